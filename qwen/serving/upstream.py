"""An engine that sends raw-prompt completions to an upstream OpenAI-compatible server (e.g.
`vllm serve` on a Qwen2 export, or another `openai_api.py`), for deployments beyond one machine.

    engine = UpstreamEngine.connect("http://gpu-host:8000", tokenizer, config=..., generation_config=...)

It has the Engine's interface (`submit`, `stats`, `shutdown`, `tokenizer`, `max_context`,
`model_name`, `observers`, `counters`, and `model.config` / `model.generation_config` from the local
checkpoint's files, without weights), so the API server keeps the Qwen-specific work (chat format,
ReAct tool calls, stop words, usage, auth, limits) and only the forward passes move. Prompts go to
`POST /v1/completions` as token ids, streamed, with vLLM's `stop_token_ids`, `top_k`,
`repetition_penalty` and `skip_special_tokens` extensions (our own server takes them too, and
writes special tokens as text anyway); the text comes back as deltas.

Requests run as tasks of one event loop on a thread of the engine's own; at most `max_running`
are sent at once, up to `max_waiting` more wait. A cancelled stream (a client that left) closes its
upstream connection at once, which makes vLLM and our server abort the request. What the upstream
asks for logprobs with vLLM's `return_tokens_as_token_ids` (so each entry maps back to a token id
exactly), prompt logprobs with `echo` (the echoed prompt is not part of the reply), and constrained
decoding by forwarding the request's `response_format`; custom logits processors cannot run there and
are refused at `submit` with a RequestError. An upstream that fails ends the stream with an
UpstreamError whose `http_status` the API answers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from types import SimpleNamespace

from .engine import RequestStream
from .params import EngineBusy, Output, RequestError, SamplingParams, TokenLogprob


class UpstreamError(RuntimeError):
    """The upstream failed a request. `http_status`, `error_type` and `code` are what the API
    server answers: 502 when the upstream is unreachable or answers badly, 504 when it times out,
    its own status for 400 / 429 / 503 (a request it refuses, or an upstream that is busy)."""

    def __init__(self, message: str, http_status: int = 502, code: str = "upstream_error",
                 error_type: str = "server_error"):
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.error_type = error_type


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"upstream URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _upstream_message(status: int, text: str) -> str:
    """The upstream's error message (OpenAI's or FastAPI's error body), else the start of its body."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300] or f"HTTP {status}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and body.get("message"):  # vLLM's older error body
        return str(body["message"])
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return text.strip()[:300]


def _status_error(status: int, text: str) -> UpstreamError:
    message = _upstream_message(status, text)
    if status == 400 or status == 422:
        return UpstreamError(f"the upstream refused the request: {message}", 400, "upstream_rejected",
                             "invalid_request_error")
    if status == 429:
        return UpstreamError(f"the upstream is busy: {message}", 429, "upstream_busy", "rate_limit_error")
    if status == 503:
        return UpstreamError(f"the upstream is unavailable: {message}", 503, "upstream_unavailable",
                             "service_unavailable")
    if status in (401, 403):
        message = f"the upstream refused this server's credentials (HTTP {status}; check --upstream-api-key): {message}"
    else:
        message = f"the upstream answered HTTP {status}: {message}"
    return UpstreamError(message, 502, "upstream_error")


class UpstreamEngine:
    def __init__(self, url: str, tokenizer, *, model: str | None = None, api_key: str | None = None,
                 max_context: int | None = None, max_running: int = 64, max_waiting: int = 256,
                 timeout: float = 600.0, config=None, generation_config=None, models: list | None = None):
        """Connect to the server at `url` (with or without /v1). Raises ValueError when it does
        not answer GET /v1/models or serves no model (or not `model`). `config` and
        `generation_config` are the local checkpoint's (the API reads the sampling defaults and
        the chat format from them); `models` is an already fetched /v1/models list."""
        import httpx

        for name, value in (("max_running", max_running), ("max_waiting", max_waiting)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.url = _base_url(url)
        self.tokenizer = tokenizer
        self.model = SimpleNamespace(config=config, generation_config=generation_config)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if models is None:
            models = self.list_models(self.url, api_key)
        if not models:
            raise ValueError(f"upstream {self.url} serves no model")
        if model is not None:
            entry = next((m for m in models if m.get("id") == model), None)
            if entry is None:
                names = ", ".join(str(m.get("id")) for m in models)
                raise ValueError(f"upstream {self.url} does not serve model {model!r} (it serves: {names})")
        else:
            entry = models[0]
        self.upstream_model = entry["id"]
        self.model_name = self.upstream_model
        upstream_len = entry.get("max_model_len") or entry.get("max_context")
        limits = [n for n in (max_context, upstream_len) if isinstance(n, int) and n > 0]
        self.max_context = min(limits) if limits else 8192
        self.max_running, self.max_waiting = max_running, max_waiting
        self.counters = Counter()  # requests_total, prompt_tokens_total, generation_tokens_total, finished_*
        self.observers: list = []  # callables (name, seconds) for "time_to_first_token", "inter_token_latency"
        self._inflight: dict[int, tuple[RequestStream, object]] = {}  # stream id -> (stream, future)
        self._sending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._slots = asyncio.Semaphore(max_running)  # bound to self._loop on first use (Python >= 3.10)
        self._client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=10.0, pool=None),
            limits=httpx.Limits(max_connections=max_running, max_keepalive_connections=max_running),
        )
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen-upstream", daemon=True)
        self._thread.start()

    @staticmethod
    def list_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict]:
        """GET {url}/v1/models; raises ValueError saying why it failed (ConnectionError when
        nothing listens there, so that a caller can wait for an upstream that is starting)."""
        import httpx

        url = _base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            response = httpx.get(f"{url}/models", headers=headers, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectionError(f"upstream {url} cannot be reached: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ValueError(f"upstream {url} does not answer GET /v1/models: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 503:  # e.g. our own server while it loads its model
            raise ConnectionError(f"upstream {url} is not ready: {_upstream_message(503, response.text)}")
        if response.status_code != 200:
            hint = " (check --upstream-api-key)" if response.status_code in (401, 403) else ""
            raise ValueError(f"upstream {url} answered GET /v1/models with HTTP {response.status_code}{hint}: "
                             f"{_upstream_message(response.status_code, response.text)}")
        try:
            models = response.json()["data"]
            if not isinstance(models, list) or not all(isinstance(m, dict) and "id" in m for m in models):
                raise TypeError("data is not a list of models")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"upstream {url} answered GET /v1/models with no model list: {exc}") from exc
        return models

    # ------------------------------------------------------------------------- requests

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestStream:
        """Send a request; raises RequestError (bad request), EngineBusy (too many in flight) or
        RuntimeError (shut down). Network failures come out of the stream as UpstreamError."""
        params = (params or SamplingParams()).check()
        prompt = list(prompt_ids)
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens",
                "max_tokens" if len(prompt) < self.max_context else "messages",
            )
        if params.logits_processors and params.response_format is None:
            raise RequestError("logits processors cannot run on this server (it generates through an upstream "
                               "engine)", "logits_processors")
        stream = RequestStream(self, len(prompt))
        body = self._body(prompt, params)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if len(self._inflight) >= self.max_running + self.max_waiting:
                raise EngineBusy(f"too many requests in flight to the upstream ({len(self._inflight)}); "
                                 "try again later")
            self.counters["requests_total"] += 1
            self.counters["prompt_tokens_total"] += len(prompt)
            future = asyncio.run_coroutine_threadsafe(self._run(stream, body, params, len(prompt),
                                                                time.perf_counter()), self._loop)
            self._inflight[stream.id] = (stream, future)
        future.add_done_callback(lambda f: self._done(stream, f))
        return stream

    def _body(self, prompt: list[int], params: SamplingParams) -> dict:
        body = {
            "model": self.upstream_model,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "top_k": params.top_k if params.top_k > 0 and not params.greedy else -1,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "stop_token_ids": list(params.stop_token_ids),
            # Special tokens that are not stop tokens stay in the text, as our engine writes them.
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.response_format is not None:  # the upstream constrains the reply itself
            body["response_format"] = params.response_format
        wanted = [k for k in (params.logprobs, params.prompt_logprobs) if k is not None]
        if wanted:
            body["logprobs"] = max(wanted)
            body["return_tokens_as_token_ids"] = True
        if params.prompt_logprobs is not None:  # OpenAI's way to score a prompt: echo it with logprobs
            body["echo"] = True
        return body

    async def _run(self, stream: RequestStream, body: dict, params: SamplingParams, prompt_tokens: int,
                   submitted: float) -> None:
        import httpx

        async with self._slots:
            with self._lock:
                self._sending += 1
            try:
                await self._send(stream, body, _Reader(params, prompt_tokens), submitted)
            except UpstreamError as exc:
                self._fail(stream, exc)
            except httpx.TimeoutException as exc:
                self._fail(stream, UpstreamError(f"the upstream {self.url} timed out: {type(exc).__name__}", 504,
                                                 "upstream_timeout"))
            except httpx.HTTPError as exc:  # refused, reset, DNS, protocol errors
                self._fail(stream, UpstreamError(f"the upstream {self.url} cannot be reached: "
                                                 f"{type(exc).__name__}: {exc}", 502, "upstream_unreachable"))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a stream that is not OpenAI's
                self._fail(stream, UpstreamError(f"the upstream {self.url} sent an unreadable reply: "
                                                 f"{type(exc).__name__}: {exc}", 502, "upstream_bad_reply"))
            finally:
                with self._lock:
                    self._sending -= 1

    async def _send(self, stream: RequestStream, body: dict, reader: _Reader, last: float) -> None:
        finish, completion, cached, text = None, None, 0, []
        prompt_tokens = reader.prompt_tokens
        async with self._client.stream("POST", f"{self.url}/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise _status_error(response.status_code, response.text)
            lines = response.aiter_lines()
            try:
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk and not chunk.get("choices"):  # an error event inside the stream
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        raise UpstreamError(f"the upstream failed the request: {error.get('message')}", 502,
                                            "upstream_error")
                    usage = chunk.get("usage") or {}
                    if usage.get("completion_tokens") is not None:
                        completion = usage["completion_tokens"]
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    for choice in chunk.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        output = reader.read(choice.get("text") or "", choice.get("logprobs"))
                        if output is None:
                            continue
                        if output.text:
                            now = time.perf_counter()
                            name = "time_to_first_token" if not text else "inter_token_latency"
                            for observer in self.observers:
                                observer(name, now - last)
                            last = now
                            text.append(output.text)
                        stream._push(output)
            finally:
                # Close the line reader here: left suspended (after [DONE]), it would be closed by a
                # task of the loop's own, which a shutdown right after the reply can leave pending
                # ("Task was destroyed but it is pending!" at exit).
                await lines.aclose()
        if finish is None:
            raise UpstreamError("the upstream ended the reply without a finish reason", 502, "upstream_bad_reply")
        if completion is None:  # an upstream without stream usage: count the text's tokens
            completion = len(self.tokenizer.encode("".join(text), allowed_special="all"))
        reason = "length" if finish == "length" else "stop"
        with self._lock:
            self.counters["generation_tokens_total"] += completion
            self.counters[f"finished_{reason}_total"] += 1
        stream._push(Output([], "", finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion,
                            cached_tokens=cached, prompt_logprobs=reader.pending_prompt_logprobs()))

    def _fail(self, stream: RequestStream, exc: UpstreamError) -> None:
        with self._lock:
            self.counters["finished_error_total"] += 1
        stream._push(exc)

    def _done(self, stream: RequestStream, future) -> None:  # the loop's thread, or the canceller's
        with self._lock:
            self._inflight.pop(stream.id, None)
            if future.cancelled():
                self.counters["finished_cancelled_total"] += 1
        if future.cancelled():
            stream._push(Output([], "", finish_reason="cancelled", prompt_tokens=stream.prompt_tokens))

    def _wake(self) -> None:
        """RequestStream.cancel(): stop the cancelled requests (closing their upstream connections)."""
        with self._lock:
            doomed = [future for stream, future in self._inflight.values() if stream.cancelled]
        for future in doomed:
            future.cancel()

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._sending, "waiting": len(self._inflight) - self._sending, **self.counters}

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [future for _, future in self._inflight.values()]
        for future in pending:
            future.cancel()

        async def close():
            await self._client.aclose()
            # Finish what is still scheduled (cancelled requests, async generators httpx left to be
            # closed by the loop) before the loop stops: a task left pending is reported at exit.
            await self._loop.shutdown_asyncgens()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=5)

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001  (closing anyway)
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def _token_id(token: str) -> int:
    if not (isinstance(token, str) and token.startswith("token_id:")):
        raise ValueError(f"logprob token {token!r} is not 'token_id:<id>' (the upstream ignored "
                         "return_tokens_as_token_ids)")
    return int(token[len("token_id:"):])


class _Reader:
    """Turns one request's streamed completion choices into Outputs: logprob entries back to token ids
    and TokenLogprobs, and, when the prompt was echoed for its logprobs, the prompt's entries apart
    from the reply's (the echoed text is not part of the reply: it ends where the first generated
    token's `text_offset` says)."""

    def __init__(self, params: SamplingParams, prompt_tokens: int):
        self.params, self.prompt_tokens = params, prompt_tokens
        self.echo = params.prompt_logprobs is not None
        self.prompt_entries: list | None = [] if self.echo else None
        self.held = ""  # echoed text not yet known to be prompt or reply
        self.reply_start: int | None = None if self.echo else 0  # offset of the reply in the echoed text
        self.prompt_sent = not self.echo

    def _entry(self, token: str, logprob, top, k: int | None) -> TokenLogprob | None:
        if logprob is None:
            return None
        alternatives = sorted(((_token_id(t), float(p)) for t, p in (top or {}).items()), key=lambda tp: -tp[1])
        return TokenLogprob(_token_id(token), float(logprob), alternatives[: k or 0])

    def read(self, piece: str, logprobs: dict | None) -> Output | None:
        tokens, reply_logprobs = [], []
        if logprobs:
            tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
            offsets = logprobs.get("text_offset") or [None] * len(logprobs["tokens"])
            for token, value, top, offset in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, offsets):
                if self.prompt_entries is not None and len(self.prompt_entries) < self.prompt_tokens:
                    self.prompt_entries.append(self._entry(token, value, top, self.params.prompt_logprobs))
                    continue
                if self.reply_start is None:
                    if offset is None:
                        raise ValueError("the echoed prompt's logprobs have no text_offset")
                    self.reply_start = offset
                tokens.append(_token_id(token))
                if self.params.logprobs is not None:
                    reply_logprobs.append(self._entry(token, value, top, self.params.logprobs))
        if self.reply_start is None or self.held:  # still (or just past) the echoed prompt
            self.held += piece
            if self.reply_start is None:
                return None
            piece, self.held = self.held[self.reply_start :], ""
        if not (piece or tokens or not self.prompt_sent):
            return None
        return Output(tokens, piece, logprobs=reply_logprobs or None, prompt_tokens=self.prompt_tokens,
                      prompt_logprobs=self.pending_prompt_logprobs())

    def pending_prompt_logprobs(self) -> list | None:
        """The prompt's entries, once (with the first output after they are all in)."""
        if self.prompt_sent or self.prompt_entries is None or len(self.prompt_entries) < self.prompt_tokens:
            return None
        self.prompt_sent = True
        return self.prompt_entries
