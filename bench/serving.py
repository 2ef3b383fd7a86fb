"""Serving throughput and latency: the engine with continuous batching against the same engine
with batching off (one sequence at a time, as the original openai_api.py served), and multi-turn
time to first token with and without prefix reuse. One run, one random model.

    python bench/serving.py [--shape half_b] [--dtype bfloat16] [--clients 1 4 8 16] [--new-tokens 32]

It prints the machine and its read bandwidth, then per concurrency the aggregate tokens/s, time to
first token and inter-token latency (medians over the clients and repeats) for both engines and
their ratio, then the time to first token of each turn of a 5-turn chat with reuse on and off.
"""

import argparse
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import DTYPES, SHAPES, print_machine, random_qwen  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qwen import QWenTokenizer, make_context  # noqa: E402
from qwen.serving import Engine, SamplingParams  # noqa: E402
from qwen.vocab import find_qwen_tiktoken  # noqa: E402

def engine_token_times(engine, ids, new_tokens):
    """Arrival time of each new token of one greedy request, straight from the engine."""
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    return [time.perf_counter() for out in engine.submit(ids, params) if out.token_ids]


def http_token_times(url, ids, new_tokens):
    """The same through the OpenAI-compatible server: a streamed /v1/completions request."""
    import httpx

    body = {"model": "bench", "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "repetition_penalty": 1.0, "top_k": 0, "top_p": 1.0}
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                times.append(time.perf_counter())
    return times


def run_clients(token_times, prompts):
    """Every prompt streamed by its own thread at once: (tokens/s overall, TTFTs, inter-token gaps).
    `token_times(ids)` runs one request and returns its tokens' arrival times."""
    ttft, gaps, counts = [], [], []
    lock = threading.Lock()

    def client(ids):
        start = time.perf_counter()
        times = token_times(ids)
        with lock:
            ttft.append(times[0] - start)
            gaps.extend(b - a for a, b in zip(times, times[1:]))
            counts.append(len(times))

    threads = [threading.Thread(target=client, args=(ids,)) for ids in prompts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start), ttft, gaps


def conversation_ttft(engine, tokenizer, turns, words, reply_tokens, tag):
    """Time to first token of each turn of one chat whose user turns have `words` words each
    (`tag` makes the chat's text its own, so nothing is reused from an earlier chat)."""
    history, result = [], []
    for turn in range(turns):
        query = " ".join(f"{tag}word{turn}_{i}" for i in range(words))
        ids = make_context(tokenizer, query, history=history, system="You are a helpful assistant.")[1]
        start = time.perf_counter()
        stream = iter(engine.submit(ids, SamplingParams(max_new_tokens=reply_tokens, do_sample=False)))
        first = next(stream)
        result.append(time.perf_counter() - start)
        reply = first.token_ids + [t for out in stream for t in out.token_ids]
        history.append((query, tokenizer.decode(reply)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="half_b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8, 16], help="concurrencies (none: skip)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=5, help="turns of the multi-turn chat (0: skip it)")
    parser.add_argument("--turn-words", type=int, default=100, help="words per user turn in the multi-turn test")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--http", action="store_true",
                        help="clients go through openai_api's app on loopback (streamed /v1/completions) instead of "
                        "calling the engine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()
    tokenizer = QWenTokenizer(find_qwen_tiktoken())
    model = random_qwen(SHAPES[args.shape], len(tokenizer), 8192, DTYPES[args.dtype], seed=0)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.shape} {SHAPES[args.shape]}, {params / 1e9:.2f}B parameters, {args.dtype}")
    context = args.prompt_len + args.new_tokens + 64
    batching = Engine(model, tokenizer, max_running=max(args.clients or [1]), max_context=context)
    serial = Engine(model, tokenizer, max_running=1, max_context=context, max_waiting=1024, prefix_slots=0)
    generator = torch.Generator().manual_seed(0)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens per client (greedy), {args.repeats} repeats")
    print(f"{'clients':>7} {'engine':>9} {'tok/s':>8} {'TTFT ms':>9} {'ITL ms':>8}"
          + ("   (through the HTTP server)" if args.http else ""))
    runners, servers = {}, []
    for name, engine in (("batching", batching), ("serial", serial)):
        if args.http:
            from qwen.api.app import create_app
            from qwen.api.server import BackgroundServer

            servers.append(BackgroundServer(create_app(engine, disable_gc=True)).start())
            runners[name] = functools.partial(http_token_times, servers[-1].url, new_tokens=args.new_tokens)
        else:
            runners[name] = functools.partial(engine_token_times, engine, new_tokens=args.new_tokens)
    for runner in runners.values():  # warm-up: first-call paths, the HTTP stack
        runner(torch.randint(0, 150000, (args.prompt_len,), generator=generator).tolist())
    for clients in args.clients:
        rates = {}
        for name in runners:
            results = []
            for _ in range(args.repeats):
                prompts = [torch.randint(0, 150000, (args.prompt_len,), generator=generator).tolist() for _ in range(clients)]
                results.append(run_clients(runners[name], prompts))
            rates[name] = statistics.median(r[0] for r in results)
            ttft = statistics.median(t for r in results for t in r[1])
            gaps = [g for r in results for g in r[2]]
            itl = statistics.median(gaps) if gaps else float("nan")
            print(f"{clients:>7} {name:>9} {rates[name]:>8.1f} {ttft * 1e3:>9.0f} {itl * 1e3:>8.1f}")
        print(f"{clients:>7} {'ratio':>9} {rates['batching'] / rates['serial']:>8.2f}x aggregate tokens/s, batching/serial")
    for server in servers:
        server.stop()
    serial.shutdown()
    batching.shutdown()
    if args.turns < 1:
        return 0
    # One chat at a time; its words take up to ~8 tokens each (the tag makes them rare).
    chat_context = args.turns * (8 * args.turn_words + 64) + 64
    reuse_on = Engine(model, tokenizer, max_running=1, max_context=chat_context, prefix_slots=2)
    reuse_off = Engine(model, tokenizer, max_running=1, max_context=chat_context, prefix_slots=0)
    print(f"\nmulti-turn chat: {args.turns} turns of {args.turn_words} words, 8-token replies; TTFT ms per turn (median of {args.repeats})")
    for name, engine in (("reuse on", reuse_on), ("reuse off", reuse_off)):
        runs = [conversation_ttft(engine, tokenizer, args.turns, args.turn_words, 8, f"{name[-2:]}{r}")
                for r in range(args.repeats)]
        per_turn = [statistics.median(run[i] for run in runs) for i in range(args.turns)]
        print(f"{name:>10}: " + " ".join(f"{t * 1e3:7.0f}" for t in per_turn)
              + f" | turn {args.turns}/turn 1 = {per_turn[-1] / per_turn[0]:.2f}")
    reuse_on.shutdown()
    reuse_off.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
