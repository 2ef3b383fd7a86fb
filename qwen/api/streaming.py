"""From a checked request to engine streams and back: request bodies, sampling parameters,
submitting the `n` choices, merging their streams, usage blocks and server-sent events."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..serving.chat import ChatDefaults
from ..serving.params import EngineBusy, RequestError, SamplingParams
from .protocol import APIError, ChatCompletionRequest, bad_request
from .state import ServerState

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


def choice_params(params: SamplingParams, index: int, processors: list | None = None) -> SamplingParams:
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


def response_format_processors(tokenizer, response_format, stop_token_ids, n: int,
                               params: SamplingParams) -> list[list | None]:
    """One constrained-decoding processor per choice for a json_object / json_schema `response_format`
    (None each for text), and `params.response_format` set to it (what an upstream engine forwards).
    Raises APIError 400 for a bad schema or when constrained decoding is unavailable."""
    if response_format is None or response_format.type == "text":
        return [None] * n
    try:
        from ..serving.constraints import response_format_processor
    except ImportError as exc:
        raise bad_request(f"response_format {response_format.type!r} is not available on this server: {exc}",
                          "response_format", "unsupported_parameter") from None
    spec = response_format.model_dump(exclude_none=True)
    params.response_format = spec
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
        cancel_streams(streams)
        raise bad_request(str(exc), _api_param(exc.param), "invalid_value") from None
    except EngineBusy as exc:
        cancel_streams(streams)
        raise APIError(429, str(exc) or "The server is busy; try again later", "rate_limit_error",
                       code="engine_busy", headers={"Retry-After": "1"}) from None
    except RuntimeError as exc:  # shut down
        cancel_streams(streams)
        raise APIError(503, f"The engine is not serving: {exc}", "service_unavailable") from None
    return streams


def _api_param(param: str | None) -> str | None:
    return {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs"}.get(param, param)


def cancel_streams(streams) -> None:
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
        cancel_streams(streams)


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
        cancel_streams(streams)


async def collect_choices(state: ServerState, request: Request, streams) -> list[list] | None:
    """Every choice's outputs of a non-streamed request; None when the client has left."""
    try:
        return await collect(request, streams)
    except ClientGone:
        return None
    except Exception as exc:  # noqa: BLE001
        raise engine_failure(exc) from None
    finally:
        state.request_done()


def engine_failure(exc: BaseException) -> APIError:
    if isinstance(getattr(exc, "http_status", None), int):  # an upstream's failure (qwen.serving.upstream)
        return APIError(exc.http_status, str(exc), getattr(exc, "error_type", "server_error"),
                        code=getattr(exc, "code", None))
    return APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", "server_error", code="generation_failed")



def usage_of(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse_response(events) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

def stream_error(exc: BaseException) -> dict:
    return engine_failure(exc).body()
