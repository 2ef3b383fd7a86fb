"""Command line of the OpenAI-compatible API server (`openai_api.py`, QWEN_SPEC §7).

    python openai_api.py -c Qwen/Qwen-7B-Chat [--server-name 127.0.0.1] [--server-port 8000]
                         [--api-auth user:password | --api-key KEY] [--cpu-only] [--disable-gc] ...
    python openai_api.py -c Qwen/Qwen-7B-Chat --upstream http://gpu-host:8001 [--upstream-api-key KEY]

The HTTP server starts at once and loads the model in the background: /health answers 503 until
the model is ready, the generation endpoints 503 with a "loading" error. The checkpoint's small
files are checked before the server starts, so a wrong path or another architecture fails fast.

With --upstream URL the weights are not loaded: the checkpoint gives the tokenizer and the generation
config (chat format, sampling defaults), and the server sends raw-prompt completions (token ids,
streamed) to the OpenAI-compatible server at URL: `vllm serve` on a `python -m qwen.tools.export_qwen2`
export, or another openai_api.py. The chat format, ReAct tool calls, stop words, usage, auth and
limits stay here; logprobs are asked for as token ids and response_format is forwarded, for the
upstream to compute and enforce. While the upstream is not up yet (connection refused, or 503),
/health answers 503 and the server waits for it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import time

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
MAX_BODY_BYTES = 8 * 1024 * 1024  # as qwen.api.protocol (not imported here: --help works without the api extra)
DEFAULT_MAX_RUNNING = 8
DEFAULT_UPSTREAM_RUNNING = 64  # an upstream such as vLLM batches many more sequences than our engine

EPILOG = """\
endpoints:
  POST /v1/chat/completions   chat (streaming, n, logprobs, tools/tool_choice and the legacy
                              functions/function_call through the ReAct prompt, response_format
                              json_object/json_schema by constrained decoding)
  POST /v1/completions        raw prompts (echo, logprobs)
  GET  /v1/models             the served model (any request's model name maps to it)
  GET  /health                200 once the model is loaded, 503 before
  GET  /metrics               Prometheus metrics
  POST /tokenize, /detokenize prompt or messages <-> token ids

With --api-auth and/or --api-key, every endpoint but /health needs credentials (either kind).
With --upstream, generation (logprobs and response_format included) runs on that server.
Use it with the official client:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
"""


def _user_password(text: str) -> str:
    user, sep, _ = text.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected user:password")
    return text


def _origins(text: str) -> list[str]:
    return [o.strip() for o in text.split(",") if o.strip()]


def build_parser() -> argparse.ArgumentParser:
    from ..loading import (
        add_precision_arguments,
        add_upstream_arguments,
        port_number,
        positive_int,
    )

    parser = argparse.ArgumentParser(
        prog="openai_api.py",
        description="OpenAI-compatible API server for Qwen (v1) chat models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--checkpoint-path", default=DEFAULT_CKPT_PATH,
                        help="checkpoint directory or Hugging Face hub name (default: %(default)s)")
    parser.add_argument("--api-auth", type=_user_password, metavar="USER:PASSWORD",
                        help="require HTTP Basic authentication with these credentials")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (the OpenAI client's api_key); "
                             "default: the QWEN_API_KEY environment variable, if set")
    parser.add_argument("--cpu-only", action="store_true", help="run the model on the CPU even if a GPU is present")
    add_precision_arguments(parser)
    parser.add_argument("--server-port", type=port_number, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this computer only; 0.0.0.0 for all)")
    parser.add_argument("--disable-gc", action="store_true",
                        help="do not collect garbage (and empty the CUDA cache) after replies")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="model id reported by /v1/models and in replies (default: the checkpoint's "
                             "directory name)")
    parser.add_argument("--max-running", type=positive_int, default=None,
                        help=f"sequences generated together (default: {DEFAULT_MAX_RUNNING}; with --upstream, "
                             f"requests sent to it at once, default: {DEFAULT_UPSTREAM_RUNNING})")
    parser.add_argument("--max-waiting", type=positive_int, default=64,
                        help="requests that may wait for a slot; more are refused with 429 (default: %(default)s)")
    parser.add_argument("--max-context", type=positive_int, metavar="TOKENS",
                        help="prompt + reply tokens per sequence (default: the model's maximum)")
    parser.add_argument("--cors-origins", type=_origins, metavar="ORIGINS",
                        help="comma-separated origins allowed by CORS, or '*' (default: no CORS headers)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                        help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    upstream = add_upstream_arguments(parser, "generation on another OpenAI-compatible server: raw-prompt "
                                      "completions go there")
    upstream.add_argument("--upstream-wait", type=positive_int, default=600, metavar="SECONDS",
                          help="how long to wait for an upstream that does not answer yet (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level (default: %(default)s)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    from ..loading import check_upstream_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("QWEN_API_KEY") or None
    check_upstream_arguments(parser, args)
    if args.max_running is None:
        args.max_running = DEFAULT_UPSTREAM_RUNNING if args.upstream else DEFAULT_MAX_RUNNING
    return args


def served_name(args) -> str:
    return args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint_path)) or "qwen"


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread on a free loopback port (tests, notebooks):

        with BackgroundServer(create_app(engine)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_upstream_engine(source: str, args, stopping=lambda: False, log=None):
    """An UpstreamEngine for args.upstream, with the tokenizer and generation config of the
    checkpoint at `source` (no weights). Waits up to args.upstream_wait seconds for an upstream
    that does not answer yet (`stopping()` ends the wait); raises CheckpointError or ValueError."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..loading import CheckpointError, error_text
    from ..serving.upstream import UpstreamEngine

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer of checkpoint {source}: {error_text(exc)}") from exc
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the defaults
        generation_config = None
    deadline = time.monotonic() + getattr(args, "upstream_wait", 600)
    said = False
    while True:
        try:
            models = UpstreamEngine.list_models(args.upstream, args.upstream_api_key)
            break
        except ConnectionError as exc:
            if time.monotonic() > deadline or stopping():
                raise ValueError(f"{exc} (waited {getattr(args, 'upstream_wait', 600)} s)") from None
            if log is not None and not said:
                log.warning("%s; waiting for it (up to %d s)", exc, getattr(args, "upstream_wait", 600))
                said = True
            time.sleep(1.0)
    return UpstreamEngine(args.upstream, tokenizer, model=args.upstream_model, api_key=args.upstream_api_key,
                          max_context=args.max_context, max_running=args.max_running, max_waiting=args.max_waiting,
                          config=config, generation_config=generation_config, models=models)


def main(argv=None) -> int:
    args = parse_args(argv)
    import importlib.util

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            print(f"error: the API server needs {module}: pip install 'qwen[api]'", file=sys.stderr)
            return 1
    from ..loading import (
        CheckpointError,
        check_chat_checkpoint,
        error_text,
        resolve_checkpoint,
    )

    try:  # the cheap checks first: a wrong path fails before the server starts
        source = resolve_checkpoint(args.checkpoint_path)
        check_chat_checkpoint(source, chat=False)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import uvicorn

    from ..serving import Engine
    from .app import create_app, set_engine, set_load_error

    app = create_app(
        None,
        served_model_name=served_name(args),
        api_key=args.api_key,
        api_auth=args.api_auth,
        cors_origins=args.cors_origins,
        max_body_bytes=args.max_body_bytes,
        disable_gc=args.disable_gc,
    )
    config = uvicorn.Config(app, host=args.server_name, port=args.server_port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    log = logging.getLogger("uvicorn.error")
    loaded = {}

    def load():
        try:
            if args.upstream:
                engine = load_upstream_engine(source, args, lambda: server.should_exit, log)
            else:
                engine = Engine.from_pretrained(
                    source, cpu_only=args.cpu_only, chat=False, dtype=args.dtype, quantization=args.quantize,
                    max_running=args.max_running,
                    max_waiting=args.max_waiting, max_context=args.max_context, model_name=served_name(args))
        except Exception as exc:  # noqa: BLE001  (reported, and the server stops)
            message = error_text(exc)
            set_load_error(app, message)
            log.error("cannot load the model: %s", message)
            loaded["error"] = message
            server.should_exit = True
            return
        loaded["engine"] = engine
        if server.should_exit:  # stopped while loading
            return
        set_engine(app, engine)
        if args.upstream:
            log.info("model %s served through upstream %s (its model %s, context %d tokens)", served_name(args),
                     engine.url, engine.upstream_model, engine.max_context)
        else:
            log.info("model %s loaded (context %d tokens); serving", served_name(args), engine.max_context)

    loader = threading.Thread(target=load, name="qwen-model-loader", daemon=True)
    loader.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass
    finally:
        engine = loaded.get("engine")
        if engine is not None:
            engine.shutdown()
        gc.collect()
    if "error" in loaded:
        print(f"error: {loaded['error']}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
