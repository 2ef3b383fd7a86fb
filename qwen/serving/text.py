"""Incremental detokenization with stop strings: text is released only when it is whole UTF-8
and cannot be the start of a stop string, and nothing from a stop string on is ever released."""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, token_bytes, stop: list[str] = ()):
        self.token_bytes = token_bytes  # token id -> its bytes
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.released = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The newly releasable text after `token_id`."""
        self.text += self.decoder.decode(self.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """What is left once no token follows (an incomplete character becomes U+FFFD)."""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, self.released) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) - (0 if final else self._held_back())
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        tail = self.text[self.released :]
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best
