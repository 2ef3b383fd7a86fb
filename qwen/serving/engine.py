"""The engine every front end shares: one model, one worker thread, continuous batching.

    engine = Engine.from_pretrained("path/to/Qwen-7B-Chat")
    for out in engine.submit(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(out.text, end="")

Requests wait in a bounded queue and join the running batch between decode steps; a newcomer's
prompt is prefilled in chunks (one chunk between two decode steps), so running streams keep
flowing. Each sequence owns a KV slot (`SlotKVCache`) and its own positions and dynamic-NTK alpha,
so its tokens do not depend on its neighbours. A finished sequence's slot keeps its KV until the
slot is needed: a later prompt that extends it (the next turn of a chat) prefills only what is new.
Streams are iterated from any thread, or with `async for` when submitted from an event loop;
leaving one (break, close, cancel, a dropped client) frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import queue
import threading
import time
from collections import Counter, deque
from pathlib import Path

import torch

from ..modeling_qwen import ntk_alpha, use_cpu_kernels
from .kv import SlotKVCache
from .params import EngineBusy, Output, RequestError, SamplingParams
from .sampling import apply_penalties, choose, logprob_of
from .text import TextAssembler

_ids = itertools.count(1)


class RequestStream:
    """The outputs of one request, as they come."""

    def __init__(self, engine: Engine, prompt_tokens: int):
        self.id = next(_ids)
        self._engine = engine
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = False
        self.cancelled = False
        self.prompt_tokens = prompt_tokens
        try:
            self._loop = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None

    def _push(self, item) -> None:  # engine thread
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def _take(self, item) -> Output:
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def __iter__(self):
        if self._loop is not None:
            raise RuntimeError("this stream was submitted inside an event loop: iterate it with `async for`")
        try:
            while not self._finished:
                yield self._take(self._queue.get())
        finally:
            if not self._finished:
                self.cancel()

    async def __aiter__(self):
        if self._loop is None:
            raise RuntimeError("this stream was submitted outside an event loop: iterate it with `for`")
        try:
            while not self._finished:
                yield self._take(await self._async_queue.get())
        finally:
            if not self._finished:
                self.cancel()

    def cancel(self) -> None:
        """Stop generating; the slot is free before the engine's next step."""
        if not self.cancelled and not self._finished:
            self.cancelled = True
            self._engine._wake()

    def result(self) -> Output:
        """All outputs joined (blocking)."""
        return join_outputs(list(self))

    async def async_result(self) -> Output:
        return join_outputs([out async for out in self])

    def __del__(self):
        if not self._finished:
            self.cancelled = True


def join_outputs(outputs: list[Output]) -> Output:
    last = outputs[-1]
    logprobs = [lp for out in outputs for lp in (out.logprobs or [])]
    return Output(
        token_ids=[t for out in outputs for t in out.token_ids],
        text="".join(out.text for out in outputs),
        logprobs=logprobs if any(out.logprobs is not None for out in outputs) else None,
        prompt_logprobs=next((out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None), None),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
    )


class _Sequence:
    def __init__(self, prompt: list[int], params: SamplingParams, stream: RequestStream, alpha: float, token_bytes):
        self.prompt, self.params, self.stream, self.alpha = prompt, params, stream, alpha
        self.generated: list[int] = []
        self.counts: Counter = Counter()
        self.text = TextAssembler(token_bytes, params.stop)
        self.slot = -1
        self.prefilled = 0  # prompt tokens whose KV is in the slot
        self.cached_tokens = 0
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.submitted = time.perf_counter()
        self.last_token_time: float | None = None

    @property
    def kv_length(self) -> int:
        """Tokens with KV in the slot once prefill is done: the prompt and all but the newest output."""
        return len(self.prompt) + max(len(self.generated) - 1, 0)


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker pool (GNU OpenMP, as torch's Linux wheels bundle;
    other threads' pools are untouched). libgomp keeps a pool per thread that ran parallel work,
    and once their threads outnumber the cores it throttles their wait-spinning: a thread whose
    steps are CPU kernels in quick succession then runs them much slower while another thread holds
    a pool (a Qwen-1.8B int4 decode step 52 instead of 38 ms on 2 cores, in the engine's thread or
    in generate() alike: bench/engine_step.py). The pool comes back by itself when the thread
    computes again. False where there is no libgomp to ask."""
    global _LIBGOMP
    if _LIBGOMP is None:
        _LIBGOMP = False
        libraries = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
        if libraries:
            try:
                _LIBGOMP = ctypes.CDLL(str(libraries[0]))  # already loaded by torch: the same runtime
                _LIBGOMP.omp_pause_resource_all.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                _LIBGOMP = False
    return bool(_LIBGOMP) and _LIBGOMP.omp_pause_resource_all(2) == 0  # omp_pause_hard


_LIBGOMP = None  # ctypes handle on torch's libgomp, False where there is none


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_running: int = 8,
        max_waiting: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = 512,
        prefix_slots: int = 4,
        model_name: str = "qwen",
        logits_processors: list | None = None,
    ):
        config = model.config
        for name, value in (("max_running", max_running), ("max_waiting", max_waiting), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        limit = config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.model = model.eval()
        use_cpu_kernels(model)  # decode steps through our CPU kernel where it runs (idempotent)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_running, self.max_waiting, self.prefill_chunk = max_running, max_waiting, prefill_chunk
        self.vocab_limit = min(config.vocab_size, len(tokenizer))
        self.logits_processors = list(logits_processors or [])  # applied to every request, before its own
        # prefix_slots > 0: finished sequences keep their KV (in any idle slot) for prompts that extend them.
        self.prefix_cache = prefix_slots > 0
        self.cache = SlotKVCache(config, max_running + prefix_slots, self.max_context, model.dtype, model.device)
        self._token_bytes = tokenizer.tokenizer.decode_single_token_bytes
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._free_slots = list(range(self.cache.slots))[::-1]  # pop() gives the lowest: rows stay contiguous
        self._idle_slots: dict[int, tuple[list[int], float]] = {}  # slot -> (tokens with KV, alpha), LRU order
        self._lock = threading.Condition()
        self._closed = False
        self.counters = Counter()  # requests_total, prompt_tokens_total, generation_tokens_total, ...
        self.observers: list = []  # callables (name, seconds) for "time_to_first_token", "inter_token_latency"
        # On the CPU only one thread's OpenMP pool should hold the cores (release_openmp_pool): the
        # thread that loaded the model lets go of its own now and a requesting thread at submit,
        # and the engine's thread lets go of its own whenever it goes idle.
        self._cpu = model.device.type == "cpu"
        if self._cpu:
            release_openmp_pool()
        self._thread = threading.Thread(target=self._loop, name="qwen-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path, cpu_only: bool = False, chat: bool = True, dtype: str | None = None,
                        quantization: str | None = None, **options) -> Engine:
        from ..loading import load_model

        model, tokenizer = load_model(path, cpu_only=cpu_only, chat=chat, dtype=dtype, quantization=quantization)
        options.setdefault("model_name", os.path.basename(os.path.normpath(str(path))) or "qwen")
        return cls(model, tokenizer, **options)

    # ------------------------------------------------------------------------- requests

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestStream:
        """Queue a request; raises RequestError (bad request) or EngineBusy (queue full)."""
        if self._cpu:
            release_openmp_pool()
        params = (params or SamplingParams()).check()
        prompt = list(prompt_ids)
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        if not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {self.model.config.vocab_size})", "prompt")
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens",
                "max_tokens" if len(prompt) < self.max_context else "messages",
            )
        if params.mask_token_ids_from is None and self.vocab_limit < self.model.config.vocab_size:
            params.mask_token_ids_from = self.vocab_limit  # the embedding's undecodable padding ids
        stream = RequestStream(self, len(prompt))
        alpha = ntk_alpha(len(prompt), self.model.config.seq_length) if self.model.config.use_dynamic_ntk else 1.0
        seq = _Sequence(prompt, params, stream, alpha, self._token_bytes)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:  # requests cancelled while waiting do not count
                self._drop_cancelled_waiting()
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"too many waiting requests ({self.max_waiting}); try again later")
            self._waiting.append(seq)
            self.counters["requests_total"] += 1
            self._lock.notify()
        return stream

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), **self.counters}

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # ------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._closed and not self._waiting and not self._running and self._cpu:
                    release_openmp_pool()  # idle: leave the cores' pool to whoever computes next
                while not self._closed and not self._waiting and not self._running:
                    self._lock.wait()
                if self._closed:
                    break
            try:
                self._step()
            except Exception as exc:  # the model failed: fail what runs, keep serving
                for seq in self._running:
                    self._release(seq, cache=False)
                    seq.stream._push(exc)
                self._running = []
        for seq in list(self._running) + list(self._waiting):
            seq.stream._push(RuntimeError("the engine was shut down"))

    @torch.inference_mode()
    def _step(self) -> None:
        for seq in [s for s in self._running if s.stream.cancelled]:
            self._finish(seq, "cancelled")
        self._drop_cancelled_waiting()
        self._admit()
        prefilling = [s for s in self._running if s.prefilled < len(s.prompt)]
        if prefilling:
            self._prefill(self._prefill_group(prefilling))
        decoding = [s for s in self._running if s.generated]
        if decoding:
            self._decode(decoding)

    def _drop_cancelled_waiting(self) -> None:
        """Requests cancelled before they got a slot end now, with a final "cancelled" output."""
        with self._lock:
            gone = [s for s in self._waiting if s.stream.cancelled]
            if gone:
                self._waiting = deque(s for s in self._waiting if not s.stream.cancelled)
        for seq in gone:
            self.counters["finished_cancelled_total"] += 1
            seq.stream._push(self._output(seq, [], "", None, "cancelled"))

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) < self.max_running:
                seq = self._waiting.popleft()
                self._place(seq)
                self._running.append(seq)
                self.counters["prompt_tokens_total"] += len(seq.prompt)

    def _place(self, seq: _Sequence) -> None:
        """Give `seq` a slot: the idle one whose KV shares the longest prefix with its prompt (same
        NTK alpha), else a never-used one, else the least recently used idle one."""
        best, best_len = None, 0
        for slot, (tokens, alpha) in self._idle_slots.items():
            if alpha != seq.alpha or seq.prompt_logprobs is not None:  # scoring needs every prompt position
                continue
            n = 0
            for a, b in zip(tokens, seq.prompt):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = slot, n
        if best is not None:
            del self._idle_slots[best]
            seq.slot, seq.prefilled = best, min(best_len, len(seq.prompt) - 1)  # prefill at least one token
            seq.cached_tokens = seq.prefilled
        elif self._free_slots:
            seq.slot = self._free_slots.pop()
        else:
            seq.slot = next(iter(self._idle_slots))
            del self._idle_slots[seq.slot]

    def _forward(self, rows: list[_Sequence], ids: list[list[int]], starts: list[int], last=None, every_position=False):
        """fp32 logits [rows, vocab] at each row's position `last[row]` (default: the last one), or
        [rows, positions, vocab] for every position. The model's own head runs on just those rows."""
        self.cache.select([s.slot for s in rows], starts, [s.alpha for s in rows])
        input_ids = torch.tensor(ids, device=self.model.device)
        hidden = self.model.transformer(input_ids=input_ids, cache=self.cache, use_cache=True).last_hidden_state
        if not every_position:
            hidden = hidden[:, -1:] if last is None else hidden[torch.arange(len(rows)), torch.tensor(last)][:, None]
        logits = self.model.lm_head(hidden).float()
        return logits if every_position else logits[:, 0]

    def _prefill_group(self, prefilling: list[_Sequence]) -> list[_Sequence]:
        """The prompts prefilled together in this step: the oldest one's next chunk, joined by others'
        while the padded batch (rows x longest chunk) stays within `prefill_chunk` tokens, so a burst
        of short prompts costs one forward instead of one step each. A prompt being scored needs every
        position's logits and goes alone; the int8 cache quantizes a written chunk as one group, so
        there only equal-length chunks go together (padding would change the real tokens' groups)."""
        def width(seq):
            return min(len(seq.prompt) - seq.prefilled, self.prefill_chunk)

        group = [prefilling[0]]
        if group[0].prompt_logprobs is not None:
            return group
        for seq in prefilling[1:]:
            if seq.prompt_logprobs is not None or (self.cache.int8 and width(seq) != width(group[0])):
                continue
            widest = max(width(s) for s in group + [seq])
            furthest = max(s.prefilled for s in group + [seq])
            if (len(group) + 1) * widest <= self.prefill_chunk and furthest + widest <= self.max_context:
                group.append(seq)
        return group

    def _prefill(self, group: list[_Sequence]) -> None:
        starts = [s.prefilled for s in group]
        chunks = [s.prompt[s.prefilled : s.prefilled + self.prefill_chunk] for s in group]
        widest = max(len(c) for c in chunks)
        # Right padding: a row's padded tail comes after its real tokens, so the causal mask keeps it
        # out of their attention, and its KV is overwritten by the row's next chunk or token.
        ids = [c + [c[-1]] * (widest - len(c)) for c in chunks]
        scoring = group[0].prompt_logprobs is not None  # then it is alone in the group
        logits = self._forward(group, ids, starts, last=[len(c) - 1 for c in chunks], every_position=scoring)
        self.counters["prefill_forwards_total"] += 1
        if scoring:  # position p predicts prompt token p + 1
            seq, start = group[0], starts[0]
            targets = seq.prompt[start + 1 : start + len(chunks[0]) + 1]
            top = seq.params.prompt_logprobs
            seq.prompt_logprobs += [logprob_of(row, token, top) for row, token in zip(logits[0], targets)]
            logits = logits[:, -1]
        for seq, chunk in zip(group, chunks):
            seq.prefilled += len(chunk)
        done = [i for i, seq in enumerate(group) if seq.prefilled == len(seq.prompt)]
        if done:
            self._sample([group[i] for i in done], logits[done])

    def _decode(self, rows: list[_Sequence]) -> None:
        logits = self._forward(rows, [[s.generated[-1]] for s in rows], [s.kv_length for s in rows])
        self._sample(rows, logits)

    def _sample(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        for seq, raw in zip(rows, logits):
            try:
                token = self._choose(seq, raw)
            except Exception as exc:  # a request's own processor failed: only that request ends
                self._running.remove(seq)
                self._release(seq, cache=False)
                seq.stream._push(exc)
                continue
            logprob = [logprob_of(raw, token, seq.params.logprobs)] if seq.params.logprobs is not None else None
            self._observe(seq, now)
            self._emit(seq, token, logprob)

    def _choose(self, seq: _Sequence, raw: torch.Tensor) -> int:
        params = seq.params
        row = raw.clone()
        if params.mask_token_ids_from is not None:
            row[params.mask_token_ids_from :] = float("-inf")
        for processor in self.logits_processors + params.logits_processors:
            processor(seq.generated, row)
        apply_penalties(row, params, seq.prompt + seq.generated, seq.counts)
        return choose(row, params, seq.generator)

    def _observe(self, seq: _Sequence, now: float) -> None:
        name = "inter_token_latency" if seq.last_token_time is not None else "time_to_first_token"
        seconds = now - (seq.last_token_time if seq.last_token_time is not None else seq.submitted)
        seq.last_token_time = now
        for observer in self.observers:
            observer(name, seconds)

    def _emit(self, seq: _Sequence, token: int, logprob) -> None:
        seq.generated.append(token)
        seq.counts[token] += 1
        self.counters["generation_tokens_total"] += 1
        if token in seq.params.stop_token_ids:
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.add(token)
            reason = "stop" if seq.text.stopped else None
            if reason is None and len(seq.generated) >= seq.params.max_new_tokens:
                text, reason = text + seq.text.finish(), "length"
        seq.stream._push(self._output(seq, [token], text, logprob, reason))
        if reason is not None:
            self._finish(seq, reason, notify=False)

    def _output(self, seq, tokens, text, logprob, reason) -> Output:
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent once, with the first output
        return Output(
            prompt_logprobs=prompt_logprobs,
            token_ids=tokens,
            text=text,
            logprobs=logprob,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated),
            cached_tokens=seq.cached_tokens,
        )

    def _finish(self, seq: _Sequence, reason: str, notify: bool = True) -> None:
        if notify:
            seq.stream._push(self._output(seq, [], "", None, reason))
        self.counters[f"finished_{reason}_total"] += 1
        self._running.remove(seq)
        self._release(seq, cache=reason != "cancelled" and seq.prefilled == len(seq.prompt))

    def _release(self, seq: _Sequence, cache: bool) -> None:
        if cache and self.prefix_cache:  # keep the KV for a prompt that extends this one
            self._idle_slots[seq.slot] = (seq.prompt + seq.generated[:-1], seq.alpha)
        else:
            self._free_slots.append(seq.slot)
