"""QWenTokenizer as a transformers-native fast tokenizer: `tokenizer.json` + `tokenizer_config.json`.

The files load with `AutoTokenizer.from_pretrained(directory)` without `import qwen` and without
trust_remote_code (a `Qwen2Tokenizer`, the class transformers uses for model_type "qwen2"; the
files have the layout of a Qwen2 checkpoint's, so tools that load tokenizers through transformers,
such as vLLM, read them the same way).

How the backend (a `tokenizers.Tokenizer`) mirrors QWenTokenizer:
- model: byte-level BPE. transformers' `TikTokenConverter` recovers the merges from the tiktoken
  ranks in qwen.tiktoken: every split (left, right) of a token into two tokens is a merge, ranked
  by the token's rank, which is tiktoken's rule (merge the adjacent pair whose concatenation has
  the lowest rank). Every token of the vocabulary is reached by merging its own bytes, so
  `ignore_merges` (on in tokenizer.json, as in tiktoken; off when transformers 5 rebuilds a
  Qwen2Tokenizer from the file) changes nothing.
- normalizer: NFC (QWenTokenizer NFC-normalizes each text before tiktoken sees it).
- pre-tokenizer: the Qwen regex `PAT_STR` (digits split one by one), then the byte-to-unicode map.
- the 208 control tokens, ids 151643.., are special added tokens: their text anywhere in the input
  becomes the control id, as QWenTokenizer's default `allowed_special="all"` does, and
  `skip_special_tokens` drops them all. No BOS/EOS is added.

Known differences from QWenTokenizer (ids of plain `encode` are the same on the test texts):
- `apply_chat_template` renders the chatml text and tokenizes it whole, like every fast tokenizer
  (and vLLM). QWenTokenizer builds the ids turn by turn as `make_context` does, so (1) control-token
  text inside a message (e.g. "<|im_start|>") stays plain text there but becomes a control id here,
  and (2) a message whose content starts with a line break (optionally after blanks) gets that
  break merged with the one after the role ("\\n\\n" is one token when tokenized whole).
- Unicode tables: QWenTokenizer normalizes with Python's `unicodedata`, the fast tokenizer with the
  tables compiled into `tokenizers`. Characters assigned in recent Unicode versions can normalize
  differently (e.g. U+0740 U+1715: Python 3.11 reorders the marks, `tokenizers` does not).
  QWenTokenizer itself depends on the Python version in the same way.
"""

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

from ..tokenization_qwen import DEFAULT_CHAT_TEMPLATE, ENDOFTEXT, PAT_STR, SPECIAL_START_ID, SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
FAST_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)
# What transformers instantiates for model_type "qwen2" (Qwen2TokenizerFast in transformers 4).
TOKENIZER_CLASS = "Qwen2Tokenizer"


class _RanksConverter(TikTokenConverter):
    """transformers' tiktoken converter, fed with ranks already read (and checked) by QWenTokenizer."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        super().__init__(vocab_file=None, pattern=PAT_STR, add_prefix_space=False)
        self.mergeable_ranks = mergeable_ranks

    def load_tiktoken_bpe(self, tiktoken_url=None) -> dict[bytes, int]:
        return self.mergeable_ranks


def _check_layout(tokenizer) -> None:
    """The fast vocabulary is the regular tokens then the control tokens, densely from 0."""
    if tokenizer.special_tokens != SPECIAL_TOKENS or len(tokenizer) != SPECIAL_START_ID + len(SPECIAL_TOKENS):
        raise ValueError(
            f"cannot write a fast tokenizer for this QWenTokenizer: it has {len(tokenizer)} ids, not the Qwen "
            f"vocabulary's {SPECIAL_START_ID} regular and {len(SPECIAL_TOKENS)} control tokens "
            "(an extra_vocab_file is not supported)"
        )


def convert(tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` equivalent to `tokenizer` (a QWenTokenizer)."""
    _check_layout(tokenizer)
    backend = _RanksConverter(tokenizer.mergeable_ranks).converted()
    backend.normalizer = normalizers.NFC()
    ordered = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in ordered])
    wrong = {token: backend.token_to_id(token) for token in ordered}
    wrong = {token: token_id for token, token_id in wrong.items() if token_id != SPECIAL_TOKENS[token]}
    if wrong or backend.get_vocab_size(with_added_tokens=True) != len(tokenizer):
        raise ValueError(f"the converted tokenizer does not keep QWenTokenizer's ids (control tokens: {wrong})")
    return backend


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json in the Qwen2 format: eos = pad = <|endoftext|>, no BOS, no unk, chatml
    template of QWenTokenizer; every control token is special (listed, so that
    `skip_special_tokens` and `all_special_ids` cover the extras as QWenTokenizer does)."""
    ordered = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    added = {
        str(SPECIAL_TOKENS[token]): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for token in ordered
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [token for token in ordered if token != ENDOFTEXT],
        "bos_token": None,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": int(model_max_length),
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": TOKENIZER_CLASS,
        "unk_token": None,
    }


def save_fast_tokenizer(tokenizer, directory, model_max_length: int) -> list[str]:
    """Write `tokenizer` (a QWenTokenizer) to `directory` as tokenizer.json, tokenizer_config.json and
    chat_template.jinja (the same template: transformers prefers that file when it exists, so a stale
    one is never left to override it). Returns the names written."""
    directory = Path(directory)
    backend = convert(tokenizer)
    backend.save(os.fspath(directory / TOKENIZER_FILE), pretty=False)
    config = tokenizer_config(model_max_length)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / TOKENIZER_CONFIG_FILE).write_text(text, encoding="utf-8")
    (directory / CHAT_TEMPLATE_FILE).write_text(config["chat_template"], encoding="utf-8")
    return list(FAST_TOKENIZER_FILES)
