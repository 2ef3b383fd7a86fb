"""Find and load a Qwen (v1) chat checkpoint for the demos and servers, with clear errors.

    model, tokenizer = load_chat_model("Qwen/Qwen-7B-Chat")   # or a local directory

Every problem is raised as a `CheckpointError` (a ValueError; `CheckpointNotFoundError` is also a
FileNotFoundError) whose message is one line naming the problem, so a command-line tool can print
`error: <message>`. The checks run before the weights are read: a wrong directory, a base model,
a Qwen2 export or another architecture is refused at once, and a hub name is not tried when the
hub cannot be reached (transformers would spend about a minute on retries).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.parse
import urllib.request

HUB_TIMEOUT_S = 2.0
# A hub repo id: `name` or `org/name` (letters, digits, `-`, `_`, `.`; no `--` or `..`).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No such directory, or a hub name that cannot be fetched."""


def error_text(exc: BaseException) -> str:
    """An exception's whole message on one line (lines joined with "; "), or its type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


# ----------------------------------------------------------------------------- where the checkpoint is


def looks_like_hub_name(path: str) -> bool:
    """True for `name` or `org/name`; anything else (`./x`, `/x`, `~/x`, `a/b/c`, `x/`) is a local path."""
    return bool(_REPO_ID.fullmatch(path)) and "--" not in path and ".." not in path


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable_reason(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when a TCP connection to it (or to the
    https proxy) opens within `timeout` seconds. Read from the environment at each call."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or endpoint
    port = url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    connected = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass

    # In a thread, because the name lookup inside create_connection ignores the timeout.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if connected else f"cannot connect to {host}:{port}"


def resolve_checkpoint(path: str, path_option: str = "-c") -> str:
    """A local checkpoint directory, or a hub name to download from. A hub name already in the
    Hugging Face cache gives its cached directory when the hub cannot be reached. `path_option`
    is how the user passes the path (for the hint in the error messages)."""
    path = os.fspath(path)
    if not path.strip():
        raise CheckpointNotFoundError(f"no checkpoint given: point {path_option} at a checkpoint directory")
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise CheckpointError(f"checkpoint path {path} is a file, not a checkpoint directory")
    if not looks_like_hub_name(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path} not found: no such directory")
    reason = hub_unreachable_reason()
    if reason is None:
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return os.path.dirname(cached)
    raise CheckpointNotFoundError(
        f"checkpoint {path} was not found locally (no such directory, not in the Hugging Face cache) and "
        f"the Hugging Face hub is unreachable ({reason}); download it elsewhere and point {path_option} "
        "at its local directory"
    )


# ----------------------------------------------------------------------------- what the checkpoint is


def _read_json(source: str, name: str, required: bool) -> dict | None:
    """`name` from a checkpoint directory or hub repo, parsed; None when it is absent and not required."""
    if os.path.isdir(source):
        file = os.path.join(source, name)
        if not os.path.isfile(file):
            file = None
    else:
        from transformers.utils import cached_file

        try:
            file = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except Exception as exc:  # noqa: BLE001  (network, unknown repo, gated repo, ...)
            raise CheckpointNotFoundError(f"cannot get {name} of checkpoint {source}: {error_text(exc)}") from exc
    if file is None:
        if required:
            raise CheckpointError(f"checkpoint {source} has no {name}: not a model checkpoint")
        return None
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {name} of checkpoint {source}: {error_text(exc)}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{name} of checkpoint {source} is not a JSON object")
    return data


def check_chat_checkpoint(source: str, chat: bool = True) -> None:
    """Refuse anything but a Qwen (v1) checkpoint (a chat one unless `chat` is false), from its
    small JSON files alone."""
    if os.path.isdir(source) and not os.listdir(source):
        raise CheckpointError(f"checkpoint directory {source} is empty")
    config = _read_json(source, "config.json", required=True)
    model_type = config.get("model_type")
    if model_type != "qwen":
        architectures = ", ".join(map(str, config.get("architectures") or [])) or "none given"
        raise CheckpointError(
            f"checkpoint {source} is not a Qwen (v1) model: its config.json has model_type {model_type!r} "
            f"(architectures: {architectures}), expected 'qwen' (QWenLMHeadModel)"
        )
    if os.path.isdir(source):
        from .tokenization_qwen import QWenTokenizer

        for name in QWenTokenizer.vocab_files_names.values():
            if not os.path.isfile(os.path.join(source, name)):
                raise CheckpointError(f"checkpoint {source} has no {name} (the tokenizer's vocabulary)")
    if not chat:
        return
    generation = _read_json(source, "generation_config.json", required=False) or {}
    chat_format = generation.get("chat_format")
    if chat_format != "chatml":
        found = "has no generation_config.json" if not generation else f"has chat_format {chat_format!r}"
        raise CheckpointError(
            f"checkpoint {source} is not a chat model: it {found}, a chat model has 'chatml' "
            "(a base model? use a -Chat checkpoint)"
        )


DTYPE_CHOICES = ("auto", "fast", "bfloat16", "float16", "float32")


def add_precision_arguments(parser) -> None:
    """--dtype and --quantize, the same on every front end."""
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="weights and activations (default: auto, the checkpoint's bf16/fp16/fp32 flags or their auto rule, "
             "fp32 on a CPU as in the original; fast: the fastest 16-bit dtype for this machine, bf16 on GPUs and "
             "CPUs with native bf16, else fp16)",
    )
    parser.add_argument(
        "--quantize", type=_quantization, metavar="{int8,int4,int4:GROUP}",
        help=f"weight-only quantization on load (int4 groups: 32, 64, 128, 256; default {_default_group()})",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535], got {value}")
    return value


def add_upstream_arguments(parser, title: str):
    """--upstream URL, --upstream-api-key, --upstream-model, the same on every front end; returns the
    argument group (a front end may add its own options to it). check_upstream_arguments after parsing."""
    group = parser.add_argument_group(f"upstream engine ({title})")
    group.add_argument("--upstream", metavar="URL",
                       help="generate on the OpenAI-compatible server at URL (openai_api.py, or vLLM serving a "
                            "qwen.tools.export_qwen2 export) instead of loading the weights; -c still gives the "
                            "tokenizer, chat format and generation config")
    group.add_argument("--upstream-api-key", metavar="KEY",
                       help="Bearer key for the upstream (default: the QWEN_UPSTREAM_API_KEY environment variable)")
    group.add_argument("--upstream-model", metavar="NAME",
                       help="model id to ask the upstream for (default: the first one its /v1/models lists)")
    return group


def check_upstream_arguments(parser, args) -> None:
    """parser.error for --upstream options that cannot work; the key defaults to QWEN_UPSTREAM_API_KEY."""
    if args.upstream is None and (args.upstream_api_key is not None or args.upstream_model is not None):
        parser.error("--upstream-api-key and --upstream-model need --upstream URL")
    if args.upstream is not None and not args.upstream.strip().lower().startswith(("http://", "https://")):
        parser.error(f"--upstream must be an http:// or https:// URL, got {args.upstream!r}")
    if args.upstream_api_key is None:
        args.upstream_api_key = os.environ.get("QWEN_UPSTREAM_API_KEY") or None


def _default_group() -> int:
    from .quantization import DEFAULT_GROUP_SIZE

    return DEFAULT_GROUP_SIZE


def _quantization(text: str) -> str:
    import argparse

    from .quantization import parse_quantization

    try:
        parse_quantization(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def load_chat_model(path: str, cpu_only: bool = False, path_option: str = "-c", **precision):
    """(model in eval mode, tokenizer) of the Qwen (v1) chat checkpoint at `path` (a directory or a
    hub name). On the GPU(s) when there is one and `cpu_only` is false. Raises CheckpointError.
    `dtype` ("auto" or a torch dtype name) and `quantization` ("int8", "int4[:group]") as load_model."""
    return load_model(path, cpu_only=cpu_only, chat=True, path_option=path_option, **precision)


def load_model(path: str, cpu_only: bool = False, chat: bool = True, path_option: str = "-c",
               dtype: str | None = None, quantization: str | None = None):
    """load_chat_model, also for base checkpoints when `chat` is false."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # `import qwen` registered our classes

    source = resolve_checkpoint(path, path_option)
    check_chat_checkpoint(source, chat=chat)
    device_map = "cpu" if cpu_only or not torch.cuda.is_available() else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        options = {"device_map": device_map}
        if dtype == "fast":  # resolved here: transformers' Auto classes take torch dtype names only
            from .modeling_qwen import fast_dtype

            options["dtype"] = fast_dtype(on_cuda=device_map != "cpu")
        elif dtype not in (None, "auto"):
            options["dtype"] = dtype
        if quantization:
            options["quantization"] = quantization
        model = AutoModelForCausalLM.from_pretrained(source, **options).eval()
    except Exception as exc:  # noqa: BLE001  (whatever the files hold, the caller gets one line)
        raise CheckpointError(f"cannot load checkpoint {path}: {error_text(exc)}") from exc
    return model, tokenizer
