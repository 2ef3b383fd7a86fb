"""The interactive terminal chat behind `cli_demo.py` (QWEN_SPEC §7, with the §10 fix).

    python cli_demo.py [-c CHECKPOINT] [-s SEED] [--cpu-only] [--max-new-tokens N]

Type text to chat; lines starting with ":" are commands (`:h` lists them). Each turn reseeds with
the current seed and streams `model.chat_stream()`. Unlike the original, `:conf` edits the
generation config that is actually passed to `chat_stream()`, so it changes generation, and its
values are parsed with `ast.literal_eval` instead of `eval`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import difflib
import os
import re
import shutil
import sys
import unicodedata

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
DEFAULT_SEED = 1234
PROMPT = "User> "
REPLY_PREFIX = "Qwen: "

WELCOME_MSG = """\
Welcome to use Qwen-Chat model, type text to start chat, type :h to show command help.
(欢迎使用 Qwen-Chat 模型，输入内容即可进行对话，:h 显示命令帮助。)
Type :q or press Ctrl-D to quit; Ctrl-C stops a reply that is being generated.

Note: this demo is governed by the original license of the Qwen model you load. Please do not
knowingly generate harmful content (hate speech, violence, pornography, deception, ...).
"""

HELP_MSG = """\
Commands:
    :help / :h            show this help                         显示帮助信息
    :exit / :quit / :q    exit the demo (also Ctrl-D)            退出
    :clear / :cl          clear the screen                       清屏
    :clear-his / :clh     clear the chat history                 清除对话历史
    :history / :his       show the chat history                  显示对话历史
    :seed                 show the random seed                   显示随机种子
    :seed <N>             set the random seed to <N>             设置随机种子
    :conf                 show the generation config             显示生成配置
    :conf <key>=<value>   change the generation config           修改生成配置
                          (several pairs may follow one :conf; values are Python literals,
                          anything else is taken as a string)
    :reset-conf           restore the generation config as loaded 重置生成配置
Any other line, including an unknown :command, is sent to the model.
"""

_SEED_RANGE = 2**32  # what numpy's seeding (inside set_seed) accepts


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < _SEED_RANGE:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Qwen-Chat command-line interactive chat demo.")
    parser.add_argument(
        "-c", "--checkpoint-path", default=DEFAULT_CKPT_PATH,
        help="checkpoint directory or hub name (default: %(default)r)",
    )
    parser.add_argument("-s", "--seed", type=_seed, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when a GPU is available")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, metavar="N",
        help="override the checkpoint's max_new_tokens (default: the checkpoint's generation config)",
    )
    return parser


# ----------------------------------------------------------------------------- loading


class CheckpointError(Exception):
    """A checkpoint that cannot be found or loaded (reported as one `error:` line, exit 2)."""


def _looks_local(path: str) -> bool:
    """True for anything that cannot be a hub name `name` or `org/name`."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.sep != "/" and os.sep in path
        or os.path.exists(path)
    )


def load(checkpoint_path: str, cpu_only: bool):
    """Tokenizer, model (eval mode) and the checkpoint's generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen classes with the Auto* factories)

    if not os.path.isdir(checkpoint_path) and _looks_local(checkpoint_path):
        raise CheckpointError(f"checkpoint directory not found: {checkpoint_path}")
    device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_path)
        model = AutoModelForCausalLM.from_pretrained(checkpoint_path, device_map=device_map).eval()
    except Exception as exc:  # noqa: BLE001  (any failure to load is reported as one line)
        detail = str(exc).strip().splitlines()
        detail = detail[0] if detail else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {checkpoint_path}: {detail}") from None
    # from_pretrained read generation_config.json; work on a copy, never on the model's own.
    return tokenizer, model, copy.deepcopy(model.generation_config)


# ----------------------------------------------------------------------------- display


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return 2
    return 1


def _rows(text: str, columns: int) -> int:
    """Terminal rows that `text` occupies when printed from column 0 (approximate for odd controls)."""
    columns = max(columns, 1)
    rows = 0
    for line in text.split("\n"):
        line = line.rsplit("\r", 1)[-1]  # a carriage return restarts the row
        width = sum(_char_width(ch) for ch in line.expandtabs(8))
        rows += max(1, -(-width // columns))
    return rows


class ReplyPrinter:
    """Shows a streamed reply. On a terminal it redraws incrementally: only the new suffix when the
    text grows, otherwise the reply is erased and printed again. Elsewhere only the final text."""

    def __init__(self, out, interactive: bool):
        self.out = out
        self.interactive = interactive
        self.shown = None  # text on screen (None: nothing printed yet)
        self.text = ""

    def update(self, text: str) -> None:
        self.text = text
        if not self.interactive:
            return
        if self.shown is None:
            self.out.write(REPLY_PREFIX + text)
        elif text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:
            up = _rows(REPLY_PREFIX + self.shown, shutil.get_terminal_size().columns) - 1
            self.out.write((f"\x1b[{up}A" if up > 0 else "") + "\r\x1b[J" + REPLY_PREFIX + text)
        self.shown = text
        self.out.flush()

    def finish(self) -> None:
        if self.interactive and self.shown is not None:
            self.out.write("\n")
        else:
            self.out.write(REPLY_PREFIX + self.text + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- generation config edits


def _known_keys(config) -> set[str]:
    from transformers import GenerationConfig

    keys = set(vars(GenerationConfig())) | set(vars(config))
    return {k for k in keys if not k.startswith("_") and k != "transformers_version"}


def parse_value(text: str):
    """A Python literal when it is one (numbers, True/False/None, lists, quoted strings), else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _type_problem(old, new) -> str | None:
    """Why `new` cannot replace `old` (a field's current value), or None. Only scalars are checked;
    validate() and generation catch the rest."""
    if new is None or old is None or isinstance(old, str):
        return None
    if isinstance(old, bool):
        return None if isinstance(new, bool) else "expected True or False"
    if isinstance(new, bool) or not isinstance(new, (int, float, list, tuple)):
        return "expected a number"
    if isinstance(old, int) and isinstance(new, float):
        return "expected an integer"
    return None


def set_config_value(config, key: str, raw_value: str):
    """Set `config.<key>` from its text form; returns the new value or raises ValueError (config unchanged)."""
    known = _known_keys(config)
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown generation config key {key!r}{hint}")
    value = parse_value(raw_value)
    problem = _type_problem(getattr(config, key, None), value)
    if problem:
        raise ValueError(f"bad value for {key}: {raw_value!r} ({problem})")
    trial = copy.deepcopy(config)
    setattr(trial, key, value)
    try:
        trial.validate()
    except Exception as exc:  # noqa: BLE001  (transformers raises ValueError, TypeError, ...)
        raise ValueError(f"bad value for {key}: {raw_value!r} ({exc})") from None
    setattr(config, key, value)
    return value


_PAIR_SPLIT = re.compile(r"\s+(?=[A-Za-z_][\w.-]*\s*=)")


def split_pairs(text: str) -> list[str]:
    """`a=1 b=[1, 2]` -> ["a=1", "b=[1, 2]"]: a new pair starts at whitespace followed by `name=`."""
    text = text.strip()
    return _PAIR_SPLIT.split(text) if text else []


# ----------------------------------------------------------------------------- the session


class ChatSession:
    def __init__(self, model, tokenizer, config, seed: int, out=None, interactive: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.loaded_config = copy.deepcopy(config)
        self.config = copy.deepcopy(config)  # what every turn passes to chat_stream (and :conf edits)
        self.seed = seed
        self.history: list[tuple[str, str]] = []
        self.out = out or sys.stdout
        self.interactive = self.out.isatty() if interactive is None else interactive

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- commands --------------------------------------------------------------

    def handle_command(self, line: str) -> bool | None:
        """Run `line` if it is a known command: True to go on, False to exit, None if it is a query."""
        if not line.startswith(":"):
            return None
        words = line[1:].split(maxsplit=1)
        command = words[0] if words else ""
        rest = words[1] if len(words) > 1 else ""
        if command in ("exit", "quit", "q"):
            return False
        if command in ("help", "h"):
            self.say(HELP_MSG)
        elif command in ("clear", "cl"):
            if self.interactive:
                self.out.write("\x1b[H\x1b[2J\x1b[3J")
            self.say(WELCOME_MSG)
        elif command in ("clear-his", "clh"):
            self.say(f"[INFO] All {len(self.history)} history cleared")
            self.history.clear()
        elif command in ("history", "his"):
            self.show_history()
        elif command == "seed":
            self.seed_command(rest)
        elif command == "conf":
            self.conf_command(rest)
        elif command == "reset-conf":
            self.config = copy.deepcopy(self.loaded_config)
            self.say("[INFO] Generation config reset to the one loaded")
            self.say(str(self.config))
        else:
            return None  # an unknown :command is a query, as in the original
        return True

    def show_history(self) -> None:
        width = shutil.get_terminal_size().columns
        self.say(f" History ({len(self.history)}) ".center(width, "="))
        for index, (query, response) in enumerate(self.history):
            self.say(f"User[{index}]: {query}")
            self.say(f"Qwen[{index}]: {response}")
        self.say("=" * width)

    def seed_command(self, rest: str) -> None:
        text = rest.strip()
        if not text:
            self.say(f"[INFO] Current random seed: {self.seed}")
            return
        try:
            seed = _seed(text)
        except argparse.ArgumentTypeError as exc:
            self.say(f"[ERROR] Cannot set the random seed: {exc}")
            return
        self.seed = seed
        self.say(f"[INFO] Random seed changed to {seed}")

    def conf_command(self, rest: str) -> None:
        pairs = split_pairs(rest)
        if not pairs:
            self.say(str(self.config))
            return
        for pair in pairs:
            key, eq, raw_value = pair.partition("=")
            key, raw_value = key.strip(), raw_value.strip()
            if not eq or not key:
                self.say(f"[ERROR] Cannot change the config: {pair!r} is not <key>=<value>")
                continue
            try:
                value = set_config_value(self.config, key, raw_value)
            except ValueError as exc:
                self.say(f"[ERROR] Cannot change the config: {exc}")
                continue
            self.say(f"[INFO] Generation config changed: {key} = {value!r}")

    # -- chat ------------------------------------------------------------------

    def chat(self, query: str) -> str | None:
        """One streamed turn; returns the reply (also added to the history), or None if it was
        interrupted with Ctrl-C or failed. Closing the stream stops its generation."""
        from transformers import set_seed

        set_seed(self.seed)
        printer = ReplyPrinter(self.out, self.interactive)
        stream = self.model.chat_stream(self.tokenizer, query, history=self.history, generation_config=self.config)
        try:
            with contextlib.closing(stream):
                for partial in stream:
                    printer.update(partial)
        except KeyboardInterrupt:
            printer.finish()
            self.say("[WARNING] Generation interrupted")
            return None
        except Exception as exc:  # noqa: BLE001  (a failed turn must not end the session)
            if printer.shown is not None:
                printer.finish()
            self.say(f"[ERROR] Generation failed: {type(exc).__name__}: {exc}")
            return None
        printer.finish()
        self.history.append((query, printer.text))
        return printer.text

    # -- loop ------------------------------------------------------------------

    def read_line(self) -> str | None:
        """The next non-empty input line, stripped; None at end of input."""
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                return None
            except UnicodeDecodeError:
                self.say("[ERROR] Encoding error in input")
                continue
            line = line.strip()
            if line:
                return line

    def run(self) -> int:
        self.say(WELCOME_MSG)
        try:
            while True:
                line = self.read_line()
                if line is None:
                    self.say()
                    return 0
                action = self.handle_command(line)
                if action is False:
                    return 0
                if action is None:
                    self.chat(line)
        except KeyboardInterrupt:  # at the prompt (during a reply, chat() catches it)
            self.say()
            return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer, model, config = load(args.checkpoint_path, args.cpu_only)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    try:
        import readline  # noqa: F401  (line editing and recall for input())
    except ImportError:
        pass
    return ChatSession(model, tokenizer, config, args.seed).run()
