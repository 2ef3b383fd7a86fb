"""One chat turn as an engine request, for the front ends that hold a conversation (web, terminal).

    request = chat_request(engine, "Hello", history=[("Hi", "Hello! How can I help?")])
    for out in engine.submit(request.prompt_ids, request.params):
        print(out.text, end="")

The prompt is `make_context`'s chatml, token for token (the format the chat models were tuned on),
so a turn's prompt extends the previous turn's prompt and reply, and the engine reuses that KV
(prefix reuse) instead of prefilling the whole conversation again. The sampling parameters carry
the chat stop tokens and, for whatever the caller leaves out, the checkpoint's generation_config
(top_p, top_k, temperature, repetition_penalty, max_new_tokens), as the original `model.chat` did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..qwen_generation_utils import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM, chatml_turn, make_context
from .params import RequestError, SamplingParams

GREEDY_BELOW = 0.01  # a temperature under this means greedy decoding (the original API's rule)


@dataclass
class ChatDefaults:
    """The checkpoint's generation settings (generation_config.json), with transformers' defaults
    for what it does not set."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    max_new_tokens: int = 512
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE
    chat_format: str = "chatml"

    @classmethod
    def of(cls, engine) -> ChatDefaults:
        """Read from `engine.model.generation_config` (an Engine or an UpstreamEngine)."""
        return cls.from_config(getattr(getattr(engine, "model", None), "generation_config", None))

    @classmethod
    def from_config(cls, config) -> ChatDefaults:
        """Read from a GenerationConfig (or anything with its attributes; None: the defaults). A
        setting it lacks, or holds as None, keeps the default. The terminal chat builds every
        turn's defaults this way from its own `:conf`-edited copy of the checkpoint's config."""
        defaults = cls()
        if config is None:
            return defaults

        def number(name):
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            return getattr(defaults, name)

        defaults.temperature = float(number("temperature"))
        defaults.top_p = float(number("top_p"))
        defaults.top_k = max(int(number("top_k")), 0)
        defaults.repetition_penalty = float(number("repetition_penalty"))
        defaults.max_new_tokens = int(number("max_new_tokens")) or defaults.max_new_tokens
        defaults.max_window_size = int(number("max_window_size"))
        do_sample = getattr(config, "do_sample", True)
        defaults.do_sample = do_sample if isinstance(do_sample, bool) else True
        defaults.chat_format = getattr(config, "chat_format", None) or "chatml"
        return defaults


def stop_token_ids(tokenizer, chat_format: str = "chatml") -> list[int]:
    """Tokens that end a reply: chatml's <|im_end|> and <|im_start|>, and <|endoftext|>."""
    if chat_format == "chatml":
        return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    return [tokenizer.eod_id]


def stop_strings(chat_format: str = "chatml") -> list[str]:
    """Text that ends a reply: a raw (base) model's next "Human:" turn."""
    return ["Human:"] if chat_format == "raw" else []


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    params: SamplingParams


def chat_request(
    engine,
    query: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = DEFAULT_SYSTEM,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    defaults: ChatDefaults | None = None,
) -> ChatRequest:
    """The prompt and SamplingParams for `query` after `history` ((query, reply) pairs, oldest
    first). None means the checkpoint's setting; `temperature` < 0.01 is greedy; `seed` None or < 0
    is a random seed. Old turns are dropped, newest kept, as `make_context` does with the
    checkpoint's max_window_size, and further while the reply would not have room for
    min(max_new_tokens, half the engine's context); `max_new_tokens` is then cut to the room left.
    Raises RequestError when the query itself leaves no room for a reply (or for a bad setting)."""
    defaults = defaults or ChatDefaults.of(engine)
    tokenizer, max_context = engine.tokenizer, engine.max_context
    history = list(history)
    system = DEFAULT_SYSTEM if system is None else system
    if not isinstance(query, str) or not query:
        raise RequestError("the message is empty", "messages")
    wanted = defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {wanted!r}", "max_tokens")

    window = min(defaults.max_window_size, max_context)
    _, ids = make_context(tokenizer, query, history, system, window, defaults.chat_format)
    # Room kept for the reply: all of max_new_tokens when it is at most half the context.
    overflow = len(ids) + min(wanted, max_context // 2) - max_context
    if overflow > 0 and history and defaults.chat_format == "chatml":
        # make_context keeps the newest turns while len(system + kept turns) < window: a window of
        # (what they take now) - overflow + 1 drops the oldest ones until the reply fits, or all.
        alone = make_context(tokenizer, query, [], system, window, defaults.chat_format)[1]
        system_length = len(chatml_turn(tokenizer, "system", system)[1])
        kept_length = len(ids) - len(alone)
        window = max(system_length + kept_length - overflow + 1, 1)
        _, ids = make_context(tokenizer, query, history, system, window, defaults.chat_format)
    room = max_context - len(ids)
    if room < 1:
        raise RequestError(
            f"the message is too long: its prompt is {len(ids)} tokens, and the model's context is "
            f"{max_context} tokens; please shorten it",
            "messages",
        )

    greedy_temperature = temperature is not None and temperature < GREEDY_BELOW
    params = SamplingParams(
        max_new_tokens=min(wanted, room),
        temperature=0.0 if greedy_temperature else float(defaults.temperature if temperature is None else temperature),
        top_p=float(defaults.top_p if top_p is None else top_p),
        top_k=int(defaults.top_k if top_k is None else top_k),
        do_sample=False if greedy_temperature else (defaults.do_sample if temperature is None else True),
        repetition_penalty=float(defaults.repetition_penalty if repetition_penalty is None else repetition_penalty),
        seed=seed if seed is not None and seed >= 0 else None,
        stop=stop_strings(defaults.chat_format),
        stop_token_ids=stop_token_ids(tokenizer, defaults.chat_format),
    )
    return ChatRequest(ids, params.check())

