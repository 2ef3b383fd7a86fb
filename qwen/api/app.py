"""The OpenAI-compatible HTTP API (Qwen v1's ``openai_api.py``) on top of the serving engine.

    app = create_app(engine)            # or create_app() now and set_engine(app, engine) once loaded
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /tokenize``, ``POST /detokenize``. Chat prompts are the original's
chatml (``make_context``), rewritten into the ReAct format when tools or functions are given
(``qwen.api.react``); every error is OpenAI's ``{"error": {...}}`` body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import gc
import hmac
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..qwen_generation_utils import IM_END, chatml_turn, make_context
from ..serving.chat import ChatDefaults, stop_token_ids
from ..serving.params import EngineBusy, RequestError, SamplingParams
from . import react
from .protocol import (
    ERROR_TYPES,
    MAX_BODY_BYTES,
    MAX_N,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    check_chat,
    check_completion,
    check_messages,
    error_body,
    message_text,
    parse_body,
)

EXEMPT_FROM_AUTH = ("/health",)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                "/detokenize")


# ============================================================================= app state


class ServerState:
    """What the routes share: the engine (None while loading), settings and metrics."""

    def __init__(self, engine, served_model_name, disable_gc, max_body_bytes):
        self.engine = None
        self.load_error: str | None = None
        self.served_model_name = served_model_name
        self.disable_gc = disable_gc
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self._gc_task: asyncio.Task | None = None
        self._last_gc = float("-inf")
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("qwen_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("qwen_time_to_first_token_seconds", "Time from a request's admission to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("qwen_inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(self))
        if engine is not None:
            self.attach(engine)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return getattr(self.engine, "model_name", None) or "qwen"

    def attach(self, engine) -> None:
        observers = getattr(engine, "observers", None)
        if observers is not None:
            observers.append(self._observe)
        self.engine = engine
        self.load_error = None

    def _observe(self, name: str, seconds: float) -> None:  # the engine's thread
        if name == "time_to_first_token":
            self.ttft.observe(seconds)
        elif name == "inter_token_latency":
            self.itl.observe(seconds)

    def require_engine(self):
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"The model failed to load: {self.load_error}", "service_unavailable",
                               code="model_load_failed")
            raise APIError(503, "The model is still loading; try again shortly", "service_unavailable",
                           code="model_loading", headers={"Retry-After": "5"})
        return self.engine

    def request_done(self) -> None:
        """The original's `_gc()` after each reply (off with --disable-gc): collect garbage and
        return cached GPU memory, here only once the engine has nothing left to do and at most
        every GC_INTERVAL_S (a full collection holds the GIL for ~150 ms on a loaded process)."""
        if self.disable_gc or self.engine is None or (self._gc_task is not None and not self._gc_task.done()):
            return
        if time.monotonic() - self._last_gc < GC_INTERVAL_S:
            return
        try:
            stats = self.engine.stats()
            if stats.get("running") or stats.get("waiting"):
                return
            self._last_gc = time.monotonic()
            self._gc_task = asyncio.get_running_loop().create_task(asyncio.to_thread(_collect_garbage))
        except RuntimeError:
            pass


GC_INTERVAL_S = 10.0


def _collect_garbage() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  (best effort)
        pass


class _EngineCollector:
    """Engine gauges and counters, read from `engine.stats()` at each scrape."""

    def __init__(self, state: ServerState):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        engine = self.state.engine
        loaded = GaugeMetricFamily("qwen_model_loaded", "1 once the model is loaded and serving")
        loaded.add_metric([], 1.0 if engine is not None else 0.0)
        yield loaded
        stats = engine.stats() if engine is not None else {}
        for name, help_text in (("running", "Sequences being generated"), ("waiting", "Requests waiting for a slot")):
            gauge = GaugeMetricFamily(f"qwen_num_requests_{name}", help_text)
            gauge.add_metric([], float(stats.get(name, 0)))
            yield gauge
        for key, name, help_text in (
            ("requests_total", "qwen_engine_requests", "Requests admitted by the engine"),
            ("prompt_tokens_total", "qwen_prompt_tokens", "Prompt tokens processed"),
            ("generation_tokens_total", "qwen_generation_tokens", "Tokens generated"),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], float(stats.get(key, 0)))
            yield counter
        finished = CounterMetricFamily("qwen_request_finished", "Finished sequences by reason", labels=["reason"])
        for key, value in sorted(stats.items()):
            if key.startswith("finished_") and key.endswith("_total"):
                finished.add_metric([key[len("finished_") : -len("_total")]], float(value))
        yield finished


def get_state(app: FastAPI) -> ServerState:
    return app.state.qwen


def set_engine(app: FastAPI, engine) -> None:
    """Serve `engine` (loaded after the app started: until then /health answers 503)."""
    get_state(app).attach(engine)


def set_load_error(app: FastAPI, message: str) -> None:
    get_state(app).load_error = message


# ============================================================================= middleware


class AuthMiddleware:
    """HTTP Basic (`--api-auth user:password`) and/or Bearer (`--api-key`) authentication; either
    one is enough. Secrets are compared in constant time. /health stays open for probes."""

    def __init__(self, app, api_key: str | None = None, basic: tuple[str, str] | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.basic = (basic[0].encode(), basic[1].encode()) if basic else None

    def _authorized(self, header: bytes | None) -> bool:
        if not header:
            return False
        scheme, _, credentials = header.decode("latin-1").strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and self.api_key is not None:
            return hmac.compare_digest(credentials.encode("latin-1"), self.api_key)
        if scheme == "basic" and self.basic is not None:
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                return False
            user, sep, password = decoded.partition(b":")
            user_ok = hmac.compare_digest(user, self.basic[0])
            password_ok = hmac.compare_digest(password, self.basic[1])
            return bool(sep) and user_ok and password_ok
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in EXEMPT_FROM_AUTH:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if self._authorized(header):
            return await self.app(scope, receive, send)
        challenges = []
        if self.basic is not None:
            challenges.append('Basic realm="qwen"')
        if self.api_key is not None:
            challenges.append("Bearer")
        message = ("Missing or invalid credentials: send 'Authorization: Bearer <API key>'" if self.api_key
                   else "Missing or invalid credentials: use HTTP Basic authentication")
        if self.api_key and self.basic:
            message = "Missing or invalid credentials: use an API key (Bearer) or HTTP Basic authentication"
        body = json.dumps(error_body(message, "authentication_error", None, "invalid_api_key")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(b"www-authenticate", c.encode()) for c in challenges]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts answered requests by endpoint and status."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            endpoint = path if path in _KNOWN_PATHS else "other"
            self.state.http_requests.labels(endpoint, str(status[0] if status else 500)).inc()


# ============================================================================= helpers


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is larger than `limit` bytes."""
    too_big = APIError(413, f"The request body is larger than the limit of {limit} bytes", "invalid_request_error",
                       code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise too_big
        except ValueError:
            raise bad_request("Invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def sampling_params(req, engine, prompt_len: int, stop: list[str], stop_token_ids: list[int],
                    logprobs: int | None, max_length: int | None = None) -> SamplingParams:
    """The request's SamplingParams; what it leaves out comes from the checkpoint's generation
    config. temperature < 0.01 means greedy (the original's rule). Raises APIError (400)."""
    defaults = ChatDefaults.of(engine)
    max_context = engine.max_context
    if prompt_len >= max_context:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens. However, your prompt is {prompt_len} "
            "tokens, which leaves no room for a reply. Please shorten it.",
            "messages" if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    room = max_context - prompt_len
    explicit = getattr(req, "max_completion_tokens", None) or req.max_tokens
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if explicit is None and max_length is not None:
        explicit, param = max_length - prompt_len, "max_length"
        if explicit < 1:
            raise bad_request(f"max_length ({max_length}) leaves no room for a reply after the prompt "
                              f"({prompt_len} tokens)", "max_length", "context_length_exceeded")
    if explicit is None:
        max_new_tokens = min(defaults.max_new_tokens, room)
    elif explicit > room:
        raise bad_request(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_len + explicit} tokens ({prompt_len} in the prompt, {explicit} for the completion). Please "
            "reduce the prompt or the completion length.", param, "context_length_exceeded")
    else:
        max_new_tokens = explicit
    temperature = defaults.temperature if req.temperature is None else req.temperature
    do_sample = defaults.do_sample if req.temperature is None else True
    if temperature < 0.01:
        temperature, do_sample = 0.0, False
    top_k = defaults.top_k if req.top_k is None else req.top_k
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(defaults.top_p if req.top_p is None else req.top_p),
        top_k=max(int(top_k), 0),
        do_sample=do_sample,
        repetition_penalty=float(defaults.repetition_penalty if req.repetition_penalty is None
                                 else req.repetition_penalty),
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        seed=req.seed,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        logprobs=logprobs,
    )


def _choice_params(params: SamplingParams, index: int, processors: list | None = None) -> SamplingParams:
    """Choice `index` of n: its own copy, seed (seed + index, so that choices differ yet repeat)
    and logits processors (a constraint follows one sequence)."""
    seed = params.seed
    if seed is not None and index:
        seed += index
        if seed >= 2**63:
            seed -= 2**64
    return SamplingParams(**{**params.__dict__, "seed": seed, "stop": list(params.stop),
                             "stop_token_ids": list(params.stop_token_ids),
                             "logits_processors": list(processors or [])})


def response_format_processors(tokenizer, response_format, stop_token_ids, n: int) -> list[list] | None:
    """One constrained-decoding processor per choice for a json_object / json_schema `response_format`
    (None for text). Raises APIError 400 for a bad schema or when constrained decoding is unavailable."""
    if response_format is None or response_format.type == "text":
        return None
    try:
        from ..serving.constraints import response_format_processor
    except ImportError as exc:
        raise bad_request(f"response_format {response_format.type!r} is not available on this server: {exc}",
                          "response_format", "unsupported_parameter") from None
    spec = response_format.model_dump(exclude_none=True)
    try:
        return [[response_format_processor(tokenizer, spec, stop_token_ids)] for _ in range(n)]
    except RequestError as exc:
        raise bad_request(str(exc), "response_format", "invalid_value") from None


def submit_all(engine, prompt_ids: list[int], params: list[SamplingParams]):
    """Submit one request per choice; all or none (a failure cancels what was admitted)."""
    streams = []
    try:
        for p in params:
            streams.append(engine.submit(prompt_ids, p))
    except RequestError as exc:
        _cancel(streams)
        raise bad_request(str(exc), _api_param(exc.param), "invalid_value") from None
    except EngineBusy as exc:
        _cancel(streams)
        raise APIError(429, str(exc) or "The server is busy; try again later", "rate_limit_error",
                       code="engine_busy", headers={"Retry-After": "1"}) from None
    except RuntimeError as exc:  # shut down
        _cancel(streams)
        raise APIError(503, f"The engine is not serving: {exc}", "service_unavailable") from None
    return streams


def _api_param(param: str | None) -> str | None:
    return {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs"}.get(param, param)


def _cancel(streams) -> None:
    for stream in streams:
        try:
            stream.cancel()
        except Exception:  # noqa: BLE001
            pass


_DONE = object()


async def merge_streams(streams):
    """(choice index, Output or exception) from all streams as they come; cancels them all on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for out in stream:
                await queue.put((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (the engine failed this request)
            await queue.put((index, exc))
        finally:
            queue.put_nowait((index, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        _cancel(streams)


class ClientGone(Exception):
    pass


async def collect(request: Request, streams) -> list[list]:
    """All outputs of every stream (non-streaming requests); cancels them if the client leaves."""
    results: list[list] = [[] for _ in streams]

    async def gather():
        async for index, item in merge_streams(streams):
            if isinstance(item, BaseException):
                raise item
            results[index].append(item)

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                return results
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
        _cancel(streams)


async def collect_choices(state: ServerState, request: Request, streams) -> list[list] | None:
    """Every choice's outputs of a non-streamed request; None when the client has left."""
    try:
        return await collect(request, streams)
    except ClientGone:
        return None
    except Exception as exc:  # noqa: BLE001
        raise _engine_failure(exc) from None
    finally:
        state.request_done()


def _engine_failure(exc: BaseException) -> APIError:
    if isinstance(getattr(exc, "http_status", None), int):  # an upstream's failure (qwen.serving.upstream)
        return APIError(exc.http_status, str(exc), getattr(exc, "error_type", "server_error"),
                        code=getattr(exc, "code", None))
    return APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", "server_error", code="generation_failed")


# ============================================================================= tokens as text


class TokenText:
    """Token ids as OpenAI's logprob strings and bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
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


# ============================================================================= chat prompts


@dataclass
class ChatPlan:
    """A chat request turned into a prompt: token ids, stop strings, and how to read the reply."""

    prompt_ids: list[int]
    stop: list[str]
    functions: list[dict] | None = None  # ReAct mode when set
    legacy: bool = False  # `functions`/`function_call` (else `tools`/`tool_calls`)
    reply_prefix: str = ""  # text the reply is read after (a forced "\nAction: ..." prefill)
    forced: str | None = None  # the named function the reply must call


def _tools_as_functions(tools) -> list[dict]:
    functions = []
    for tool in tools:
        fn = tool.function
        functions.append({
            "name": fn.name,
            "description": fn.description or "",
            "parameters": fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}},
        })
    return functions


def _tool_mode(req) -> tuple[list[dict] | None, bool, str | None]:
    """(functions for the ReAct prompt or None, legacy API?, forced: None | "required" | a function name)."""
    if req.functions is not None:
        functions, legacy, choice, param = req.functions, True, req.function_call, "function_call"
        for i, f in enumerate(functions):
            if not isinstance(f, dict):
                raise bad_request("each function must be an object", f"functions[{i}]")
    elif req.tools is not None:
        functions, legacy, choice, param = _tools_as_functions(req.tools), False, req.tool_choice, "tool_choice"
    else:
        if req.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice requires tools", "tool_choice")
        if req.function_call not in (None, "none", "auto"):
            raise bad_request("function_call requires functions", "function_call")
        return None, False, None
    if not functions:
        return None, legacy, None
    if choice is None or choice == "auto":
        return functions, legacy, None
    if choice == "none":
        return None, legacy, None
    if choice == "required":
        return functions, legacy, "required"
    name = choice.function.name if hasattr(choice, "function") else choice.name
    chosen = [f for f in functions if f.get("name_for_model", f.get("name")) == name]
    if not chosen:
        raise bad_request(f"{param} names {name!r}, which is not among the given "
                          f"{'functions' if legacy else 'tools'}", param)
    return chosen, legacy, name


def _react_messages(messages) -> list[dict]:
    """OpenAI messages -> the original's (system/user/assistant/function, content, function_call).

    `tool` results become `function` results; an assistant's `tool_calls` become one function
    call each, the later ones placed just before their results (ReAct has one call per step)."""
    out: list[dict] = []
    pending: list[dict] = []  # calls of the last assistant message not placed yet
    awaiting: list[dict] = []  # placed calls whose results have not come yet

    def place(call):
        out.append({"role": "assistant", "content": "", "function_call": call})
        awaiting.append(call)

    def flush():
        while pending:
            place(pending.pop(0))
        awaiting.clear()

    def by_id(calls, call_id):
        return next((c for c in calls if call_id and c.get("id") == call_id), None)

    for m in messages:
        text = message_text(m) or ""
        if m.role in ("tool", "function"):
            call = by_id(awaiting, m.tool_call_id)
            if call is None and by_id(pending, m.tool_call_id) is None and awaiting:
                call = awaiting[0]  # no (known) id: results answer the calls in order
            if call is None and pending:
                call = by_id(pending, m.tool_call_id) or pending[0]
                pending.remove(call)
                place(call)
            if call is not None:
                awaiting.remove(call)
            out.append({"role": "function", "content": text})
            continue
        flush()
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text})
        elif m.role == "user":
            out.append({"role": "user", "content": text})
        else:  # assistant
            calls = []
            if m.function_call is not None:
                calls.append({"name": m.function_call.name, "arguments": m.function_call.arguments or ""})
            for call in m.tool_calls or []:
                calls.append({"id": call.id, "name": call.function.name, "arguments": call.function.arguments or ""})
            message = {"role": "assistant", "content": text}
            if calls:
                message["function_call"] = calls[0]
                awaiting.append(calls[0])
                pending.extend(calls[1:])
            out.append(message)
    flush()
    return out


def _continuation_ids(tokenizer, system: str, history) -> list[int]:
    """chatml of system + history with the last assistant turn left open; message text stays
    plain text (special-token text in it is not a control token)."""
    nl = tokenizer.encode("\n")
    ids = chatml_turn(tokenizer, "system", system)[1]
    for i, (user_text, bot_text) in enumerate(history):
        ids += nl + chatml_turn(tokenizer, "user", user_text)[1]
        ids += nl + chatml_turn(tokenizer, "assistant", bot_text, close=i < len(history) - 1)[1]
    return ids


def build_chat_plan(tokenizer, req: ChatCompletionRequest, defaults: ChatDefaults) -> ChatPlan:
    """The prompt for a chat request (Raises APIError 400 for conversations that cannot be one)."""
    functions, legacy, forced = _tool_mode(req)
    messages = _react_messages(req.messages)
    try:
        prompt = react.messages_to_prompt(messages, functions)
        stop = react.stop_strings(req.stop, functions)
        if prompt.query is not None:
            _, ids = make_context(tokenizer, prompt.query, prompt.history, prompt.system,
                                  max_window_size=defaults.max_window_size, chat_format="chatml")
        else:
            ids = _continuation_ids(tokenizer, prompt.system, prompt.history)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if message == "query must be a non-empty string":
            message = "Invalid request: the last user message is empty"
        raise bad_request(message, "messages") from None
    for word in prompt.stop_words:
        if word not in stop and word != IM_END:  # <|im_end|> is a stop token already
            stop.append(word)
    reply_prefix = ""
    if forced is not None:
        # Force a call by writing the start of it: the model continues with the arguments
        # (or, for "required", with the name of the function it picks).
        reply_prefix = f"\nAction: {forced}\nAction Input:" if forced != "required" else "\nAction:"
        prefill = reply_prefix if prompt.query is None else reply_prefix.lstrip("\n")
        ids = ids + tokenizer.encode(prefill, allowed_special=set())
    return ChatPlan(ids, stop, functions, legacy, reply_prefix, forced if forced != "required" else None)


# ============================================================================= replies


def _tool_call_message(content: str | None, call: dict, legacy: bool, call_id: str) -> dict:
    message = {"role": "assistant", "content": content or None}
    if legacy:
        message["function_call"] = {"name": call["name"], "arguments": call["arguments"]}
    else:
        message["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": call["name"], "arguments": call["arguments"]}}]
    return message


def _finish_reason(engine_reason: str | None, called: bool, legacy: bool) -> str:
    if engine_reason == "length":
        return "length"
    if called:
        return "function_call" if legacy else "tool_calls"
    return "stop"


def chat_choice(plan: ChatPlan, index: int, outputs, token_text: TokenText, want_logprobs: bool) -> tuple[dict, int]:
    """(a non-streamed chat choice, completion tokens) from a stream's outputs."""
    text = "".join(out.text for out in outputs)
    last = outputs[-1]
    logprobs = [lp for out in outputs for lp in (out.logprobs or [])] if want_logprobs else None
    call = None
    if plan.functions:
        content, call = react.parse_react_response(plan.reply_prefix + text)
        if call is not None:
            message = _tool_call_message(content, call, plan.legacy, _tool_call_id())
        else:
            message = {"role": "assistant", "content": content}
    else:
        message = {"role": "assistant", "content": text}
    choice = {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(token_text, logprobs) if want_logprobs else None,
        "finish_reason": _finish_reason(last.finish_reason, call is not None, plan.legacy),
    }
    return choice, last.completion_tokens


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that `marker` starts with (the start of a cut marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReActStream:
    """Streams a ReAct reply as OpenAI deltas, with the same result as `parse_react_response`:
    a function call as its thought (content), then its name, then argument fragments; a final
    answer as the text after `Final Answer: `; anything else as the whole stripped text at the end.
    Text already sent cannot be taken back, so where the parser looks further ahead the stream
    keeps its first reading: after a `Final Answer: `, a second one or an `Action:` is answer text."""

    def __init__(self, prefix: str = ""):
        self.buf = prefix
        self.mode = "undecided"  # -> "answer" | "args"
        self.pos = 0  # in "answer"/"args": where the unsent text starts
        self.started = False  # something non-blank was sent in the current mode
        self.call_name: str | None = None

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """Events ("content", text) / ("name", name) / ("args", fragment) for new text; `final`
        when no more text follows."""
        self.buf += text
        events: list[tuple[str, str]] = []
        if self.mode == "undecided":
            i = self.buf.find("\nAction:")
            j = self.buf.find("\nAction Input:", i + 1) if i >= 0 else -1
            name = self.buf[i + len("\nAction:") : j].strip() if j >= 0 else ""
            if name:
                thought = self.buf[:i]
                t = thought.find("Thought: ")
                content = (thought[t + len("Thought: ") :] if t >= 0 else thought).strip()
                if content:
                    events.append(("content", content))
                events.append(("name", name))
                self.call_name = name
                self.mode, self.pos = "args", j + len("\nAction Input:")
            elif i < 0:
                z = self.buf.find("\nFinal Answer: ")
                if z >= 0:
                    self.mode, self.pos = "answer", z + len("\nFinal Answer: ")
        if self.mode in ("answer", "args"):
            end = self.buf.find("\nObservation:", self.pos) if self.mode == "args" else -1
            tail = self.buf[self.pos :] if end < 0 else self.buf[self.pos : end]
            if not self.started:
                stripped = tail.lstrip()
                self.pos += len(tail) - len(stripped)
                tail = stripped
            send = tail.rstrip()  # trailing blanks wait: they are dropped if nothing follows
            if self.mode == "args" and end < 0 and not final:
                send = send[: len(send) - _partial_suffix(send, "\nObservation:")]
            if send:
                events.append(("content" if self.mode == "answer" else "args", send))
                self.pos += len(send)
                self.started = True
        elif final:
            content, _ = react.parse_react_response(self.buf)
            if content:
                events.append(("content", content))
        return events


# ============================================================================= the app


def create_app(
    engine=None,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    api_auth: str | tuple[str, str] | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    disable_gc: bool = False,
) -> FastAPI:
    """The API app serving `engine` (None: serve once `set_engine` is called; /health says 503 until then).

    `api_auth` is "user:password" (HTTP Basic), `api_key` a Bearer key; with either, every route
    but /health needs credentials. `cors_origins` (e.g. ["*"]) enables CORS for those origins.
    """
    basic = None
    if api_auth:
        if isinstance(api_auth, str):
            user, sep, password = api_auth.partition(":")
            if not sep:
                raise ValueError("api_auth must be 'user:password'")
            basic = (user, password)
        else:
            basic = tuple(api_auth)
    state = ServerState(engine, served_model_name, disable_gc, max_body_bytes)
    app = FastAPI(title="Qwen OpenAI-compatible API", docs_url="/docs", redoc_url=None)
    app.state.qwen = state

    if basic or api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key, basic=basic)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials="*" not in cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"Not found: {request.url.path}", 405: f"Method {request.method} not allowed for "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, ERROR_TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return JSONResponse(error_body(f"Internal server error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    # ------------------------------------------------------------------------- simple routes

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen",
                "root": state.model_name, "parent": None,
                "max_model_len": getattr(state.engine, "max_context", None)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        state.require_engine()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse_body(TokenizeRequest, await read_body(request, state.max_body_bytes))
        engine = state.require_engine()
        tokenizer = engine.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' and 'messages'", "prompt")
        if req.prompt is not None:
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt)
        else:
            check_messages(req.messages)
            chat = ChatCompletionRequest.model_construct(
                messages=req.messages, tools=req.tools, functions=req.functions, tool_choice=None,
                function_call=None, stop=None)
            plan = await asyncio.to_thread(build_chat_plan, tokenizer, chat, ChatDefaults.of(engine))
            ids = plan.prompt_ids
        token_text = TokenText(tokenizer)
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids,
                "token_strs": [token_text.string(t) for t in ids]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_body(DetokenizeRequest, await read_body(request, state.max_body_bytes))
        engine = state.require_engine()
        limit = _vocab_limit(engine)
        for i, t in enumerate(req.tokens):
            if not 0 <= t < limit:
                raise bad_request(f"token ids must be in [0, {limit}), got {t}", f"tokens[{i}]")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    # ------------------------------------------------------------------------- chat completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_body(ChatCompletionRequest, await read_body(request, state.max_body_bytes))
        check_chat(req)
        engine = state.require_engine()
        defaults = ChatDefaults.of(engine)
        if defaults.chat_format != "chatml":
            raise bad_request(f"The loaded model is not a chat model (chat_format {defaults.chat_format!r}); use "
                              "/v1/completions", "model", "model_not_chat")
        tokenizer = engine.tokenizer
        plan = await asyncio.to_thread(build_chat_plan, tokenizer, req, defaults)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        stop_ids = stop_token_ids(tokenizer)
        params = sampling_params(req, engine, len(plan.prompt_ids), plan.stop, stop_ids, logprobs, req.max_length)
        n = req.n or 1
        processors = [None] * n
        if req.response_format is not None and req.response_format.type != "text":
            if plan.functions:
                raise bad_request("response_format (JSON) cannot be combined with tools or functions: a tool call is "
                                  "ReAct text, not JSON", "response_format")
            processors = await asyncio.to_thread(response_format_processors, tokenizer, req.response_format,
                                                 stop_ids, n)
        streams = submit_all(engine, plan.prompt_ids, [_choice_params(params, i, processors[i]) for i in range(n)])
        meta = {"id": _new_id("chatcmpl-"), "created": int(time.time()), "model": state.model_name}
        token_text = TokenText(tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(chat_stream(state, plan, streams, meta, token_text, bool(req.logprobs), include_usage))
        results = await collect_choices(state, request, streams)
        if results is None:
            return Response(status_code=499)
        choices, completion_tokens, cached = [], 0, 0
        for i, outputs in enumerate(results):
            choice, used = chat_choice(plan, i, outputs, token_text, bool(req.logprobs))
            choices.append(choice)
            completion_tokens += used
            cached = max(cached, outputs[-1].cached_tokens)
        return {"object": "chat.completion", **meta, "choices": choices,
                "usage": _usage(len(plan.prompt_ids), completion_tokens, cached)}

    # ------------------------------------------------------------------------- completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await read_body(request, state.max_body_bytes))
        check_completion(req)
        engine = state.require_engine()
        tokenizer = engine.tokenizer
        score_prompt = bool(req.echo) and req.logprobs is not None  # lm-eval's loglikelihood requests
        prompts = await asyncio.to_thread(_completion_prompts, tokenizer, req.prompt, _vocab_limit(engine))
        n = req.n or 1
        if len(prompts) * n > MAX_N:
            raise bad_request(f"at most {MAX_N} choices per request (prompts x n)", "n")
        stop = [s for s in ([req.stop] if isinstance(req.stop, str) else (req.stop or [])) if s]
        stop_ids = [tokenizer.eod_id, *(t for t in req.stop_token_ids or [] if t != tokenizer.eod_id)]  # + vLLM's
        jobs, streams = [], []
        try:
            for p, (text, ids) in enumerate(prompts):
                params = sampling_params(req, engine, len(ids), stop, stop_ids, req.logprobs)
                params.prompt_logprobs = req.logprobs if score_prompt else None
                batch = submit_all(engine, ids, [_choice_params(params, i) for i in range(n)])
                streams.extend(batch)
                jobs.extend((text, ids) for _ in batch)
        except APIError:
            _cancel(streams)
            raise
        meta = {"id": _new_id("cmpl-"), "created": int(time.time()), "model": state.model_name}
        token_text = TokenText(tokenizer)
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(completion_stream(state, jobs, streams, meta, token_text, req.logprobs, bool(req.echo),
                                          include_usage, prompt_tokens))
        results = await collect_choices(state, request, streams)
        if results is None:
            return Response(status_code=499)
        choices, completion_tokens = [], 0
        for i, outputs in enumerate(results):
            text = "".join(out.text for out in outputs)
            prompt_text = jobs[i][0] if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                builder = CompletionLogprobs(token_text, 0 if score_prompt else len(prompt_text))
                blocks = [builder.prompt_block(jobs[i][1], outputs[0].prompt_logprobs)] if score_prompt else []
                blocks.append(builder.block([lp for out in outputs for lp in (out.logprobs or [])]))
                logprobs = merge_completion_logprobs(blocks)
            choices.append({"index": i, "text": prompt_text + text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(outputs[-1].finish_reason, False, False)})
            completion_tokens += outputs[-1].completion_tokens
        return {"object": "text_completion", **meta, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens, 0)}

    return app


def _vocab_limit(engine) -> int:
    limit = len(engine.tokenizer)
    vocab = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None)
    return min(limit, vocab) if isinstance(vocab, int) else limit


def _completion_prompts(tokenizer, prompt, limit: int) -> list[tuple[str, list[int]]]:
    """[(prompt text, ids)] for a completions `prompt`: text (special-token text allowed, as a raw
    prompt is written), a list of texts, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise bad_request("prompt must not be empty", param)
            out.append((p, tokenizer.encode(p)))
        else:
            if not p:
                raise bad_request("prompt must not be empty", param)
            for t in p:
                if not 0 <= t < limit:
                    raise bad_request(f"prompt token ids must be in [0, {limit}), got {t}", param)
            out.append((tokenizer.decode(p), list(p)))
    return out


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(events) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream_error(exc: BaseException) -> dict:
    return _engine_failure(exc).body()


@dataclass
class _ChoiceStream:
    react: ReActStream | None
    call_id: str = field(default_factory=_tool_call_id)
    pending_logprobs: list = field(default_factory=list)
    called: bool = False


async def chat_stream(state: ServerState, plan: ChatPlan, streams, meta: dict, token_text: TokenText,
                      want_logprobs: bool, include_usage: bool):
    """chat.completion.chunk events: a role delta per choice, content / tool-call deltas, an empty
    delta with the finish reason, then (with include_usage) a usage chunk with no choices."""
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    choices = [_ChoiceStream(ReActStream(plan.reply_prefix) if plan.functions else None) for _ in streams]

    def chunk(index, delta, finish_reason=None, logprobs=None):
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}], **extra}

    def deltas(index, events):
        st = choices[index]
        out = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
            elif kind == "name":
                st.called = True
                if plan.legacy:
                    out.append({"function_call": {"name": value, "arguments": ""}})
                else:
                    out.append({"tool_calls": [{"index": 0, "id": st.call_id, "type": "function",
                                                "function": {"name": value, "arguments": ""}}]})
            elif kind == "args":
                if plan.legacy:
                    out.append({"function_call": {"arguments": value}})
                else:
                    out.append({"tool_calls": [{"index": 0, "function": {"arguments": value}}]})
        return out

    def with_logprobs(index, delta_list, flush=False):
        st = choices[index]
        events = []
        for k, delta in enumerate(delta_list):
            lp = None
            if want_logprobs and st.pending_logprobs and (k == len(delta_list) - 1):
                lp = chat_logprobs(token_text, st.pending_logprobs)
                st.pending_logprobs = []
            events.append(chunk(index, delta, logprobs=lp))
        return events

    completion_tokens, cached = 0, 0
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, out in merge_streams(streams):
            if isinstance(out, BaseException):
                yield _stream_error(out)
                return
            st = choices[index]
            if want_logprobs and out.logprobs:
                st.pending_logprobs.extend(out.logprobs)
            final = out.finish_reason is not None
            if st.react is None:
                delta_list = [{"content": out.text}] if out.text else []
            else:
                delta_list = deltas(index, st.react.feed(out.text, final=final))
            for event in with_logprobs(index, delta_list):
                yield event
            if final:
                lp = chat_logprobs(token_text, st.pending_logprobs) if want_logprobs and st.pending_logprobs else None
                yield chunk(index, {}, _finish_reason(out.finish_reason, st.called, plan.legacy), lp)
                completion_tokens += out.completion_tokens
                cached = max(cached, out.cached_tokens)
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(len(plan.prompt_ids), completion_tokens, cached)}
    finally:
        _cancel(streams)
        state.request_done()


async def completion_stream(state: ServerState, jobs, streams, meta: dict, token_text: TokenText,
                            logprobs: int | None, echo: bool, include_usage: bool, prompt_tokens: int):
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    score_prompt = echo and logprobs is not None  # the echoed prompt carries its logprobs: sent with the first output
    builders = [CompletionLogprobs(token_text, len(text) if echo and not score_prompt else 0) for text, _ in jobs]

    def chunk(index, text, lp=None, finish_reason=None):
        return {**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                     "finish_reason": finish_reason}], **extra}

    completion_tokens = 0
    try:
        if echo and not score_prompt:
            for i, (text, _) in enumerate(jobs):
                yield chunk(i, text)
        async for index, out in merge_streams(streams):
            if isinstance(out, BaseException):
                yield _stream_error(out)
                return
            if score_prompt and out.prompt_logprobs is not None:
                text, ids = jobs[index]
                yield chunk(index, text, builders[index].prompt_block(ids, out.prompt_logprobs))
            lp = builders[index].block(out.logprobs) if logprobs is not None and out.logprobs else None
            final = out.finish_reason is not None
            if out.text or lp or final:
                yield chunk(index, out.text, lp,
                            _finish_reason(out.finish_reason, False, False) if final else None)
            if final:
                completion_tokens += out.completion_tokens
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens, 0)}
    finally:
        _cancel(streams)
        state.request_done()
