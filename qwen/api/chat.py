"""Chat requests as prompts and replies: the original's chatml prompt (`make_context`), rewritten
into the ReAct format when tools or functions are given (`qwen.api.react`), and the reply read back
as content or a tool call, whole or as a stream of OpenAI deltas."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..qwen_generation_utils import IM_END, chatml_turn, make_context
from ..serving.chat import ChatDefaults
from . import react
from .logprobs import TokenText, chat_logprobs
from .protocol import ChatCompletionRequest, bad_request, message_text
from .state import ServerState
from .streaming import cancel_streams, merge_streams, stream_error, usage_of

# ============================================================================= chat prompts


def _tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


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


def openai_finish_reason(engine_reason: str | None, called: bool, legacy: bool) -> str:
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
        "finish_reason": openai_finish_reason(last.finish_reason, call is not None, plan.legacy),
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
                yield stream_error(out)
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
                yield chunk(index, {}, openai_finish_reason(out.finish_reason, st.called, plan.legacy), lp)
                completion_tokens += out.completion_tokens
                cached = max(cached, out.cached_tokens)
        if include_usage:
            yield {**base, "choices": [], "usage": usage_of(len(plan.prompt_ids), completion_tokens, cached)}
    finally:
        cancel_streams(streams)
        state.request_done()
