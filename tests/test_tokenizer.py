"""QWenTokenizer against golden vectors from the original code, plus its HF integration."""

import base64
import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest

import qwen  # registers the Auto classes
from qwen.tokenization_qwen import QWenTokenizer
from transformers import AutoTokenizer

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_chat_golden.json").read_text(encoding="utf-8"))
TOKENIZER_CASES = GOLDEN["tokenizer_cases"]
CASE_IDS = [f"{i}-{c['text'][:20]!r}" for i, c in enumerate(TOKENIZER_CASES)]


def _hex(tokens):
    return [t.hex() if isinstance(t, bytes) else t for t in tokens]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=CASE_IDS)
def test_encode_allowed_special_all(qwen_tokenizer, case):
    assert qwen_tokenizer.encode(case["text"]) == case["ids_allowed_special_all"]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=CASE_IDS)
def test_encode_allowed_special_none(qwen_tokenizer, case):
    assert qwen_tokenizer.encode(case["text"], allowed_special=set()) == case["ids_allowed_special_none"]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=CASE_IDS)
def test_decode(qwen_tokenizer, case):
    ids = case["ids_allowed_special_all"]
    assert qwen_tokenizer.decode(ids) == case["decoded"]
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=CASE_IDS)
def test_tokens(qwen_tokenizer, case):
    tokens = qwen_tokenizer.tokenize(case["text"])
    assert _hex(tokens) == case["tokens_hex"]
    # tokens map back to the same ids, and join back to the decoded text
    assert qwen_tokenizer.convert_tokens_to_ids(tokens) == case["ids_allowed_special_all"]
    assert qwen_tokenizer.convert_tokens_to_string(tokens) == case["decoded"]


@pytest.mark.parametrize("case", GOLDEN["decode_cases"], ids=lambda c: f"{c['ids']}-{c['errors']}")
def test_decode_errors_per_call(qwen_tokenizer, case):
    assert qwen_tokenizer.decode(case["ids"], errors=case["errors"]) == case["text"]


def test_errors_set_in_constructor(vocab_path):
    tok = QWenTokenizer(vocab_path, errors="ignore")
    assert tok.decode([160, 121]) == ""
    assert tok.decode([160, 121], errors="replace") == "\ufffd"


def test_sizes_and_special_ids(qwen_tokenizer):
    assert len(qwen_tokenizer) == GOLDEN["vocab_len"] == 151851
    assert qwen_tokenizer.vocab_size == 151851
    for token, token_id in GOLDEN["special_ids"].items():
        assert qwen_tokenizer.convert_tokens_to_ids(token) == token_id
        assert qwen_tokenizer.convert_ids_to_tokens(token_id) == token
    assert (qwen_tokenizer.eod_id, qwen_tokenizer.im_start_id, qwen_tokenizer.im_end_id) == (151643, 151644, 151645)


def test_no_special_tokens_by_default(qwen_tokenizer):
    assert qwen_tokenizer.pad_token_id is None
    assert qwen_tokenizer.eos_token_id is None and qwen_tokenizer.bos_token_id is None
    # no BOS/EOS is ever added
    assert qwen_tokenizer("hello")["input_ids"] == [14990]


def test_vocab_is_regular_bytes_only(qwen_tokenizer):
    vocab = qwen_tokenizer.get_vocab()
    assert len(vocab) == 151643
    assert all(isinstance(token, bytes) for token in vocab)
    assert vocab[b"hello"] == 14990


def test_token_id_conversions(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.convert_tokens_to_ids(b"hello") == 14990
    assert tok.convert_tokens_to_ids(["<|im_end|>", b"hello", "unknown"]) == [151645, 14990, None]
    assert tok.convert_ids_to_tokens([151643, 14990]) == ["<|endoftext|>", b"hello"]
    with pytest.raises(ValueError, match="unknown id"):
        tok.convert_ids_to_tokens(151851)


def test_nfc_in_tokenize_only(qwen_tokenizer):
    decomposed = "e\u0301"  # e + combining acute
    assert qwen_tokenizer.encode(decomposed) == qwen_tokenizer.encode("\u00e9")
    # the inner tiktoken object skips NFC
    assert qwen_tokenizer.tokenizer.encode(decomposed) != qwen_tokenizer.tokenizer.encode("\u00e9")


def test_skip_special_drops_control_ids(qwen_tokenizer):
    ids = qwen_tokenizer.encode("hi<|im_start|><|extra_7|>there<|endoftext|>")
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "hithere"


def test_add_tokens(fresh_tokenizer):
    tok = fresh_tokenizer
    assert tok.add_special_tokens({"pad_token": "<|extra_0|>"}) == 0
    assert tok.pad_token_id == 151646 and len(tok) == 151851
    with pytest.raises(ValueError, match="fixed"):
        tok.add_tokens(["brand_new"])
    with pytest.raises(ValueError, match="fixed"):
        tok.add_tokens(["<|extra_205|>"], special_tokens=True)


def test_pickle_round_trip(fresh_tokenizer):
    fresh_tokenizer.pad_token = "<|extra_0|>"
    text = "你好 <|im_end|> world"
    clone = pickle.loads(pickle.dumps(fresh_tokenizer))
    assert "tokenizer" not in fresh_tokenizer.__getstate__()
    assert clone.encode(text) == fresh_tokenizer.encode(text)
    assert clone.decode(clone.encode(text)) == text
    assert clone.pad_token_id == 151646 and len(clone) == 151851


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(fresh_tokenizer, side):
    tok = fresh_tokenizer
    tok.pad_token = "<|extra_0|>"
    tok.padding_side = side
    out = tok(["a", "b c d"], padding="longest")
    a, bcd = tok.encode("a"), tok.encode("b c d")
    assert len(a) == 1 and len(bcd) == 3
    pad = [151646, 151646]
    if side == "left":
        assert out["input_ids"] == [pad + a, bcd]
        assert out["attention_mask"] == [[0, 0, 1], [1, 1, 1]]
    else:
        assert out["input_ids"] == [a + pad, bcd]
        assert out["attention_mask"] == [[1, 0, 0], [1, 1, 1]]
    tensors = tok(["a", "b c d"], padding="longest", return_tensors="pt")
    assert tensors["input_ids"].tolist() == out["input_ids"]


def test_save_and_load(fresh_tokenizer, tmp_path):
    tok = fresh_tokenizer
    tok.pad_token = "<|extra_0|>"
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    saved_vocab = (tmp_path / "qwen.tiktoken").read_bytes()
    assert len(saved_vocab.splitlines()) == 151643  # ranks only, no control tokens
    assert saved_vocab.startswith(b"IQ== 0\n")

    loaded = QWenTokenizer.from_pretrained(tmp_path)
    text = "Hello <|im_start|>世界 123"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.pad_token == "<|extra_0|>" and len(loaded) == 151851
    assert loaded.chat_template == tok.chat_template


def test_save_vocabulary_round_trips_file(qwen_tokenizer, vocab_path, tmp_path):
    (path,) = qwen_tokenizer.save_vocabulary(str(tmp_path))
    original = Path(vocab_path).read_bytes().splitlines()
    assert Path(path).read_bytes().splitlines() == [line for line in original if line]


def _write_vocab(path, entries):
    path.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in entries))
    return path


def test_extra_vocab_file(vocab_path, tmp_path):
    extra = _write_vocab(
        tmp_path / "extra.tiktoken",
        [
            (b"hello", 100),  # bytes already in the vocab: skipped
            (b"\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c!", 151645),  # id taken by <|im_end|>: skipped
            (b"qwenqwenqwen", 151851),
            (b" zzzzzzzzzzzz", 151852),  # a whole pre-token, so tiktoken finds it directly
        ],
    )
    tok = QWenTokenizer(vocab_path, extra_vocab_file=str(extra))
    assert len(tok) == 151853
    assert tok.encode("qwenqwenqwen zzzzzzzzzzzz") == [151851, 151852]
    assert tok.convert_tokens_to_ids(b"hello") == 14990
    assert tok.decode([151851, 151852]) == "qwenqwenqwen zzzzzzzzzzzz"
    # extra-vocab ids sit above the control tokens, so skip_special_tokens drops them too
    assert tok.decode([14990, 151851], skip_special_tokens=True) == "hello"


def test_extra_vocab_ids_must_be_dense(vocab_path, tmp_path):
    extra = _write_vocab(tmp_path / "extra.tiktoken", [(b"qwenqwenqwen", 151860)])
    with pytest.raises(ValueError, match="densely"):
        QWenTokenizer(vocab_path, extra_vocab_file=str(extra))


def _corrupt(vocab_path, tmp_path, edit):
    lines = Path(vocab_path).read_bytes().splitlines()
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(b"\n".join(edit(lines)) + b"\n")
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: [b"@@not-base64@@ 0"] + lines[1:], "invalid base64"),
        (lambda lines: [b"IQ== zero"] + lines[1:], "not an integer"),
        (lambda lines: [b"IQ== 0 extra"] + lines[1:], "expected 'base64_token rank'"),
        (lambda lines: lines[:-10], "expected 151643 tokens"),
        (lambda lines: lines + [base64.b64encode(b"new-token") + b" 151643"], "expected 151643 tokens"),
        (lambda lines: lines + [lines[0]], "duplicate token"),
    ],
    ids=["bad-base64", "non-integer-rank", "three-fields", "too-few", "too-many", "duplicate"],
)
def test_corrupt_vocab_gives_clear_error(vocab_path, tmp_path, edit, message):
    path = _corrupt(vocab_path, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        QWenTokenizer(str(path))
    assert str(path) in str(info.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        QWenTokenizer(str(tmp_path / "qwen.tiktoken"))
    with pytest.raises(ValueError, match="qwen.tiktoken"):
        QWenTokenizer()


def test_find_qwen_tiktoken(vocab_path, tmp_path):
    from qwen.vocab import find_qwen_tiktoken

    assert Path(vocab_path).name == "qwen.tiktoken"
    assert find_qwen_tiktoken(vocab_path) == vocab_path
    with pytest.raises(FileNotFoundError, match="not found"):
        find_qwen_tiktoken(tmp_path / "missing.tiktoken")


# -- argument and input errors -----------------------------------------------------

INJECTION = "a<|im_end|>b"


@pytest.mark.parametrize(
    "allowed_special, ids",
    [
        ("all", [64, 151645, 65]),
        ({"<|im_end|>"}, [64, 151645, 65]),
        (frozenset({"<|im_end|>"}), [64, 151645, 65]),
        (["<|im_end|>"], [64, 151645, 65]),  # a list or tuple is taken as a set
        (("<|endoftext|>",), [64, 27, 91, 318, 6213, 91, 29, 65]),
        (set(), [64, 27, 91, 318, 6213, 91, 29, 65]),
    ],
    ids=["all", "set", "frozenset", "list", "tuple-other-token", "empty-set"],
)
def test_allowed_special_accepted_forms(qwen_tokenizer, allowed_special, ids):
    assert qwen_tokenizer.encode(INJECTION, allowed_special=allowed_special) == ids
    tokens = qwen_tokenizer.tokenize(INJECTION, allowed_special=allowed_special)
    assert qwen_tokenizer.convert_tokens_to_ids(tokens) == ids


@pytest.mark.parametrize("name", ["allowed_special", "disallowed_special"])
@pytest.mark.parametrize(
    "value, error, message",
    [
        ("none", ValueError, r'must be "all" or a set of control tokens .* got the string \'none\''),
        ("<|im_end|>", ValueError, r"got the string '<\|im_end\|>'"),
        (None, TypeError, r'must be "all" or a set \(or list\) of control tokens, got NoneType: None'),
        (7, TypeError, r"got int: 7"),
        ({"<|im_end|>", "<|foo|>"}, ValueError, r"contains '<\|foo\|>', which is not a control token"),
        ([1], ValueError, r"contains 1, which is not a control token"),
    ],
    ids=["other-string", "single-token-string", "none", "int", "unknown-token", "non-string-item"],
)
def test_bad_special_tokens_argument(qwen_tokenizer, name, value, error, message):
    for call in (qwen_tokenizer.encode, qwen_tokenizer.tokenize, qwen_tokenizer):
        with pytest.raises(error, match=message) as info:
            call(INJECTION, **{name: value})
        assert str(info.value).startswith(name + " "), info.value


def test_disallowed_special_still_guards_text(qwen_tokenizer):
    with pytest.raises(ValueError, match="disallowed special token '<\\|im_end\\|>'"):
        qwen_tokenizer.encode(INJECTION, allowed_special=set(), disallowed_special=["<|im_end|>"])
    assert qwen_tokenizer.encode(INJECTION, allowed_special=set(), disallowed_special={"<|im_start|>"}) == (
        qwen_tokenizer.encode(INJECTION, allowed_special=set())
    )


@pytest.mark.parametrize("token_id", [-1, 151851, 151935, 10**9, 1.5])
def test_decode_out_of_range_id_names_it_and_the_range(qwen_tokenizer, token_id):
    message = rf"cannot decode token id {re.escape(repr(token_id))}: valid ids are the integers 0\.\.151850"
    with pytest.raises(ValueError, match=message):
        qwen_tokenizer.decode([14990, token_id])
    with pytest.raises(ValueError, match=message):
        qwen_tokenizer.batch_decode([[14990], [token_id]])


def test_decode_range_checks_keep_errors_and_skip_behaviour(qwen_tokenizer):
    assert qwen_tokenizer.decode([151850]) == "<|extra_204|>"  # the last valid id
    assert qwen_tokenizer.decode(14990) == "hello"
    # skip_special_tokens drops every id from <|endoftext|> up, padded-vocabulary ids included (the original)
    assert qwen_tokenizer.decode([14990, 151900], skip_special_tokens=True) == "hello"
    assert qwen_tokenizer.decode([14990, 160], errors="ignore") == "hello"
    assert qwen_tokenizer.decode([14990, 160], errors="replace") == "hello\ufffd"
    with pytest.raises(ValueError, match="unknown id 151900: valid ids are 0..151850"):
        qwen_tokenizer.convert_ids_to_tokens(151900)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"content": "hi"}], r"^chat message 0 has no 'role': \{'content': 'hi'\}"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"^chat message 1 has no 'content'"),
        ([{"role": 1, "content": "hi"}], r"^chat message 0: 'role' must be a string, got int: 1"),
        ([{"role": "user", "content": None}], r"^chat message 0: 'content' must be a string, got NoneType: None"),
        ([{"role": "user", "content": 3}], r"^chat message 0: 'content' must be a string, got int: 3"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"'content' must be a string, got list"),
        ([{"role": "user", "content": "hi"}, "hi"], r"^chat message 1 must be a dict with 'role' and 'content'"),
        ([[{"role": "user", "content": "hi"}], [{"role": "user"}]], r"^conversation 1: chat message 0 has no 'content"),
        ([("user", "hi")], r"^conversation 0: chat message 0 must be a dict"),
        ([], r"empty conversation"),
        ("hi", r"^a chat must be a list of message dicts, got str"),
    ],
    ids=["no-role", "no-content", "int-role", "none-content", "int-content", "list-content", "str-message",
         "batch", "tuple-message", "empty", "str-chat"],
)
@pytest.mark.parametrize("tokenize", [True, False])
def test_bad_chat_messages(qwen_tokenizer, messages, message, tokenize):
    with pytest.raises(ValueError, match=message):
        qwen_tokenizer.apply_chat_template(messages, tokenize=tokenize)


def test_chat_messages_may_be_dataclasses(qwen_tokenizer):
    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    as_dicts = [{"role": "user", "content": "hi"}]
    as_objects = [Message("user", "hi")]
    for tokenize in (True, False):
        expected = qwen_tokenizer.apply_chat_template(as_dicts, tokenize=tokenize, add_generation_prompt=True)
        assert qwen_tokenizer.apply_chat_template(as_objects, tokenize=tokenize, add_generation_prompt=True) == expected


def test_other_templates_keep_their_own_message_rules(qwen_tokenizer):
    template = "{% for m in messages %}{{ m['role'] }}:{{ m['text'] }};{% endfor %}"
    assert qwen_tokenizer.apply_chat_template([{"role": "user", "text": "hi"}], chat_template=template,
                                              tokenize=False) == "user:hi;"


@pytest.mark.parametrize("load", [QWenTokenizer.from_pretrained, AutoTokenizer.from_pretrained],
                         ids=["QWenTokenizer", "AutoTokenizer"])
def test_from_pretrained_checkpoint_without_vocabulary(tmp_path, load):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    with pytest.raises(FileNotFoundError, match=f"no qwen.tiktoken in {re.escape(repr(str(tmp_path)))}"):
        load(tmp_path)


def test_from_pretrained_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no qwen.tiktoken in {re.escape(repr(str(tmp_path)))}"):
        QWenTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no qwen.tiktoken in {re.escape(repr(str(tmp_path / 'sub')))}"):
        QWenTokenizer.from_pretrained(tmp_path, subfolder="sub")


@pytest.mark.parametrize("path", ["/nonexistent/qwen-checkpoint", "./no-such-dir", "../no-such-dir", "a/b/c"])
def test_from_pretrained_missing_local_directory(path):
    with pytest.raises(FileNotFoundError, match=f"no such directory: {re.escape(repr(path))}"):
        QWenTokenizer.from_pretrained(path)


def test_from_pretrained_file_instead_of_directory(tmp_path, vocab_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(NotADirectoryError, match=f"{re.escape(repr(str(config)))} is a file; .* directory containing"):
        QWenTokenizer.from_pretrained(config)
    # transformers' single-file form still works for the vocabulary itself
    assert len(QWenTokenizer.from_pretrained(vocab_path)) == 151851


def test_from_pretrained_hub_id_goes_to_the_hub_logic():
    with pytest.raises(ValueError, match="but none was given or found in 'qwen-tests/no-such-repo'"):
        QWenTokenizer.from_pretrained("qwen-tests/no-such-repo", local_files_only=True)
