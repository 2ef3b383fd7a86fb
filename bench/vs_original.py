"""Prefill latency, generate speed and peak memory: our Qwen v1 against the ORIGINAL remote code, on the
same checkpoint, measured in one run.

    python bench/vs_original.py --original-code DIR --original-python PATH [--checkpoint DIR]
                                [--dtype {bf16,fp32}] [--prompt-len 256] [--new-tokens 64]
                                [--repeats 5] [--batch 1]

The original modeling_qwen.py only runs on transformers 4.x, so it runs in a second interpreter
(--original-python, e.g. a venv with transformers==4.40.2), ours in this one. Each implementation
gets one long-lived worker process that loads the model once and waits; the driver then asks the two
workers for one measurement round at a time, alternating them (and who goes first) every repeat, so
both are measured under the same conditions while only one of them is running.

A round is: one forward over the prompt with use_cache=True (prefill; full logits, since the original
has no way to ask for fewer), then a greedy model.generate() of exactly --new-tokens tokens (eos None).
It prints the machine, every run, the medians, the ratios ours/original, peak RSS and whether the
greedy tokens agree.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_ORIGINAL_FILES = ("modeling_qwen.py", "configuration_qwen.py", "qwen_generation_utils.py",
                           "tokenization_qwen.py")
PAD_ID = 151643  # <|endoftext|>, the pad/eod id of every Qwen v1 checkpoint
IMPLEMENTATIONS = ("ours", "original")

# ----------------------------------------------------------------------------- the worker
#
# Written to a temp file and run by both interpreters, so it must work on transformers 4.x and 5.x and
# must not import anything from this repository unless it is the "ours" worker. Protocol, one JSON
# object per line: the driver sends the setup, the worker answers {"ready": ...}; then each "go" line
# gets one round's result; "quit" (or end of input) ends it. Anything the model code prints goes to
# stderr (a log file), never into the protocol stream.

WORKER = r'''
import json, os, resource, sys, time

protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # stray prints from model code land in the log, not in the protocol
sys.stdout = sys.stderr

impl, checkpoint, dtype, threads, repo_root = sys.argv[1:6]
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

if int(threads) > 0:
    torch.set_num_threads(int(threads))


def peak_rss_mb():
    # VmHWM belongs to this process's address space; ru_maxrss would start at the parent's peak, since
    # Linux carries it across fork + exec (and the driver may have just built a checkpoint).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def send(obj):
    protocol.write(json.dumps(obj) + "\n")


class Clock(BaseStreamer):
    """generate() calls put() once with the prompt, then once per new token (all rows at once)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


rss_before = peak_rss_mb()
start = time.perf_counter()
flags = {"bf16": {"bf16": True}, "fp32": {"fp32": True}}[dtype]
if impl == "ours":
    sys.path.insert(0, repo_root)
    import qwen  # registers the Auto* classes: no remote code involved
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **flags)
else:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, **flags)
model.eval()
load_s = time.perf_counter() - start
rss_loaded = peak_rss_mb()
module = type(model).__module__

setup = json.loads(sys.stdin.readline())
ids = torch.tensor(setup["ids"], dtype=torch.long)
mask = torch.tensor(setup["mask"], dtype=torch.long)
new_tokens = setup["new_tokens"]
batch, prompt_len = ids.shape
# The same plain greedy settings for both: no repetition penalty, no stop words, no eos.
model.generation_config = GenerationConfig(pad_token_id=setup["pad_id"], eos_token_id=None)
inputs = {"input_ids": ids}
if batch > 1:
    inputs["attention_mask"] = mask


@torch.no_grad()
def prefill():
    start = time.perf_counter()
    model(**inputs, use_cache=True)
    return time.perf_counter() - start


@torch.no_grad()
def prefill_last_only():
    # What transformers 5 generate() does first: logits for the last position only.
    start = time.perf_counter()
    model(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def generate(n):
    clock = Clock()
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=clock)
    total = time.perf_counter() - start
    steps = len(clock.times) - 1  # new tokens per row
    decode = (steps - 1) * batch / (clock.times[-1] - clock.times[1]) if steps > 1 else float("nan")
    return n * batch / total, decode, out[:, prompt_len:].tolist()


# Warm-up: allocator, kernels, first-call paths, the original's rotary cache.
prefill()
generate(4)
has_last_only = impl == "ours"
if has_last_only:
    prefill_last_only()
send({
    "ready": True,
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "capability": torch.backends.cpu.get_cpu_capability(),
    "threads": torch.get_num_threads(),
    "model_class": module + "." + type(model).__name__,
    "model_dtype": str(model.dtype),
    "load_s": load_s,
    "rss_before_load_mb": rss_before,
    "rss_loaded_mb": rss_loaded,
})

for line in sys.stdin:
    command = line.strip()
    if command == "quit":
        break
    if command != "go":
        continue
    result = {"prefill_s": prefill()}
    if has_last_only:
        result["prefill_last_only_s"] = prefill_last_only()
    result["generate_tok_s"], result["decode_tok_s"], result["tokens"] = generate(new_tokens)
    result["peak_rss_mb"] = peak_rss_mb()
    send(result)
'''


class Worker:
    """One implementation in its own interpreter, driven line by line."""

    def __init__(self, name, python, script, checkpoint, dtype, threads, log_path, env):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - held open for the worker's lifetime, closed in close()
        self.proc = subprocess.Popen(
            [python, script, name, str(checkpoint), dtype, str(threads), str(REPO_ROOT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env,
        )

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            tail = Path(self.log_path).read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(f"the {self.name} worker exited (code {self.proc.returncode}); last lines of "
                               f"{self.log_path}:\n" + "\n".join(tail))
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- machine and inputs


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int):
    """Random prompts; with batch > 1 the rows have different lengths (the first is the longest) and are
    padded on the left, as generate() wants for a decoder-only model."""
    rng = random.Random(seed)
    ids, mask = [], []
    for row in range(batch):
        length = prompt_len if row == 0 else rng.randint(max(1, prompt_len // 2), prompt_len)
        tokens = [rng.randrange(min(vocab, 150000)) for _ in range(length)]
        pad = prompt_len - length
        ids.append([PAD_ID] * pad + tokens)
        mask.append([0] * pad + [1] * length)
    return ids, mask


def original_code_problem(code_dir: Path, batch: int) -> str | None:
    """Known SDPA mask bug in some published revisions of modeling_qwen.py: the padding mask is expanded
    with causal_mask.size(2) (causal_mask is None on a decode step) and the causal masked_fill's result
    is thrown away. A batch without padding never takes that branch."""
    if batch == 1:
        return None
    text = (code_dir / "modeling_qwen.py").read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    discarded = any(line.startswith("attention_mask.masked_fill(") for line in lines)
    if discarded or "-1, -1, causal_mask.size(2), -1" in text.replace("\n", " ").replace("  ", " "):
        return ("this modeling_qwen.py has the SDPA padding-mask bug (the masked_fill result is discarded and "
                "the mask is expanded with causal_mask.size(2), None on a decode step): padded batches fail or "
                "attend to the future. Use a revision where the branch reads 'attention_mask = "
                "attention_mask.expand(-1, -1, query.size(2), -1)' and 'attention_mask = "
                "attention_mask.masked_fill(...)', or run with --batch 1.")
    return None


def prepare_original_checkpoint(checkpoint: Path, code_dir: Path, out: Path) -> Path:
    """A copy of `checkpoint` whose *.py files are the original ones (everything else symlinked)."""
    out.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.suffix == ".py" or item.name.startswith("."):
            continue
        (out / item.name).symlink_to(item.resolve())
    for item in code_dir.glob("*.py"):
        shutil.copy2(item, out / item.name)
    return out


def read_shape(checkpoint: Path) -> str:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown shape"
    return (f"hidden {config.get('hidden_size')}, layers {config.get('num_hidden_layers')}, heads "
            f"{config.get('num_attention_heads')}, intermediate {config.get('intermediate_size')}, vocab "
            f"{config.get('vocab_size')}, seq_length {config.get('seq_length')}")


def fmt(values, scale=1.0, digits=1):
    return "[" + ", ".join(f"{v * scale:.{digits}f}" for v in values) + "]"


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  .venv/bin/python bench/vs_original.py --original-code /path/to/qwen_py_files "
        "--original-python /path/to/venv4/bin/python --dtype bf16\n\nBoth models are in memory at once "
        "(the default shape: ~2 GB in bf16, ~4 GB in fp32, plus a transient fp32 copy while building the "
        "random checkpoint). Not part of `make test`.",
    )
    parser.add_argument("--checkpoint", type=Path,
                        help="a Qwen v1 checkpoint directory (default: build a random one into a temp dir with "
                        "qwen.tools.tiny_checkpoint at --hidden/--layers/--heads/--seq-length)")
    parser.add_argument("--original-code", type=Path, required=True,
                        help="a folder with the original " + ", ".join(REQUIRED_ORIGINAL_FILES)
                        + " (e.g. from a published Qwen HF repo)")
    parser.add_argument("--original-python", required=True,
                        help="an interpreter with transformers 4.x (and einops, tiktoken, "
                        "transformers_stream_generator) in which the original code runs")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="precision flag passed to from_pretrained in both (bf16=True / fp32=True)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1,
                        help="rows; > 1: random prompt lengths in [prompt-len/2, prompt-len], padded left")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both workers (default: torch's)")
    parser.add_argument("--hidden", type=int, default=1024, help="built checkpoint only")
    parser.add_argument("--layers", type=int, default=12, help="built checkpoint only")
    parser.add_argument("--heads", type=int, default=16, help="built checkpoint only")
    parser.add_argument("--seq-length", type=int, default=8192, help="built checkpoint only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if args.batch < 1 or args.prompt_len < 2 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1, --prompt-len >= 2")
    code_dir = args.original_code.resolve()
    missing = [name for name in REQUIRED_ORIGINAL_FILES if not (code_dir / name).is_file()]
    if missing:
        parser.error(f"--original-code {code_dir} lacks {', '.join(missing)}")
    if shutil.which(args.original_python) is None and not os.access(args.original_python, os.X_OK):
        parser.error(f"--original-python {args.original_python} is not an executable")
    problem = original_code_problem(code_dir, args.batch)
    if problem:
        parser.error(problem)
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} has no config.json")

    import torch  # after argument checks, so --help stays quick

    from decode import cpu_model  # bench/decode.py, next to this script

    print(f"cpu: {cpu_model()} | capability {torch.backends.cpu.get_cpu_capability()} | cores {os.cpu_count()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes skew the numbers)")

    with tempfile.TemporaryDirectory(prefix="qwen_vs_original_") as tmp:
        tmp = Path(tmp)
        if args.checkpoint is None:
            sys.path.insert(0, str(REPO_ROOT))
            from qwen.tools.tiny_checkpoint import build

            start = time.perf_counter()
            checkpoint = tmp / "checkpoint"
            build(str(checkpoint), chat=True, hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                  seq_length=args.seq_length, seed=args.seed)
            print(f"checkpoint: random, built in {time.perf_counter() - start:.1f} s (bf16 weights)")
        else:
            checkpoint = args.checkpoint.resolve()
            print(f"checkpoint: {checkpoint}")
        original_checkpoint = prepare_original_checkpoint(checkpoint, code_dir, tmp / "original_checkpoint")
        vocab = json.loads((checkpoint / "config.json").read_text()).get("vocab_size", 151936)
        print(f"model: {read_shape(checkpoint)} | --dtype {args.dtype}")
        print(f"original code: {code_dir}")

        script = tmp / "worker.py"
        script.write_text(WORKER)
        ids, mask = make_prompts(args.batch, args.prompt_len, vocab, args.seed)
        lengths = [sum(row) for row in mask]
        setup = json.dumps({"ids": ids, "mask": mask, "new_tokens": args.new_tokens, "pad_id": PAD_ID})

        env = dict(os.environ)
        env["HF_MODULES_CACHE"] = str(tmp / "hf_modules")  # the original's remote code is copied here
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        pythons = {"ours": sys.executable, "original": args.original_python}
        dirs = {"ours": checkpoint, "original": original_checkpoint}
        workers, info = {}, {}
        try:
            # Loaded one after the other, so the loads do not compete either.
            for name in IMPLEMENTATIONS:
                workers[name] = Worker(name, pythons[name], script, dirs[name], args.dtype, args.threads,
                                       tmp / f"{name}.log", env)
                workers[name].send(setup)
                info[name] = workers[name].receive()
            for name in IMPLEMENTATIONS:
                i = info[name]
                print(f"{name:<8}: python {i['python']}, torch {i['torch']}, transformers {i['transformers']}, "
                      f"capability {i['capability']}, threads {i['threads']} | {i['model_class']} "
                      f"{i['model_dtype']} | loaded in {i['load_s']:.1f} s")
            print(f"batch {args.batch} (prompt lengths {lengths}, left-padded), prompt {args.prompt_len}, "
                  f"{args.new_tokens} new tokens (greedy, eos None), {args.repeats} repeats, ours/original "
                  "alternating")

            # One untimed round each once both are loaded: the first round after the other worker's load
            # was consistently slow (up to 1.6x) in trial runs.
            for name in IMPLEMENTATIONS:
                workers[name].send("go")
                workers[name].receive()
            results = {name: [] for name in IMPLEMENTATIONS}
            for repeat in range(args.repeats):
                order = IMPLEMENTATIONS if repeat % 2 == 0 else IMPLEMENTATIONS[::-1]
                for name in order:
                    workers[name].send("go")
                    results[name].append(workers[name].receive())
                    print(f"  repeat {repeat + 1} {name:<8}: prefill {results[name][-1]['prefill_s'] * 1e3:.1f} ms, "
                          f"generate {results[name][-1]['generate_tok_s']:.2f} tok/s", flush=True)
        finally:
            for worker in workers.values():
                worker.close()

    def series(name, key):
        return [r[key] for r in results[name]]

    med = {name: {key: statistics.median(series(name, key))
                  for key in ("prefill_s", "generate_tok_s", "decode_tok_s", "peak_rss_mb")}
           for name in IMPLEMENTATIONS}
    print()
    print(f"{'impl':<9} {'prefill ms':>11} {'generate tok/s':>15} {'decode tok/s':>13} {'peak RSS MB':>12} "
          f"{'peak at load':>13}")
    for name in IMPLEMENTATIONS:
        m = med[name]
        print(f"{name:<9} {m['prefill_s'] * 1e3:>11.1f} {m['generate_tok_s']:>15.2f} {m['decode_tok_s']:>13.2f} "
              f"{max(series(name, 'peak_rss_mb')):>12.0f} {info[name]['rss_loaded_mb']:>13.0f}")
    print("(peak RSS: the worker's VmHWM over the whole run / after from_pretrained; the driver not counted)")
    print("(medians; tokens/s count every row: batch x new tokens. generate = whole generate() call, prefill "
          "included; decode = from the first new token to the last)")
    for name in IMPLEMENTATIONS:
        print(f"{name:<9} runs: prefill ms {fmt(series(name, 'prefill_s'), 1e3)}, generate tok/s "
              f"{fmt(series(name, 'generate_tok_s'), digits=2)}, "
              f"decode tok/s {fmt(series(name, 'decode_tok_s'), digits=2)}")
    last_only = series("ours", "prefill_last_only_s")
    print(f"ours      prefill with logits for the last position only (what transformers 5 generate() runs): "
          f"median {statistics.median(last_only) * 1e3:.1f} ms, runs {fmt(last_only, 1e3)}")
    ratio_prefill = med["ours"]["prefill_s"] / med["original"]["prefill_s"]
    ratio_generate = med["ours"]["generate_tok_s"] / med["original"]["generate_tok_s"]
    ratio_decode = med["ours"]["decode_tok_s"] / med["original"]["decode_tok_s"]
    print(f"ratio ours/original: prefill latency {ratio_prefill:.3f} (< 1: ours faster), generate tokens/s "
          f"{ratio_generate:.3f}, decode tokens/s {ratio_decode:.3f} (> 1: ours faster)")

    ours_tokens = results["ours"][-1]["tokens"]
    original_tokens = results["original"][-1]["tokens"]
    stable = all(r["tokens"] == ours_tokens for r in results["ours"]) and all(
        r["tokens"] == original_tokens for r in results["original"])
    agree = []
    for a, b in zip(ours_tokens, original_tokens):
        n = 0
        while n < len(a) and a[n] == b[n]:
            n += 1
        agree.append(n)
    if all(n == args.new_tokens for n in agree):
        verdict = "identical"
    else:
        verdict = "differ: identical prefix per row " + str(agree) + f" of {args.new_tokens}"
    print(f"greedy tokens ours vs original: {verdict}"
          f"{'' if stable else ' (and they changed between repeats!)'}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
