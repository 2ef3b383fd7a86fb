"""The OpenAI-compatible HTTP API (Qwen v1's ``openai_api.py``) on top of the serving engine.

    app = create_app(engine)            # or create_app() now and set_engine(app, engine) once loaded
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /tokenize``, ``POST /detokenize``. Chat prompts are the original's
chatml (``make_context``), rewritten into the ReAct format when tools or functions are given
(``qwen.api.react``); every error is OpenAI's ``{"error": {...}}`` body.

This module holds the app and its routes; beside it: ``state`` (server state, metrics, auth),
``streaming`` (requests to engine streams and back, SSE), ``chat`` (chat prompts, tool calls and
their streamed deltas), ``logprobs`` (tokens as text), ``protocol`` (request schemas and errors).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serving.chat import ChatDefaults, stop_token_ids
from .chat import build_chat_plan, chat_choice, chat_stream, openai_finish_reason
from .logprobs import CompletionLogprobs, TokenText, merge_completion_logprobs
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
    parse_body,
)
from .state import (
    AuthMiddleware,
    MetricsMiddleware,
    ServerState,
    get_state,
    set_engine,
    set_load_error,
)
from .streaming import (
    cancel_streams,
    choice_params,
    collect_choices,
    error_response,
    merge_streams,
    read_body,
    response_format_processors,
    sampling_params,
    sse_response,
    stream_error,
    submit_all,
    usage_of,
)

__all__ = ["create_app", "get_state", "set_engine", "set_load_error"]

# ============================================================================= the app


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


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
        if plan.functions and req.response_format is not None and req.response_format.type != "text":
            raise bad_request("response_format (JSON) cannot be combined with tools or functions: a tool call is "
                              "ReAct text, not JSON", "response_format")
        processors = await asyncio.to_thread(response_format_processors, tokenizer, req.response_format, stop_ids, n,
                                             params)
        streams = submit_all(engine, plan.prompt_ids, [choice_params(params, i, processors[i]) for i in range(n)])
        meta = {"id": _new_id("chatcmpl-"), "created": int(time.time()), "model": state.model_name}
        token_text = TokenText(tokenizer)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(chat_stream(state, plan, streams, meta, token_text, bool(req.logprobs), include_usage))
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
                "usage": usage_of(len(plan.prompt_ids), completion_tokens, cached)}

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
                processors = await asyncio.to_thread(response_format_processors, tokenizer, req.response_format,
                                                     stop_ids, n, params)
                batch = submit_all(engine, ids, [choice_params(params, i, processors[i]) for i in range(n)])
                streams.extend(batch)
                jobs.extend((text, ids) for _ in batch)
        except APIError:
            cancel_streams(streams)
            raise
        meta = {"id": _new_id("cmpl-"), "created": int(time.time()), "model": state.model_name}
        token_text = TokenText(tokenizer, as_ids=bool(req.return_tokens_as_token_ids))
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(completion_stream(state, jobs, streams, meta, token_text, req.logprobs, bool(req.echo),
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
                            "finish_reason": openai_finish_reason(outputs[-1].finish_reason, False, False)})
            completion_tokens += outputs[-1].completion_tokens
        return {"object": "text_completion", **meta, "choices": choices,
                "usage": usage_of(prompt_tokens, completion_tokens, 0)}

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
                yield stream_error(out)
                return
            if score_prompt and out.prompt_logprobs is not None:
                text, ids = jobs[index]
                yield chunk(index, text, builders[index].prompt_block(ids, out.prompt_logprobs))
            lp = builders[index].block(out.logprobs) if logprobs is not None and out.logprobs else None
            final = out.finish_reason is not None
            if out.text or lp or final:
                yield chunk(index, out.text, lp,
                            openai_finish_reason(out.finish_reason, False, False) if final else None)
            if final:
                completion_tokens += out.completion_tokens
        if include_usage:
            yield {**base, "choices": [], "usage": usage_of(prompt_tokens, completion_tokens, 0)}
    finally:
        cancel_streams(streams)
        state.request_done()
