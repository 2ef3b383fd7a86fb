"""Decode and prefill speed: our model against llama.cpp on the same random weights, per precision class.

    python bench/vs_llamacpp.py [--shape 1_8b] [--threads 2] [--repeats 3] [--rounds 1] [--llama-python /tmp/llama_venv/bin/python]
    python bench/vs_llamacpp.py --shape tiny          # smoke run, well under a minute

It prints the machine first (CPU, torch's capability, threads, load, a measured memory-read bandwidth), then:
1. builds a random Qwen v1 model of --shape (bench/decode.py's random_qwen, bf16) and saves it with
   save_pretrained and the real vocabulary (qwen.tiktoken) into a work directory;
2. exports it with qwen.tools.export_gguf to BF16 and F16 GGUF files, and quantizes the BF16 file with
   llama.cpp's own quantizer (llama_model_quantize) to Q8_0, Q4_0 and Q4_1;
3. times llama.cpp (llama-cpp-python, in its own virtualenv: --llama-python) on each file: prefill of a
   --prompt-len (512) token prompt (logits for the last position only) and greedy decode of --new-tokens (64)
   after a --decode-prompt-len (16) token prompt, --threads (2) threads, median of --repeats (3) after a warm-up;
   with --rounds R the two engines alternate R times per class (medians over all R x repeats runs);
4. times ours the same way (bench/decode.py's prefill_seconds and decode, torch threads = --threads) on the
   checkpoint directory: bf16 and fp16 loaded with `dtype`, and int8 / int4 with
   `QWenLMHeadModel.from_pretrained(dir, quantization=...)` ("n/a" where that is not available);
5. prints a table per precision class (bf16 ~ BF16, fp16 ~ F16, int8 ~ Q8_0, int4 ~ Q4_0 at
   4.5 bits per weight, int4:64 ~ Q4_1 at 5) and the ratios
   ours/llama.cpp (> 1: ours faster, for both decode and prefill tokens/s).

Each model is loaded alone (llama.cpp in a subprocess per file), so memory peaks near one bf16 copy of the
model in our process plus what loading needs (~4 GB for --shape 1_8b; int8/int4 quantize after loading a
bf16 copy) and one GGUF file in llama.cpp's. Disk: the work directory holds the checkpoint and five GGUF files,
about 8.3 bytes per parameter (~15 GB for --shape 1_8b); it is deleted at the end unless --work-dir is given.
Other processes on the machine skew everything: the load average is printed; re-run when it is high.
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import (
    SHAPES,
    agreement,
    decode,
    prefill_seconds,
    print_machine,
    random_qwen,
)

from qwen import QWenLMHeadModel
from qwen.modeling_qwen import fast_dtype
from qwen.tokenization_qwen import QWenTokenizer
from qwen.tools.export_gguf import export_gguf
from qwen.vocab import find_qwen_tiktoken

LLAMA_PYTHON = os.environ.get("QWEN_LLAMA_PYTHON", "/tmp/llama_venv/bin/python")
LLAMA_SETUP = ("python3 -m venv /tmp/llama_venv && CMAKE_BUILD_PARALLEL_LEVEL=2 "
               "/tmp/llama_venv/bin/pip install llama-cpp-python==0.3.36 numpy")
# precision class -> (llama.cpp file type name, ours: how to load)
CLASSES = {
    "bf16": ("BF16", {"dtype": torch.bfloat16}),
    "fp16": ("F16", {"dtype": torch.float16}),
    "int8": ("Q8_0", {"dtype": torch.bfloat16, "quantization": "int8"}),
    "int4": ("Q4_0", {"dtype": torch.bfloat16, "quantization": "int4"}),  # both 4.5 bits per weight
    "int4:64": ("Q4_1", {"dtype": torch.bfloat16, "quantization": "int4:64"}),  # both 5 bits per weight
}
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0, _Q4_1

# Runs in the llama.cpp virtualenv; argv[1] is a JSON file of arguments, the last stdout line is JSON.
LLAMA_SCRIPT = textwrap.dedent("""
    import ctypes, json, statistics, sys, time
    import numpy as np
    import llama_cpp

    args = json.load(open(sys.argv[1]))
    if args["action"] == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.nthread = args["threads"]
        params.ftype = args["ftype"]
        code = llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(params))
        print(json.dumps({"code": code}))
        sys.exit(0)

    start = time.perf_counter()
    prompt, short = args["prompt"], args["decode_prompt"]
    llm = llama_cpp.Llama(model_path=args["model"], logits_all=False, verbose=False,
                          n_ctx=max(len(prompt), len(short) + args["new_tokens"]) + 16,
                          n_batch=len(prompt), n_ubatch=len(prompt),
                          n_threads=args["threads"], n_threads_batch=args["threads"])
    load_s = time.perf_counter() - start
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def prefill():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t0

    def generate(n):
        llm.reset()
        llm.eval(short)
        ids = [int(np.argmax(last_logits()))]
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([ids[-1]])
            ids.append(int(np.argmax(last_logits())))
        return (n - 1) / (time.perf_counter() - first), ids

    prefill(); generate(4)  # warm-up
    prefills, rates = [], []
    for _ in range(args["repeats"]):
        prefills.append(prefill())
        rate, ids = generate(args["new_tokens"])
        rates.append(rate)
    print(json.dumps({"load_s": load_s, "prefill_s": prefills, "decode_tps": rates, "tokens": ids,
                      "system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
                      "ftype": llama_cpp.llama_ftype_name(llama_cpp.llama_model_ftype(llm.model)).decode()
                      if hasattr(llama_cpp, "llama_ftype_name") and hasattr(llama_cpp, "llama_model_ftype")
                      else None}))
""")


def run_llama(python: str, work: Path, args: dict, timeout: float) -> dict:
    (work / "llama_args.json").write_text(json.dumps(args))
    (work / "llama_bench.py").write_text(LLAMA_SCRIPT)
    proc = subprocess.run([python, str(work / "llama_bench.py"), str(work / "llama_args.json")],
                          check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load_ours(directory: Path, how: dict):
    """Our model as `how` says, or (None, reason) when that is not available (e.g. quantization not yet there)."""
    try:
        model = QWenLMHeadModel.from_pretrained(directory, **how).eval()
    except (TypeError, ValueError, ImportError, NotImplementedError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "quantization" in how and type(model.transformer.h[0].mlp.w1) is torch.nn.Linear:
        # an unknown keyword may end up as a config attribute and be ignored
        return None, f"quantization={how['quantization']!r} left the model unquantized"
    return model, None


def time_ours(model, prompt, short, new_tokens, repeats):
    prefill_seconds(model, prompt)  # warm-up
    decode(model, short, 4)
    prefills, rates, tokens = [], [], None
    for _ in range(repeats):
        prefills.append(prefill_seconds(model, prompt))
        rate, tokens = decode(model, short, new_tokens)
        rates.append(rate)
    return prefills, rates, tokens.tolist()


def fmt(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"llama.cpp virtualenv: {LLAMA_SETUP}")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1_8b")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--decode-prompt-len", type=int, default=16, help="prompt before the decoded tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine per round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the engines this many times per class (medians over all runs)")
    parser.add_argument("--threads", type=int, default=2, help="threads for llama.cpp and torch")
    parser.add_argument("--classes", default=",".join(CLASSES), help=f"subset of {','.join(CLASSES)}")
    parser.add_argument("--int4-group", type=int,
                        help="our group size in the int4 class (default: ours' default, 128, or the largest "
                             "of 64/32 that divides a layer's input size)")
    parser.add_argument("--llama-python", default=LLAMA_PYTHON, help="python of the llama-cpp-python virtualenv")
    parser.add_argument("--work-dir", help="keep the checkpoint and GGUF files here (reused when present)")
    parser.add_argument("--bandwidth-gib", type=float, help="size of the bandwidth probe (default 1, tiny 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        parser.error(f"unknown --classes {unknown}: choose from {', '.join(CLASSES)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if not os.path.exists(args.llama_python):
        print(f"error: no llama.cpp virtualenv at {args.llama_python}; create it: {LLAMA_SETUP}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.int4_group:
        CLASSES["int4"][1]["quantization"] = f"int4:{args.int4_group}"
    bandwidth = print_machine(args.bandwidth_gib or (0.25 if args.shape == "tiny" else 1.0))

    shape = SHAPES[args.shape]
    hidden, layers, inter = shape["hidden"], shape["layers"], shape["intermediate"]
    params = 2 * args.vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden + 3 * hidden * (inter // 2))
    bf16_bytes = 2 * params
    print(f"model: hidden {hidden}, layers {layers}, heads {shape['heads']}, intermediate {inter}, vocab {args.vocab}"
          f" ({params / 1e9:.3f} B parameters, {bf16_bytes / 1e9:.2f} GB in bf16) | threads {args.threads}")
    print(f"decode roofline bf16: {bandwidth / (bf16_bytes - 2 * args.vocab * hidden):.1f} tokens/s")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vs_llamacpp."))
    work.mkdir(parents=True, exist_ok=True)
    need = int(8.3 * params)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"error: {work} has {free / 1e9:.1f} GB free; the checkpoint and GGUF files need ~{need / 1e9:.1f} GB",
              file=sys.stderr)
        return 2
    try:
        return _run(args, classes, work, bf16_bytes)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, classes, work: Path, bf16_bytes: int) -> int:
    timeout = 3600
    checkpoint = work / "checkpoint"
    start = time.perf_counter()
    if not (checkpoint / "config.json").is_file():
        model = random_qwen(SHAPES[args.shape], args.vocab, args.seq_length, torch.bfloat16, args.seed)
        model.config.bf16 = False  # the loading dtype decides (bf16 / fp16 runs below)
        model.save_pretrained(checkpoint)
        QWenTokenizer(find_qwen_tiktoken()).save_pretrained(checkpoint)
        del model
        gc.collect()
        print(f"checkpoint: {checkpoint} ({time.perf_counter() - start:.1f} s)")
    files = {}
    types = {CLASSES[c][0] for c in classes}
    for name, outtype in (("BF16", "bf16"), ("F16", "f16")):
        files[name] = work / f"model-{outtype}.gguf"
        needed = name in types or (name == "BF16" and types & set(LLAMA_FTYPES))  # quantized from BF16
        if needed and not files[name].exists():
            t0 = time.perf_counter()
            export_gguf(checkpoint, files[name], outtype)
            print(f"exported {files[name].name} ({files[name].stat().st_size / 1e9:.2f} GB, "
                  f"{time.perf_counter() - t0:.1f} s)")
    for name, ftype in LLAMA_FTYPES.items():
        files[name] = work / f"model-{name.lower()}.gguf"
        if name in types and not files[name].exists():
            t0 = time.perf_counter()
            result = run_llama(args.llama_python, work, {"action": "quantize", "src": str(files["BF16"]),
                                                         "dst": str(files[name]), "ftype": ftype,
                                                         "threads": args.threads}, timeout)
            if result["code"] != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed (code {result['code']})")
            print(f"quantized {files[name].name} ({files[name].stat().st_size / 1e9:.2f} GB, "
                  f"{time.perf_counter() - t0:.1f} s)")

    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 151643, (1, args.prompt_len), generator=generator)
    short = prompt[:, :args.decode_prompt_len]
    print(f"prefill: {args.prompt_len}-token prompt; decode: {args.new_tokens} greedy tokens after "
          f"{args.decode_prompt_len} (tokens/s from the first new token on); median of {args.repeats} x {args.rounds} "
          f"round(s) after a warm-up")
    print()

    rows, shown_system = {}, False
    for cls in classes:
        llama_type, how = CLASSES[cls]
        model, reason = load_ours(work / "checkpoint", how)
        if model is None:
            print(f"ours      {cls:<5}: n/a ({reason})")
        timings = {"llama_prefill": [], "llama_decode": [], "prefill": [], "decode": []}
        same = None
        # Rounds alternate the two engines (each with `repeats` runs), so that a slow spell of a
        # shared machine falls on both rather than on one.
        for _ in range(args.rounds):
            llama = run_llama(args.llama_python, work, {
                "action": "bench", "model": str(files[llama_type]), "prompt": prompt[0].tolist(),
                "decode_prompt": short[0].tolist(), "new_tokens": args.new_tokens, "repeats": args.repeats,
                "threads": args.threads}, timeout)
            if not shown_system:  # the SIMD features its CPU backend was built for and uses
                print(f"llama.cpp system info: {llama['system']}")
                shown_system = True
            timings["llama_prefill"] += llama["prefill_s"]
            timings["llama_decode"] += llama["decode_tps"]
            print(f"llama.cpp {llama_type:<5} ({files[llama_type].stat().st_size / 1e9:.2f} GB, load {llama['load_s']:.1f} s):"
                  f" prefill {[round(t * 1e3, 1) for t in llama['prefill_s']]} ms, decode "
                  f"{[round(r, 2) for r in llama['decode_tps']]} tok/s")
            if model is None:
                continue
            prefills, rates, tokens = time_ours(model, prompt, short, args.new_tokens, args.repeats)
            timings["prefill"] += prefills
            timings["decode"] += rates
            same = agreement(tokens, llama["tokens"])
            print(f"ours      {cls:<5} ({model_bytes(model) / 1e9:.2f} GB): prefill "
                  f"{[round(t * 1e3, 1) for t in prefills]} ms, decode {[round(r, 2) for r in rates]} tok/s")
        del model
        gc.collect()
        ours_prefill = statistics.median(timings["prefill"]) if timings["prefill"] else None
        rows[cls] = (llama_type, args.prompt_len / statistics.median(timings["llama_prefill"]),
                     statistics.median(timings["llama_decode"]),
                     None if ours_prefill is None else args.prompt_len / ours_prefill,
                     statistics.median(timings["decode"]) if timings["decode"] else None, same)

    print()
    print(f"{'class':<6} {'llama.cpp':<9} {'prefill tok/s':>14} {'decode tok/s':>13} | {'ours prefill':>12} "
          f"{'ours decode':>12} | {'ratio prefill':>13} {'ratio decode':>12} | greedy agree")
    for cls, (llama_type, lp, ld, op, od, same) in rows.items():
        ratio_p = None if op is None else op / lp
        ratio_d = None if od is None else od / ld
        agree = "n/a" if same is None else f"{same}/{args.new_tokens}"
        print(f"{cls:<6} {llama_type:<9} {lp:>14.1f} {ld:>13.2f} | {fmt(op, '.1f'):>12} {fmt(od):>12} | "
              f"{fmt(ratio_p, '.3f'):>13} {fmt(ratio_d, '.3f'):>12} | {agree}")
    print(f"ratios are ours/llama.cpp in tokens/s (> 1: ours faster). ours int4 is "
          f"quantization={CLASSES['int4'][1]['quantization']!r} against Q4_0's blocks of 32 (fp16 scale), int4:64 "
          "against Q4_1's (fp16 scale and min); llama.cpp's Q4_x files keep output.weight in Q6_K (Q8_0 when "
          "hidden is not a multiple of 256).")
    print_16bit_target(rows)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


def print_16bit_target(rows) -> None:
    """The issue's 16-bit targets: our default 16-bit dtype on this CPU (dtype="fast") against the
    faster of llama.cpp's BF16 and F16 in this run, in decode and in prefill."""
    if "bf16" not in rows or "fp16" not in rows:
        return
    ours = "bf16" if fast_dtype(on_cuda=False) == torch.bfloat16 else "fp16"
    _, _, _, op, od, _ = rows[ours]
    for phase, at, mine in (("decode", 2, od), ("prefill", 1, op)):
        best = max(("bf16", "fp16"), key=lambda c: rows[c][at])
        peer, rate = rows[best][0], rows[best][at]
        ratio = "n/a" if mine is None else f"{mine / rate:.3f}"
        print(f"16-bit {phase}: ours {ours} (dtype='fast' here) {fmt(mine)} tok/s against llama.cpp's faster "
              f"16-bit, {peer}, {rate:.2f} tok/s: ratio {ratio}")


if __name__ == "__main__":
    sys.exit(main())
