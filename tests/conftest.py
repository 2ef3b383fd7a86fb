"""Shared fixtures: the real Qwen vocabulary and the golden vectors from the original code."""

import copy
import json
import signal
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Several tests send SIGINT to a child (Ctrl-C in cli_demo.py, web_demo.py and openai_api.py). A shell
# that starts a command in the background without job control (`make test > log &` in a script) starts
# it with SIGINT ignored, which every child inherits through exec, so no Ctrl-C would reach them. A
# Python handler here instead is reset to the default at exec: the children get SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def vocab_path():
    from qwen.vocab import find_qwen_tiktoken

    # dashscope is a test dependency: a missing vocabulary is a failure, not a skip.
    return find_qwen_tiktoken()


@pytest.fixture(scope="session")
def tokenizer_chat_golden():
    return json.loads((FIXTURES / "tokenizer_chat_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def qwen_tokenizer(vocab_path):
    """One shared tokenizer (loading the vocabulary takes a second); do not mutate it."""
    from qwen.tokenization_qwen import QWenTokenizer

    return QWenTokenizer(vocab_path)


@pytest.fixture
def fresh_tokenizer(qwen_tokenizer):
    """A private copy for tests that set pad_token, padding_side, ..."""
    return copy.deepcopy(qwen_tokenizer)
