"""Fine-tuning data (qwen.finetune.data): chatml ids and label masking checked by hand, truncation,
malformed records, eager vs lazy (streamed JSON Lines) datasets and the collator."""

import json

import pytest

from qwen.finetune import (
    DataCollator,
    DataError,
    LazySupervisedDataset,
    SupervisedDataset,
    check_record,
    encode_conversation,
)
from qwen.qwen_generation_utils import make_context

I = -100
S, E, NL = 151644, 151645, 198  # im_start, im_end, "\n"
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
DEFAULT_SYSTEM_IDS = [2610, 525, 264, 10950, 17847, 13]  # "You are a helpful assistant."
HELLO = 9707  # "Hello"


def record(*turns, **extra):
    roles = ["user", "assistant"]
    return {"id": "r", "conversations": [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)], **extra}


def encode(tokenizer, rec, max_length=None):
    return encode_conversation(tokenizer, check_record(rec, 0), max_length)


def test_single_turn_ids_and_labels_by_hand(qwen_tokenizer):
    out = encode(qwen_tokenizer, record("Hello", "Hello"))
    sys_block = [S, SYSTEM, NL] + DEFAULT_SYSTEM_IDS + [E, NL]
    assert out["input_ids"] == sys_block + [S, USER, NL, HELLO, E, NL] + [S, ASSISTANT, NL, HELLO, E, NL]
    assert out["labels"] == (
        [S] + [I] * (2 + len(DEFAULT_SYSTEM_IDS)) + [E, NL]  # system: only the structure is learned
        + [S, I, I, I, E, NL]  # user: content ignored
        + [S, I, I, HELLO, E, NL]  # assistant: content learned, not the role token or its "\n"
    )


def test_chinese_and_the_chat_prompt_agree(qwen_tokenizer):
    """The prompt part is exactly what make_context (the chat) builds, Chinese included."""
    rec = record("你好", "你好！我是通义千问。", "讲个故事", "从前有座山。")
    out = encode(qwen_tokenizer, rec)
    _, prompt = make_context(qwen_tokenizer, "讲个故事", history=[("你好", "你好！我是通义千问。")],
                             system="You are a helpful assistant.")
    assert out["input_ids"][: len(prompt)] == prompt
    reply = qwen_tokenizer.encode("从前有座山。")
    assert out["input_ids"][len(prompt):] == reply + [E, NL]
    assert out["labels"][len(prompt):] == reply + [E, NL]
    assert 108386 in out["input_ids"]  # "你好" is one token
    # Every user content token is ignored, every assistant content token learned.
    learned = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != I and t not in (S, E, NL)]
    assert learned == qwen_tokenizer.encode("你好！我是通义千问。") + reply


def test_multi_turn_label_counts(qwen_tokenizer):
    rec = record("a", "b", "c", "d", "e", "f")
    out = encode(qwen_tokenizer, rec)
    assert len(out["input_ids"]) == len(out["labels"])
    assert out["input_ids"].count(S) == 7 and out["labels"].count(S) == 7  # system + 6 messages; all learned
    assert out["labels"].count(E) == 7 and out["labels"].count(NL) == 7


@pytest.mark.parametrize("how", ["key", "message"])
def test_per_record_system_prompt(qwen_tokenizer, how):
    if how == "key":
        rec = record("Hello", "Hello", system="Be brief.")
    else:
        rec = record("Hello", "Hello")
        rec["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    out = encode(qwen_tokenizer, rec)
    brief = qwen_tokenizer.encode("Be brief.")
    assert out["input_ids"][: 5 + len(brief)] == [S, SYSTEM, NL] + brief + [E, NL]
    assert out["labels"][: 5 + len(brief)] == [S] + [I] * (2 + len(brief)) + [E, NL]


def test_special_token_text_in_content_stays_plain_text(qwen_tokenizer):
    text = "say <|im_end|><|endoftext|> and <|im_start|>"
    out = encode(qwen_tokenizer, record(text, text))
    assert out["input_ids"].count(E) == 3 and out["input_ids"].count(S) == 3
    assert 151643 not in out["input_ids"]
    assert qwen_tokenizer.decode(out["input_ids"]).count(text) == 2


def test_truncation_cuts_ids_and_labels_together(qwen_tokenizer):
    full = encode(qwen_tokenizer, record("Hello " * 50, "Hello " * 50))
    cut = encode(qwen_tokenizer, record("Hello " * 50, "Hello " * 50), max_length=40)
    assert cut["input_ids"] == full["input_ids"][:40] and cut["labels"] == full["labels"][:40]


@pytest.mark.parametrize("rec, problem", [
    ({"id": "x"}, 'missing key "conversations"'),
    ({"id": "x", "conversations": []}, "non-empty list"),
    ({"id": "x", "conversations": [{"from": "user"}]}, 'message 0 has no "value"'),
    ({"id": "x", "conversations": [{"value": "hi"}]}, 'message 0 has no "from"'),
    (record("hi", "   "), "message 1 (assistant) has an empty value"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "from 'human'"),
    ({"id": "x", "conversations": [{"from": "assistant", "value": "hi"}]}, "'user' was expected"),
    ({"id": "x", "conversations": [{"from": "user", "value": "a"}, {"from": "user", "value": "b"}]},
     "message 1 is from 'user' where 'assistant' was expected"),
    (record("only a question"), "the last message is from the user"),
    (record("a", "b") | {"conversations": record("a", "b")["conversations"] + [{"from": "system", "value": "s"}]},
     "system message may only come first"),
    ("just text", "expected an object"),
])
def test_malformed_records_are_named(rec, problem):
    with pytest.raises(DataError) as info:
        check_record(rec, 7)
    assert problem in str(info.value)
    assert str(info.value).startswith("record 7" + (" (id 'x')" if isinstance(rec, dict) and rec.get("id") == "x" else ""))


def write(tmp_path, records, name="data.json", lines=False):
    path = tmp_path / name
    if lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


GOOD = [record(f"q{i}", f"a{i}") | {"id": f"good{i}"} for i in range(4)]
BAD = [{"id": "bad0", "conversations": [{"from": "bot", "value": "x"}]}, {"id": "bad1"}]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("lines", [False, True])
def test_bad_records_are_all_reported_or_skipped_with_a_count(tmp_path, qwen_tokenizer, lazy, lines):
    path = write(tmp_path, GOOD[:2] + BAD[:1] + GOOD[2:] + BAD[1:], "data.jsonl" if lines else "data.json", lines)
    cls = LazySupervisedDataset if lazy else SupervisedDataset
    with pytest.raises(DataError) as info:
        cls(path, qwen_tokenizer, 512)
    message = str(info.value)
    assert "2 malformed record(s)" in message and "--skip_invalid" in message
    assert "record 2 (id 'bad0')" in message and "record 5 (id 'bad1')" in message
    data = cls(path, qwen_tokenizer, 512, skip_invalid=True)
    assert len(data) == 4 and data.skipped == 2


def test_eager_lazy_json_and_jsonl_give_the_same_examples(tmp_path, qwen_tokenizer):
    records = GOOD + [record("你好", "世界", "再见", "拜拜")]
    json_path, lines_path = write(tmp_path, records), write(tmp_path, records, "data.jsonl", lines=True)
    expected = [encode(qwen_tokenizer, r, 64) for r in records]
    for data in (SupervisedDataset(json_path, qwen_tokenizer, 64), SupervisedDataset(lines_path, qwen_tokenizer, 64),
                 LazySupervisedDataset(json_path, qwen_tokenizer, 64),
                 LazySupervisedDataset(lines_path, qwen_tokenizer, 64)):
        assert [data[i] for i in range(len(data))] == expected


def test_lazy_json_lines_keeps_only_offsets(tmp_path, qwen_tokenizer):
    path = write(tmp_path, GOOD, "data.jsonl", lines=True)
    data = LazySupervisedDataset(path, qwen_tokenizer, 64)
    assert data.streamed and data.records is None and data.cache == {}
    assert all(isinstance(index, int) and isinstance(offset, int) for index, offset in data.offsets)
    assert data[3] == encode(qwen_tokenizer, GOOD[3], 64) and list(data.cache) == [3]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    ('{"id": 1}', "expected a JSON list"),
    ("[]", "no usable records"),
])
def test_unreadable_files_are_clear_errors(tmp_path, qwen_tokenizer, content, problem):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=problem):
        SupervisedDataset(path, qwen_tokenizer, 64)
    with pytest.raises(DataError, match="does not exist"):
        SupervisedDataset(tmp_path / "missing.json", qwen_tokenizer, 64)


def test_jsonl_bad_line_names_the_record(tmp_path, qwen_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="record 1 .* not valid JSON"):
        LazySupervisedDataset(path, qwen_tokenizer, 64)


def test_collator_pads_to_the_longest_row():
    batch = DataCollator(pad_id=151643)([
        {"input_ids": [1, 2, 3], "labels": [I, 2, 3]},
        {"input_ids": [4], "labels": [4]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 151643, 151643]]
    assert batch["labels"].tolist() == [[I, 2, 3], [4, I, I]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    padded = DataCollator(pad_id=0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])
    assert padded["input_ids"].shape == (1, 8)


def test_bundled_identity_dataset_is_valid(qwen_tokenizer):
    """make demo trains on it: a few dozen well-formed conversations, English and Chinese."""
    from importlib.resources import files

    data = SupervisedDataset(files("qwen.finetune") / "identity_demo.json", qwen_tokenizer, 512)
    assert len(data) >= 24 and data.skipped == 0
