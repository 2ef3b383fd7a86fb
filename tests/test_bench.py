"""The benchmark scripts the README shows run end to end (on the tiny shape, so in seconds) and
print the figures they promise: machine, bandwidth, baseline ratio."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen import kernels

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_bench(script, *args):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "capability" in proc.stdout and "memory read bandwidth" in proc.stdout
    return proc.stdout


def test_decode_bench():
    out = run_bench("decode.py", "--shape", "tiny", "--vocab", "1024", "--prompt-len", "8", "--new-tokens", "4",
                    "--repeats", "1", "--bandwidth-gib", "0.1")
    assert "ratio ours/qwen2" in out and "greedy tokens (row 0): identical" in out


@pytest.mark.parametrize("dtype", ["float32"])
def test_alignment_bench(dtype):
    out = run_bench("alignment.py", "--shape", "tiny", "--vocab", "1024", "--dtypes", dtype, "--prompt-len", "8",
                    "--new-tokens", "4", "--repeats", "1")
    assert "misaligned parameters: aligned 0%, mapped 100%" in out
    assert "ratio aligned/mapped" in out and "greedy tokens identical: True" in out


@pytest.mark.parametrize("through", [[], ["--http"]], ids=["engine", "http"])
def test_serving_bench(through):
    out = run_bench("serving.py", "--shape", "tiny", "--clients", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
                    "--repeats", "1", "--turns", "2", "--turn-words", "5", *through)
    assert "x aggregate tokens/s, batching/serial" in out
    assert ("through the HTTP server" in out) == bool(through)
    assert "reuse on:" in out and "reuse off:" in out


def test_memory_bench():
    out = run_bench("memory.py", "--shape", "tiny", "--vocab", "1024", "--bandwidth-gib", "0.1")
    assert "peak RSS growth" in out and "all parameters 64-byte aligned: True" in out
    plain, int8 = (float(x) for x in re.findall(r"(?:plain|int8) ([\d.]+) KiB", out))
    assert 0 < int8 < plain


def test_cache_kernels_bench():
    import torch

    out = run_bench("cache_kernels.py", "--dtypes", "float16", "--contexts", "1024", "--batch", "1", "--repeats", "2",
                    "--bandwidth-gib", "0.1")
    plain, int8, ratio = re.search(r"16-bit ([\d.]+) KiB, int8 ([\d.]+) KiB \(int8/16-bit ([\d.]+)\)", out).groups()
    # per head and token: 128 fp16 values (256 bytes) against 128 bytes + an fp16 scale and zero
    assert float(plain) == 32 * 2 * 32 * 256 / 1024 and float(int8) == 32 * 2 * 32 * (128 + 4) / 1024
    assert float(ratio) == round((128 + 4) / 256, 3)
    if torch.cuda.is_available():
        assert re.search(r"(?m)^float16 +1 +1 +1024 +[\d.]+ +[\d.]+ +[\d.]+ ", out), out
    else:
        assert "no CUDA device" in out


def test_gpu_check_script(tmp_path):
    """bench/gpu_check.sh (the GPU session's one command) runs here too: the selected kernel tests,
    the bench's memory part; a failing test makes its status nonzero."""
    def gpu_check(out, *pytest_args):
        return subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(out), *pytest_args],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))

    proc = gpu_check(tmp_path / "ok", "-k", "ship_as_remote_code")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in (tmp_path / "ok" / "tests.txt").read_text()
    assert "int8/16-bit 0.516" in (tmp_path / "ok" / "bench.txt").read_text()
    assert "torch " in (tmp_path / "ok" / "machine.txt").read_text()
    proc = gpu_check(tmp_path / "none", "-k", "no_such_test")
    assert proc.returncode != 0 and "tests: exit 5, bench: exit 0" in proc.stdout


LLAMA_PYTHON = os.environ.get("QWEN_LLAMA_PYTHON", "/tmp/llama_venv/bin/python")


def test_vs_llamacpp_bench():
    """Runs where llama-cpp-python's virtualenv exists (README: "Against llama.cpp")."""
    if not os.path.exists(LLAMA_PYTHON):
        pytest.skip(f"no llama.cpp virtualenv at {LLAMA_PYTHON} (set QWEN_LLAMA_PYTHON; README shows how to build it)")
    out = run_bench("vs_llamacpp.py", "--shape", "tiny", "--repeats", "1", "--rounds", "2", "--llama-python", LLAMA_PYTHON)
    for name in ("bf16", "fp16", "int8", "int4", "int4:64"):
        assert re.search(rf"(?m)^{name}\s.*\d", out), f"no {name} row"
    assert "ratio" in out and len(re.findall(r"(?m)^ours +bf16 ", out)) == 2  # one line per round
    assert re.search(r"(?m)^llama.cpp system info: .*AVX2 = [01]", out), "llama.cpp's SIMD features not shown"
    for phase in ("decode", "prefill"):  # our default 16-bit dtype against llama.cpp's faster 16-bit format
        assert re.search(rf"(?m)^16-bit {phase}: ours (bf16|fp16) .* llama.cpp's faster 16-bit, (BF16|F16), [\d.]+ "
                         r"tok/s: ratio \d", out), f"no 16-bit {phase} target line"


def test_decode_bench_quantized_batch():
    out = run_bench("decode.py", "--shape", "tiny", "--vocab", "1024", "--prompt-len", "8", "--new-tokens", "4",
                    "--repeats", "1", "--bandwidth-gib", "0.1", "--dtype", "int8", "--batch", "2")
    assert "ours int8, qwen2 bfloat16" in out and "x batch 2" in out and "% of roofline" in out


def test_decode_bench_quantized_alone():
    out = run_bench("decode.py", "--shape", "tiny", "--vocab", "1024", "--prompt-len", "8", "--new-tokens", "4",
                    "--repeats", "1", "--bandwidth-gib", "0.1", "--dtype", "int4", "--no-baseline")
    assert "ours int4" in out and "qwen2" not in out and "% of roofline" in out and "(no baseline)" in out


@pytest.mark.parametrize("dtype", ["int8", "int4", "int4:32"])
def test_gemv_bench_quantized(dtype):
    out = run_bench("gemv.py", "--smoke", "--dtype", dtype)
    assert re.search(rf"(?m)^smoke .* {re.escape(dtype)} +1 \|", out), out
    assert "ours/torch speed-up" in out


def test_decode_bench_against_torch_kernels():
    out = run_bench("decode.py", "--shape", "tiny", "--vocab", "1024", "--prompt-len", "8", "--new-tokens", "4",
                    "--repeats", "1", "--bandwidth-gib", "0.1", "--dtype", "int4:32", "--vs-torch-kernels")
    assert re.search(r"(?m)^torchq +[\d.]+ +[\d.]+", out) and "ratio ours/torchq" in out and "qwen2" not in out


@pytest.mark.parametrize("dtype", ["float16", "int4"])
@pytest.mark.parametrize("kernel_path", ["auto", "avx2"])
def test_prefill_bench_smoke(dtype, kernel_path, monkeypatch):
    monkeypatch.setenv("QWEN_KERNELS", kernel_path)  # avx2: qwen.kernels' GEMM is timed too
    out = run_bench("prefill.py", "--smoke", "--dtype", dtype)
    assert re.search(r"(?m)^torch (float16|bfloat16) +[\d.]+ +\d+-\d+ +[\d.]+ ", out), out
    assert re.search(r"(?m)^fp32 torch +[\d.]+ +\d+-\d+ +[\d.]+ ", out), out
    assert re.search(r"fp32 products \(torch's GEMM\): [\d.]+x the speed", out), out
    ours = kernels.gemm_runs() if kernel_path == "auto" else kernels._cpu_level >= 1
    assert bool(re.search(r"(?m)^fp32 qwen +[\d.]+ +\d+-\d+ +[\d.]+ ", out)) == ours, out
    assert ("fp32 products (qwen's GEMM)" in out) == ours, out


def test_engine_step_bench_smoke():
    out = run_bench("engine_step.py", "--smoke")
    for pools in ("released", "never released"):
        for path in ("engine", "generate"):
            assert re.search(rf"(?m)^{pools} +{path} +[\d.]+ +[\d.]+-[\d.]+ +[\d.]+$", out), out
    assert re.search(r"released: engine / generate time per token [\d.]+", out), out


def run_script(script, *args):
    """A bench script that measures no speed (no bandwidth line): its stdout."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_quant_accuracy_bench_smoke():
    out = run_script("quant_accuracy.py", "--smoke")
    assert "trained 2 steps" in out and "first 16 equal" in out
    assert re.search(r"top-2 log-probability gap over all 8 greedy positions: median \d+\.\d+", out), out
    for name in ("fp32", "bf16", "fp16", "int8", "int4:32"):  # every row: perplexity, then greedy agreement
        assert re.search(rf"(?m)^{re.escape(name)} +\d+\.\d+ +[+-]\d+\.\d+% +\d/2 +\d/2 ", out), out


def test_finetune_bench_smoke():
    out = run_script("finetune.py", "--shape", "tiny", "--lengths", "32", "--steps", "1", "--dtype", "float32")
    assert re.search(r"(?m)^lora +32 +[\d,]+ +\d+\.\d+ +\d+\.\d+ GiB", out), out
    assert re.search(r"(?m)^full +32 +[\d,]+ +\d+\.\d+ +\d+\.\d+ GiB", out), out
    assert "A100" in out
