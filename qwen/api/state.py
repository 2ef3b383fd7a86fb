"""The API server's state (the engine, its name, metrics), its Prometheus collectors and the
authentication and metrics middlewares."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import json
import time

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .protocol import APIError, error_body

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
            ("prefill_forwards_total", "qwen_prefill_forwards", "Prefill forwards (several prompts may share one)"),
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
