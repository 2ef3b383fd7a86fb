"""Weight-only int8 / int4 layers (qwen/quantization.py): storage, numerics, loading, memory.

nice -n 5 .venv/bin/python -m pytest -q tests/test_quantization.py
.venv/bin/python tests/test_quantization.py [--threads 2]    # the timing table (see _benchmark)
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwen
import qwen.quantization as Q
from qwen.quantization import Int4Linear, Int8Linear, parse_quantization, quantize_model
from qwen.tools.tiny_checkpoint import build

GREEDY = {"do_sample": False, "max_new_tokens": 6}
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: a rounding is off by at most 2^-9 relative
FP32_EPS = 2.0**-23


def _weight(n, k, dtype=torch.bfloat16, seed=0):
    """A weight with the awkward cases: an all-zero row, a constant row, a constant group, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[1] = 0
    w[2] = 0.5
    w[3, :32] = -0.25
    w[4, 7] = 1.5
    return w.to(dtype)


def _linear(n, k, bias=True, dtype=torch.bfloat16, seed=0):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(n, k, torch.float32, seed))
        if bias:
            lin.bias.uniform_(-0.5, 0.5)
    return lin.to(dtype)


def _quantize(lin, kind):
    return Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, int(kind.split(":")[1]))


# -- storage and round trip ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_storage_and_round_trip(dtype):
    lin = _linear(96, 160, dtype=dtype)
    layer = Int8Linear.from_linear(lin)
    w = lin.weight.detach().float()
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (96, 160)
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (96,)
    assert torch.equal(layer.scale, w.abs().amax(dim=1) / 127)
    assert int(layer.qweight.abs().max()) == 127 and int(layer.qweight.min()) >= -127
    assert layer.scale[1] == 0 and not layer.qweight[1].any()  # an all-zero row stays exactly zero
    deq = layer.dequantize()
    assert torch.equal(deq, layer.qweight.float() * layer.scale[:, None])  # the canonical formula
    error = (deq - w).abs()
    # Half a step, plus the fp32 rounding of w / scale and of q * scale (an exact tie can land either way).
    assert (error <= layer.scale[:, None] / 2 * (1 + 1e-4) + FP32_EPS * w.abs()).all()
    assert torch.equal(layer.bias, lin.bias) and layer.bias.dtype == dtype


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_storage_and_round_trip(group_size):
    n, k = 80, 512
    lin = _linear(n, k, bias=False)
    layer = Int4Linear.from_linear(lin, group_size)
    assert layer.bias is None
    groups = k // group_size
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (n, k // 2)
    assert layer.scales.dtype == layer.mins.dtype == torch.float32
    assert layer.scales.shape == layer.mins.shape == (n, groups)
    w = lin.weight.detach().float().view(n, groups, group_size)
    assert torch.equal(layer.mins, w.amin(dim=2))
    assert torch.equal(layer.scales, (w.amax(dim=2) - w.amin(dim=2)) / 15)
    # The documented nibble order, element by element: low nibble = even k.
    kk = torch.arange(k)
    q = (layer.packed[:, kk // 2] >> (4 * (kk % 2)).to(torch.uint8)) & 0xF
    assert int(q.max()) <= 15
    product = q.float().view(n, groups, group_size) * layer.scales[..., None]
    expected = (product + layer.mins[..., None]).view(n, k)
    deq = layer.dequantize()
    # dequantize() fuses the multiply-add (one fp32 rounding instead of two): equal to an ulp of the terms.
    ulp = FP32_EPS * (product.abs() + layer.mins[..., None].abs()).view(n, k)
    assert ((deq - expected).abs() <= ulp).all()
    error = (deq.view(n, groups, group_size) - w).abs()
    step = layer.scales[..., None]
    assert (error <= step / 2 * (1 + 1e-4) + 4 * FP32_EPS * w.abs()).all()
    assert torch.equal(deq[1], torch.zeros(k)) and torch.equal(deq[2], torch.full((k,), 0.5))  # constant groups exact


# -- forward against the dequantized weight -------------------------------------------------


def _tolerance(x, layer, ref):
    """Bound of the difference to F.linear(x, dequantize(), bias) in fp32 for bf16 arithmetic:
    x rounded to bf16 (2^-9 |x|); the weights in 16 bits: int8 a bf16 scale times an exact q, one
    more rounding (2^-8 |w|); int4 scale, zero (or min) and their multiply-add each rounded, under
    6 x 2^-9 of the group's largest |w| (|q * scale| <= range <= 2 max|w|); the output and the bias
    add rounded to bf16 (2^-8 |y|)."""
    w = layer.dequantize().abs()
    if isinstance(layer, Int4Linear):
        n, k = w.shape
        w = w.view(n, -1, layer.group_size).amax(dim=2, keepdim=True).expand(-1, -1, layer.group_size).reshape(n, k)
        per_weight = 4 * BF16_EPS
    else:
        per_weight = 1.5 * BF16_EPS
    return per_weight * (x.abs().float() @ w.T) + BF16_EPS * ref.abs() + 1e-5


@pytest.mark.parametrize("kind", ["int8", "int4:32", "int4:128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (3,), (64,), (96,), (2, 5)], ids=["M1", "M3", "M64", "M96", "B2xT5"])
def test_forward_matches_dequantized_linear(kind, dtype, shape):
    n, k = 208, 256  # 208 rows: not a multiple of torch's 64-row blocks
    layer = _quantize(_linear(n, k, dtype=dtype), kind)
    x = torch.randn(*shape, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
    y = layer(x)
    assert y.shape == (*shape, n) and y.dtype == dtype
    assert ((y.float() - ref).abs() <= _tolerance(x, layer, ref)).all()
    if dtype == torch.float32 and x.numel() // k >= max(layer.large_m, layer.large_m_own):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # large M: an fp32 GEMM


@pytest.mark.parametrize("kind", ["int8", "int4:64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_paths_agree_whatever_m(kind, dtype):
    """Force the kernel path and the dequantize path (in 64-row chunks) for one input each."""
    layer = _quantize(_linear(208, 256, dtype=dtype), kind)
    x = torch.randn(5, 256).to(dtype)
    ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
    layer.large_m = layer.large_m_own = 10**9
    kernel = layer(x)
    layer.large_m, layer.large_m_own, layer.gemm_chunk = 0, 0, 64 * 256  # 64-row chunks: 4 of them, the last partial
    chunked = layer(x)
    del layer.large_m, layer.large_m_own, layer.gemm_chunk
    for y in (kernel, chunked):
        assert ((y.float() - ref).abs() <= _tolerance(x, layer, ref)).all()
    if dtype == torch.float32:
        torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)


def _one_rounding(y, ref):
    """y is ref (fp32) rounded once to y's dtype, up to fp32 summation order: within half a 16-bit
    ulp of ref plus 1e-5 of the row's largest value."""
    half_ulp = torch.finfo(y.dtype).eps / 2 * 2.0 ** torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    return ((y.float() - ref).abs() <= half_ulp + 1e-5 * ref.abs().amax(dim=-1, keepdim=True)).all()


def _emulated_16_bit(monkeypatch):
    """What a CPU without native 16-bit products decides (ATEN_CPU_CAPABILITY=avx2 simulates one)."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(Q, "_NATIVE_GEMM", {})


def test_gemm_dtype_follows_the_cpu(monkeypatch):
    assert Q.gemm_dtype(torch.float32, "cpu") == torch.float32
    assert Q.gemm_dtype(torch.bfloat16, "meta") == torch.bfloat16  # only CPU products are widened
    native = {dt: Q.gemm_dtype(dt, "cpu") == dt for dt in (torch.bfloat16, torch.float16)}
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default")
    assert native[torch.bfloat16] == (
        (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) and not capped)
    _emulated_16_bit(monkeypatch)
    assert Q.gemm_dtype(torch.bfloat16, "cpu") == Q.gemm_dtype(torch.float16, "cpu") == torch.float32


@pytest.mark.parametrize("path", ["qwen", "torch"])
@pytest.mark.parametrize("kind", ["int8", "int4:64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_m_multiplies_in_fp32_without_native_16_bit_products(monkeypatch, kind, dtype, path):
    """Prefill on such a CPU: the weights dequantized to fp32 (ours: as it packs them; torch's: in
    64-row chunks here, for F.linear), an fp32 GEMM with the bias, one rounding to the activations'
    dtype."""
    from qwen import kernels
    from tests.test_cpu_kernels import gemm_path

    if path == "qwen" and kernels.backend() == "torch":
        pytest.skip("our GEMM needs qwen.kernels")
    _emulated_16_bit(monkeypatch)
    calls = gemm_path(monkeypatch, path)
    layer = _quantize(_linear(208, 256, dtype=dtype), kind)
    layer.gemm_chunk = 64 * 256
    x = torch.randn(3, 70, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
    y = layer(x)
    assert y.shape == (3, 70, 208) and y.dtype == dtype
    assert _one_rounding(y, ref)
    assert calls == ([True] if path == "qwen" else [])


@pytest.mark.parametrize("kind", ["int8", "int4:128"])
def test_our_gemm_takes_over_from_large_m_gemm_rows(monkeypatch, kind):
    """Where qwen.kernels' GEMM runs (the avx2 path), calls of large_m_gemm rows or more use it rather
    than the GEMV kernel's 16-row chunks; fewer rows stay on the GEMV kernel."""
    from qwen import kernels
    from tests.test_cpu_kernels import gemm_path

    if kernels.backend() == "torch":
        pytest.skip("qwen.kernels is not built here")
    _emulated_16_bit(monkeypatch)
    calls = gemm_path(monkeypatch, "qwen")
    layer = _quantize(_linear(64, 256), kind)
    assert layer.large_m_gemm < layer.large_m_own
    for rows in (layer.large_m_gemm - 1, layer.large_m_gemm):
        calls.clear()
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        y = layer(x)
        assert calls == ([True] if rows == layer.large_m_gemm else []), rows
        ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
        if calls:
            assert _one_rounding(y, ref)
        else:
            torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02)
    assert kernels.gemm_runs()
    monkeypatch.setattr(kernels, "GEMM", False)
    assert not kernels.gemm_runs()


def test_int4_without_torch_kernel_uses_dequantize(monkeypatch):
    """N not a multiple of 16: torch's int4 packing refuses it, so without qwen.kernels the layer
    always dequantizes."""
    monkeypatch.setattr(Q, "_own_kernels", lambda weight: None)  # torch's kernels only
    layer = Int4Linear.from_linear(_linear(40, 128), 64)
    assert layer.packed_cpu is None
    x = torch.randn(1, 128).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.dequantize(), layer.bias.float())
    assert ((layer(x).float() - ref).abs() <= _tolerance(x, layer, ref)).all()


def test_chunked_quantization_and_packing_equal_one_shot(monkeypatch):
    monkeypatch.setattr(Q, "_own_kernels", lambda weight: None)  # torch's packed copy is built
    lin = _linear(208, 256)
    whole = Int4Linear.from_linear(lin, 32)
    whole8 = Int8Linear.from_linear(lin)
    monkeypatch.setattr(Q, "_CHUNK_ELEMENTS", 64 * 256)  # 64-row chunks: 4 of them, the last partial
    chunked = Int4Linear.from_linear(lin, 32)
    chunked8 = Int8Linear.from_linear(lin)
    for name in ("packed", "scales", "mins", "packed_cpu", "scale_zeros"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert torch.equal(whole8.qweight, chunked8.qweight) and torch.equal(whole8.scale, chunked8.scale)
    assert torch.equal(whole.dequantize(), chunked.dequantize())


@pytest.mark.parametrize("kind", ["int8", "int4:64"])
def test_state_dict_is_canonical_and_reloads(kind):
    layer = _quantize(_linear(64, 128), kind)
    state = layer.state_dict()
    expected = {"qweight", "scale", "bias"} if kind == "int8" else {"packed", "scales", "mins", "bias"}
    assert set(state) == expected
    fresh = Int8Linear(128, 64) if kind == "int8" else Int4Linear(128, 64, group_size=64)
    fresh.load_state_dict(state)  # rebuilds the backend copies
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("kind", ["int8", "int4:64"])
def test_model_dtype_changes_keep_float32_scales(kind):
    layer = _quantize(_linear(64, 128), kind)
    names = ("scale",) if kind == "int8" else ("scales", "mins")
    before = {name: getattr(layer, name).clone() for name in names}
    layer.to(torch.bfloat16).float()  # would round the scales through bf16 if they followed the model
    for name in names:
        assert getattr(layer, name).dtype == torch.float32 and torch.equal(getattr(layer, name), before[name])
    assert layer.bias.dtype == torch.float32
    x = torch.randn(3, 128)
    ref = F.linear(x, layer.dequantize(), layer.bias)
    assert ((layer(x) - ref).abs() <= _tolerance(x, layer, ref)).all()


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, group_size, message",
    [
        ("int3", None, "unknown quantization 'int3'"),
        ("fp8", None, "unknown quantization 'fp8'"),
        (8, None, "unknown quantization 8"),
        ("int4:48", None, "group size must be one of 32, 64, 128, 256, got 48"),
        ("int4:big", None, "group size must be one of .*'big'"),
        ("int4", 100, "group size must be one of .*got 100"),
        ("int4", "64", "group size must be one of .*'64'"),
        ("int4:64", 128, "disagree"),
        ("int8", 64, "int8 .* takes no group size"),
        ("int8:64", None, "int8 .* takes no group size"),
    ],
)
def test_bad_quantization_arguments(method, group_size, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization(method, group_size)
    with pytest.raises(ValueError, match=message):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), method, group_size=group_size)


def test_parse_quantization_forms():
    assert parse_quantization("int8") == ("int8", None)
    assert parse_quantization("int4") == ("int4", Q.DEFAULT_GROUP_SIZE)
    assert parse_quantization(" INT4:64 ") == ("int4", 64)
    assert parse_quantization("int4", 32) == ("int4", 32)
    assert parse_quantization("int4:32", 32) == ("int4", 32)


def test_layer_level_errors():
    with pytest.raises(ValueError, match="group size 64 does not divide the layer's input size 96"):
        Int4Linear.from_linear(nn.Linear(96, 32), 64)
    bad = nn.Linear(64, 32)
    with torch.no_grad():
        bad.weight[3, 5] = float("nan")
    for make in (Int8Linear.from_linear, lambda lin: Int4Linear.from_linear(lin, 32)):
        with pytest.raises(ValueError, match="inf or nan"):
            make(bad)


# -- whole models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny chat checkpoint with the real vocabulary whose input sizes (192, 512) 64 divides."""
    return build(tmp_path_factory.mktemp("quant") / "chat", chat=True, hidden_size=192, heads=3, layers=2)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return qwen.QWenTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return torch.tensor([tokenizer.encode("Weight-only quantization keeps the activations in floating point.")])


def _last_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0, -1].float()


def _linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


# Cosine similarity of the last logits to the float model. int8: > 0.99 (the brief's bound; measured
# 0.9998-0.9999 on three seeds, bf16 and fp32). int4, group 64, min-max: a Gaussian group of 64 spans
# ~4.8 sigma, so a step is ~0.32 sigma and the rounding error ~0.09 sigma rms: each layer's output
# keeps a cosine of ~0.996, and the eleven layers on the way to the logits compound to ~0.98
# (measured 0.972-0.984 on three seeds, 0.983 for this checkpoint). 0.95 leaves room for another
# machine's kernels while a wrong nibble order or scale layout (cosine ~0) still fails.
COSINE_BOUND = {"int8": 0.99, "int4:64": 0.95}


@pytest.mark.parametrize("kind", ["int8", "int4:64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_pretrained_quantizes_every_linear_layer(checkpoint, prompt, kind, dtype):
    plain = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype=dtype).eval()
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype=dtype, quantization=kind).eval()
    cls = Int8Linear if kind == "int8" else Int4Linear
    names = _linear_names(plain)
    assert len(names) == 2 * 5 + 1
    for name in names:
        assert type(model.get_submodule(name)) is cls, name
    assert not _linear_names(model) and model.qwen_quantization == kind
    assert type(model.transformer.wte) is nn.Embedding and model.transformer.wte.weight.dtype == dtype
    assert model.dtype == dtype

    # Decode-sized (kernel) and prefill-sized (dequantize) calls against the float model.
    large = max(Int8Linear.large_m, Int4Linear.large_m, Int8Linear.large_m_own, Int4Linear.large_m_own)
    long_prompt = prompt.repeat(1, 1 + large // prompt.shape[1])
    assert long_prompt.shape[1] >= max(cls.large_m, cls.large_m_own)
    for ids in (prompt, long_prompt):
        ref, got = _last_logits(plain, ids), _last_logits(model, ids)
        assert F.cosine_similarity(ref, got, dim=0) > COSINE_BOUND[kind]

    out = model.generate(prompt, **GREEDY)
    assert out.shape == (1, prompt.shape[1] + GREEDY["max_new_tokens"])
    assert torch.equal(out[:, : prompt.shape[1]], prompt)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_chat(checkpoint, tokenizer, kind):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization=kind).eval()
    response, history = model.chat(tokenizer, "Hello!", history=None, **GREEDY)
    assert isinstance(response, str) and history == [("Hello!", response)]
    again, _ = model.chat(tokenizer, "Hello!", history=None, **GREEDY)
    assert again == response  # greedy decoding through the int kernels is deterministic


def test_default_group_size_falls_back_per_layer(checkpoint, caplog):
    """Without a group size, int4 uses 128 where it divides a layer's input size (mlp.c_proj: 512)
    and the largest of 64/32 that does elsewhere (hidden 192 -> 64): every layer is quantized."""
    with caplog.at_level("WARNING", logger="qwen.quantization"):
        model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int4")
    assert not _linear_names(model)
    groups = {name: module.group_size for name, module in model.named_modules() if isinstance(module, Int4Linear)}
    assert groups["transformer.h.0.mlp.c_proj"] == Q.DEFAULT_GROUP_SIZE == 128
    assert groups["transformer.h.0.attn.c_attn"] == groups["lm_head"] == 64
    assert model.qwen_quantization == "int4:128/64"
    assert not [r for r in caplog.records if r.name == "qwen.quantization"]


def test_group_size_that_does_not_divide_leaves_layers_float(checkpoint, caplog):
    """Group 128 does not divide hidden 192: those layers stay nn.Linear, one warning names them;
    mlp.c_proj (input 512) is quantized."""
    with caplog.at_level("WARNING", logger="qwen.quantization"):
        model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int4:128")
    assert model.qwen_quantization == "int4:128"
    assert [type(block.mlp.c_proj) for block in model.transformer.h] == [Int4Linear, Int4Linear]
    left = _linear_names(model)
    assert len(left) == 2 * 4 + 1 and "lm_head" in left
    warnings = [r.getMessage() for r in caplog.records if r.name == "qwen.quantization"]
    assert len(warnings) == 1 and "left unquantized" in warnings[0] and "9 linear layer(s)" in warnings[0]


def test_bad_quantization_fails_before_loading(checkpoint, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(qwen.QWenPreTrainedModel, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int2")
    with pytest.raises(ValueError, match="group size"):
        qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int4:100")


REMOTE_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, quantization="int8").eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits[0, -1].float()
print(json.dumps({"layer": type(model.transformer.h[0].mlp.w1).__module__ + "." + type(model.transformer.h[0].mlp.w1).__name__,
                  "logits": logits.tolist(),
                  "qwen_imported": any(m == "qwen" or m.startswith("qwen.") for m in sys.modules)}))
"""


def test_quantization_ships_with_the_remote_code(checkpoint, prompt, tmp_path, monkeypatch):
    """quantization.py is one of the remote-code files save_pretrained writes: a saved checkpoint
    quantizes on load through transformers' remote code, without the qwen package (so on torch's
    kernels: compared with the local model on torch's kernels too)."""
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "quantization.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "saved"), json.dumps(prompt.tolist())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["layer"].startswith("transformers_modules") and remote["layer"].endswith("quantization.Int8Linear")
    assert remote["qwen_imported"] is False
    monkeypatch.setattr(Q, "_own_kernels", lambda weight: None)
    local = _last_logits(qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int8"), prompt)
    torch.testing.assert_close(torch.tensor(remote["logits"]), local, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4:64"])
def test_quantize_model_frees_the_float_weights(checkpoint, kind):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint).eval()
    names = _linear_names(model)
    weights = [weakref.ref(model.get_submodule(name).weight) for name in names]
    float_bytes = sum(model.get_submodule(name).weight.nbytes for name in names)
    before = sum(p.nbytes for p in model.parameters())
    quantize_model(model, kind)
    gc.collect()
    assert all(ref() is None for ref in weights)  # nothing holds the float weights any more
    assert sum(p.nbytes for p in model.parameters()) == before - float_bytes  # biases and the rest remain
    # What the quantized layers hold instead, canonical and backend copies together: int8 1 byte per
    # weight + 4 (scale) + 2 (bf16 scale) per row; int4 2 x 0.5 byte per weight + 4 + 4 + 2 + 2 per group
    # with torch's packed copy, 0.5 byte + 4 + 4 per group on qwen.kernels (no copy).
    own = Q._own_kernels(torch.empty(0)) is not None
    held = expected = 0
    for name in names:
        layer = model.get_submodule(name)
        held += sum(b.nbytes for b in layer.buffers())
        n, k = layer.out_features, layer.in_features
        if kind == "int8":
            expected += n * k + 6 * n
        else:
            expected += n * k // 2 + n * (k // 64) * 8 if own else n * k + n * (k // 64) * 12
    assert held == expected


def test_quantize_model_in_memory_matches_from_pretrained(checkpoint, prompt):
    model = quantize_model(qwen.QWenLMHeadModel.from_pretrained(checkpoint).eval(), "int4", group_size=64)
    loaded = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization="int4:64").eval()
    assert torch.equal(_last_logits(model, prompt), _last_logits(loaded, prompt))


# -- timing table (not a test) ----------------------------------------------------------------


def _benchmark(threads=2, repeats=15):
    """One layer's forward at M = 1, 8, 512 rows, bf16 activations: bf16 F.linear, the int8 and int4
    torch kernels, qwen.kernels' (None where it does not run: the time of a no-op) and the
    dequantize + F.linear path. The cases run round-robin (a burst of other
    work on a shared machine hits them all); prints median ms, min ms and GB/s = weight (and scale)
    bytes read / median time."""
    import statistics
    import time

    from qwen.machine import describe

    torch.set_num_threads(threads)
    print(describe())
    big = torch.ones(1 << 26)  # 256 MB of fp32
    big.sum()
    start = time.perf_counter()
    for _ in range(5):
        big.sum()
    print(f"memory read (fp32 sum, 256 MB): {5 * big.nbytes / (time.perf_counter() - start) / 1e9:.1f} GB/s")
    del big

    for n, k in ((11008, 2048), (2048, 2048)):
        lin = _linear(n, k, bias=False)
        w = lin.weight.detach()
        q8 = Int8Linear.from_linear(lin)
        q4 = {g: Int4Linear.from_linear(lin, g) for g in (32, 64, 128)}
        for layer in q4.values():  # torch's packed copy too, for its kernel
            layer._own_kernel_runs = lambda: False
            layer.refresh_backend()
        cases = {
            "bf16 F.linear": (lambda x, w=w: F.linear(x, w), n * k * 2),
            "int8 kernel": (q8._kernel, n * k + n * 2),
            "int8 qwen.kernels": (q8._qwen_kernel, n * k + n * 4),
            "int8 dequant+linear": (q8._dequantized_linear, n * k + n * 4),
        }
        for g, layer in q4.items():
            cases[f"int4 g{g} kernel"] = (layer._kernel, n * k // 2 + n * k // g * 4)
            cases[f"int4 g{g} qwen.kernels"] = (layer._qwen_kernel, n * k // 2 + n * k // g * 8)
        for g, layer in q4.items():
            cases[f"int4 g{g} dequant+linear"] = (layer._dequantized_linear, n * k // 2 + n * k // g * 8)
        cells = {name: [] for name in cases}
        for m in (1, 8, 512):
            x = torch.randn(m, k).to(torch.bfloat16)
            times = {name: [] for name in cases}
            for _ in range(repeats + 1):
                for name, (fn, _) in cases.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
            for name, (_, nbytes) in cases.items():
                median, low = statistics.median(times[name][1:]) * 1e3, min(times[name][1:]) * 1e3
                cells[name].append(f"{median:7.2f} {low:7.2f} {nbytes / median / 1e6:5.1f}")
        print(f"\n{n}x{k}: median ms, min ms, GB/s  at M = 1 | 8 | 512")
        for name, row in cells.items():
            print(f"  {name:25s}" + " |".join(row), flush=True)


if __name__ == "__main__":
    _benchmark(threads=int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2)


@pytest.mark.parametrize("in_features", [8, 24, 170])
def test_int8_rows_not_a_multiple_of_16_stay_exact(in_features):
    """torch's int8 kernel misreads rows whose length is not a multiple of 16 (wrong sums, or a
    crash); such layers take the dequantizing path and match it."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48, bias=True).to(torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    for rows in (1, 3):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        want = F.linear(x.float(), layer.dequantize(), layer.bias.float())
        got = layer(x).float()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


# -- qwen.kernels' int8 / int4 kernels in the model ---------------------------------------------

OWN = Q._own_kernels(torch.empty(0)) is not None


@pytest.mark.skipif(not OWN, reason="qwen.kernels does not run here (QWEN_KERNELS=off, no extension or not x86)")
@pytest.mark.parametrize("kind", ["int8", "int4:64", "int4:32"])
def test_own_kernels_agree_with_torch_kernels(checkpoint, tokenizer, kind, monkeypatch):
    """Greedy tokens on qwen.kernels (decode steps: 1 row) and on torch's weight-only kernels agree
    on a few prompts; the layers read the canonical buffers (int4: no torch copy is built)."""
    ours = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization=kind).eval()
    layer = ours.transformer.h[0].mlp.w1
    if kind.startswith("int4"):
        assert layer.packed_cpu is None and layer._KERNEL_TENSORS == ("packed", "scales", "mins")
    else:
        assert layer._KERNEL_TENSORS == ("qweight", "scale")
    monkeypatch.setattr(Q, "_own_kernels", lambda weight: None)
    theirs = qwen.QWenLMHeadModel.from_pretrained(checkpoint, quantization=kind).eval()
    monkeypatch.undo()
    greedy = {"do_sample": False, "max_new_tokens": 8}
    for text in ("Weight-only quantization keeps the activations in floating point.", "Hello!",
                 "The sea is calm tonight; the tide is full"):
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            assert torch.equal(ours.generate(ids, **greedy), theirs.generate(ids, **greedy)), text


@pytest.mark.skipif(not OWN, reason="qwen.kernels does not run here")
@pytest.mark.parametrize("kind", ["int8", "int4:64"])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_own_kernels_match_the_dequantized_weight(kind, rows):
    """Layers on qwen.kernels against the fp32 product with dequantize(): x rounded to bf16 for the
    kernel, fp32 sums, one bf16 rounding (the bias inside it); more than MAX_ROWS rows go in chunks."""
    layer = _quantize(_linear(208, 256), kind)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    ref = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    y = layer(x)
    assert rows < layer.large_m_own and y.dtype == torch.bfloat16
    size = x.double().abs() @ layer.dequantize().double().abs().T + layer.bias.double().abs()
    if kind != "int8":  # int4: the terms are |q| * scale + |min|
        n, k, g = 208, 256, layer.group_size
        q = layer._unpack_rows(0, n).view(n, -1, g).double()
        terms = (q * layer.scales.double()[..., None] + layer.mins.double()[..., None].abs()).view(n, k)
        size = x.double().abs() @ terms.T + layer.bias.double().abs()
    bound = BF16_EPS * ref.abs() + 3 * (256 + 64) * FP32_EPS / 2 * size + 1e-38  # u = 2^-8: 8 significant bits
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("method", ["int8", "int4:64"])
def test_training_through_a_frozen_quantized_layer_gives_the_float_gradients(method):
    """Q-LoRA trains adapters around frozen quantized layers: with grad enabled the layer's output and
    the gradient for its input are those of the dequantized weight (fp32), for prefill-size and
    decode-size calls alike (the kernels and the scratch buffer know no autograd)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192, bias=True)
    layer = quantize_model(torch.nn.Sequential(linear), method)[0]
    w = layer.dequantize(torch.float32)
    for rows in (3, 200):
        x = torch.randn(rows, 256, requires_grad=True)
        y = layer(x)
        (y * torch.arange(192.0)).sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = torch.nn.functional.linear(x_ref, w, layer.bias)
        (y_ref * torch.arange(192.0)).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
