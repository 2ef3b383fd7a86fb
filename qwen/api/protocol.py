"""Request models, validation and error bodies of the OpenAI-compatible API server.

Requests are parsed from the raw body with pydantic in strict mode: a field of the wrong type is
an error (``"0.5"`` is not a number, ``true`` is not an integer), NaN and infinities are refused,
and unknown fields are ignored. Every problem becomes an :class:`APIError`, which the app answers
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_N = 64  # choices per request (each one takes an engine slot)
_INT64 = 2**63

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def loc_to_param(loc) -> str | None:
    """pydantic's error location as a dotted parameter name: ``("messages", 0, "role")`` -> ``messages[0].role``."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "function-after", "union", "literal"):
            continue  # pydantic's names of union branches, not fields
        elif "[" in str(part) or "(" in str(part) or str(part)[:1].isupper():
            continue  # a union branch named by its type (e.g. NamedToolChoice)
        else:
            param += ("." if param else "") + str(part)
    return param or None


def validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    # A union reports one error per branch: the branch errors that went deepest say the most.
    first = max(errors, key=lambda e: len(e["loc"])) if all(e["type"] != "json_invalid" for e in errors) else errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("The request body must be a JSON object", code="invalid_json")
    param = loc_to_param(first["loc"])
    message = first["msg"]
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'"
    elif param:
        message = f"Invalid value for '{param}': {message}"
        if first["type"] not in ("value_error",) and "input" in first and _short(first["input"]) is not None:
            message += f" (got {_short(first['input'])})"
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return bad_request(message, param, code)


def _short(value) -> str | None:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= 80 else text[:77] + "..."


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """The request ``model`` parsed from a JSON ``body``, or an :class:`APIError` (400)."""
    if not body.strip():
        raise bad_request("The request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep for the parser
        raise bad_request(f"The request body could not be parsed: {exc}", code="invalid_json") from None


# ----------------------------------------------------------------------------- request models


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, protected_namespaces=())


class FunctionCall(_Model):
    name: str = Field(min_length=1)
    arguments: str | dict | list | None = None


class ToolCallFunction(_Model):
    name: str = Field(min_length=1)
    arguments: str | dict | list | None = None


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Model):
    type: str
    text: str | None = None


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Model):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str = Field(min_length=1)


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


StopField = Union[str, Annotated[list[str], Field(max_length=16)], None]
_MAX_TOKENS = {"ge": 1, "le": 2**31 - 1}


class _SamplingFields(_Model):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: StopField = None
    max_tokens: int | None = Field(None, **_MAX_TOKENS)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 (vLLM) and 0 both mean no top-k cut
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **_MAX_TOKENS)
    max_length: int | None = Field(None, **_MAX_TOKENS)  # the original's: prompt + reply tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None


PromptField = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: int | None = Field(16, **_MAX_TOKENS)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None  # vLLM's
    response_format: ResponseFormat | None = None  # constrained decoding on raw prompts, as vLLM
    return_tokens_as_token_ids: bool | None = False  # vLLM's: logprob tokens as "token_id:<id>"


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    functions: list[dict[str, Any]] | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- checks beyond types


def check_common(req: _SamplingFields) -> None:
    """Checks that pydantic's field constraints cannot express (400 on failure)."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    for i, stop in enumerate(stops):
        if len(stop) > 1024:
            raise bad_request("each stop string may be at most 1024 characters", f"stop[{i}]" if
                              not isinstance(req.stop, str) else "stop")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if req.tools is not None and req.functions is not None:
        raise bad_request("Give either 'tools' or the legacy 'functions', not both", "functions")
    check_messages(req.messages)


def check_messages(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"Only text content parts are supported, got type {part.type!r}",
                                      f"messages[{i}].content[{j}]")
        if message.role not in ("assistant",) and (message.tool_calls or message.function_call):
            raise bad_request(f"Only assistant messages may have tool_calls or function_call (messages[{i}] "
                              f"is {message.role!r})", f"messages[{i}]")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of other than n is not supported", "best_of", "unsupported_parameter")
    if req.suffix:
        raise bad_request("suffix is not supported (Qwen has no fill-in-the-middle mode)", "suffix",
                          "unsupported_parameter")


def message_text(message: ChatMessage) -> str | None:
    """A message's content as one string (text parts joined), or None."""
    content = message.content
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content
