"""Tool calling through the server with a model that really answers in the ReAct format.

A random tiny model never writes `Action:` by itself, so the tiny checkpoint's output layer is
fitted (closed form, a second) to reply to two fixed conversations: a question, answered with
a call of `get_weather`, and the same question after the call's result, answered with a final
answer. The hidden states come from the model's own forward pass over prompt + reply, and only
the output rows of the reply's tokens are set (least squares, with a wide margin), so greedy or
sampled decoding by the real engine reproduces the replies. The prompts are the server's own.
"""

import json

import httpx
import openai
import pytest
import torch

from qwen.api.app import create_app
from qwen.api.chat import build_chat_plan
from qwen.api.protocol import ChatCompletionRequest
from qwen.api.server import BackgroundServer
from qwen.serving import Engine
from qwen.serving.chat import ChatDefaults

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'
CALL_REPLY = f"Thought: I should look it up.\nAction: get_weather\nAction Input: {ARGUMENTS}\nObservation:"
AFTER_RESULT = QUESTION + [
    {"role": "assistant", "content": "I should look it up.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
]
ANSWER_REPLY = " I now know the final answer.\nFinal Answer: It is sunny in Paris, 24 C."
# After the prefill that forces a call: "Action:" (tool_choice "required"), or "Action: get_weather
# \nAction Input:" (the function named).
REQUIRED_REPLY = f" get_weather\nAction Input: {ARGUMENTS}\nObservation:"
NAMED_REPLY = f" {ARGUMENTS}\nObservation:"
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def fit_replies(model, pairs):
    """Set the output rows of the replies' tokens so that each prompt is answered with its reply."""
    feats, targets = [], []
    with torch.no_grad():
        for prompt, reply in pairs:
            hidden = model.transformer(input_ids=torch.tensor([prompt + reply])).last_hidden_state[0]
            feats.append(hidden[len(prompt) - 1 : len(prompt) + len(reply) - 1])
            targets += reply
        h = torch.cat(feats).double()
        classes = sorted(set(targets))
        onehot = torch.zeros(len(targets), len(classes), dtype=torch.float64)
        for i, t in enumerate(targets):
            onehot[i, classes.index(t)] = 1.0
        margin = 4 * (h.float() @ model.lm_head.weight.T).abs().max().item() + 60
        model.lm_head.weight[classes] = (torch.linalg.pinv(h) @ (margin * onehot)).T.float()
        logits = h.float() @ model.lm_head.weight.T
        assert logits.argmax(-1).tolist() == targets


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from qwen.loading import load_model
    from qwen.tools.tiny_checkpoint import build

    # 128 hidden units: room for the ~70 reply positions to fit exactly.
    path = build(tmp_path_factory.mktemp("api-tools") / "react-chat", chat=True, dtype="float32", hidden_size=128)
    model, tokenizer = load_model(str(path), cpu_only=True)
    defaults = ChatDefaults.of(type("E", (), {"model": model})())

    def prompt(messages, tool_choice=None):
        req = ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS, "tool_choice": tool_choice})
        return build_chat_plan(tokenizer, req, defaults).prompt_ids

    encode = lambda text: tokenizer.encode(text, allowed_special=set())
    fit_replies(model, [(prompt(QUESTION), encode(CALL_REPLY)),
                        (prompt(AFTER_RESULT), encode(ANSWER_REPLY) + [tokenizer.im_end_id]),
                        (prompt(QUESTION, "required"), encode(REQUIRED_REPLY)),
                        (prompt(QUESTION, NAMED), encode(NAMED_REPLY))])
    engine = Engine(model, tokenizer, max_running=4, max_waiting=8, max_context=512, model_name="react")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, disable_gc=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.parametrize("temperature", [0, None])
def test_tool_call(client, engine, temperature):
    extra = {} if temperature is None else {"temperature": temperature}
    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, **extra)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I should look it up."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The reply stopped at "Observation:" (a stop word with tools), which it generated.
    assert reply.usage.completion_tokens == len(engine.tokenizer.encode(CALL_REPLY))


def test_tool_call_streamed(client):
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "I should look it up."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert "".join(tc.function.arguments or "" for tc in calls) == ARGUMENTS
    assert all(tc.index == 0 and tc.function.name is None for tc in calls[1:])
    content_at = max(i for i, d in enumerate(deltas) if d.content)
    assert content_at < min(i for i, d in enumerate(deltas) if d.tool_calls)  # the thought comes first
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_legacy_function_call(server):
    body = {"messages": QUESTION, "functions": [WEATHER]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"] == {"role": "assistant", "content": "I should look it up.",
                                 "function_call": {"name": "get_weather", "arguments": ARGUMENTS}}
    lines = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
    events = [json.loads(x[6:]) for x in lines.split("\n\n") if x.startswith("data: {")]
    fcs = [e["choices"][0]["delta"]["function_call"] for e in events if "function_call" in e["choices"][0]["delta"]]
    assert fcs[0] == {"name": "get_weather", "arguments": ""}
    assert "".join(f["arguments"] for f in fcs) == ARGUMENTS
    assert events[-1]["choices"][0]["finish_reason"] == "function_call"


def test_final_answer_after_the_tool_result(client):
    reply = client.chat.completions.create(model="m", messages=AFTER_RESULT, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.message.content == "It is sunny in Paris, 24 C."
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=AFTER_RESULT, tools=TOOLS, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "It is sunny in Paris, 24 C."
    assert len(pieces) > 1  # streamed as it came, not at the end
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_tools_the_reply_is_raw_text(client):
    # Same model, no tools: the ReAct prompt is not built, so nothing is parsed either.
    reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, temperature=0)
    assert reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_forced_tool_choice(client, tool_choice):
    for stream in (False, True):
        response = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice=tool_choice,
                                                  stream=stream)
        if stream:
            chunks = list(response)
            deltas = [c.choices[0].delta for c in chunks]
            calls = [tc for d in deltas for tc in (d.tool_calls or [])]
            assert calls[0].function.name == "get_weather"
            assert "".join(tc.function.arguments or "" for tc in calls) == ARGUMENTS
            assert not "".join(d.content or "" for d in deltas)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            choice = response.choices[0]
            assert choice.message.content is None and choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
