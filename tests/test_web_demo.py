"""web_demo.py (qwen/web.py) in a real headless Chromium, and qwen.serving.chat.

The page is served in-process (Gradio in a thread) on a tiny random chat checkpoint, and Debian's
/usr/bin/chromium is driven by playwright. The test wraps `engine.submit` to see the prompts and
sampling parameters the page sends, and to script some replies (a logits processor that forces
tokens: Markdown and a ReAct trace); the other replies are the random model's gibberish. An
engine-wide processor paces every token (so that a reply streams for about a second) and bans
the special tokens (so that a random reply runs to its max new tokens).

Screenshots go to artifacts/web_demo/. QWEN_UPDATE_DOCS_SCREENSHOT=1 also rewrites docs/web_demo.png.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import free_port

from qwen.qwen_generation_utils import DEFAULT_SYSTEM, make_context
from qwen.serving import Engine, RequestError
from qwen.serving.chat import ChatDefaults, chat_request, stop_token_ids
from qwen.tools.tiny_checkpoint import build, generation_config

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "web_demo"
CHROMIUM = os.environ.get("QWEN_TEST_CHROMIUM", "/usr/bin/chromium")
MAX_CONTEXT = 1024
MAX_NEW_TOKENS = 64  # the page's initial setting
PACE_S = 0.02  # per token and sequence
EOD_ID = 151643  # <|endoftext|>; the other specials follow it

CODE_QUESTION = "Write a Python function that checks whether a string is a palindrome."
CODE_REPLY = """Here is a short one:

```python
def is_palindrome(text: str) -> bool:
    return text == text[::-1]
```

It compares the string with its reverse."""
FOLLOW_UP = "Can it ignore case and spaces?"
FOLLOW_UP_REPLY = """Yes, normalise the text first:

```python
def is_palindrome(text: str) -> bool:
    letters = [c.lower() for c in text if not c.isspace()]
    return letters == letters[::-1]
```"""
TOOL_QUESTION = "What's the weather in Paris?"
TOOL_REPLY = """Thought: I need the current weather in Paris.
Action: get_weather
Action Input: {"city": "Paris"}
Observation: sunny, 24 °C
Thought: I now know the final answer
Final Answer: It is **sunny** in Paris, 24 °C."""
SCRIPTS = {CODE_QUESTION: CODE_REPLY, FOLLOW_UP: FOLLOW_UP_REPLY, TOOL_QUESTION: TOOL_REPLY}


# ============================================================================= qwen.serving.chat


@pytest.fixture(scope="module")
def fake_engine(qwen_tokenizer):
    """What chat_request reads from an engine: the tokenizer, the context, the generation config."""
    return SimpleNamespace(tokenizer=qwen_tokenizer, max_context=256,
                           model=SimpleNamespace(generation_config=generation_config(chat=True)))


def test_chat_request_is_make_context_with_the_checkpoints_defaults(fake_engine):
    tok = fake_engine.tokenizer
    history = [("Hi", "Hello! How can I help?")]
    request = chat_request(fake_engine, "Tell me a joke", history)
    assert request.prompt_ids == make_context(tok, "Tell me a joke", history, DEFAULT_SYSTEM)[1]
    params = request.params
    assert params.stop_token_ids == stop_token_ids(tok) == [tok.im_end_id, tok.im_start_id, tok.eod_id]
    # The published chat generation_config: top_p 0.8, top_k 0, repetition_penalty 1.1, 512 new tokens
    # (cut here to the room left in a 256-token context).
    assert (params.top_p, params.top_k, params.repetition_penalty, params.do_sample) == (0.8, 0, 1.1, True)
    assert params.max_new_tokens == 256 - len(request.prompt_ids) and params.seed is None
    assert ChatDefaults.of(fake_engine).max_new_tokens == 512

    custom = chat_request(fake_engine, "Tell me a joke", system="Be brief.", temperature=0.0, top_k=5,
                          max_new_tokens=10, seed=7).params
    assert custom.greedy and custom.top_k == 5 and custom.max_new_tokens == 10 and custom.seed == 7
    assert chat_request(fake_engine, "x", seed=-1).params.seed is None  # -1: a random seed
    assert chat_request(fake_engine, "x", system="Be brief.").prompt_ids == make_context(tok, "x", [], "Be brief.")[1]


def test_chat_request_drops_old_turns_to_fit_and_refuses_a_message_longer_than_the_context(fake_engine):
    tok = fake_engine.tokenizer
    history = [(f"question {i} " * 8, f"answer {i} " * 8) for i in range(6)]  # ~6 x 40 tokens
    request = chat_request(fake_engine, "last", history, max_new_tokens=64)
    assert len(request.prompt_ids) + 64 <= 256
    kept = [n for n in range(len(history) + 1) if make_context(tok, "last", history[len(history) - n :],
                                                                DEFAULT_SYSTEM)[1] == request.prompt_ids]
    assert kept and 0 < kept[0] < len(history)  # the newest turns, as many as fit
    assert request.params.max_new_tokens == 64
    with pytest.raises(RequestError, match="too long"):
        chat_request(fake_engine, "word " * 300)
    with pytest.raises(RequestError, match="empty"):
        chat_request(fake_engine, "")


# ============================================================================= the page


class Pace:
    """Engine-wide: a delay per token, and no special tokens (random replies run to their limit)."""

    def __call__(self, generated, logits):
        time.sleep(PACE_S)
        logits[EOD_ID:] = float("-inf")


class Script:
    """A request's reply forced token by token, then <|im_end|>."""

    def __init__(self, ids, end):
        self.ids, self.end = ids, end

    def __call__(self, generated, logits):
        i = len(generated)
        target = self.ids[i] if i < len(self.ids) else self.end
        logits.fill_(float("-inf"))
        logits[target] = 0.0


class Recorder:
    """Wraps engine.submit: records each request's prompt, params and outputs; scripts SCRIPTS."""

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.requests = []
        self._submit = engine.submit
        engine.submit = self.submit

    def submit(self, prompt_ids, params=None):
        text = self.tokenizer.decode(prompt_ids)
        query = text.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        if query in SCRIPTS:
            script = self.tokenizer.encode(SCRIPTS[query], allowed_special=set())
            params.logits_processors.append(Script(script, self.tokenizer.im_end_id))
        record = SimpleNamespace(prompt=list(prompt_ids), params=params, query=query, outputs=[])
        stream = self._submit(prompt_ids, params)
        take = stream._take

        def recording_take(item):
            out = take(item)
            record.outputs.append(out)
            return out

        stream._take = recording_take
        self.requests.append(record)
        return stream

    @staticmethod
    def finished(record):
        return bool(record.outputs) and record.outputs[-1].finish_reason is not None

    @staticmethod
    def text(record):
        return "".join(out.text for out in record.outputs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(tmp_path_factory.mktemp("web") / "qwen-tiny-chat", chat=True, dtype="float32")


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_running=4, max_context=MAX_CONTEXT, logits_processors=[Pace()])
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def recorder(engine):
    return Recorder(engine)


@pytest.fixture(scope="module")
def server(engine, recorder):
    from qwen.web import build_demo, launch

    demo = build_demo(engine, max_new_tokens=MAX_NEW_TOKENS)
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":  # CI provides it (.ci/run): its absence is a failure there
            pytest.fail(f"no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set QWEN_TEST_CHROMIUM)")
    from playwright import sync_api
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:  # Debian's browser: playwright's own cannot be downloaded
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def open_page(browser, url):
    """A page in a context of its own (a new Gradio session); nothing outside the server is fetched."""
    context = browser.new_context(viewport={"width": 1000, "height": 800}, device_scale_factor=1)
    page = context.new_page()
    # A pattern, not a Python callback: requests to the server then never wait for this thread.
    page.route(re.compile(rf"^(?!{re.escape(url)})"), lambda route: route.abort())
    page.goto(url)
    page.wait_for_selector("#qwen-input textarea")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def wait_until(condition, timeout=30.0, what="condition", page=None):
    """Poll `condition`; with a page, wait through playwright (which keeps its events flowing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if page is not None:
            page.wait_for_timeout(30)
        else:
            time.sleep(0.03)


def messages(page, role):
    return page.eval_on_selector_all(f"#qwen-chatbot [data-testid={role}]", "els => els.map(e => e.innerText)")


def bot_text(page):
    return "\n".join(messages(page, "bot"))


def type_and_send(page, text):
    page.fill("#qwen-input textarea", text)
    page.click("#qwen-send")


def wait_reply(page, recorder, before, timeout=30.0):
    """Wait for request number `before` + 1 to finish and the page to settle; returns its record."""
    wait_until(lambda: len(recorder.requests) > before and recorder.finished(recorder.requests[before]),
               timeout, "the reply", page)
    wait_idle(page)
    return recorder.requests[before]


def wait_idle(page):
    """Send is back and the chat stopped changing."""

    def settled():
        if not page.is_visible("#qwen-send") or page.is_visible("#qwen-stop"):
            return False
        now = bot_text(page)
        page.wait_for_timeout(150)
        return bot_text(page) == now

    wait_until(settled, 15, "the page to settle", page)


def open_settings(page):
    if not page.is_visible("#qwen-system textarea"):
        page.click("#qwen-settings .label-wrap")
        page.wait_for_selector("#qwen-system textarea")


def set_number(page, label, value):
    box = page.locator(f'input[aria-label="{label}"]')
    box.fill(str(value))
    box.press("Tab")


def shoot(page, name):
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def shoot_docs(page):
    """The README's picture: the window as a user sees it (QWEN_UPDATE_DOCS_SCREENSHOT=1 rewrites it)."""
    page.set_viewport_size({"width": 1000, "height": 960})
    page.mouse.move(0, 0)
    page.wait_for_timeout(400)
    png = page.screenshot(path=str(ARTIFACTS / "docs-web_demo.png"))
    if os.environ.get("QWEN_UPDATE_DOCS_SCREENSHOT") == "1":
        save_docs_screenshot(png)


def save_docs_screenshot(png: bytes):
    """docs/web_demo.png: the screenshot at 3/4 size in a 128-colour palette (under 150 KB)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    image = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = ROOT / "docs" / "web_demo.png"
    out.parent.mkdir(exist_ok=True)
    image.save(out, optimize=True)
    assert out.stat().st_size < 150_000


def test_a_reply_streams_renders_markdown_and_the_next_turn_reuses_its_kv(page, recorder, engine):
    tok = engine.tokenizer
    shoot(page, "01-empty.png")
    before = len(recorder.requests)
    type_and_send(page, CODE_QUESTION)
    lengths = []
    while not (len(recorder.requests) > before and recorder.finished(recorder.requests[before])):
        lengths.append(len(bot_text(page)))
        if len(lengths) == 20:
            shoot(page, "02-streaming.png")
        page.wait_for_timeout(20)
    first = wait_reply(page, recorder, before)
    final = len(bot_text(page))
    growing = sorted({n for n in lengths if 0 < n < final})
    assert len(growing) >= 2, f"the reply did not stream: lengths seen {sorted(set(lengths))}, final {final}"
    assert page.input_value("#qwen-input textarea") == ""

    # The prompt is the chat format the model knows, with the checkpoint's sampling defaults.
    assert first.prompt == make_context(tok, CODE_QUESTION, [], DEFAULT_SYSTEM)[1]
    assert first.params.stop_token_ids == [tok.im_end_id, tok.im_start_id, tok.eod_id]
    assert (first.params.top_p, first.params.repetition_penalty, first.params.max_new_tokens) == (0.8, 1.1, 64)
    assert recorder.text(first) == CODE_REPLY and first.outputs[-1].finish_reason == "stop"
    # Markdown: a highlighted code block, and copy buttons on the messages.
    code = page.locator("#qwen-chatbot [data-testid=bot] pre code")
    assert code.count() == 1 and "def is_palindrome" in code.inner_text()
    assert page.locator('#qwen-chatbot button[aria-label="Copy message"]').count() >= 2

    # The second turn's prompt extends the first prompt and reply: the engine prefills only what is new.
    before = len(recorder.requests)
    page.locator("#qwen-input textarea").fill(FOLLOW_UP)
    page.locator("#qwen-input textarea").press("Enter")
    second = wait_reply(page, recorder, before)
    assert second.prompt == make_context(tok, FOLLOW_UP, [(CODE_QUESTION, CODE_REPLY)], DEFAULT_SYSTEM)[1]
    generated = [t for out in first.outputs for t in out.token_ids]  # the reply, then <|im_end|>
    assert generated[:-1] == tok.encode(CODE_REPLY, allowed_special=set())
    assert second.outputs[-1].cached_tokens == len(first.prompt) + len(generated) - 1
    assert messages(page, "user") == [CODE_QUESTION, FOLLOW_UP]
    assert page.locator("#qwen-chatbot [data-testid=bot] pre code").count() == 2
    shoot(page, "03-markdown.png")
    shoot_docs(page)


def test_stop_regenerate_undo_and_clear(page, recorder, engine):
    open_settings(page)
    set_number(page, "number input for Max new tokens", MAX_CONTEXT - 100)
    before = len(recorder.requests)
    type_and_send(page, "Tell me a long story.")
    wait_until(lambda: len(bot_text(page)) > 20, 30, "the reply to start", page)
    cancelled = engine.counters["finished_cancelled_total"]
    page.click("#qwen-stop")
    stopped_at = time.monotonic()
    wait_until(lambda: engine.counters["finished_cancelled_total"] > cancelled and engine.stats()["running"] == 0,
               5, "the engine to drop the request", page)
    assert time.monotonic() - stopped_at < 2.0  # at once: a token takes 20 ms here
    record = recorder.requests[before]
    assert record.params.max_new_tokens == MAX_CONTEXT - 100
    assert len(record.outputs) < record.params.max_new_tokens // 2
    wait_idle(page)
    stopped = bot_text(page)
    assert "stopped" in stopped
    page.wait_for_timeout(500)
    assert bot_text(page) == stopped  # nothing more arrives
    shoot(page, "04-stopped.png")

    # Regenerate replaces the last reply; under sampling each one differs.
    set_number(page, "number input for Max new tokens", 24)
    replies = []
    for _ in range(2):
        before = len(recorder.requests)
        page.click("#qwen-regenerate")
        record = wait_reply(page, recorder, before)
        assert record.prompt == recorder.requests[before - 1].prompt and record.params.max_new_tokens == 24
        replies.append(recorder.text(record))
        assert messages(page, "user") == ["Tell me a long story."] and len(messages(page, "bot")) == 1
    assert replies[0] != replies[1]

    # Undo takes the exchange back and returns the message to the text box.
    page.click("#qwen-undo")
    wait_until(lambda: messages(page, "user") == [], 10, "undo", page)
    assert page.input_value("#qwen-input textarea") == "Tell me a long story."

    # Clear History forgets the conversation: the next prompt has no history.
    before = len(recorder.requests)
    type_and_send(page, "One")
    wait_reply(page, recorder, before)
    page.click("#qwen-clear")
    wait_until(lambda: messages(page, "user") == [], 10, "clear", page)
    before = len(recorder.requests)
    type_and_send(page, "Two")
    record = wait_reply(page, recorder, before)
    assert record.prompt == make_context(engine.tokenizer, "Two", [], DEFAULT_SYSTEM)[1]
    assert messages(page, "user") == ["Two"]


def test_system_prompt_and_settings_reach_the_engine(page, recorder, engine):
    open_settings(page)
    page.fill("#qwen-system textarea", "You are a pirate. Answer like one.")
    set_number(page, "number input for Top k", 5)
    set_number(page, "number input for Max new tokens", 16)
    page.fill("#qwen-seed input", "1234")
    page.locator("#qwen-seed input").press("Tab")
    before = len(recorder.requests)
    type_and_send(page, "Ahoy")
    first = wait_reply(page, recorder, before)
    assert first.prompt == make_context(engine.tokenizer, "Ahoy", [], "You are a pirate. Answer like one.")[1]
    assert "<|im_start|>system\nYou are a pirate. Answer like one.<|im_end|>" in engine.tokenizer.decode(first.prompt)
    assert (first.params.top_k, first.params.max_new_tokens, first.params.seed) == (5, 16, 1234)
    before = len(recorder.requests)
    page.click("#qwen-regenerate")
    again = wait_reply(page, recorder, before)
    assert recorder.text(again) == recorder.text(first)  # a fixed seed repeats the reply

    set_number(page, "number input for Temperature", 0)
    before = len(recorder.requests)
    page.click("#qwen-regenerate")
    assert wait_reply(page, recorder, before).params.greedy
    shoot(page, "05-settings.png")


def test_empty_and_too_long_messages(page, recorder, engine):
    before = len(recorder.requests)
    page.click("#qwen-send")
    type_and_send(page, "   ")
    page.wait_for_timeout(500)
    assert messages(page, "user") == [] and len(recorder.requests) == before

    type_and_send(page, "hello " * (MAX_CONTEXT + 50))
    wait_until(lambda: "too long" in bot_text(page), 15, "the error message", page)
    assert "Error" in bot_text(page)
    wait_idle(page)
    assert len(recorder.requests) == before  # refused before the engine
    shoot(page, "06-error.png")

    before = len(recorder.requests)
    type_and_send(page, "hi")  # the page still works, and the failed turn is not history
    record = wait_reply(page, recorder, before)
    assert record.prompt == make_context(engine.tokenizer, "hi", [], DEFAULT_SYSTEM)[1]
    assert len(messages(page, "user")) == 2


def test_an_example_prompt_sends_itself(page, recorder, engine):
    from qwen.web import EXAMPLES

    before = len(recorder.requests)
    page.click(f'#qwen-chatbot button.example[aria-label="Select example 3: {EXAMPLES[2]}"]')
    record = wait_reply(page, recorder, before)
    assert record.query == EXAMPLES[2] and messages(page, "user") == [EXAMPLES[2]]
    assert record.prompt == make_context(engine.tokenizer, EXAMPLES[2], [], DEFAULT_SYSTEM)[1]


def test_a_react_trace_shows_as_a_collapsible_step(page, recorder):
    before = len(recorder.requests)
    type_and_send(page, TOOL_QUESTION)
    wait_reply(page, recorder, before)
    step = page.locator("#qwen-chatbot .thought-group")
    assert step.count() == 1
    assert "Used tool: get_weather" in step.inner_text()
    answer = page.locator("#qwen-chatbot [data-testid=bot]").filter(has_text="sunny in Paris")
    assert answer.count() >= 1 and "Final Answer" not in bot_text(page)
    page.click("#qwen-chatbot .thought-group .title")  # open the step: the trace is there
    wait_until(lambda: "Action Input:" in step.inner_text(), 5, "the step to open", page)
    assert '{"city": "Paris"}' in step.inner_text()
    shoot(page, "07-tool-step.png")


def test_two_pages_chat_at_once_each_in_its_own_conversation(browser, server, recorder, engine):
    pages = [open_page(browser, server) for _ in range(2)]
    try:
        running, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                running[0] = max(running[0], engine.stats()["running"])
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        before = len(recorder.requests)
        for i, page in enumerate(pages):
            type_and_send(page, f"I am tab {i}")
        wait_until(lambda: len(recorder.requests) >= before + 2
                   and all(recorder.finished(r) for r in recorder.requests[before:]), 30, "both replies", pages[0])
        done.set()
        watcher.join()
        for i, page in enumerate(pages):
            wait_idle(page)
            assert messages(page, "user") == [f"I am tab {i}"]
            assert len(messages(page, "bot")) == 1 and len(bot_text(page)) > 0
        assert running[0] == 2  # generated together, in one batch
        shoot(pages[1], "08-second-tab.png")
    finally:
        for page in pages:
            page.context.close()


def test_upstream_chats_through_an_openai_compatible_server(checkpoint, engine, recorder, browser):
    from qwen.api.app import create_app
    from qwen.api.server import BackgroundServer
    from qwen.web import build_demo, launch, load_engine, parse_args

    with BackgroundServer(create_app(engine)) as api:
        upstream = load_engine(parse_args(["-c", str(checkpoint), "--upstream", api.url]))
        demo = build_demo(upstream, max_new_tokens=12, upstream=api.url)
        port = free_port()
        launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        page = open_page(browser, f"http://127.0.0.1:{port}/")
        try:
            before = len(recorder.requests)
            type_and_send(page, "Hello through the upstream")
            record = wait_reply(page, recorder, before)  # the API server's request to our engine
            assert record.prompt == make_context(engine.tokenizer, "Hello through the upstream", [], DEFAULT_SYSTEM)[1]
            assert record.params.max_new_tokens == 12
            assert len(bot_text(page)) > 0
        finally:
            page.context.close()
            demo.close()
            upstream.shutdown()


# ============================================================================= the command line


def test_web_demo_py_serves_the_page_and_stops_on_ctrl_c(checkpoint):
    import signal
    import urllib.request

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "-c", str(checkpoint), "--cpu-only",
                               "--server-port", str(port), "--max-context", "512"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 120, None
        while page is None:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "web_demo.py did not start"
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert "Qwen-Chat" in page and "qwen-chatbot" in page  # the app config the page boots from
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_missing_or_broken_checkpoint_is_one_error_line(tmp_path, checkpoint, capsys):
    result = subprocess.run([sys.executable, str(ROOT / "web_demo.py"), "-c", str(tmp_path / "missing")],
                            check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "missing" in result.stderr

    from qwen.web import main

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["-c", str(broken), "--cpu-only"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
