"""The terminal chat behind `cli_demo.py` (QWEN_SPEC §7, with the §10 fix).

    python cli_demo.py [-c CHECKPOINT] [-s SEED] [--cpu-only] [--max-new-tokens N] [--prompt TEXT]

On a terminal: type text to chat; lines starting with ":" are commands (`:h` lists them). With
stdin piped, every line is read the same way and the output is a plain transcript; `--prompt`
answers one query and exits. Each turn reseeds with the current seed and streams
`model.chat_stream()`. Unlike the original, `:conf` edits the generation config that is actually
passed to `chat_stream()`, so it changes generation, and its values are parsed with
`ast.literal_eval` instead of `eval` and checked when they are set.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import difflib
import math
import os
import re
import shutil
import sys
import unicodedata

from .loading import CheckpointError, add_precision_arguments, error_text, load_chat_model

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
DEFAULT_SEED = 1234
PROMPT = "User> "
REPLY_PREFIX = "Qwen: "
QUERY_PREFIX = "User: "  # echoes a piped query in the transcript

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

USAGE_NOTES = """\
modes:
  on a terminal   an interactive chat: type text to chat, :h lists the commands
  piped stdin     each line is a query or a :command, e.g.
                    printf ':conf do_sample=False\\n你好\\n:his\\n' | cli_demo.py -c DIR
                  The output is a plain transcript ("User: ..." and "Qwen: ..." lines; no
                  prompts, banner or escape codes). A line that fails (bad :conf value,
                  undecodable bytes, a query the model refuses) gives an "error: ..." line
                  on stderr and the next line is read. It stops at :q or at the end of the
                  input; the exit status is 1 if any line failed, else 0.
  --prompt TEXT   print the reply to TEXT alone and exit (status 1 if it failed)

-c takes a local checkpoint directory or a Hugging Face hub name. A name is
downloaded, or taken from the Hugging Face cache when the hub cannot be reached.
The checkpoint must be a Qwen (v1) chat model.
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
    parser = argparse.ArgumentParser(
        description="Qwen-Chat command-line chat demo.", epilog=USAGE_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c", "--checkpoint-path", default=DEFAULT_CKPT_PATH,
        help="checkpoint directory or hub name (default: %(default)r)",
    )
    parser.add_argument("-s", "--seed", type=_seed, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when a GPU is available")
    add_precision_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, metavar="N",
        help="override the checkpoint's max_new_tokens (default: the checkpoint's generation config)",
    )
    parser.add_argument(
        "--prompt", metavar="TEXT",
        help="answer TEXT (a query, never a :command), print only the reply and exit; stdin is not read",
    )
    return parser


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

    def __init__(self, out, interactive: bool, prefix: str = REPLY_PREFIX):
        self.out = out
        self.interactive = interactive
        self.prefix = prefix
        self.shown = None  # text on screen (None: nothing printed yet)
        self.text = ""

    def update(self, text: str) -> None:
        self.text = text
        if not self.interactive:
            return
        if self.shown is None:
            self.out.write(self.prefix + text)
        elif text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:
            up = _rows(self.prefix + self.shown, shutil.get_terminal_size().columns) - 1
            self.out.write((f"\x1b[{up}A" if up > 0 else "") + "\r\x1b[J" + self.prefix + text)
        self.shown = text
        self.out.flush()

    def finish(self) -> None:
        if self.interactive and self.shown is not None:
            self.out.write("\n")
        else:
            self.out.write(self.prefix + self.text + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- generation config edits

# Checked when a value is set, so that a bad one is refused at once rather than failing every
# later turn: field -> (type, test or None, what a valid value is).
_FIELD_RULES = {
    "temperature": (float, lambda v: v > 0, "a number > 0 (for greedy decoding set do_sample=False)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "typical_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0 (1.0 means no penalty)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 turns top-k off)"),
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "min_new_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "num_beams": (int, lambda v: v >= 1, "an integer >= 1"),
    "no_repeat_ngram_size": (int, lambda v: v >= 0, "an integer >= 0"),
    "max_window_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "do_sample": (bool, None, "True or False"),
    "chat_format": (str, lambda v: v == "chatml", "'chatml' (the chat format)"),
}
_NOT_NONE = {"max_new_tokens", "max_window_size", "do_sample", "chat_format"}  # None breaks every turn


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


def _checked_value(key: str, value, current):
    """`value` as field `key` (now `current`) stores it (an int given for a float field becomes a
    float); ValueError naming what the field takes when it does not fit."""
    kind = type(current) if isinstance(current, (bool, int, float)) else None
    kind, test, what = _FIELD_RULES.get(key, (kind, None, None))
    if value is None:
        if key in _NOT_NONE:
            raise ValueError(f"must be {what}, not None")
        return None
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"must be {what or 'True or False'}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"must be {what or 'an integer'}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be {what or 'a number'}")
        value = float(value)
    if test is not None and not test(value):
        raise ValueError(f"must be {what}")
    return value


def set_config_value(config, key: str, raw_value: str):
    """Set `config.<key>` from its text form; returns the new value or raises ValueError (config unchanged)."""
    known = _known_keys(config)
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown generation config key {key!r}{hint}")
    old = getattr(config, key, None)
    try:
        value = _checked_value(key, parse_value(raw_value), old)
        trial = copy.deepcopy(config)
        setattr(trial, key, value)
        trial.validate()  # transformers' own checks (not strict: those refuse unused sampling flags)
    except Exception as exc:  # noqa: BLE001  (transformers raises ValueError, TypeError, ...)
        raise ValueError(f"bad value {raw_value} for {key}: {error_text(exc)}; {key} stays {old!r}") from None
    setattr(config, key, value)
    return value


_PAIR_SPLIT = re.compile(r"\s+(?=[A-Za-z_][\w.-]*\s*=)")


def split_pairs(text: str) -> list[str]:
    """`a=1 b=[1, 2]` -> ["a=1", "b=[1, 2]"]: a new pair starts at whitespace followed by `name=`."""
    text = text.strip()
    return _PAIR_SPLIT.split(text) if text else []


# ----------------------------------------------------------------------------- the session


class ChatSession:
    """The chat loop. `interactive` (default: stdin and stdout are terminals) gives the banner,
    prompts and live replies; otherwise input lines are read as bytes and the output is a plain
    transcript. Problems are `error: ...` lines on `err`."""

    def __init__(self, model, tokenizer, config, seed: int, out=None, err=None, inp=None,
                 interactive: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.loaded_config = copy.deepcopy(config)
        self.config = copy.deepcopy(config)  # what every turn passes to chat_stream (and :conf edits)
        self.seed = seed
        self.history: list[tuple[str, str]] = []
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.inp = inp or sys.stdin
        if interactive is None:
            interactive = self.inp.isatty() and self.out.isatty()
        self.interactive = interactive
        self.lines_read = 0
        self.errors = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.out.flush()  # keep the order on a terminal, where both streams show
        self.err.write(f"error: {text}\n")
        self.err.flush()
        self.errors += 1

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
            if self.interactive:  # a transcript has no screen to clear
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
            self.error(f"cannot set the random seed: {exc}; it stays {self.seed}")
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
                self.error(f"cannot change the config: {pair!r} is not <key>=<value>")
                continue
            try:
                value = set_config_value(self.config, key, raw_value)
            except ValueError as exc:
                self.error(str(exc))
                continue
            self.say(f"[INFO] Generation config changed: {key} = {value!r}")

    # -- chat ------------------------------------------------------------------

    def chat(self, query: str, prefix: str = REPLY_PREFIX) -> str | None:
        """One streamed turn; returns the reply (also added to the history), or None if it was
        interrupted with Ctrl-C or failed. Closing the stream stops its generation."""
        from transformers import set_seed

        set_seed(self.seed)
        printer = ReplyPrinter(self.out, self.interactive, prefix)
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
            # A ValueError is the model refusing the input (e.g. too long): its message is the reason.
            reason = error_text(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {error_text(exc)}"
            self.error(f"generation failed: {reason}")
            return None
        printer.finish()
        self.history.append((query, printer.text))
        return printer.text

    # -- loop ------------------------------------------------------------------

    def _next_raw_line(self) -> str | None:
        """The next input line (None at the end); an undecodable line is reported and skipped."""
        while True:
            if self.interactive:
                try:
                    return input(PROMPT)
                except EOFError:
                    return None
                except UnicodeDecodeError:
                    self.error("the line is not valid UTF-8, skipped")
                    continue
            # Piped: bytes, decoded line by line, so one bad byte costs only its own line.
            raw = self.inp.buffer.readline()
            if not raw:
                return None
            self.lines_read += 1
            encoding = self.inp.encoding or "utf-8"
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                self.error(f"line {self.lines_read} is not valid {encoding.upper()}, skipped")

    def read_line(self) -> str | None:
        """The next non-empty input line, stripped; None at end of input."""
        while True:
            line = self._next_raw_line()
            if line is None:
                return None
            line = line.strip()
            if line:
                return line

    def run(self) -> int:
        """Chat until :q, the end of input or Ctrl-C at the prompt. Returns the exit status: 1 when
        a non-interactive run met an error, else 0."""
        if self.interactive:
            self.say(WELCOME_MSG)
        try:
            while True:
                line = self.read_line()
                if line is None:
                    if self.interactive:
                        self.say()  # end the prompt's line
                    break
                action = self.handle_command(line)
                if action is False:
                    break
                if action is None:
                    if not self.interactive:
                        self.say(QUERY_PREFIX + line)
                    self.chat(line)
        except KeyboardInterrupt:  # at the prompt (during a reply, chat() catches it)
            self.say()
        return 1 if self.errors and not self.interactive else 0

    def answer(self, query: str) -> int:
        """--prompt: the reply alone; exit status 1 when the turn failed."""
        return 0 if self.chat(query, prefix="") is not None else 1


def _quiet_transformers(progress: bool) -> None:
    """transformers' warnings (e.g. about unused sampling flags) would land in the middle of the
    chat or the transcript; its errors still show. The loading bar is kept on a terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stdin is None:  # started with stdin closed: no input, as if it were empty
        sys.stdin = open(os.devnull, encoding="utf-8")
    interactive = args.prompt is None and sys.stdin.isatty() and sys.stdout.isatty()
    _quiet_transformers(progress=interactive)
    try:
        model, tokenizer = load_chat_model(
            args.checkpoint_path, args.cpu_only, dtype=args.dtype, quantization=args.quantize
        )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    # from_pretrained read generation_config.json; work on a copy, never on the model's own.
    config = copy.deepcopy(model.generation_config)
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    session = ChatSession(model, tokenizer, config, args.seed, interactive=interactive)
    try:
        if args.prompt is not None:
            return session.answer(args.prompt)
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and recall for input())
            except ImportError:
                pass
        return session.run()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and let the exit flush go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
