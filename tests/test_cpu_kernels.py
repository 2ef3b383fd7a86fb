"""The model on our CPU kernel (qwen/kernels): where it runs, from_pretrained and the engine route
16-bit decode steps through it; its logits stay within the 16-bit tolerance of torch's (the same
bound as between two CPUs, README "Exactness"); QWEN_KERNELS=off gives torch's numbers exactly."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import qwen
import qwen.quantization as Q
from qwen import kernels
from qwen.kernels import linear as linear_module
from qwen.kernels.linear import KernelLinear, use_kernels, use_torch
from qwen.serving import Engine, SamplingParams
from qwen.tools.tiny_checkpoint import build

ON = kernels.backend() != "torch"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kernels") / "chat", chat=True, dtype="bfloat16")


def linear_types(model):
    return {type(m) for m in model.modules() if isinstance(m, nn.Linear)}


def test_from_pretrained_uses_the_kernel_where_it_runs(checkpoint):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    assert linear_types(model) == ({KernelLinear} if ON else {nn.Linear})
    fp32 = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="float32")
    assert linear_types(fp32) == {nn.Linear}  # fp32 stays on torch: the golden fp32 parity holds as is
    assert use_torch(model) == (len([m for m in model.modules() if isinstance(m, nn.Linear)]) if ON else 0)
    assert linear_types(model) == {nn.Linear}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_steps_stay_within_16_bit_tolerance_of_torch(checkpoint, dtype):
    """Teacher-forced decode steps (one row: the kernel's case) against the same model on torch:
    within 4 ulps of the 16-bit type at each row's largest logit, the cross-CPU bound."""
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype=dtype)
    reference = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype=dtype)
    use_torch(reference)
    ids = torch.randint(0, 151000, (1, 40), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for m in (model, reference):
            m.cache = qwen.QWenCache(m.config)
            m(ids[:, :24], cache=m.cache, use_cache=True)
        for t in range(24, 40):
            got, want = (m(ids[:, t : t + 1], cache=m.cache, use_cache=True).logits[0, -1].float() for m in (model, reference))
            ulp = torch.finfo(dtype).eps * want.abs().max()
            worst = max(worst, ((got - want).abs().max() / ulp).item())
    assert worst <= 4, f"{worst:.2f} ulps"
    if ON:
        assert worst > 0 or dtype == torch.float16  # the kernel really ran (its sums differ from torch's)


def test_engine_runs_on_the_kernel_and_stays_greedy_consistent(checkpoint):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    use_torch(model)  # the engine turns it on itself
    tokenizer = qwen.QWenTokenizer.from_pretrained(checkpoint)
    engine = Engine(model, tokenizer, max_running=2)
    try:
        assert linear_types(engine.model) == ({KernelLinear} if ON else {nn.Linear})
        ids = qwen.make_context(tokenizer, "Tell me about the sea.")[1]
        first = engine.submit(ids, SamplingParams(max_new_tokens=12, do_sample=False)).result()
        again = engine.submit(ids, SamplingParams(max_new_tokens=12, do_sample=False)).result()
        assert len(first.token_ids) == 12 and first.token_ids == again.token_ids
    finally:
        engine.shutdown()


def gemm_path(monkeypatch, path) -> list:
    """Make KernelLinear's and the quantized layers' many-row products take `path`: "qwen" (our
    GEMM, the avx2 path's) or "torch" (F.linear on fp32 chunks); returns a list that counts the
    calls our GEMM ran."""
    calls = []
    if path == "qwen":
        # Any x86 CPU with a kernel runs the avx2 path, and the GEMM there (whatever gemm_runs says
        # of this CPU's own path: on Intel's AVX-512 paths it does not run).
        monkeypatch.setattr(kernels, "_level", 1)
        monkeypatch.setattr(kernels, "_gemm_here", True)

        def counted(real):
            def call(*args, **kwargs):
                y = real(*args, **kwargs)
                calls.append(y is not None)
                return y

            return call

        for module, name in ((kernels, "gemm"), (linear_module, "gemm"), (kernels, "int8_gemm"), (kernels, "int4_gemm")):
            monkeypatch.setattr(module, name, counted(getattr(module, name)))
    else:
        monkeypatch.setattr(kernels, "GEMM", False)
    return calls


@pytest.mark.skipif(not ON, reason="KernelLinear needs qwen.kernels")
@pytest.mark.parametrize("path", ["qwen", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_without_native_16_bit_products_multiplies_in_fp32(monkeypatch, dtype, path):
    """More rows than a decode step on a CPU whose torch emulates 16-bit products (ATEN_CPU_CAPABILITY
    =avx2 simulates one): our GEMM (widening as it packs), or the weight widened to fp32 a chunk at
    a time (4 chunks, the last partial) for F.linear; either way an fp32 product with the bias, one
    rounding."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(Q, "_NATIVE_GEMM", {})
    calls = gemm_path(monkeypatch, path)
    layer = nn.Linear(192, 200).to(dtype)
    layer.__class__ = KernelLinear
    layer.gemm_chunk = 64 * 192
    x = torch.randn(2, 40, 192, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    monkeypatch.setattr(Q, "_SCRATCH", threading.local())  # the scratch is first allocated under inference_mode
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():  # as generate() runs: the same scratch written outside inference_mode
        y = layer(x)
    assert torch.equal(y, first)
    assert y.shape == (2, 40, 200) and y.dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2 * 2.0 ** torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    assert ((y.float() - ref).abs() <= half_ulp + 1e-5 * ref.abs().max()).all()
    assert calls == ([True, True] if path == "qwen" else [])


def test_use_kernels_is_idempotent_and_leaves_other_layers(checkpoint):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    assert use_kernels(model) == 0  # already swapped (or nothing to do without the kernel)
    embedding = model.get_input_embeddings()
    assert type(embedding) is nn.Embedding


def test_switching_the_kernel_off_keeps_torch(checkpoint):
    script = ("import sys, qwen, torch; from torch import nn\n"
              "m = qwen.QWenLMHeadModel.from_pretrained(sys.argv[1], dtype='bfloat16')\n"
              "print(sorted({type(x).__name__ for x in m.modules() if isinstance(x, nn.Linear)}))")
    out = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True,
                         env=dict(os.environ, QWEN_KERNELS="off"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['Linear']"
