"""Per-request next-token choice from one row of logits: penalties, temperature, top-k, top-p,
and a private generator per request, so a seeded request samples the same tokens whatever runs
beside it in the batch."""

from __future__ import annotations

from collections import Counter

import torch

from .params import SamplingParams, TokenLogprob


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: list[int], generated: Counter) -> None:
    """In place. repetition_penalty over prompt + output (transformers' rule); presence and
    frequency penalties over the output (OpenAI's rule)."""
    if params.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)), device=logits.device)
        picked = logits[ids]
        logits[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        ids = torch.tensor(list(generated), device=logits.device)
        counts = torch.tensor(list(generated.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from fp32 logits [V] (already penalised)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_of(raw_logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's log-probability of `token` (before penalties and temperature) and the top ones."""
    logprobs = raw_logits.log_softmax(-1)
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)
