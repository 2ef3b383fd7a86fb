"""QWenTokenizer: the Qwen v1 tiktoken BPE behind transformers' Python tokenizer API.

This file is also copied into saved checkpoints as remote code, so it imports
only the standard library, tiktoken, transformers and ``.qwen_generation_utils``.
"""

import base64
import binascii
import logging
import os
import unicodedata

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

from .qwen_generation_utils import DEFAULT_SYSTEM, chatml_generation_prompt, chatml_turn

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
    if path is None:
        raise ValueError(
            f"QWenTokenizer needs its vocabulary file {VOCAB_FILES_NAMES['vocab_file']!r}, but none was given or found"
        )
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


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level BPE on tiktoken with 208 fixed control tokens (ids 151643..151850).

    Regular tokens are ``bytes``, control tokens ``str``. No BOS/EOS is ever added.
    """

    vocab_files_names = VOCAB_FILES_NAMES

    def __init__(self, vocab_file=None, errors="replace", extra_vocab_file=None, **kwargs):
        # Everything tiktoken-related is built before the base __init__, which
        # already calls len(), convert_tokens_to_ids() and _add_tokens().
        self.errors = errors
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
        raise ValueError(f"unknown id {index}")

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
        ``allowed_special=set()`` to keep it plain text.
        """
        if kwargs.get("split_special_tokens"):
            allowed_special = set()
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        return [self.decoder[i] for i in ids]

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
        piecewise = (
            tokenize
            and self.get_chat_template(chat_template, tools) == DEFAULT_CHAT_TEMPLATE
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

        # Let the base class validate the messages and render them; this also
        # keeps its errors (empty chat, continue + generation prompt, ...).
        rendered = super().apply_chat_template(conversation, tokenize=False, **common)
        batched = isinstance(rendered, list)
        conversations = conversation if batched else [conversation]
        ids = [
            self._chatml_ids(getattr(chat, "messages", chat), add_generation_prompt, bool(continue_final_message))
            for chat in conversations
        ]
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

    def _chatml_ids(self, messages, add_generation_prompt, continue_final_message):
        """Ids of one chatml conversation, built with make_context's piecewise helpers."""
        messages = list(messages)
        if messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
        ids = []
        nl = self.encode("\n")
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise TypeError(f"chat message {i} needs string 'role' and 'content', got {message!r}")
            last = i == len(messages) - 1
            ids += (nl if i else []) + chatml_turn(self, role, content, close=not (last and continue_final_message))[1]
        if add_generation_prompt:
            ids += chatml_generation_prompt(self)[1]
        return ids
