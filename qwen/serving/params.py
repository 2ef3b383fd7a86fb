"""What a request asks for: its prompt and sampling parameters, checked once at admission."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real


class RequestError(ValueError):
    """A request the engine cannot take; `param` names the offending field (for API error bodies)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineBusy(RuntimeError):
    """The waiting queue is full (an HTTP front end answers 429)."""


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """Per-request sampling. `temperature == 0` or `do_sample=False` means greedy.

    Penalties follow their usual definitions: `repetition_penalty` divides positive (multiplies
    negative) logits of tokens already in the prompt or output (as transformers); `presence_penalty`
    and `frequency_penalty` subtract from the logits of tokens already generated (as OpenAI)."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    do_sample: bool = True
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings never emitted; matched across tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end the reply; not part of its text
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring)
    mask_token_ids_from: int | None = None  # ids >= this are never sampled (the embedding's padding)
    # Callables (generated_ids: list[int], logits: fp32 tensor [vocab]) -> None that edit the
    # logits in place before sampling (constrained decoding, tests that force tokens).
    logits_processors: list = field(default_factory=list)
    # The request's response_format (json_object / json_schema) that the logits processors enforce:
    # an upstream engine, which cannot run them, forwards it instead.
    response_format: dict | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def check(self) -> SamplingParams:
        """Raise a RequestError naming the first unusable field; returns self."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}", "max_tokens")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}", "top_k")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise RequestError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}", "repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}", name)
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop must be a non-empty string or a list of them", "stop")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise RequestError("stop_token_ids must be token ids (integers >= 0)", "stop_token_ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"top_logprobs must be an integer in [0, 20], got {self.logprobs!r}", "top_logprobs")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= 20):
            raise RequestError(f"prompt logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}", "logprobs")
        return self


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Output:
    """One step of a request's stream: the new token ids and the text they complete (never a
    broken UTF-8 character, never part of a stop string). The last one has `finish_reason`
    ("stop" or "length", or "cancelled") and the token counts."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output; None for the first token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
