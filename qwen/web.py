"""The browser chat (web_demo.py): a Gradio front end of qwen.serving.

    demo = build_demo(Engine.from_pretrained("Qwen/Qwen-7B-Chat"))
    launch(demo, server_port=8000)

Replies stream token by token from the engine; Stop cancels the request at once (its KV slot is
free before the engine's next step). Every browser tab is its own session (a gr.State holds its
conversation) and all of them share the engine, whose continuous batching generates their replies
together. A turn's prompt is the chatml of the whole conversation (qwen.serving.chat), so it
extends the previous turn's prompt and reply and the engine prefills only the new part.

The conversation is kept as plain text turns, not as the rendered chat: the model is fed back
exactly what it wrote (the original demo fed it the HTML it had made for display).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys

from .qwen_generation_utils import DEFAULT_SYSTEM

try:  # the `web` extra; main() says how to install it when it is missing
    import gradio as gr
except ImportError:  # pragma: no cover
    gr = None

DEFAULT_CKPT_PATH = "Qwen/Qwen-7B-Chat"
EXAMPLES = [
    "Give me a short introduction to large language models.",
    "Write a Python function that checks whether a string is a palindrome.",
    "请用三句话介绍一下长城。",
    "What should I pack for a three-day hiking trip?",
]
STOPPED_NOTE = "\n\n*— stopped —*"
LENGTH_NOTE = "\n\n*— reached the max new tokens limit —*"

# System fonts only: a page served offline must not wait for Google Fonts.
_SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Helvetica Neue", "Arial", "Noto Sans",
         "sans-serif"]
_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
CSS = """
.gradio-container { max-width: 980px !important; width: 100% !important; margin: 0 auto !important; }
#qwen-header { text-align: center; margin: 6px 0 2px; }
#qwen-header h1 { font-size: 1.7em; font-weight: 700; margin: 0; letter-spacing: -0.01em; }
#qwen-header p { margin: 2px 0 0; color: var(--body-text-color-subdued); font-size: 0.95em; }
#qwen-input textarea { font-size: 1em; }
#qwen-send, #qwen-stop { min-width: 96px; }
#qwen-tools button { font-size: 0.9em; }
#qwen-footer { text-align: center; color: var(--body-text-color-subdued); font-size: 0.8em; }
#qwen-footer p { margin: 0; }
footer { display: none !important; }
"""


# ============================================================================= the conversation


def new_turn(query: str) -> dict:
    """One exchange: the user's text, the reply so far, and how it ended. status is "pending",
    "streaming", "stop" (the model ended it), "length", "stopped" (by the user) or "error"."""
    return {"query": query, "reply": "", "status": "pending", "error": ""}


def history_of(turns: list[dict]) -> list[tuple[str, str]]:
    """(query, reply) pairs of the finished turns, for the prompt; failed turns are left out."""
    return [(t["query"], t["reply"]) for t in turns if t["status"] in ("stop", "length", "stopped")]


_REACT_LABEL = re.compile(r"^(Thought|Action Input|Action|Observation):", re.MULTILINE)
_FINAL_ANSWER = "\nFinal Answer:"


def reply_messages(text: str, finished: bool):
    """A reply as chat messages. A ReAct trace (the format the chat models use for tools: Thought /
    Action / Action Input / Observation, then Final Answer) becomes a collapsible step, titled with
    the tool it calls, followed by the answer; anything else is one Markdown message."""
    from .api.react import parse_react_response

    body = text.lstrip()
    if not body.startswith("Thought:"):
        return [gr.ChatMessage(role="assistant", content=text)] if text else []
    cut = body.rfind(_FINAL_ANSWER)
    trace = body[:cut] if cut >= 0 else body
    answer = body[cut + len(_FINAL_ANSWER):].strip() if cut >= 0 else ""
    _, call = parse_react_response(trace)
    if finished and cut < 0 and call is None:  # just a line that starts with "Thought:"
        return [gr.ChatMessage(role="assistant", content=text)]
    title = f"🛠️ Used tool: {call['name']}" if call else "💭 Reasoning"
    step = gr.ChatMessage(
        role="assistant",
        content=_REACT_LABEL.sub(r"**\1:**", trace.strip()),
        metadata={"title": title, "status": "done" if finished or cut >= 0 else "pending"},
    )
    messages = [step]
    if answer:
        messages.append(gr.ChatMessage(role="assistant", content=answer))
    return messages


def render(turns: list[dict]):
    """The chat window's messages for `turns`."""
    messages = []
    for turn in turns:
        messages.append(gr.ChatMessage(role="user", content=turn["query"]))
        status = turn["status"]
        if status == "error":
            messages.append(gr.ChatMessage(role="assistant", content=f"⚠️ **Error:** {turn['error']}"))
            continue
        replies = reply_messages(turn["reply"], finished=status not in ("pending", "streaming"))
        note = {"stopped": STOPPED_NOTE, "length": LENGTH_NOTE}.get(status)
        if note:
            if replies and not replies[-1].metadata:
                replies[-1].content += note
            else:
                replies.append(gr.ChatMessage(role="assistant", content=note.strip()))
        messages.extend(replies)
    return messages


# ============================================================================= sessions


class _Session:
    """One browser tab's running request, so that Stop (a separate event) can end it."""

    def __init__(self):
        self.stream = None
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        self.stopped.set()
        if self.stream is not None:
            self.stream.cancel()


async def follow(stream, stopped: asyncio.Event):
    """The stream's outputs until it ends or `stopped` is set; leaving cancels the request. (A
    request cancelled while it waits for a slot may never send a last output: the race with
    `stopped` does not depend on one.)"""
    outputs = stream.__aiter__()
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(outputs))
            await asyncio.wait((step, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return
            try:
                out = step.result()
            except StopAsyncIteration:
                return
            yield out
            if out.finish_reason is not None:
                return
    finally:
        stopping.cancel()
        stream.cancel()


class ChatApp:
    """The handlers behind the page; one instance serves every session."""

    def __init__(self, engine, default_system: str = DEFAULT_SYSTEM):
        from .serving.chat import ChatDefaults

        self.engine = engine
        self.defaults = ChatDefaults.of(engine)
        self.default_system = default_system
        self.sessions: dict[str, _Session] = {}

    # --------------------------------------------------------------------- helpers

    def _busy(self, request) -> bool:
        return request is not None and request.session_hash in self.sessions

    @staticmethod
    def _controls(busy: bool):
        """Updates for Send, Stop, Regenerate, Undo and Clear."""
        return (gr.update(visible=not busy), gr.update(visible=busy),
                *(gr.update(interactive=not busy) for _ in range(3)))

    def _request(self, turns, system, temperature, top_p, top_k, max_new_tokens, seed):
        from .serving.chat import chat_request

        seed = None if seed is None or seed == "" or int(seed) < 0 else int(seed)
        return chat_request(
            self.engine, turns[-1]["query"], history_of(turns[:-1]),
            system if system and system.strip() else self.default_system,
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
            max_new_tokens=int(max_new_tokens), seed=seed, defaults=self.defaults,
        )

    async def _generate(self, turns, settings, request, textbox):
        """Stream the reply of turns[-1]; yields (textbox, chatbot, state, *controls)."""
        from .loading import error_text
        from .serving import EngineBusy, RequestError

        turn = turns[-1]
        turn.update(reply="", status="pending", error="")
        session = _Session()
        key = request.session_hash if request is not None else None
        if key is not None:
            self.sessions[key] = session
        unchanged = (gr.skip(),) * 5
        try:
            yield (textbox, render(turns), turns, *self._controls(True))
            chat = self._request(turns, *settings)
            session.stream = self.engine.submit(chat.prompt_ids, chat.params)
            turn["status"] = "streaming"
            async with contextlib.aclosing(follow(session.stream, session.stopped)) as outputs:
                async for out in outputs:
                    turn["reply"] += out.text
                    if out.finish_reason is not None:
                        turn["status"] = out.finish_reason if out.finish_reason in ("stop", "length") else "stopped"
                        break
                    if out.text:
                        yield (gr.skip(), render(turns), turns, *unchanged)
        except (RequestError, EngineBusy) as exc:  # too long a message, a bad setting, a full queue
            turn.update(status="error", error=str(exc))
        except Exception as exc:  # noqa: BLE001  (the engine or the upstream failed: say so in the chat)
            turn.update(status="error", error=error_text(exc))
        finally:
            if key is not None and self.sessions.get(key) is session:
                del self.sessions[key]
            if turn["status"] in ("pending", "streaming"):  # stopped, or cancelled by Gradio (tab closed)
                turn["status"] = "stopped"
        yield (gr.skip(), render(turns), turns, *self._controls(False))

    # --------------------------------------------------------------------- events
    # Gradio passes inputs by position and injects the parameters annotated gr.Request and
    # gr.SelectData; the settings are (system, temperature, top_p, top_k, max_new_tokens, seed).

    async def send(self, message, turns, system, temperature, top_p, top_k, max_new_tokens, seed,
                   request: gr.Request):
        if not message or not message.strip() or self._busy(request):
            yield (gr.skip(),) * 8
            return
        turns.append(new_turn(message))
        settings = (system, temperature, top_p, top_k, max_new_tokens, seed)
        async for update in self._generate(turns, settings, request, textbox=""):
            yield update

    async def send_example(self, turns, system, temperature, top_p, top_k, max_new_tokens, seed,
                           event: gr.SelectData, request: gr.Request):
        value = event.value
        text = value.get("text") if isinstance(value, dict) else value
        async for update in self.send(text, turns, system, temperature, top_p, top_k, max_new_tokens, seed, request):
            yield update

    async def regenerate(self, turns, system, temperature, top_p, top_k, max_new_tokens, seed,
                         request: gr.Request):
        if not turns or self._busy(request):
            yield (gr.skip(),) * 8
            return
        settings = (system, temperature, top_p, top_k, max_new_tokens, seed)
        async for update in self._generate(turns, settings, request, textbox=gr.skip()):
            yield update

    async def stop(self, request: gr.Request):
        session = self.sessions.get(request.session_hash) if request is not None else None
        if session is not None:
            session.stop()

    async def undo(self, turns, request: gr.Request):
        """Take back the last exchange (stopping its reply); its message returns to the text box."""
        if not turns:
            return gr.skip(), gr.skip(), gr.skip()
        await self.stop(request)
        turn = turns.pop()
        return turn["query"], render(turns), turns

    async def clear(self, turns, request: gr.Request):
        """Forget the conversation (stopping a reply): also the chat window's own trash button."""
        await self.stop(request)
        turns.clear()
        return [], turns

    async def unload(self, request: gr.Request):
        await self.stop(request)


# ============================================================================= the page


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate", font=_SANS,
                          font_mono=_MONO)


def build_demo(engine, *, title: str = "Qwen-Chat", default_system: str = DEFAULT_SYSTEM,
               max_new_tokens: int | None = None, examples: list[str] | None = None, upstream: str | None = None):
    """The Gradio Blocks app chatting with `engine` (an Engine or UpstreamEngine); start it with
    `launch(demo, ...)` (the theme and style go to Blocks.launch in Gradio 6)."""
    app = ChatApp(engine, default_system)
    defaults = app.defaults
    max_tokens_limit = max(1, min(engine.max_context - 1, 8192))
    max_new_tokens = min(max_new_tokens or defaults.max_new_tokens, max_tokens_limit)
    model = getattr(engine, "model_name", None) or "qwen"
    where = f" · through {upstream}" if upstream else ""

    with gr.Blocks(title=title, analytics_enabled=False, fill_height=False) as demo:
        demo.chat_app = app  # the handlers, for whoever embeds or tests the page
        gr.HTML(f"<div id='qwen-header'><h1>{_escape(title)}</h1><p>Chat with <b>{_escape(model)}</b>: replies "
                "stream as they are written; Stop ends one at once.</p></div>")
        chatbot = gr.Chatbot(
            elem_id="qwen-chatbot",
            show_label=False,
            height="calc(100vh - 330px)",  # the window's height less the header, input and settings rows
            min_height=360,
            buttons=["copy", "copy_all"],
            feedback_options=None,
            placeholder="### How can I help you today?\nAsk anything, or start from an example below.",
            examples=[{"text": text} for text in (EXAMPLES if examples is None else examples)] or None,
            latex_delimiters=[{"left": "$$", "right": "$$", "display": True}],
        )
        state = gr.State([])
        with gr.Row(equal_height=True):
            textbox = gr.Textbox(elem_id="qwen-input", show_label=False, scale=8, lines=1, max_lines=8,
                                 placeholder="Message Qwen… (Enter to send, Shift+Enter for a new line)",
                                 autofocus=True, container=False)
            send = gr.Button("Send", variant="primary", elem_id="qwen-send", scale=1, min_width=96)
            stop = gr.Button("■ Stop", variant="stop", elem_id="qwen-stop", scale=1, min_width=96, visible=False)
        with gr.Row(elem_id="qwen-tools"):
            regenerate = gr.Button("🔄 Regenerate", size="sm", variant="secondary", elem_id="qwen-regenerate")
            undo = gr.Button("↩️ Undo", size="sm", variant="secondary", elem_id="qwen-undo")
            clear = gr.Button("🗑️ Clear History", size="sm", variant="secondary", elem_id="qwen-clear")
        with gr.Accordion("⚙️ System prompt and generation settings", open=False, elem_id="qwen-settings"):
            system = gr.Textbox(value=default_system, label="System prompt", lines=2, max_lines=6,
                                elem_id="qwen-system", info="Applies from the next message on.")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                                        info="0 = greedy", elem_id="qwen-temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p", elem_id="qwen-top-p")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top k", info="0 = off",
                                  elem_id="qwen-top-k")
            with gr.Row():
                max_tokens = gr.Slider(1, max_tokens_limit, value=max_new_tokens, step=1, label="Max new tokens",
                                       elem_id="qwen-max-new-tokens")
                seed = gr.Number(value=-1, label="Seed", precision=0, minimum=-1, info="-1 = random: Regenerate "
                                 "gives a new reply; a fixed seed repeats it", elem_id="qwen-seed")
        gr.Markdown(f"{_escape(model)} · {engine.max_context}-token context{_escape(where)} · "
                    "replies are machine-generated and can be wrong", elem_id="qwen-footer")

        settings = [system, temperature, top_p, top_k, max_tokens, seed]
        controls = [send, stop, regenerate, undo, clear]
        outputs = [textbox, chatbot, state, *controls]
        generating = {"outputs": outputs, "concurrency_limit": None, "show_progress": "hidden"}
        textbox.submit(app.send, [textbox, state, *settings], **generating)
        send.click(app.send, [textbox, state, *settings], **generating)
        chatbot.example_select(app.send_example, [state, *settings], **generating)
        regenerate.click(app.regenerate, [state, *settings], **generating)
        stop.click(app.stop, None, None, queue=False)
        undo.click(app.undo, [state], [textbox, chatbot, state], queue=False)
        clear.click(app.clear, [state], [chatbot, state], queue=False)
        chatbot.clear(app.clear, [state], [chatbot, state], queue=False)
        demo.unload(app.unload)
    demo.queue(default_concurrency_limit=None)
    return demo


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))


def launch(demo, **options):
    """demo.launch with our theme and style (keyword arguments as Blocks.launch)."""
    options.setdefault("theme", theme())
    options.setdefault("css", CSS)
    options.setdefault("footer_links", [])
    return demo.launch(**options)


# ============================================================================= command line






def build_parser() -> argparse.ArgumentParser:
    from .loading import add_precision_arguments, add_upstream_arguments, port_number, positive_int

    parser = argparse.ArgumentParser(prog="web_demo.py", description="Chat with a Qwen (v1) chat model in the browser.")
    parser.add_argument("-c", "--checkpoint-path", default=DEFAULT_CKPT_PATH,
                        help="checkpoint directory or Hugging Face hub name (default: %(default)s)")
    parser.add_argument("--cpu-only", action="store_true", help="run the model on the CPU even if a GPU is present")
    add_precision_arguments(parser)
    parser.add_argument("--share", action="store_true", help="also serve the page through a public gradio.live link")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    parser.add_argument("--server-port", type=port_number, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this computer only; 0.0.0.0 for all)")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                        help="the page's initial max new tokens (default: the checkpoint's generation_config)")
    parser.add_argument("--max-running", type=positive_int, default=8,
                        help="replies generated together, across all tabs (default: %(default)s)")
    parser.add_argument("--max-context", type=positive_int, metavar="TOKENS",
                        help="prompt + reply tokens per conversation (default: the model's maximum)")
    add_upstream_arguments(parser, "chat with another OpenAI-compatible server")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    from .loading import check_upstream_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    check_upstream_arguments(parser, args)
    args.max_waiting = 64
    args.upstream_wait = 10  # an interactive start: say so soon when the upstream is not there
    return args


def load_engine(args):
    """The engine for the parsed arguments: the checkpoint's weights, or --upstream. Raises
    CheckpointError (or ValueError for an upstream that cannot be used) with a one-line message."""
    from .loading import check_chat_checkpoint, resolve_checkpoint

    source = resolve_checkpoint(args.checkpoint_path)
    check_chat_checkpoint(source, chat=True)
    if args.upstream:
        from .api.server import load_upstream_engine

        return load_upstream_engine(source, args)
    from .serving import Engine

    return Engine.from_pretrained(source, cpu_only=args.cpu_only, chat=True, dtype=args.dtype,
                                  quantization=args.quantize, max_running=args.max_running,
                                  max_waiting=args.max_waiting, max_context=args.max_context)


def main(argv=None) -> int:
    args = parse_args(argv)
    if gr is None:
        print("error: the web demo needs gradio: pip install 'qwen[web]'", file=sys.stderr)
        return 1
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .loading import error_text

    try:
        engine = load_engine(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a bad checkpoint or upstream: one line, no traceback)
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 1
    try:
        demo = build_demo(engine, max_new_tokens=args.max_new_tokens, upstream=args.upstream)
        launch(demo, share=args.share, inbrowser=args.inbrowser, server_port=args.server_port,
               server_name=args.server_name)
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
