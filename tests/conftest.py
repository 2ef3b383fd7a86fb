"""Shared fixtures: the real Qwen vocabulary and the golden vectors from the original code."""

import copy
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


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
