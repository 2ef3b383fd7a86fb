"""Tokens as text for logprobs: OpenAI's chat `logprobs.content` and the completions `logprobs`
block (tokens, text offsets, top alternatives)."""

from __future__ import annotations

import codecs
import math

# ============================================================================= tokens as text


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class TokenText:
    """Token ids as OpenAI's logprob strings and bytes; with `as_ids`, strings are "token_id:<id>"
    (vLLM's `return_tokens_as_token_ids`, exact where bytes of a split character are not)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        encoding = getattr(tokenizer, "tokenizer", None)
        self._bytes = getattr(encoding, "decode_single_token_bytes", None)

    def bytes(self, token_id: int) -> bytes:
        if self._bytes is not None:
            try:
                return self._bytes(token_id)
            except Exception:  # noqa: BLE001
                pass
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def string(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        data = self.bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def chat_logprobs(token_text: TokenText, logprobs) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id, logprob):
        data = token_text.bytes(token_id)
        return {"token": token_text.string(token_id), "logprob": _finite(logprob), "bytes": list(data)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top]}
                        for lp in logprobs], "refusal": None}


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built incrementally (text offsets run on)."""

    def __init__(self, token_text: TokenText, start_offset: int):
        self.token_text = token_text
        self.offset = start_offset
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def block(self, logprobs) -> dict:
        return self._block([lp.token_id for lp in logprobs or []], logprobs or [])

    def prompt_block(self, prompt_ids: list[int], logprobs) -> dict:
        """The echoed prompt's entries: the first token has no logprob (null), as in OpenAI's API."""
        return self._block(prompt_ids, logprobs)

    def _block(self, token_ids, logprobs) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in zip(token_ids, logprobs):
            out["tokens"].append(self.token_text.string(token))
            out["token_logprobs"].append(None if lp is None else _finite(lp.logprob))
            out["top_logprobs"].append(None if lp is None else {self.token_text.string(t): _finite(p) for t, p in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(self.token_text.bytes(token)))
        return out


def merge_completion_logprobs(blocks: list[dict]) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for block in blocks:
        for key in out:
            out[key].extend(block[key])
    return out
