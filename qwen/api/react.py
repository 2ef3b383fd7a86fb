"""ReAct function calling for the OpenAI-compatible chat API (Qwen v1's ``openai_api.py``).

The chat models were tuned on this exact prompt format, so the strings here are
reproduced character for character. Everything is a pure function on plain data
(dicts, strings); errors are ``ValueError`` with messages fit for an HTTP 400.
"""

import json
from dataclasses import dataclass, field

from ..qwen_generation_utils import DEFAULT_SYSTEM, IM_END, IM_START

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

OBSERVATION_STOP = "Observation:"
ROLES = ("system", "user", "assistant", "function")


def _clean(text):
    """The original's normalisation of every message: drop leading newlines and trailing whitespace."""
    return text.lstrip("\n").rstrip()


def _model_name(function):
    name = function.get("name_for_model", function.get("name"))
    if not name:
        raise ValueError(f"Invalid request: function {function!r} has no 'name' (or 'name_for_model')")
    return name


def tool_description(function: dict) -> str:
    """One tool line of the ReAct instruction for an OpenAI-style ``function`` dict.

    ``name_for_model``/``name_for_human`` fall back to ``name`` and
    ``description_for_model`` to ``description``; ``parameters`` is required.
    """
    if not isinstance(function, dict):
        raise ValueError(f"Invalid request: each function must be an object, got {function!r}")
    name_for_model = _model_name(function)
    name_for_human = function.get("name_for_human", function.get("name", name_for_model))
    if "parameters" not in function:
        raise ValueError(f"Invalid request: function {name_for_model!r} has no 'parameters'")
    return TOOL_DESC.format(
        name_for_model=name_for_model,
        name_for_human=name_for_human,
        description_for_model=function.get("description_for_model", function.get("description", "")),
        parameters=json.dumps(function["parameters"], ensure_ascii=False),
    )


def react_instruction(functions: list[dict]) -> str:
    """The full ReAct instruction listing ``functions`` (prefixed to a user message as ``... Question: ...``)."""
    if not functions:
        raise ValueError("Invalid request: the ReAct instruction needs at least one function")
    tools_text = "\n\n".join(tool_description(f) for f in functions)
    tools_name_text = ", ".join(_model_name(f) for f in functions)
    return REACT_INSTRUCTION.format(tools_text=tools_text, tools_name_text=tools_name_text).lstrip("\n").rstrip()


@dataclass
class ChatPrompt:
    """What a chat completion request turns into.

    Either ``query`` is set (run ``model.chat(query, history, system)``), or the
    conversation ends with an assistant turn to continue (after a ``function``
    result, or a trailing assistant message): then ``query`` is None and
    ``raw_completion`` is the chatml text to tokenize whole and continue.
    ``stop_words`` are the stop strings the prompt itself needs on top of the
    request's (``stop_strings``): ``<|im_end|>`` for a raw completion, since it
    does not go through ``chat``'s own chatml stops; empty otherwise.
    """

    query: str | None
    history: list[tuple[str, str]]
    system: str = DEFAULT_SYSTEM
    raw_completion: str | None = None
    stop_words: list[str] = field(default_factory=list)


def _content(message, index):
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"Invalid request: messages[{index}].content must be a string")
    return _clean(content)


def _call_text(content, function_call, index):
    """A past function call as ReAct text: ``Thought: ...\\nAction: name\\nAction Input: args``."""
    if not isinstance(function_call, dict) or not function_call.get("name"):
        raise ValueError(f"Invalid request: messages[{index}].function_call needs a 'name'")
    arguments = function_call.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not content.startswith("Thought:"):
        content = f"Thought: {content}"
    return f"{content}\nAction: {function_call['name']}\nAction Input: {arguments}"


def _rewrite(messages, functions):
    """Messages -> (system, [[role, content], ...]) with only user/assistant turns left."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("Invalid request: messages must be a non-empty list")
    system = DEFAULT_SYSTEM
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"Invalid request: messages[{index}] must be an object")
        role = message.get("role")
        content = _content(message, index)
        if role == "system":
            if index != 0:
                raise ValueError(f"Invalid request: a system message is only allowed first (messages[{index}])")
            system = content
        elif role == "user":
            turns.append(["user", content])
        elif role == "assistant":
            if not turns:
                raise ValueError(f"Invalid request: messages[{index}] (assistant) must follow a user message")
            function_call = message.get("function_call")
            if function_call is not None:
                content = _call_text(content, function_call, index)
            elif functions:
                content = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            if turns[-1][0] == "user":
                turns.append(["assistant", content])
            else:
                turns[-1][1] += "\n" + content
        elif role == "function":
            if not turns or turns[-1][0] != "assistant":
                raise ValueError(f"Invalid request: messages[{index}] (function) must follow an assistant message")
            turns[-1][1] += f"\nObservation: {content}"
            if index == len(messages) - 1:
                turns[-1][1] += "\nThought:"
        else:
            raise ValueError(f"Invalid request: messages[{index}] has unknown role {role!r}; expected one of {ROLES}")
    if not any(role == "user" for role, _ in turns):
        raise ValueError("Invalid request: expecting at least one user message")
    return system, turns


def _pair(turns):
    """Consecutive (user, assistant) turns -> history pairs."""
    if len(turns) % 2:
        raise ValueError(
            "Invalid request: the conversation before the last user message must alternate user and assistant "
            f"(got an odd number, {len(turns)}, of messages)"
        )
    history = []
    for i in range(0, len(turns), 2):
        (user_role, user_text), (bot_role, bot_text) = turns[i], turns[i + 1]
        if (user_role, bot_role) != ("user", "assistant"):
            raise ValueError(
                "Invalid request: expecting exactly one user message before every assistant message "
                f"(turns {i} and {i + 1} are {user_role!r}, {bot_role!r})"
            )
        history.append((user_text, bot_text))
    return history


def chatml_completion_text(system: str, history: list[tuple[str, str]]) -> str:
    """chatml of system + history with the last turn left open (final ``<|im_end|>`` removed)."""
    text = f"{IM_START}system\n{system}{IM_END}"
    for user_text, bot_text in history:
        text += f"\n{IM_START}user\n{user_text}{IM_END}\n{IM_START}assistant\n{bot_text}{IM_END}"
    return text[: -len(IM_END)]


def messages_to_prompt(messages: list[dict], functions: list[dict] | None) -> ChatPrompt:
    """Rewrite OpenAI chat messages (and optional ``functions``) into a Qwen chat prompt, ReAct included.

    Raises ``ValueError`` (an HTTP 400) for malformed conversations.
    """
    system, turns = _rewrite(messages, functions)
    instruction = react_instruction(functions) if functions else ""
    query = None
    if turns[-1][0] == "user":
        query = turns.pop()[1]
    history = _pair(turns)
    if instruction:
        if history:
            user_text, bot_text = history[-1]
            history[-1] = (f"{instruction}\n\nQuestion: {user_text}", bot_text)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    if query is not None:
        return ChatPrompt(query=query, history=history, system=system)
    return ChatPrompt(
        query=None,
        history=history,
        system=system,
        raw_completion=chatml_completion_text(system, history),
        stop_words=[IM_END],
    )


def stop_strings(request_stop: list[str] | str | None, functions) -> list[str]:
    """The request's ``stop``, plus copies without leading newlines, plus ``Observation:`` with functions.

    Order is kept and duplicates and empty strings are dropped.
    """
    if request_stop is None:
        request_stop = []
    elif isinstance(request_stop, str):
        request_stop = [request_stop]
    if not all(isinstance(s, str) for s in request_stop):
        raise ValueError("Invalid request: stop must be a string or a list of strings")
    candidates = list(request_stop) + [s.lstrip("\n") for s in request_stop]
    if functions:
        candidates.append(OBSERVATION_STOP)
    stops = []
    for s in candidates:
        if s and s not in stops:
            stops.append(s)
    return stops


def truncate_at_stop(text: str, stops) -> str:
    """``text`` cut before the earliest occurrence of any of ``stops``."""
    cut = len(text)
    for stop in stops or ():
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def parse_react_response(text: str) -> tuple[str, dict | None]:
    """Split a ReAct reply into ``(content, function_call)``; function_call is None for a plain answer.

    ``Thought: ...\\nAction: name\\nAction Input: args[\\nObservation:]`` gives
    ``{"name", "arguments"}`` with the thought as content; otherwise the content is
    what follows the last ``\\nFinal Answer: `` (or the whole reply), stripped.
    """
    i = text.find("\nAction:")
    j = text.find("\nAction Input:", i + 1) if i >= 0 else -1
    if j >= 0:
        # A reply cut at the "Observation:" stop word has lost it: the arguments run to the end.
        k = text.find("\nObservation:", j + 1)
        if k < 0:
            k = len(text)
        name = text[i + len("\nAction:") : j].strip()
        arguments = text[j + len("\nAction Input:") : k].strip()
        if name:
            content = text[:i]
            t = content.find("Thought: ")
            if t >= 0:
                content = content[t + len("Thought: ") :]
            return content.strip(), {"name": name, "arguments": arguments}
    z = text.rfind("\nFinal Answer: ")
    if z >= 0:
        text = text[z + len("\nFinal Answer: ") :]
    return text.strip(), None
