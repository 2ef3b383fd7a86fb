"""The API server's pure parts: request validation and error bodies, tool-message rewriting, and
the streamed ReAct parser (which must agree with `parse_react_response` however the text is cut)."""

import json
import random

import pytest

from qwen.api.chat import ReActStream, _react_messages
from qwen.api.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
)
from qwen.api.react import parse_react_response

REPLIES = [
    'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n',
    'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: x',
    "Thought: I now know the final answer.\nFinal Answer: It is  sunny.\n\n",
    "Just an answer without the format.  ",
    "\nAction: f\nAction Input:",
    "\nAction: f\nAction Input: a b\n c \n",
    "Thought: x\nAction: \nAction Input: y",  # no name: not a call
    "Thought: x\nAction: f",  # no input: not a call
    "  \n Final Answer: trailing\n",
    "",
]


def stream_result(text, cuts, prefix=""):
    stream = ReActStream(prefix)
    events = []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for k, piece in enumerate(pieces):
        events += stream.feed(piece, final=k == len(pieces) - 1)
    content = "".join(v for kind, v in events if kind == "content")
    names = [v for kind, v in events if kind == "name"]
    args = "".join(v for kind, v in events if kind == "args")
    return events, content, names, args


@pytest.mark.parametrize("text", REPLIES)
def test_streamed_react_agrees_with_the_parser(text):
    content, call = parse_react_response(text)
    rng = random.Random(0)
    cut_sets = [list(range(1, len(text))), []]
    cut_sets += [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k))) for k in (2, 5, 9) if len(text) > 1]
    for cuts in cut_sets:
        events, s_content, names, args = stream_result(text, cuts)
        assert s_content == content
        if call is None:
            assert names == [] and args == ""
        else:
            assert names == [call["name"]] and args == call["arguments"]
            kinds = [kind for kind, _ in events]
            assert kinds.index("name") < (kinds.index("args") if "args" in kinds else len(kinds))


def test_streaming_keeps_its_first_final_answer():
    # The parser takes the last "Final Answer: "; a stream cannot take back what it sent.
    text = "Thought: hmm\nFinal Answer: one\nFinal Answer: two"
    assert parse_react_response(text) == ("two", None)
    assert stream_result(text, [30])[1] == "one\nFinal Answer: two"


def test_streamed_react_with_a_forced_prefix():
    events, content, names, args = stream_result(' {"city": "Rome"}\nObs', [3, 8], prefix="\nAction: f\nAction Input:")
    assert events[0] == ("name", "f") and names == ["f"] and args == '{"city": "Rome"}\nObs' and content == ""


def test_the_answer_streams_before_the_end():
    stream = ReActStream()
    assert stream.feed("Thought: ok\nFinal Answer: It is ") == [("content", "It is")]
    assert stream.feed("sunny") == [("content", " sunny")]
    assert stream.feed("  ", final=True) == []


def chat_request(**body):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}], **body})


def test_tool_messages_become_function_messages():
    req = chat_request(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "t", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": "[]"}}]},
        {"role": "tool", "tool_call_id": "2", "content": "r2"},
        {"role": "tool", "tool_call_id": "1", "content": "r1"},
        {"role": "user", "content": "next"},
    ])
    assert _react_messages(req.messages) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "t", "function_call": {"id": "1", "name": "f", "arguments": "{}"}},
        {"role": "assistant", "content": "", "function_call": {"id": "2", "name": "g", "arguments": "[]"}},
        {"role": "function", "content": "r2"},
        {"role": "function", "content": "r1"},
        {"role": "user", "content": "next"},
    ]


def test_calls_without_results_are_kept():
    req = chat_request(messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
    ])
    roles = [(m["role"], m.get("function_call", {}).get("name")) for m in _react_messages(req.messages)]
    assert roles == [("user", None), ("assistant", "f"), ("assistant", "g")]


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "q"}], "n": 1.0}', "n"),
    (b'{"messages": [{"role": "user", "content": "q"}], "temperature": "0.5"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "q"}], "tool_choice": {"type": "function"}}',
     "tool_choice.function"),
    (b'{"messages": [{"role": "user", "content": "q"}], "stop": ["a", 1]}', "stop[1]"),
    (b'{"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "retrieval"}]}', "tools[0].type"),
    (b"[" * 10000, None),
    (b"\xff\xfe", None),
])
def test_validation_errors_name_the_parameter(body, param):
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, body)
    assert info.value.status == 400 and info.value.param == param
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_stop_limits():
    long_stop = "a stop string well over sixteen characters"
    assert parse_body(ChatCompletionRequest, json.dumps(
        {"messages": [{"role": "user", "content": "q"}], "stop": long_stop}).encode()).stop == long_stop
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, json.dumps(
            {"messages": [{"role": "user", "content": "q"}], "stop": ["x"] * 17}).encode())
    assert info.value.param == "stop"


def test_unknown_fields_are_ignored():
    req = parse_body(CompletionRequest, b'{"prompt": "x", "frobnicate": [1, {"a": null}], "model": "m"}')
    assert req.prompt == "x" and req.max_tokens == 16
