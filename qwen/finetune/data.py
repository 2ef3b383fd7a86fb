"""Fine-tuning data: reading and checking conversations, chatml encoding with label masking, datasets
and the batch collator.

Input format (the original's): a JSON list, or JSON Lines (one record per line), of

    {"id": "identity_0", "conversations": [{"from": "user", "value": "Hi"},
                                           {"from": "assistant", "value": "Hello!"}]}

A record may give its own system prompt, as a top-level "system" string or as a first message
{"from": "system", ...}; otherwise the original's fixed "You are a helpful assistant." is used.

Encoding (QWEN_SPEC §7, finetune.py): [im_start] "system" "\\n" + system + [im_end] "\\n", then per
message [im_start] role "\\n" + value + [im_end] "\\n". Labels are -100 except:
- system and user blocks: im_start, im_end and the final "\\n" are learned;
- assistant blocks: im_start, the content, im_end and the final "\\n" are learned (not the role
  token or its "\\n").
One deliberate difference: text is encoded with ``allowed_special=set()`` (as make_context does for
chat), so "<|im_end|>" written inside a message is plain text, never a control token.
Sequences longer than model_max_length are cut there (possibly mid-message). Batches are padded
to their longest row, not to model_max_length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..qwen_generation_utils import DEFAULT_SYSTEM

IGNORE_INDEX = -100
ROLES = ("user", "assistant")
ROLE_IDS = {"system": 8948, "user": 872, "assistant": 77091}  # each role word is one token
NEWLINE_ID = 198
MAX_REPORTED = 10

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Conversation:
    """A checked record: its id, its position in the file, its system prompt and its messages."""

    id: str
    index: int
    system: str
    messages: tuple[tuple[str, str], ...]  # (role, value), alternating user / assistant


def _where(index: int, record) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (id {record_id!r})" if record_id is not None else "")


def check_record(record, index: int, default_system: str = DEFAULT_SYSTEM) -> Conversation:
    """The Conversation in `record`, or a DataError naming the record and what is wrong with it."""

    def bad(problem):
        return DataError(f"{_where(index, record)}: {problem}")

    if not isinstance(record, dict):
        raise bad(f"expected an object with \"id\" and \"conversations\", got {type(record).__name__}")
    if "conversations" not in record:
        raise bad('missing key "conversations"')
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise bad('"conversations" must be a non-empty list of {"from", "value"} messages')
    system = record.get("system", default_system)
    if not isinstance(system, str):
        raise bad('"system" must be a string')
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad(f"message {position} is not an object")
        for key in ("from", "value"):
            if key not in turn:
                raise bad(f'message {position} has no "{key}"')
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise bad(f"message {position} ({role}) has an empty value")
        if role == "system":
            if position != 0:
                raise bad(f"message {position}: a system message may only come first")
            if "system" in record:
                raise bad('both a "system" key and a system message')
            system = value
            continue
        if role not in ROLES:
            raise bad(f"message {position} is from {role!r}: expected 'user', 'assistant' or a first 'system'")
        expected = ROLES[len(messages) % 2]
        if role != expected:
            raise bad(f"message {position} is from {role!r} where {expected!r} was expected "
                      "(turns must alternate, starting with the user)")
        messages.append((role, value))
    if not messages:
        raise bad("no user message")
    if messages[-1][0] != "assistant":
        raise bad("the last message is from the user: nothing to learn")
    return Conversation(str(record.get("id", index)), index, system, tuple(messages))


def encode_conversation(tokenizer, conversation: Conversation, max_length: int | None = None) -> dict:
    """input_ids and labels (lists of ints) of one conversation, cut to `max_length` tokens."""

    def text(value):
        return tokenizer.encode(value, allowed_special=set())

    ids = [tokenizer.im_start_id, ROLE_IDS["system"], NEWLINE_ID] + text(conversation.system)
    ids += [tokenizer.im_end_id, NEWLINE_ID]
    labels = [tokenizer.im_start_id] + [IGNORE_INDEX] * (len(ids) - 3) + [tokenizer.im_end_id, NEWLINE_ID]
    for role, value in conversation.messages:
        content = text(value)
        ids += [tokenizer.im_start_id, ROLE_IDS[role], NEWLINE_ID] + content + [tokenizer.im_end_id, NEWLINE_ID]
        learned = content if role == "assistant" else [IGNORE_INDEX] * len(content)
        labels += [tokenizer.im_start_id, IGNORE_INDEX, IGNORE_INDEX] + learned + [tokenizer.im_end_id, NEWLINE_ID]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------- reading files


def _is_json_lines(path: Path) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if path.suffix.lower() == ".json":
        return False
    with path.open("rb") as f:  # by content: a JSON list starts with "["
        for line in f:
            if line.strip():
                return not line.lstrip().startswith(b"[")
    return False


def _json_lines(path: Path) -> Iterator[tuple[int, int, object]]:
    """(index, byte offset, record) per non-blank line, one line in memory at a time."""
    index = 0
    with path.open("rb") as f:
        while True:
            offset = f.tell()
            line = f.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: record {index} (line at byte {offset}) is not valid JSON: {exc}") from exc
            yield index, offset, record
            index += 1


def _json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); use a JSON list of records or JSON Lines") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def _checked(path: Path, items, skip_invalid: bool, default_system: str):
    """For each valid item of (index, key, record): its key, or its Conversation when the key is None.
    All problems are reported at once."""
    kept, problems = [], []
    for index, key, record in items:
        try:
            conversation = check_record(record, index, default_system)
            kept.append(conversation if key is None else key)
        except DataError as exc:
            problems.append(str(exc))
    if problems and not skip_invalid:
        shown = "; ".join(problems[:MAX_REPORTED])
        more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(problems)} malformed record(s): {shown}{more} "
                        "(fix them, or pass --skip_invalid to drop them)")
    if problems:
        logger.warning("%s: skipped %d malformed record(s) (--skip_invalid); first: %s", path, len(problems), problems[0])
    if not kept:
        raise DataError(f"{path}: no usable records")
    return kept, len(problems)


# ----------------------------------------------------------------------------- datasets


class SupervisedDataset(torch.utils.data.Dataset):
    """Every record read, checked and tokenized up front."""

    def __init__(self, path, tokenizer, max_length: int, skip_invalid: bool = False,
                 default_system: str = DEFAULT_SYSTEM):
        path = Path(path)
        _require_file(path)
        if _is_json_lines(path):
            items = ((index, None, record) for index, _, record in _json_lines(path))
        else:
            items = ((index, None, record) for index, record in enumerate(_json_list(path)))
        kept, self.skipped = _checked(path, items, skip_invalid, default_system)
        self.examples = [encode_conversation(tokenizer, conv, max_length) for conv in kept]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Records tokenized when first used. JSON Lines files are streamed: one pass checks every record
    and remembers only its byte offset; a record is read again from disk when it is needed. A JSON
    list is parsed whole (the format has no cheaper way), only its tokenization is deferred."""

    def __init__(self, path, tokenizer, max_length: int, skip_invalid: bool = False,
                 default_system: str = DEFAULT_SYSTEM):
        self.path, self.tokenizer, self.max_length = Path(path), tokenizer, max_length
        self.default_system = default_system
        _require_file(self.path)
        self.streamed = _is_json_lines(self.path)
        if self.streamed:
            items = ((index, (index, offset), record) for index, offset, record in _json_lines(self.path))
            kept, self.skipped = _checked(self.path, items, skip_invalid, default_system)
            self.offsets = kept  # (index, byte offset) of each valid line
            self.records = None
        else:
            items = ((index, None, record) for index, record in enumerate(_json_list(self.path)))
            kept, self.skipped = _checked(self.path, items, skip_invalid, default_system)
            self.records = kept
        self.cache: dict[int, dict] = {}

    def __len__(self):
        return len(self.offsets) if self.streamed else len(self.records)

    def _conversation(self, i) -> Conversation:
        if not self.streamed:
            return self.records[i]
        index, offset = self.offsets[i]
        with self.path.open("rb") as f:
            f.seek(offset)
            return check_record(json.loads(f.readline()), index, self.default_system)

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = encode_conversation(self.tokenizer, self._conversation(i), self.max_length)
        return self.cache[i]


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")


def make_dataset(path, tokenizer, max_length: int, lazy: bool = False, skip_invalid: bool = False,
                 default_system: str = DEFAULT_SYSTEM):
    cls = LazySupervisedDataset if lazy else SupervisedDataset
    return cls(path, tokenizer, max_length, skip_invalid, default_system)


@dataclass
class DataCollator:
    """Pads a batch to its longest row: input_ids with `pad_id`, labels with -100, attention_mask 0.

    With `pack_length` (--packing), the batch's records are first packed in order into as few rows of
    at most `pack_length` tokens as fit, and attention_mask is a 4-d bool mask [rows, 1, L, L] that
    keeps each record causal within itself: what every record computes equals its own row, as
    rotary positions are relative (and dynamic NTK / LogN are off within seq_length in training).
    The first label of every record but a row's first is -100, so no record learns to predict the
    next record's start."""

    pad_id: int
    pad_to_multiple_of: int | None = None
    pack_length: int | None = None

    def __call__(self, examples):
        if self.pack_length:
            return self._packed(examples)
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def _packed(self, examples):
        rows: list[list[dict]] = []
        for example in examples:  # first fit, in order
            n = len(example["input_ids"])
            for row in rows:
                if sum(len(e["input_ids"]) for e in row) + n <= self.pack_length:
                    row.append(example)
                    break
            else:
                rows.append([example])
        longest = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), 1, longest, longest), dtype=torch.bool)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                end = start + len(example["input_ids"])
                ids[r, start:end] = torch.tensor(example["input_ids"])
                labels[r, start:end] = torch.tensor(example["labels"])
                if start:
                    labels[r, start] = IGNORE_INDEX
                mask[r, 0, start:end, start:end] = causal[: end - start, : end - start]
                start = end
            mask[r, 0, start:, start:] = causal[: longest - start, : longest - start]  # padding sees itself
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

