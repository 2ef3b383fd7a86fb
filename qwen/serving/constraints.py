"""Constrained decoding for OpenAI's `response_format`: replies that always parse as JSON and, with a
schema, validate against it. Built on llguidance (`pip install qwen[structured]`).

    proc = response_format_processor(tokenizer, {"type": "json_object"}, stop_token_ids=[151645, 151644])
    params = SamplingParams(stop_token_ids=[151645, 151644], logits_processors=[proc] if proc else [])

A processor belongs to one request (one choice): it follows that request's generated tokens with a
grammar matcher and, before each sampling step, sets the logit of every token the grammar does not
allow to -inf. Once the JSON is complete only the stop tokens remain, so the engine ends the reply
with finish_reason "stop"; a reply cut short by max_new_tokens ends with "length" and is a prefix.

The grammar's view of the vocabulary (every token's bytes, ~1 s for Qwen's 151,851 tokens) is built
once per tokenizer, on first use (or `prepare(tokenizer)` at start-up); compiled schemas are kept in
a small LRU cache per tokenizer, and each request gets a cheap copy of the compiled matcher.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .params import RequestError

PARAM = "response_format"

# Whitespace the JSON grammar allows between tokens: a few spaces or tabs, or one line break and an
# indent. Enough for compact, `json.dumps` and pretty-printed output (indent up to 32), but never an
# endless run of blanks, which an unsure model would otherwise happily produce.
WHITESPACE = r"(?:[\x20\x09]{1,4}|\x0D?\x0A[\x20\x09]{0,32})"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ANY_OBJECT = {"type": "object"}


def _llguidance():
    try:
        import llguidance
        import llguidance.tiktoken
    except ImportError as exc:  # an optional extra
        raise RequestError(
            "response_format 'json_object' and 'json_schema' need the optional llguidance package on the server "
            "(pip install 'qwen[structured]')",
            PARAM,
        ) from exc
    return llguidance


class Grammars:
    """One tokenizer's grammar vocabulary and its compiled schemas (thread-safe)."""

    def __init__(self, tokenizer, max_schemas: int = 64):
        self._encoding = tokenizer.tokenizer  # tiktoken.Encoding: byte-level BPE plus special tokens
        self.vocab_size = self._encoding.n_vocab  # decodable ids; any id beyond is never allowed
        specials = [self._encoding.encode_single_token(t) for t in self._encoding.special_tokens_set]
        self.special_start = min(specials, default=self.vocab_size)
        self.max_schemas = max_schemas
        self._lltokenizer = None
        self._lock = threading.Lock()  # guards the lazy build and the cache
        self._compiled: OrderedDict[str, object] = OrderedDict()  # key -> pristine LLMatcher, LRU order

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltokenizer is None:
                llg = _llguidance()
                # eos_token is the one the matcher marks as allowed once the JSON is complete; the
                # processor replaces it by the request's own stop tokens.
                self._lltokenizer = llg.tiktoken.lltokenizer_from_encoding(
                    self._encoding, eos_token=self.special_start
                )
            return self._lltokenizer

    def matcher(self, schema: dict, lenient: bool):
        """A fresh matcher for `schema`; RequestError when the schema cannot be compiled."""
        key = json.dumps([schema, lenient], sort_keys=True, separators=(",", ":"))
        lltokenizer = self.lltokenizer
        with self._lock:
            pristine = self._compiled.get(key)
            if pristine is not None:
                self._compiled.move_to_end(key)
                return pristine.deep_copy()
        llg = _llguidance()
        options = {"whitespace_pattern": WHITESPACE, "lenient": lenient}
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"invalid JSON schema in response_format: {exc}", PARAM) from exc
        pristine = llg.LLMatcher(lltokenizer, grammar, log_level=0)  # compiles; releases the GIL meanwhile
        if pristine.is_error():
            raise RequestError(f"invalid JSON schema in response_format: {_first_line(pristine.get_error())}", PARAM)
        with self._lock:
            self._compiled[key] = pristine
            self._compiled.move_to_end(key)
            while len(self._compiled) > self.max_schemas:
                self._compiled.popitem(last=False)
            return pristine.deep_copy()


def _first_line(message: str) -> str:
    return message.strip().split("\n<state>")[0].strip()


_grammars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_grammars_lock = threading.Lock()


def grammars(tokenizer) -> Grammars:
    """The shared `Grammars` of `tokenizer` (a QWenTokenizer), created on first use."""
    with _grammars_lock:
        found = _grammars.get(tokenizer)
        if found is None:
            found = _grammars[tokenizer] = Grammars(tokenizer)
        return found


def prepare(tokenizer) -> None:
    """Build the grammar vocabulary now (about a second) rather than in the first JSON request."""
    grammars(tokenizer).lltokenizer


class JsonProcessor:
    """A logits processor that keeps one reply inside a JSON grammar (see the module docstring).

    `error` is None while the reply follows the grammar; if a token the grammar rejects ever reaches
    it (another processor forced one, say), it records why and allows only the stop tokens, so the
    request ends at once instead of failing the engine's whole batch."""

    def __init__(self, matcher, grammars: Grammars, stop_token_ids):
        self._start = matcher  # kept untouched, to start over from
        self._matcher = matcher.deep_copy()
        self._stop = sorted({int(t) for t in stop_token_ids})
        self._vocab = grammars.vocab_size
        self._eos = grammars.special_start
        self._consumed: list[int] = []
        self._words = np.zeros((self._vocab + 31) // 32, dtype=np.int32)  # llguidance's bitmask
        self.error: str | None = None

    @property
    def done(self) -> bool:
        """Whether the tokens so far form a complete JSON value of the schema."""
        return self.error is None and self._matcher.is_accepting()

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> None:
        self._follow(generated_ids)
        allowed = self._allowed()
        n = min(len(allowed), logits.shape[-1])
        bias = torch.from_numpy(allowed[:n]).to(logits.device).float()
        logits[:n] += bias.reciprocal_().neg_().add_(1)  # 1 -> 0, 0 -> -inf (faster than masked_fill)
        logits[n:] = float("-inf")  # the embedding's padding rows

    def _follow(self, generated_ids: list[int]) -> None:
        """Feed the matcher the tokens it has not seen (replaying from scratch if the history changed)."""
        seen = len(self._consumed)
        if generated_ids[:seen] != self._consumed:
            self._matcher = self._start.deep_copy()  # (an errored matcher cannot be reset)
            self._consumed, seen = [], 0
            self.error = None
        for token in generated_ids[seen:]:
            self._consumed.append(token)
            if self.error is None and not self._matcher.consume_token(token):
                self.error = _first_line(self._matcher.get_error()) or f"token {token} is not allowed here"

    def _allowed(self) -> np.ndarray:
        """0/1 per token id below the vocabulary size."""
        allowed = np.zeros(self._vocab, dtype=np.uint8)
        if self.error is None:
            words = self._words
            self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            allowed[:] = np.unpackbits(words.view(np.uint8), bitorder="little")[: self._vocab]
            allowed[self._eos] = 0
            if self._matcher.is_error():
                self.error = _first_line(self._matcher.get_error())
                allowed[:] = 0
            elif not allowed.any() and not self._matcher.is_accepting():
                self.error = "the grammar allows no further token"
        if self.error is not None or self._matcher.is_accepting():
            for token in self._stop:
                if token < self._vocab:
                    allowed[token] = 1
        return allowed


def json_processor(tokenizer, schema: dict | None, stop_token_ids, *, strict: bool = True) -> JsonProcessor:
    """A fresh processor for one reply that is a JSON value of `schema` (None: any JSON object).

    `stop_token_ids` are the tokens that end the reply (the request's SamplingParams.stop_token_ids);
    they are allowed once the JSON is complete, and then nothing else is. With `strict` False, schema
    keywords the grammar cannot enforce (uniqueItems, ...) are ignored instead of refused."""
    stop_token_ids = list(stop_token_ids or [])
    if not stop_token_ids:
        raise ValueError("json_processor needs the request's stop token ids (e.g. <|im_end|>)")
    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, (dict, bool)):
        raise RequestError(f"the JSON schema must be an object, got {type(schema).__name__}", PARAM)
    cache = grammars(tokenizer)
    return JsonProcessor(cache.matcher(schema, lenient=not strict), cache, stop_token_ids)


def response_format_processor(tokenizer, response_format, stop_token_ids) -> JsonProcessor | None:
    """The processor for an OpenAI `response_format` (a dict; None or type "text": no constraint).

        {"type": "json_object"}
        {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}, "strict": true}}

    A json_schema without "schema" means any JSON object. Raises RequestError(param="response_format")
    for a malformed value or a schema that cannot be compiled."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object", PARAM)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_processor(tokenizer, ANY_OBJECT, stop_token_ids)
    if kind != "json_schema":
        raise RequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", PARAM
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("response_format of type 'json_schema' needs a 'json_schema' object", PARAM)
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(
            "response_format.json_schema.name must be 1 to 64 letters, digits, underscores or dashes", PARAM
        )
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise RequestError("response_format.json_schema.description must be a string", PARAM)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError("response_format.json_schema.strict must be a boolean", PARAM)
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise RequestError("response_format.json_schema.schema must be a JSON Schema object", PARAM)
    return json_processor(tokenizer, schema, stop_token_ids, strict=bool(strict))
