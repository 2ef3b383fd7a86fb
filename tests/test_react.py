"""ReAct prompt building and parsing for the OpenAI-compatible API (spec §7, openai_api.py)."""

import pytest

from qwen.api.react import (
    ChatPrompt,
    messages_to_prompt,
    parse_react_response,
    react_instruction,
    stop_strings,
    tool_description,
    truncate_at_stop,
)
from qwen.qwen_generation_utils import make_context

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SEARCH = {
    "name_for_human": "谷歌搜索",
    "name_for_model": "google_search",
    "description_for_model": "谷歌搜索是一个通用搜索引擎。",
    "parameters": [{"name": "search_query", "description": "搜索关键词", "required": True}],
}

WEATHER_LINE = (
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the current weather in a city. Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
)
SEARCH_LINE = (
    "google_search: Call this tool to interact with the 谷歌搜索 API. What is the 谷歌搜索 API useful for? "
    '谷歌搜索是一个通用搜索引擎。 Parameters: [{"name": "search_query", "description": "搜索关键词", "required": true}]'
)

INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? Get the current weather in a city. Parameters: {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

google_search: Call this tool to interact with the 谷歌搜索 API. What is the 谷歌搜索 API useful for? 谷歌搜索是一个通用搜索引擎。 Parameters: [{"name": "search_query", "description": "搜索关键词", "required": true}]

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [get_weather, google_search]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

INSTRUCTION_ONE = react_instruction([WEATHER])
SYS = "You are a helpful assistant."


def user(content):
    return {"role": "user", "content": content}


def assistant(content, function_call=None):
    message = {"role": "assistant", "content": content}
    if function_call is not None:
        message["function_call"] = function_call
    return message


# ---------------------------------------------------------------------------
# Tool lines and the instruction
# ---------------------------------------------------------------------------


def test_tool_line_fallbacks_to_name_and_description():
    assert tool_description(WEATHER) == WEATHER_LINE


def test_tool_line_explicit_fields_and_non_ascii_parameters():
    assert tool_description(SEARCH) == SEARCH_LINE


def test_tool_line_explicit_fields_win_over_fallbacks():
    function = dict(SEARCH, name="ignored", description="ignored too")
    assert tool_description(function) == SEARCH_LINE


def test_tool_line_without_description_is_empty():
    line = tool_description({"name": "f", "parameters": {}})
    assert line == "f: Call this tool to interact with the f API. What is the f API useful for?  Parameters: {}"


@pytest.mark.parametrize(
    "function, fragment",
    [
        ({"name": "get_weather"}, "'get_weather' has no 'parameters'"),
        ({"description": "x", "parameters": {}}, "has no 'name'"),
        ("get_weather", "must be an object"),
    ],
)
def test_tool_line_errors(function, fragment):
    with pytest.raises(ValueError, match=fragment):
        tool_description(function)


def test_instruction_two_tools():
    assert react_instruction([WEATHER, SEARCH]) == INSTRUCTION


def test_instruction_needs_functions():
    with pytest.raises(ValueError):
        react_instruction([])


# ---------------------------------------------------------------------------
# Message rewriting and placement
# ---------------------------------------------------------------------------


def test_plain_chat_without_functions():
    prompt = messages_to_prompt(
        [
            {"role": "system", "content": "\n\nBe brief.  \n"},
            user("\nhi\n"),
            assistant("hello  "),
            user("\n\nhow are you? \n"),
        ],
        None,
    )
    assert prompt == ChatPrompt(query="how are you?", history=[("hi", "hello")], system="Be brief.")
    assert prompt.raw_completion is None and prompt.stop_words == []


def test_default_system():
    assert messages_to_prompt([user("hi")], None).system == SYS


def test_system_only_first():
    with pytest.raises(ValueError, match="system message is only allowed first"):
        messages_to_prompt([user("hi"), {"role": "system", "content": "late"}], None)


def test_placement_without_history_goes_on_query():
    prompt = messages_to_prompt([user("What's the weather in Paris?")], [WEATHER, SEARCH])
    assert prompt.query == f"{INSTRUCTION}\n\nQuestion: What's the weather in Paris?"
    assert prompt.history == []


def test_placement_with_history_goes_on_last_pair():
    prompt = messages_to_prompt(
        [user("q1"), assistant("a1"), user("q2"), assistant("a2"), user("q3")],
        [WEATHER, SEARCH],
    )
    final = "Thought: I now know the final answer.\nFinal Answer: "
    assert prompt.history == [
        ("q1", final + "a1"),
        (f"{INSTRUCTION}\n\nQuestion: q2", final + "a2"),
    ]
    assert prompt.query == "q3"


def test_assistant_function_call_rewriting():
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    cases = {
        "I should check the weather.": "Thought: I should check the weather.",
        "": "Thought: ",
        "Thought: already thinking": "Thought: already thinking",
    }
    for content, thought in cases.items():
        prompt = messages_to_prompt([user("q"), assistant(content, call), user("next")], [WEATHER])
        assert prompt.history[0][1] == f'{thought}\nAction: get_weather\nAction Input: {{"city": "Paris"}}'


def test_assistant_none_content_with_function_call():
    call = {"name": "get_weather", "arguments": "{}"}
    prompt = messages_to_prompt([user("q"), assistant(None, call), user("next")], [WEATHER])
    assert prompt.history[0][1] == "Thought: \nAction: get_weather\nAction Input: {}"


def test_function_result_then_final_answer_and_new_question():
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt = messages_to_prompt(
        [
            user("Weather in Paris?"),
            assistant("I need the weather.", call),
            {"role": "function", "name": "get_weather", "content": "\nSunny, 25C\n"},
            assistant("It is sunny."),
            user("And tomorrow?"),
        ],
        [WEATHER],
    )
    assert prompt.history == [
        (
            f"{INSTRUCTION_ONE}\n\nQuestion: Weather in Paris?",
            'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
            "Observation: Sunny, 25C\n"
            "Thought: I now know the final answer.\nFinal Answer: It is sunny.",
        )
    ]
    assert prompt.query == "And tomorrow?"
    assert prompt.raw_completion is None



def test_last_function_result_gives_raw_completion():
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt = messages_to_prompt(
        [
            {"role": "system", "content": "Sys."},
            user("Weather in Paris?"),
            assistant("I need the weather.", call),
            {"role": "function", "name": "get_weather", "content": "Sunny"},
        ],
        [WEATHER],
    )
    bot = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: Sunny\nThought:'
    usr = f"{INSTRUCTION_ONE}\n\nQuestion: Weather in Paris?"
    assert prompt.query is None
    assert prompt.history == [(usr, bot)]
    assert prompt.raw_completion == (
        f"<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n{usr}<|im_end|>\n<|im_start|>assistant\n{bot}"
    )
    assert prompt.stop_words == ["<|im_end|>"]


def test_raw_completion_matches_make_context(qwen_tokenizer):
    call = {"name": "get_weather", "arguments": "{}"}
    prompt = messages_to_prompt(
        [
            user("first"),
            assistant("a1"),
            user("second"),
            assistant("", call),
            {"role": "function", "content": "r1"},
            {"role": "function", "content": "r2"},
        ],
        [WEATHER],
    )
    assert prompt.history[-1][1] == (
        "Thought: \nAction: get_weather\nAction Input: {}\nObservation: r1\nObservation: r2\nThought:"
    )
    # chatml of the earlier turns + the open last user/assistant pair, as make_context writes it.
    (last_user, last_bot) = prompt.history[-1]
    raw_text, _ = make_context(qwen_tokenizer, last_user, prompt.history[:-1], system=SYS)
    assert prompt.raw_completion == raw_text + last_bot


def test_consecutive_assistants_are_joined():
    prompt = messages_to_prompt([user("q"), assistant("part one\n"), assistant("\npart two"), user("q2")], None)
    assert prompt.history == [("q", "part one\npart two")]


def test_consecutive_assistants_with_functions():
    prompt = messages_to_prompt([user("q"), assistant("a"), assistant("b"), user("q2")], [WEATHER])
    final = "Thought: I now know the final answer.\nFinal Answer: "
    assert prompt.history[0][1] == f"{final}a\n{final}b"


def test_trailing_assistant_is_continued_raw():
    prompt = messages_to_prompt([user("q"), assistant("Once upon")], None)
    assert prompt.query is None
    assert prompt.raw_completion == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\nOnce upon"
    )


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([user("a"), user("b")], "odd number"),
        ([user("a"), user("b"), assistant("c"), user("d")], "odd number"),
        ([user("a"), user("b"), user("c"), assistant("d"), user("e")], "exactly one user message"),
        ([assistant("a"), user("b")], "must follow a user message"),
        ([user("a"), {"role": "function", "content": "r"}], "must follow an assistant message"),
        ([user("a"), {"role": "tool", "content": "r"}], "unknown role 'tool'"),
        ([{"content": "r"}], "unknown role None"),
        ([{"role": "system", "content": "s"}], "at least one user message"),
        ([], "non-empty list"),
        ([user(["a", "b"])], "content must be a string"),
        ([user("a"), assistant("b", {"arguments": "{}"}), user("c")], "needs a 'name'"),
    ],
)
def test_errors(messages, fragment):
    with pytest.raises(ValueError, match=fragment):
        messages_to_prompt(messages, [WEATHER])


def test_bad_function_list_is_an_error():
    with pytest.raises(ValueError, match="no 'parameters'"):
        messages_to_prompt([user("q")], [{"name": "f"}])


# ---------------------------------------------------------------------------
# Stop strings and truncation
# ---------------------------------------------------------------------------


def test_stop_strings():
    assert stop_strings(None, None) == []
    assert stop_strings(None, [WEATHER]) == ["Observation:"]
    assert stop_strings("\nUser:", None) == ["\nUser:", "User:"]
    assert stop_strings(["\n\nEnd", "Observation:", "x", "\nx", ""], [WEATHER]) == [
        "\n\nEnd",
        "Observation:",
        "x",
        "\nx",
        "End",
    ]


def test_truncate_at_stop():
    assert truncate_at_stop("abc Observation: def", ["Observation:"]) == "abc "
    assert truncate_at_stop("one two three", ["three", "two"]) == "one "
    assert truncate_at_stop("nothing here", ["zzz"]) == "nothing here"
    assert truncate_at_stop("keep", []) == "keep"
    assert truncate_at_stop("keep", None) == "keep"


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def test_parse_action():
    text = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
    assert parse_react_response(text) == (
        "I need the weather.",
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    )


def test_parse_action_without_observation():
    text = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
    assert parse_react_response(text) == (
        "I need the weather.",
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    )


def test_parse_action_of_raw_completion_output():
    # After "...\nThought:" the model continues without the "Thought: " prefix.
    text = " I should search.\nAction: google_search\nAction Input: {\"search_query\": \"x\"}"
    assert parse_react_response(text) == (
        "I should search.",
        {"name": "google_search", "arguments": '{"search_query": "x"}'},
    )


def test_parse_final_answer():
    text = "Thought: I now know the final answer.\nFinal Answer: It is sunny.\nFinal Answer: Really sunny. "
    assert parse_react_response(text) == ("Really sunny.", None)


def test_parse_neither():
    assert parse_react_response("  Just a plain reply.\n") == ("Just a plain reply.", None)
    # An Action without an Action Input is not a call.
    assert parse_react_response("Thought: hmm\nAction: get_weather") == ("Thought: hmm\nAction: get_weather", None)
