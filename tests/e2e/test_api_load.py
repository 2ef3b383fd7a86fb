"""The OpenAI-compatible server under load, end to end (`make test-e2e`, not part of `make test`).

`openai_api.py` runs as its own process on loopback, serving a tiny fp32 chat checkpoint (the real
vocabulary and engine; only the weights are small and random), driven by the official `openai`
client and raw httpx. Nothing is mocked. Three properties:

* 32 streaming clients at once (the server runs 32 sequences together) each get a well-formed SSE
  stream (one id, a role delta first, one finish_reason last, a usage chunk, then `[DONE]`) whose
  text and finish reason equal the non-streamed greedy reply to the same request, asked alone;
* 300 sequential requests after a warm-up leave the server's RSS flat (the bound is explained at
  `RSS_GROWTH_BOUND_KIB`);
* a client that drops its stream mid-way frees its slot: /metrics shows nothing running, the
  `cancelled` counter up by one and no more tokens generated, and the next request is served.

Timings depend on the machine (2 shared cores in CI): the tests print them and assert no speed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import free_port
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "openai_api.py"
MODEL = "tiny-chat"
CLIENTS = 32  # concurrent streaming clients; the server runs them all at once (--max-running)
MAX_CONTEXT = 2048
STARTUP_TIMEOUT = 180.0
REQUEST_TIMEOUT = 180.0


class ServerProcess:
    """`python openai_api.py ...` as a child process; its output goes to a log file."""

    def __init__(self, checkpoint: str, log_path: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "-c", checkpoint, "--cpu-only", "--server-port", str(self.port),
             "--served-model-name", MODEL, "--log-level", "warning", *options],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready after {timeout:.0f} s:\n{self.log()}")

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS, KiB)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a graceful stop, like Ctrl-C
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qwen.tools.tiny_checkpoint import build

    return str(build(tmp_path_factory.mktemp("e2e") / MODEL, chat=True, dtype="float32"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("e2e-log") / "server.log",
                        "--max-running", str(CLIENTS), "--max-waiting", str(2 * CLIENTS),
                        "--max-context", str(MAX_CONTEXT))
    try:
        print(f"\nserver pid {srv.pid} ready in {srv.wait_ready():.1f} s, RSS {srv.rss_kib() / 1024:.0f} MiB")
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"the server did not stop cleanly ({code}):\n{srv.log()}"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=REQUEST_TIMEOUT) as c:
        yield c


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name (with labels): value}, read by prometheus_client's own parser."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


CANCELLED = 'qwen_request_finished_total{reason="cancelled"}'
RUNNING = "qwen_num_requests_running"
WAITING = "qwen_num_requests_waiting"
GENERATED = "qwen_generation_tokens_total"


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Client {i}: tell me something about the number {i * 7919 % 1000}."}]


# ============================================================================= 32 concurrent streams


def parse_sse(lines) -> tuple[list[dict], bool]:
    """The `data:` payloads of an SSE body (decoded JSON) and whether `[DONE]` ended it. Fails on
    anything that is not `data: ...` or a blank separator, and on events after `[DONE]`."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not done, f"an event after [DONE]: {line!r}"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def check_stream(events: list[dict], done: bool) -> tuple[str, str, dict]:
    """Checks a chat.completion.chunk stream (with include_usage); returns (text, finish_reason, usage)."""
    assert done, "the stream did not end with [DONE]"
    assert events, "no chunks"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]  # the official client's schema
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None, "the last chunk is not the usage chunk"
    assert all(c.usage is None for c in body)
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 for c in body)
    assert body[0].choices[0].delta.role == "assistant", "the first delta does not carry the role"
    finishes = [c.choices[0].finish_reason for c in body]
    assert finishes[-1] is not None and all(f is None for f in finishes[:-1]), finishes
    assert body[-1].choices[0].delta.content in (None, ""), "the finish chunk carries text"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    return text, finishes[-1], usage_chunk.usage.model_dump()


def stream_request(i: int) -> dict:
    return {"model": "gpt-3.5-turbo", "messages": messages(i), "max_tokens": 24, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def stream_with_openai(url: str, i: int) -> tuple[list[dict], bool]:
    """The official client, reading the raw SSE body so that `[DONE]` itself is checked."""
    with (
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT) as c,
        c.chat.completions.with_streaming_response.create(**stream_request(i)) as response,
    ):
        assert response.http_response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(response.iter_lines())


def stream_with_httpx(url: str, i: int) -> tuple[list[dict], bool]:
    with (
        httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as c,
        c.stream("POST", "/v1/chat/completions", json=stream_request(i)) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(response.iter_lines())


def test_32_concurrent_streaming_clients_get_their_solo_greedy_replies(server, client):
    # What each request gives alone, asked one at a time (greedy: deterministic, and the engine
    # promises the same tokens alone or in a batch).
    start = time.monotonic()
    expected = []
    for i in range(CLIENTS):
        request = {k: v for k, v in stream_request(i).items() if k not in ("stream", "stream_options")}
        reply = client.chat.completions.create(**request)
        expected.append((reply.choices[0].message.content, reply.choices[0].finish_reason,
                         reply.usage.completion_tokens))
    solo_seconds = time.monotonic() - start
    assert len({text for text, _, _ in expected}) > 1, "all prompts gave the same reply: a weak test"

    # Watch the engine while the clients run: they must really be served together.
    peak = {"running": 0, "waiting": 0}
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            m = metrics(server.url)
            peak["running"] = max(peak["running"], int(m[RUNNING]))
            peak["waiting"] = max(peak["waiting"], int(m[WAITING]))
            time.sleep(0.1)

    results: list = [None] * CLIENTS
    barrier = threading.Barrier(CLIENTS)

    def run_client(i):
        try:
            barrier.wait(timeout=60)
            transport = stream_with_openai if i % 2 == 0 else stream_with_httpx
            results[i] = transport(server.url, i)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            results[i] = exc

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT + 60)
    concurrent_seconds = time.monotonic() - start
    watching.set()
    watcher.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    print(f"\n{CLIENTS} replies one at a time: {solo_seconds:.2f} s; {CLIENTS} concurrent streams: "
          f"{concurrent_seconds:.2f} s; peak running {peak['running']}, peak waiting {peak['waiting']}")

    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not failures, failures
    for i, (events, done) in enumerate(results):
        text, finish_reason, usage = check_stream(events, done)
        exp_text, exp_finish, exp_tokens = expected[i]
        assert (text, finish_reason) == (exp_text, exp_finish), f"client {i}"
        assert usage["completion_tokens"] == exp_tokens, f"client {i}"
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Served together (31 of 32 at once is typical; a quarter leaves room for a slow, shared
    # machine), and never beyond --max-running.
    assert CLIENTS // 4 <= peak["running"] <= CLIENTS, peak
    after = metrics(server.url)
    assert after[RUNNING] == 0 and after[WAITING] == 0


# ============================================================================= RSS over 300 requests

WARMUP_REQUESTS = 30
MEASURED_REQUESTS = 300
# The bound on RSS growth over the 300 measured requests. What a request allocates is freed when it
# ends: the KV cache is preallocated (2 layers x 36 slots x 2048 positions: 75 MiB, written in
# place), metrics are fixed-size histograms and counters whose labels are bounded. What may still
# move after the warm-up is allocator slack: glibc arenas of the threads that touch a request (the
# event loop, the engine, the to_thread pool) and Python's free lists, a few MiB at most. A leak of
# one request's bookkeeping (its stream, sequence, torch.Generator and outputs: tens of KiB) would
# add 300 x that, and one of its token ids and logits (a 151,936-float logits row alone is 594 KiB)
# over 170 MiB. 16 MiB lies between the two with room on either side; the second half of the run
# must in addition not grow more than the first plus allocator slack (a leak grows linearly).
RSS_GROWTH_BOUND_KIB = 16 * 1024
RSS_SLACK_KIB = 4 * 1024


def varied_request(client, i: int) -> None:
    """One of four kinds of request, prompts of several lengths: chat and completions, streamed
    and not, so the warm-up has touched every path the measured requests take."""
    words = " ".join(f"w{i % 97}" for _ in range(1 + (i * 37) % 40))
    kind = i % 4
    if kind == 0:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    elif kind == 1:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words}],
                                                max_tokens=4, temperature=0, stream=True)
        assert [c.choices[0].finish_reason for c in stream if c.choices][-1] in ("stop", "length")
    elif kind == 2:
        reply = client.completions.create(model=MODEL, prompt=words, max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    else:
        stream = client.completions.create(model=MODEL, prompt=words, max_tokens=4, temperature=0.8, seed=i,
                                           stream=True)
        assert [c.choices[0].finish_reason for c in stream][-1] in ("stop", "length")


def test_300_sequential_requests_leave_rss_flat(server, client):
    for i in range(WARMUP_REQUESTS):
        varied_request(client, i)
    time.sleep(0.5)  # the server's garbage collection after the last reply (it runs without --disable-gc)
    before = server.rss_kib()
    start = time.monotonic()
    samples = [before]
    for i in range(WARMUP_REQUESTS, WARMUP_REQUESTS + MEASURED_REQUESTS):
        varied_request(client, i)
        if (i - WARMUP_REQUESTS + 1) % (MEASURED_REQUESTS // 2) == 0:
            time.sleep(0.5)
            samples.append(server.rss_kib())
    seconds = time.monotonic() - start
    before, middle, after = samples
    print(f"\nRSS after {WARMUP_REQUESTS} warm-up requests: {before} KiB; after {MEASURED_REQUESTS // 2} more: "
          f"{middle} KiB; after {MEASURED_REQUESTS}: {after} KiB (growth {after - before:+d} KiB, bound "
          f"{RSS_GROWTH_BOUND_KIB} KiB); {MEASURED_REQUESTS} requests in {seconds:.1f} s "
          f"({1000 * seconds / MEASURED_REQUESTS:.0f} ms each)")
    assert after - before < RSS_GROWTH_BOUND_KIB
    assert after - middle <= max(middle - before, 0) + RSS_SLACK_KIB
    m = metrics(server.url)
    assert m[RUNNING] == 0 and m[WAITING] == 0


# ============================================================================= a client that leaves


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


LONG = MAX_CONTEXT - 64  # tokens: far more than the few the client reads before it leaves


def long_stream_events(server, client, how: str) -> float:
    """Open a long greedy stream, read a few chunks, drop the connection; returns the time the
    drop took to free the slot (seconds)."""
    before = metrics(server.url)
    if how == "openai":
        stream = client.chat.completions.create(model=MODEL, messages=messages(1), max_tokens=LONG, temperature=0,
                                                stream=True)
        received = []
        for chunk in stream:
            received.append(chunk)
            if len(received) == 5:
                break
        assert metrics(server.url)[RUNNING] == 1, "the stream ended before the client left"
        stream.close()  # closes the HTTP connection: the body was not read to its end
    else:  # a bare socket that sends the request, reads a little and goes away
        body = json.dumps({"model": MODEL, "messages": messages(2), "max_tokens": LONG, "temperature": 0,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while data.count(b"data: ") < 5:
            piece = sock.recv(65536)
            assert piece, f"the server closed the connection: {data!r}"
            data += piece
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert metrics(server.url)[RUNNING] == 1, "the stream ended before the client left"
        sock.close()
    left = time.monotonic()

    def freed():
        m = metrics(server.url)
        return m if m[RUNNING] == 0 and m.get(CANCELLED, 0) == before.get(CANCELLED, 0) + 1 else None

    after = wait_for(freed, timeout=10)
    seconds = time.monotonic() - left
    assert after, f"the slot was not freed 10 s after the client left: {metrics(server.url)}"
    # Nothing is generated for the departed client any more, and it did not run to its end.
    time.sleep(0.5)
    later = metrics(server.url)
    assert later[GENERATED] == after[GENERATED]
    assert later[GENERATED] - before[GENERATED] < LONG
    assert later.get('qwen_request_finished_total{reason="length"}', 0) == \
        before.get('qwen_request_finished_total{reason="length"}', 0)
    return seconds


@pytest.mark.parametrize("how", ["openai", "socket"])
def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client, how):
    seconds = long_stream_events(server, client, how)
    print(f"\nslot freed {1000 * seconds:.0f} ms after the client ({how}) left")
    # The server goes on serving: a following request (streamed, like the one that left) completes.
    stream = client.chat.completions.create(model=MODEL, messages=messages(3), max_tokens=8, temperature=0,
                                            stream=True)
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    m = metrics(server.url)
    assert m[RUNNING] == 0 and m[WAITING] == 0
