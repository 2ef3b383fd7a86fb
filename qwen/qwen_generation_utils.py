"""Chat formats, stop words, response decoding and the chat turn itself (model.chat() and
model.chat_stream() delegate here) for Qwen v1.

This file is also copied into saved checkpoints as remote code, so it imports
only the standard library, torch and transformers.

The token layout must match the original exactly: prompts are encoded piece by
piece (role, "\\n", content, each on its own), which can differ from encoding the
whole rendered string, and user text is encoded with ``allowed_special=set()``
so that "<|im_end|>" typed by a user stays plain text.
"""

import copy
import os
import threading
from collections.abc import Iterator
from numbers import Integral, Real

import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144
CHAT_FORMATS = ("chatml", "raw")


def _unknown_format(chat_format):
    return NotImplementedError(f"Unknown chat format {chat_format!r}; expected one of {CHAT_FORMATS}")


# ---------------------------------------------------------------------------
# Prompt construction
# ---------------------------------------------------------------------------


def chatml_turn(tokenizer, role, content, close=True):
    """One chatml turn as ``(text, ids)``: ``<|im_start|>{role}\\n{content}<|im_end|>``.

    Shared by ``make_context`` and ``QWenTokenizer.apply_chat_template`` so both
    produce identical ids. ``close=False`` leaves the turn open (no ``<|im_end|>``),
    for continuing a final message.
    """
    ids = (
        [tokenizer.im_start_id]
        + tokenizer.encode(role, allowed_special=set())
        + tokenizer.encode("\n")
        + tokenizer.encode(content, allowed_special=set())
    )
    text = f"{IM_START}{role}\n{content}"
    if close:
        ids.append(tokenizer.im_end_id)
        text += IM_END
    return text, ids


def chatml_generation_prompt(tokenizer):
    """``\\n<|im_start|>assistant\\n`` as ``(text, ids)``, the cue for the model's reply."""
    nl = tokenizer.encode("\n")
    return f"\n{IM_START}assistant\n", nl + [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl


def _check_query(query):
    if not isinstance(query, str):
        raise TypeError(f"query must be a non-empty string, got {type(query).__name__}")
    if not query:
        raise ValueError("query must be a non-empty string")


def check_history(history):
    """Return history as a list of (query, response) string pairs, or raise naming the bad entry."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair, got {entry!r}")
        if not all(isinstance(part, str) for part in entry):
            raise TypeError(f"history[{i}] must hold two strings, got {entry!r}")
    return list(history)


def make_context(tokenizer, query, history=None, system="", max_window_size=DEFAULT_MAX_WINDOW_SIZE, chat_format="chatml"):
    """Build the prompt for ``query``: returns ``(raw_text, context_tokens)``.

    chatml: system turn, then as many past turns as fit, then the query and the
    assistant cue. Past turns are kept newest-first while
    ``len(system) + len(turn) + len(kept) < max_window_size`` and dropped from the
    first one that does not fit; the query itself is not counted (as in the original).
    raw: the query alone, encoded with the defaults (special-token text becomes
    control ids); history and system are ignored.
    """
    _check_query(query)
    history = check_history(history)
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise _unknown_format(chat_format)
    if not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")

    nl_tokens = tokenizer.encode("\n")
    system_text, system_tokens = chatml_turn(tokenizer, "system", system)

    kept_text, kept_tokens = "", []
    for turn_query, turn_response in reversed(history):
        query_text, query_tokens = chatml_turn(tokenizer, "user", turn_query)
        response_text, response_tokens = chatml_turn(tokenizer, "assistant", turn_response)
        turn_tokens = nl_tokens + query_tokens + nl_tokens + response_tokens
        if len(system_tokens) + len(turn_tokens) + len(kept_tokens) >= max_window_size:
            break
        kept_tokens = turn_tokens + kept_tokens
        kept_text = f"\n{query_text}\n{response_text}" + kept_text

    query_text, query_tokens = chatml_turn(tokenizer, "user", query)
    prompt_text, prompt_tokens = chatml_generation_prompt(tokenizer)
    raw_text = system_text + kept_text + "\n" + query_text + prompt_text
    context_tokens = system_tokens + kept_tokens + nl_tokens + query_tokens + prompt_tokens
    return raw_text, context_tokens


def get_stop_words_ids(chat_format, tokenizer):
    """Token sequences that end a reply in ``chat_format``."""
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    raise _unknown_format(chat_format)


# ---------------------------------------------------------------------------
# Checkpoint paths
# ---------------------------------------------------------------------------


def _looks_like_local_path(path):
    """Absolute, ./ or ../ relative, ~, existing, or with more than one '/': not a hub repo id."""
    return (
        os.path.isabs(path)
        or path in (".", "..")
        or path.startswith(("./", "../", "~"))
        or os.path.exists(path)
        or path.count("/") > 1
    )


def check_local_checkpoint(path, needed_file, subfolder=None):
    """Clear errors for a local checkpoint path that cannot work, before transformers takes it for a
    hub repo id ("Repo id must be in the form ...") or fails on what it finds there. Hub ids such as
    "Qwen/Qwen-7B-Chat" that are not local paths are left alone."""
    path = os.fspath(path)
    if not _looks_like_local_path(path):
        return
    directory = os.path.expanduser(path)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"no such directory: {path!r} (expected a checkpoint directory containing {needed_file})")
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"{path!r} is a file; expected a checkpoint directory containing {needed_file} "
            f"(such as {os.path.dirname(os.path.abspath(directory))!r})"
        )
    directory = os.path.join(directory, subfolder) if subfolder else directory
    if not os.path.isfile(os.path.join(directory, needed_file)):
        empty = " (the directory is empty)" if os.path.isdir(directory) and not os.listdir(directory) else ""
        raise FileNotFoundError(f"no {needed_file} in {directory!r}{empty}: not a Qwen checkpoint directory")


# ---------------------------------------------------------------------------
# Response decoding
# ---------------------------------------------------------------------------


def _finish(text, end_reason, verbose, return_end_reason):
    if verbose:
        print("\nEnd Reason:", end_reason)
        print("\nGenerate: ", text)
    return (text, end_reason) if return_end_reason else text


def _decode_chatml(tokens, tokenizer, raw_text_len, context_length, verbose, return_end_reason, errors):
    end_ids = {tokenizer.im_start_id, tokenizer.im_end_id}
    stop_at = next((i for i in range(context_length, len(tokens)) if tokens[i] in end_ids), None)
    if stop_at is None:
        end_reason = f"Gen length {len(tokens)}"
        # Faithful quirk: the original's search loop leaves its index on the last
        # token, so without an end marker the last generated token is dropped.
        stop_at = max(context_length, len(tokens) - 1)
    else:
        end_reason = f"Gen {tokenizer.decode([tokens[stop_at]])!r}"
    text = tokenizer.decode(tokens[:stop_at], errors=errors)[raw_text_len:]
    if verbose:
        print("\nRaw Generate w/o EOD:", tokenizer.decode(tokens, errors=errors)[raw_text_len:])
        print("\nRaw Generate:", text)
    return _finish(text.strip(), end_reason, verbose, return_end_reason)


def _decode_raw(tokens, tokenizer, raw_text_len, verbose, return_end_reason, errors):
    text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
    if verbose:
        print("\nRaw Generate: ", text)
    # "<|endoftext|>" is deleted wherever it occurs; "Human:" is kept.
    text = text.replace(ENDOFTEXT, "").strip()
    return _finish(text, f"Gen length {len(tokens)}", verbose, return_end_reason)


def decode_tokens(
    tokens,
    tokenizer,
    raw_text_len,
    context_length,
    chat_format,
    verbose=False,
    return_end_reason=False,
    errors="replace",
):
    """Decode the reply in ``tokens`` (prompt + generation).

    ``raw_text_len`` is the prompt's character length before NFC (so non-NFC
    prompts shift the slice, as in the original); ``context_length`` is the
    prompt's token count.
    """
    if torch.is_tensor(tokens):
        tokens = tokens.cpu().tolist()
    if chat_format == "chatml":
        return _decode_chatml(tokens, tokenizer, raw_text_len, context_length, verbose, return_end_reason, errors)
    if chat_format == "raw":
        return _decode_raw(tokens, tokenizer, raw_text_len, verbose, return_end_reason, errors)
    raise _unknown_format(chat_format)


# ---------------------------------------------------------------------------
# Generation helpers
# ---------------------------------------------------------------------------


def _is_int(value):
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_generation_config(config):
    """Raise a ValueError naming the first generation option that cannot work (transformers only
    warns about some, or fails deep inside a logits processor)."""
    if not hasattr(config, "to_diff_dict"):
        raise TypeError(
            f"generation_config must be a transformers GenerationConfig, not {type(config).__name__} "
            "(use GenerationConfig(**options), or pass the options as keyword arguments)"
        )
    for name in ("max_new_tokens", "max_length"):
        value = getattr(config, name, None)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    top_k = getattr(config, "top_k", None)
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    top_p = getattr(config, "top_p", None)
    if top_p is not None and not (isinstance(top_p, Real) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    temperature = getattr(config, "temperature", None)
    if temperature is not None and not (isinstance(temperature, Real) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if getattr(config, "do_sample", False) and temperature is not None and temperature == 0:
        raise ValueError("temperature must be > 0 when sampling (for greedy decoding set do_sample=False)")
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is not None and not (isinstance(penalty, Real) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a number > 0, got {penalty!r}")


def check_context_fits(prompt_length, config, context_length):
    """Raise a ValueError, before any compute, when the prompt plus the tokens to generate cannot
    fit in `context_length` (the model config's max_position_embeddings)."""
    new_tokens = getattr(config, "max_new_tokens", None)
    if prompt_length >= context_length:
        raise ValueError(
            f"the prompt has {prompt_length} tokens, more than the model's context of {context_length} "
            "tokens allows (max_position_embeddings); shorten it"
        )
    if new_tokens is not None and prompt_length + new_tokens > context_length:
        raise ValueError(
            f"the prompt ({prompt_length} tokens) plus max_new_tokens ({new_tokens}) exceeds the model's context "
            f"of {context_length} tokens (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )
    max_length = getattr(config, "max_length", None)
    if new_tokens is None and max_length is not None and max_length > context_length:
        raise ValueError(f"max_length ({max_length}) exceeds the model's context of {context_length} tokens")


class StopWordsLogitsProcessor(LogitsProcessor):
    """Push ``eos_token_id`` to the top once a sample's ids end with a stop sequence.

    Nothing else is masked: in chat the model emits ``<|im_end|>``, this sets the
    eos logit to 32768, and HF's own eos handling then ends that sample.
    """

    BOOST = float(2**15)

    def __init__(self, stop_words_ids, eos_token_id):
        if not isinstance(stop_words_ids, list) or not stop_words_ids:
            raise ValueError(f"`stop_words_ids` has to be a non-empty list, but is {stop_words_ids!r}.")
        for seq in stop_words_ids:
            if not isinstance(seq, list):
                raise ValueError(f"`stop_words_ids` has to be a list of lists, but is {stop_words_ids!r}.")
            if not seq:
                raise ValueError(f"`stop_words_ids` cannot contain an empty list: {stop_words_ids!r}.")
            if any(not isinstance(t, Integral) or isinstance(t, bool) or t < 0 for t in seq):
                raise ValueError(
                    f"Each list in `stop_words_ids` has to be a list of non-negative integers, but is {stop_words_ids!r}."
                )
        # [eos] alone needs no boost: HF already stops on it.
        self.stop_words_ids = [[int(t) for t in seq] for seq in stop_words_ids if list(seq) != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def _stopped(self, input_ids):
        """Bool per sample: do its ids (prompt included) end with any stop sequence?"""
        stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for seq in self.stop_words_ids:
            if len(seq) > input_ids.shape[1]:
                continue
            target = torch.tensor(seq, dtype=input_ids.dtype, device=input_ids.device)
            stopped |= (input_ids[:, -len(seq) :] == target).all(dim=1)
        return stopped

    def __call__(self, input_ids, scores):
        stopped = self._stopped(input_ids)
        if stopped.any():
            scores[stopped, self.eos_token_id] = self.BOOST
        return scores


def pad_batch(batch, pad_id, seq_length):
    """Right-pad each token list in ``batch`` in place to ``seq_length``."""
    for tokens in batch:
        if len(tokens) < seq_length:
            tokens.extend([pad_id] * (seq_length - len(tokens)))
    return batch


def get_ltor_masks_and_position_ids(data, eod_token, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron-style left-to-right masks for a [batch, seq] tensor of ids.

    Returns ``(attention_mask, loss_mask, position_ids)``; attention_mask is True
    where attention is *blocked*. The reset options restart positions / block
    attention across ``eod_token`` document boundaries.
    """
    batch, seq_length = data.size()
    mask_batch = batch if reset_attention_mask else 1
    attention_mask = torch.tril(torch.ones((mask_batch, seq_length, seq_length), device=data.device))
    attention_mask = attention_mask.view(mask_batch, 1, seq_length, seq_length)
    loss_mask = torch.ones(data.size(), dtype=torch.float, device=data.device)
    if eod_mask_loss:
        loss_mask[data == eod_token] = 0.0
    position_ids = torch.arange(seq_length, dtype=torch.long, device=data.device).unsqueeze(0).expand_as(data)
    if reset_position_ids:
        position_ids = position_ids.clone()
    if reset_position_ids or reset_attention_mask:
        for b in range(batch):
            eod_index = (data[b] == eod_token).nonzero(as_tuple=True)[0].tolist()
            prev_index = 0
            for i in eod_index:
                if reset_attention_mask:
                    attention_mask[b, 0, i + 1 :, : i + 1] = 0
                if reset_position_ids:
                    position_ids[b, i + 1 :] -= i + 1 - prev_index
                    prev_index = i + 1
    return attention_mask < 0.5, loss_mask, position_ids


def get_batch(context_tokens, eod_id):
    """``(tokens, attention_mask, position_ids)`` for plain causal generation."""
    tokens = context_tokens.contiguous()
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod_id, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False
    )
    return tokens, attention_mask, position_ids


def top_k_logits(logits, top_k=0, top_p=0.0, filter_value=-float("Inf")):
    """Filter [batch, vocab] ``logits`` in place to the top-k and/or nucleus (top-p) set."""
    if top_k > 0:
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = filter_value
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        # Shift right so the token that crosses top_p is kept; always keep the best one.
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.scatter_(-1, sorted_indices, sorted_logits.masked_fill(remove, filter_value))
    return logits


def switch(val1, val2, boolean):
    """Elementwise ``val2 if boolean else val1``."""
    boolean = boolean.type_as(val1)
    return (1 - boolean) * val1 + boolean * val2


# ---------------------------------------------------------------------------
# Chat turns: model.chat() and model.chat_stream() delegate here
# ---------------------------------------------------------------------------


def partial_reply(tokenizer, tokens: list[int]) -> str:
    """The text chat_stream shows for the tokens generated so far: up to the first chatml end
    marker, and without the newest token until a marker follows it. When generation ends at
    max_new_tokens, decode_tokens (so chat(), and chat_stream's final value) drops that token;
    holding it back keeps every value chat_stream yields a prefix of the next."""
    stop_ids = (tokenizer.im_start_id, tokenizer.im_end_id)
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), max(len(tokens) - 1, 0))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True, errors="ignore").strip()


class _StopWhenSet(StoppingCriteria):
    """Ends generation for every sequence once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _MaskUndecodableIds(LogitsProcessor):
    """The embedding is padded past the tokenizer (151936 vs 151851 ids); a trained model never
    picks those ids, but a random one can, and chat() could not decode them: mask them out."""

    def __init__(self, vocab_len: int):
        self.vocab_len = vocab_len

    def __call__(self, input_ids, scores):
        scores[:, self.vocab_len :] = -float("inf")
        return scores


class _TokenQueue(BaseStreamer):
    """Collects generated token ids from `generate` running in another thread."""

    def __init__(self):
        self.tokens: list[int] = []
        self.event = threading.Condition()
        self.done = False
        self.skipped_prompt = False

    def put(self, value):
        if not self.skipped_prompt:  # the first call carries the prompt
            self.skipped_prompt = True
            return
        with self.event:
            self.tokens.extend(value.reshape(-1).tolist())
            self.event.notify()

    def end(self):
        with self.event:
            self.done = True
            self.event.notify()


def apply_generation_options(config: GenerationConfig, options: dict) -> dict:
    """Set the options that are generation-config fields (as GenerationConfig.update does) and
    check the result with our clear errors first; returns the other options."""
    rest = {}
    for key, value in options.items():
        if hasattr(config, key):
            setattr(config, key, value)
        else:
            rest[key] = value
    check_generation_config(config)
    return rest


def _chat_inputs(model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
    generation_config = generation_config if generation_config is not None else model.generation_config
    check_generation_config(generation_config)
    chat_format = getattr(generation_config, "chat_format", None)
    if chat_format != "chatml":
        raise ValueError(
            f"chat() needs a chat model: generation_config.chat_format is {chat_format!r}, expected 'chatml' "
            "(this looks like a base model; use generate() instead)"
        )
    max_window_size = kwargs.get("max_window_size") or getattr(generation_config, "max_window_size", None)
    if max_window_size is None:
        raise ValueError("chat() needs max_window_size (in generation_config.json or as a keyword argument)")
    _, context_tokens = make_context(
        tokenizer, query, history=history, system=system, max_window_size=max_window_size, chat_format=chat_format
    )
    stop_words_ids = list(stop_words_ids or []) + get_stop_words_ids(chat_format, tokenizer)
    # Fail before any compute when the reply cannot fit (keyword options win over the config).
    limits = copy.deepcopy(generation_config)
    apply_generation_options(limits, {k: v for k, v in kwargs.items() if hasattr(limits, k)})
    check_context_fits(len(context_tokens), limits, model.config.max_position_embeddings)
    input_ids = torch.tensor([context_tokens], device=model.device)
    return context_tokens, input_ids, stop_words_ids, generation_config


def _decode_reply(tokenizer, output_ids, context_length, chat_format) -> str:
    """The reply as chat() returns it, decoded from the generated tokens only: the original
    cut the decoded prompt + reply at the prompt's character count, which loses the reply's
    first characters when the prompt is not NFC-normalised (tokenising normalises it)."""
    return decode_tokens(output_ids[context_length:], tokenizer, 0, 0, chat_format=chat_format, errors="replace")


def _chat_processors(model, tokenizer, logits_processor):
    """The caller's processors (copied), plus a mask of the ids chat() could not decode."""
    processors = LogitsProcessorList(logits_processor or [])
    if model.config.vocab_size > len(tokenizer):
        processors.append(_MaskUndecodableIds(len(tokenizer)))
    return processors


def chat(
    model,
    tokenizer,
    query: str,
    history=None,
    system: str = DEFAULT_SYSTEM,
    stream=None,
    stop_words_ids=None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
):
    """One chat turn: returns (response, history + [(query, response)]); the caller's history is not changed."""
    if stream is not None:
        raise ValueError("chat() does not stream; use chat_stream()")
    history = copy.deepcopy(check_history(history))
    context_tokens, input_ids, stop_words_ids, generation_config = _chat_inputs(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    logits_processor = _chat_processors(model, tokenizer, kwargs.pop("logits_processor", None))
    outputs = model.generate(
        input_ids,
        stop_words_ids=stop_words_ids,
        generation_config=generation_config,
        logits_processor=logits_processor,
        **kwargs,
    )
    response = _decode_reply(tokenizer, outputs[0], len(context_tokens), generation_config.chat_format)
    history.append((query, response))
    return response, history


def chat_stream(
    model,
    tokenizer,
    query: str,
    history=None,
    system: str = DEFAULT_SYSTEM,
    stop_words_ids=None,
    logits_processor=None,
    generation_config: GenerationConfig | None = None,
    **kwargs,
) -> Iterator[str]:
    """Yield the cumulative response text as tokens arrive; the last value equals what chat()
    returns for the same (greedy) generation. History is neither copied nor updated."""
    context_tokens, input_ids, stop_words_ids, generation_config = _chat_inputs(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    logits_processor = _chat_processors(model, tokenizer, logits_processor)
    queue = _TokenQueue()
    result, failure = {}, []
    # A consumer that stops iterating (break, close, Ctrl-C) also stops generation.
    cancelled = threading.Event()
    stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    stopping.append(_StopWhenSet(cancelled))

    def run():
        try:
            result["ids"] = model.generate(
                input_ids,
                stop_words_ids=stop_words_ids,
                generation_config=generation_config,
                logits_processor=logits_processor,
                stopping_criteria=stopping,
                streamer=queue,
                **kwargs,
            )
        except BaseException as exc:  # surfaced in the consumer thread
            failure.append(exc)
            queue.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    seen, last = 0, None
    try:
        while True:
            with queue.event:
                while len(queue.tokens) == seen and not queue.done:
                    queue.event.wait()
                tokens, done = list(queue.tokens), queue.done
            seen = len(tokens)
            text = partial_reply(tokenizer, tokens)
            if text and text != last and not done:
                last = text
                yield text
            if done:
                break
    finally:
        cancelled.set()
        worker.join()
    if failure:
        raise failure[0]
    final = _decode_reply(tokenizer, result["ids"][0], len(context_tokens), generation_config.chat_format)
    if final != last:
        yield final
