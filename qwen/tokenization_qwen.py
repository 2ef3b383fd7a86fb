"""QWenTokenizer: the Qwen v1 tiktoken BPE behind transformers' Python tokenizer API.

This file is also copied into saved checkpoints as remote code, so it imports
only the standard library, tiktoken, transformers and ``.qwen_generation_utils``.
"""

import base64
import binascii
import dataclasses
import logging
import os
import unicodedata

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

from .qwen_generation_utils import DEFAULT_SYSTEM, check_local_checkpoint, chatml_generation_prompt, chatml_turn

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643  # = number of regular tokens in qwen.tiktoken
SPECIAL_TOKENS = {token: SPECIAL_START_ID + i for i, token in enumerate((ENDOFTEXT, IMSTART, IMEND) + EXTRAS)}

AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}

# chatml with the default system prompt. Piecewise token ids for it are built
# in `apply_chat_template`; the template renders the matching text.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _load_tiktoken_bpe(path):
    """Read ``base64(bytes) rank`` lines into {bytes: rank}, with errors that name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Qwen vocabulary file not found: {path!r}")
    ranks = {}
    seen_ranks = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue  # blank lines are allowed
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: invalid base64 token {parts[0][:80]!r} ({e})") from None
            try:
                rank = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: rank is not an integer: {parts[1][:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: duplicate token {token!r}")
            if rank < 0 or rank in seen_ranks:
                raise ValueError(f"{path}:{lineno}: invalid or duplicate rank {rank}")
            ranks[token] = rank
            seen_ranks.add(rank)
    return ranks


def _as_message_dict(message):
    """A chat message as a plain dict (dicts, dataclasses and pydantic models, like transformers), else None."""
    if isinstance(message, dict):
        return message
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
    if callable(getattr(message, "model_dump", None)):
        return message.model_dump()
    return None


def _checked_chat(messages, where=""):
    """One conversation as a list of dicts with string 'role' and 'content' (what chatml needs)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{where}a chat must be a list of message dicts, got {type(messages).__name__}: {messages!r}")
    if not messages:
        raise ValueError(f"{where}cannot apply the chat template to an empty conversation")
    checked = []
    for i, message in enumerate(messages):
        as_dict = _as_message_dict(message)
        if as_dict is None:
            raise ValueError(
                f"{where}chat message {i} must be a dict with 'role' and 'content', got {type(message).__name__}: "
                f"{message!r}"
            )
        for key in ("role", "content"):
            if key not in as_dict:
                raise ValueError(f"{where}chat message {i} has no {key!r}: {as_dict!r}")
            if not isinstance(as_dict[key], str):
                raise ValueError(
                    f"{where}chat message {i}: {key!r} must be a string, got {type(as_dict[key]).__name__}: "
                    f"{as_dict[key]!r}"
                )
        checked.append(as_dict)
    return checked


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level BPE on tiktoken with 208 fixed control tokens (ids 151643..151850).

    Regular tokens are ``bytes``, control tokens ``str``. No BOS/EOS is ever added.
    """

    vocab_files_names = VOCAB_FILES_NAMES

    def __init__(self, vocab_file=None, errors="replace", extra_vocab_file=None, **kwargs):
        # Everything tiktoken-related is built before the base __init__, which
        # already calls len(), convert_tokens_to_ids() and _add_tokens().
        self.errors = errors
        if vocab_file is None:
            source = kwargs.get("name_or_path")  # set by from_pretrained
            raise ValueError(
                f"QWenTokenizer needs its vocabulary file {VOCAB_FILES_NAMES['vocab_file']!r}, but none was given"
                + (f" or found in {source!r}" if source else "")
            )
        self.mergeable_ranks = _load_tiktoken_bpe(vocab_file)
        n_regular = len(self.mergeable_ranks)
        if set(self.mergeable_ranks.values()) != set(range(SPECIAL_START_ID)):
            raise ValueError(
                f"{vocab_file}: expected {SPECIAL_START_ID} tokens with ranks 0..{SPECIAL_START_ID - 1} "
                f"(the Qwen vocabulary), found {n_regular}"
            )
        self.special_tokens = dict(SPECIAL_TOKENS)
        if extra_vocab_file is not None:
            self._merge_extra_vocab(extra_vocab_file)

        self.tokenizer = self._build_encoding()
        self.decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.decoder.update({rank: token for token, rank in self.special_tokens.items()})
        self.eod_id = self.tokenizer.eot_token
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]

        # Saved checkpoints must load through AutoTokenizer + trust_remote_code
        # even when this tokenizer was constructed directly.
        self._auto_map = kwargs.pop("auto_map", None) or AUTO_MAP
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = DEFAULT_CHAT_TEMPLATE
        super().__init__(errors=errors, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained; a local path without the vocabulary fails first with its name."""
        path = os.fspath(pretrained_model_name_or_path)
        # transformers' single-file form (the .tiktoken file itself) stays allowed.
        if "vocab_file" not in kwargs and not (os.path.isfile(path) and path.endswith(".tiktoken")):
            check_local_checkpoint(path, VOCAB_FILES_NAMES["vocab_file"], kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _merge_extra_vocab(self, extra_vocab_file):
        """Add tokens from ``extra_vocab_file``; entries whose bytes or id already exist are skipped."""
        used_ids = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
        for token, rank in _load_tiktoken_bpe(extra_vocab_file).items():
            if token in self.mergeable_ranks:
                logger.info("extra token %r exists, skipping", token)
            elif rank in used_ids:
                logger.info("the index %d for extra token %r exists, skipping", rank, token)
            else:
                self.mergeable_ranks[token] = rank
                used_ids.add(rank)
        # tiktoken's vocab size is max id + 1, so new ids must continue densely after the specials.
        n_vocab = max(used_ids) + 1
        if len(used_ids) != n_vocab:
            raise ValueError(
                f"{extra_vocab_file}: new token ids must run densely from {SPECIAL_START_ID + len(SPECIAL_TOKENS)}; "
                f"got {len(used_ids)} ids but the largest is {n_vocab - 1}"
            )

    def _build_encoding(self):
        return tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )

    # -- pickling: the Rust-backed tiktoken object is dropped and rebuilt ------

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["tokenizer"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokenizer = self._build_encoding()

    # -- vocabulary -------------------------------------------------------------

    def __len__(self):
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab

    def get_vocab(self):
        """Regular tokens only, as {bytes: id} (control tokens are not included)."""
        return self.mergeable_ranks

    def convert_tokens_to_ids(self, tokens):
        """Ids for str (control) or bytes (regular) tokens; unknown tokens give None."""
        if isinstance(tokens, (str, bytes)):
            return self._lookup(tokens)
        return [self._lookup(token) for token in tokens]

    def _lookup(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks.get(token)

    def _convert_token_to_id(self, token):
        token_id = self._lookup(token)
        if token_id is None:
            raise ValueError(f"unknown token {token!r}")
        return token_id

    def _convert_id_to_token(self, index):
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"unknown id {index}: valid ids are 0..{len(self) - 1}")

    def _add_tokens(self, new_tokens, special_tokens=False):
        """The vocabulary is fixed: known control tokens are a no-op (so pad_token='<|extra_0|>' works)."""
        for token in new_tokens or []:
            surface = token.content if isinstance(token, AddedToken) else token
            if surface not in SPECIAL_TOKENS:
                kind = "special" if special_tokens else "regular"
                raise ValueError(
                    f"QWenTokenizer cannot add {kind} token {surface!r}: its vocabulary is fixed. "
                    "Use one of the existing control tokens <|endoftext|>, <|im_start|>, <|im_end|>, "
                    "<|extra_0|> .. <|extra_204|> (e.g. pad_token='<|extra_0|>')."
                )
        return 0

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Write the regular ranks (no control tokens) as ``qwen.tiktoken``."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf8") as f:
            for token, rank in self.mergeable_ranks.items():
                f.write(base64.b64encode(token).decode("utf8") + " " + str(rank) + "\n")
        return (path,)

    # -- encoding / decoding -----------------------------------------------------

    def tokenize(self, text, allowed_special="all", disallowed_special=(), **kwargs):
        """NFC-normalize, then encode with tiktoken; returns bytes (regular) and str (control) tokens.

        By default special-token text becomes control tokens; pass
        ``allowed_special=set()`` to keep it plain text. Both arguments take "all" or
        a set (list, tuple) of control tokens.
        """
        allowed_special = self._special_tokens_argument("allowed_special", allowed_special)
        disallowed_special = self._special_tokens_argument("disallowed_special", disallowed_special)
        if kwargs.get("split_special_tokens"):
            allowed_special = set()
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[i] for i in ids]

    def _special_tokens_argument(self, name, value):
        """`value` as tiktoken takes it: "all" or a set of this tokenizer's control tokens."""
        if isinstance(value, str):
            if value == "all":
                return value
            raise ValueError(
                f'{name} must be "all" or a set of control tokens such as {{"<|endoftext|>"}}, got the string {value!r}'
            )
        if not isinstance(value, (set, frozenset, list, tuple)):
            raise TypeError(
                f'{name} must be "all" or a set (or list) of control tokens, got {type(value).__name__}: {value!r}'
            )
        for token in value:
            if not isinstance(token, str) or token not in self.special_tokens:
                raise ValueError(
                    f"{name} contains {token!r}, which is not a control token: use <|endoftext|>, <|im_start|>, "
                    "<|im_end|> or <|extra_0|> .. <|extra_204|>"
                )
        return set(value)

    def _tokenize(self, text, **kwargs):
        raise NotImplementedError("QWenTokenizer tokenizes whole texts in tokenize()")

    def convert_tokens_to_string(self, tokens):
        """Join tokens; byte runs are decoded together so multi-byte characters survive."""
        text, pending = "", b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
            elif isinstance(token, str):
                text += pending.decode("utf-8", errors=self.errors) + token
                pending = b""
            else:
                raise TypeError(f"token should be bytes or str, got {type(token).__name__}")
        return text + pending.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens=False, errors=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            # Everything from <|endoftext|> up is a control (or extra-vocab) id.
            token_ids = [i for i in token_ids if i < self.eod_id]
        n_ids = len(self)
        for token_id in token_ids:
            if not (hasattr(token_id, "__index__") and 0 <= token_id < n_ids):
                raise ValueError(
                    f"cannot decode token id {token_id!r}: valid ids are the integers 0..{n_ids - 1} "
                    "(a model's embedding may have more rows than the tokenizer has tokens)"
                )
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    # -- chat ------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        tools=None,
        documents=None,
        chat_template=None,
        add_generation_prompt=False,
        continue_final_message=False,
        tokenize=True,
        sanitize_control_tokens=False,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        return_dict=True,
        return_assistant_tokens_mask=False,
        tokenizer_kwargs=None,
        **kwargs,
    ):
        """Render/tokenize a chat like transformers does, but with make_context's ids.

        With the default template, ids are built turn by turn exactly as
        ``make_context`` builds them (message text never becomes control tokens),
        rather than by tokenizing the rendered string (so it is always
        "sanitized": ``sanitize_control_tokens`` changes nothing). Any other template, tools
        or documents go through transformers' generic path. History is never
        truncated here (``make_context`` drops old turns past ``max_window_size``).
        """
        common = dict(
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            return_dict=return_dict,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            tokenizer_kwargs=tokenizer_kwargs,
            **kwargs,
        )
        default_template = self.get_chat_template(chat_template, tools) == DEFAULT_CHAT_TEMPLATE
        if default_template:
            chats = self._checked_chats(conversation)
        piecewise = (
            tokenize
            and default_template
            and tools is None
            and documents is None
            and continue_final_message in (False, True, "content")
        )
        if not piecewise:
            return super().apply_chat_template(
                conversation, tokenize=tokenize, sanitize_control_tokens=sanitize_control_tokens, **common
            )
        if return_assistant_tokens_mask:
            raise ValueError("QWenTokenizer does not support return_assistant_tokens_mask")

        # The messages are checked above; let the base class render them, which also
        # keeps its errors (continue + generation prompt, ...).
        rendered = super().apply_chat_template(conversation, tokenize=False, **common)
        batched = isinstance(rendered, list)
        ids = [self._chatml_ids(chat, add_generation_prompt, bool(continue_final_message)) for chat in chats]
        out = self(
            ids if batched else ids[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        return out if return_dict else out["input_ids"]

    @staticmethod
    def _checked_chats(conversation):
        """One conversation or a batch (detected as transformers does), each checked by `_checked_chat`."""
        batched = (
            isinstance(conversation, (list, tuple))
            and len(conversation) > 0
            and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        )
        if not batched:
            return [_checked_chat(getattr(conversation, "messages", conversation))]
        return [
            _checked_chat(getattr(chat, "messages", chat), where=f"conversation {n}: ")
            for n, chat in enumerate(conversation)
        ]

    def _chatml_ids(self, messages, add_generation_prompt, continue_final_message):
        """Ids of one chatml conversation, built with make_context's piecewise helpers."""
        messages = list(messages)
        if messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
        ids = []
        nl = self.encode("\n")
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            last = i == len(messages) - 1
            ids += (nl if i else []) + chatml_turn(self, role, content, close=not (last and continue_final_message))[1]
        if add_generation_prompt:
            ids += chatml_generation_prompt(self)[1]
        return ids
