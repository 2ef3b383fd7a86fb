"""GPTQ checkpoints in the published layout (Qwen-*-Chat-Int4 / Int8) load through from_pretrained
with our own unpacking: no GPTQ library. The checkpoints are written here from known weights, with
the AutoGPTQ packing spelled out, so the test knows every dequantized weight exactly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import quantizable_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qwen
from qwen import QWenLMHeadModel, QWenTokenizer
from qwen.quantization import Int4Linear

GROUP = 128
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """A tiny chat model whose every linear input size is a multiple of 128 (fp16, as published)."""
    return quantizable_checkpoint(tmp_path_factory.mktemp("gptq") / "float")


def quantize_group(w: torch.Tensor, bits: int, symmetric: bool):
    """GPTQ's grid for one group of weights w [N, g] (round to nearest; GPTQ's error feedback is not
    what is tested here): fp16 scales, integer zeros, q in 0 .. 2^bits - 1."""
    top = (1 << bits) - 1
    if symmetric:
        scale = (w.abs().amax(dim=1) * 2 / top).half().float().clamp_min(1e-4)
        zero = torch.full_like(scale, (top + 1) // 2)
    else:
        low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((high - low) / top).half().float().clamp_min(1e-4)
        zero = torch.round(-low / scale).clamp(0, top)
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top)
    return q.long(), zero.long(), scale


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of `values` [R, C] packed along R: word i holds rows i*p .. i*p+p-1, lowest bits
    first (p = 32 / bits), the AutoGPTQ qweight packing."""
    per_word = 32 // bits
    rows, cols = values.shape
    words = torch.zeros(rows // per_word, cols, dtype=torch.int64)
    for j in range(per_word):
        words |= values[j::per_word].long() << (bits * j)
    return words.to(torch.int32)  # wraps bit 31 into the sign, as the int32 tensors in the files


def write_gptq(source, out, bits=4, checkpoint_format=None, shuffle_groups=False, symmetric=True, drop=None):
    """Quantize every block linear of the float checkpoint at `source` into the AutoGPTQ layout in
    `out`; returns {layer name: the exact float32 weight [N, K] the GPTQ tensors stand for}."""
    shutil.copytree(source, out)
    state = load_file(str(out / "model.safetensors"))
    expected = {}
    generator = torch.Generator().manual_seed(1)
    for key in [k for k in state if k.endswith(".weight") and any(k.endswith(f"{lin}.weight") for lin in LINEARS)]:
        name = key[: -len(".weight")]
        w = state.pop(key).float()  # [N, K]
        n, k = w.shape
        groups = k // GROUP
        g_idx = torch.arange(k) // GROUP
        if shuffle_groups:  # act-order: the groups are not in input order
            g_idx = g_idx[torch.randperm(k, generator=generator)]
        q = torch.zeros(n, k, dtype=torch.long)
        zeros, scales = torch.zeros(groups, n, dtype=torch.long), torch.zeros(groups, n)
        for j in range(groups):
            cols = (g_idx == j).nonzero().flatten()
            q[:, cols], zeros[j], scales[j] = quantize_group(w[:, cols], bits, symmetric)
        stored_zeros = zeros if checkpoint_format == "gptq_v2" else zeros - 1  # AutoGPTQ stores zero - 1
        state[f"{name}.qweight"] = pack_rows(q.t(), bits)  # [K * bits / 32, N]
        state[f"{name}.qzeros"] = pack_rows((stored_zeros & ((1 << bits) - 1)).t(), bits).t().contiguous()
        state[f"{name}.scales"] = scales.half()  # [groups, N]
        state[f"{name}.g_idx"] = g_idx.to(torch.int32)
        expected[name] = (q - zeros.t()[:, g_idx]).float() * scales.half().float().t()[:, g_idx]
    if drop:
        del state[drop]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"bits": bits, "group_size": GROUP, "damp_percent": 0.01,
                                     "desc_act": shuffle_groups, "static_groups": False, "sym": symmetric,
                                     "true_sequential": True, "model_name_or_path": None,
                                     "model_file_base_name": "model", "quant_method": "gptq"}
    if checkpoint_format:
        config["quantization_config"]["checkpoint_format"] = checkpoint_format
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return expected


def float_reference(source, expected):
    """The float model holding exactly the weights the GPTQ tensors stand for (fp32)."""
    model = QWenLMHeadModel.from_pretrained(source, dtype=torch.float32)
    qwen.kernels.linear.use_torch(model)
    with torch.no_grad():
        for name, w in expected.items():
            model.get_submodule(name).weight.copy_(w)
    return model.eval()


def test_published_int4_layout_loads_with_the_exact_weights(float_checkpoint, tmp_path):
    expected = write_gptq(float_checkpoint, tmp_path / "int4")
    model = QWenLMHeadModel.from_pretrained(tmp_path / "int4", dtype=torch.float32)
    assert model.qwen_quantization == "gptq-int4:128"
    for name, w in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == GROUP
        assert torch.equal(layer.dequantize(torch.float32), w), name
    # The rest of the model is the float checkpoint's (c_attn's bias included).
    ref = float_reference(float_checkpoint, expected)
    assert torch.equal(model.transformer.h[0].attn.c_attn.bias, ref.transformer.h[0].attn.c_attn.bias)
    text = " ".join(f"GPTQ weights {i}, exactly." for i in range(20))
    ids = torch.tensor([QWenTokenizer.from_pretrained(tmp_path / "int4").encode(text)])
    assert ids.shape[1] >= Int4Linear.large_m  # a prefill: the layers dequantize and use an fp32 GEMM
    with torch.no_grad():  # so the logits are the float model's
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)


def test_int4_chat_and_the_auto_class(float_checkpoint, tmp_path):
    write_gptq(float_checkpoint, tmp_path / "int4", symmetric=False)
    tokenizer = QWenTokenizer.from_pretrained(tmp_path / "int4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "int4", dtype=torch.bfloat16)
    assert isinstance(model.transformer.h[1].mlp.w2, Int4Linear)
    reply, history = model.chat(tokenizer, "你好", history=None, generation_config=model.generation_config,
                                max_new_tokens=8, do_sample=False)
    assert isinstance(reply, str) and history == [("你好", reply)]
    # As remote code (the files save_pretrained wrote beside the weights), in a process without qwen.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.bfloat16)\n"
        "assert not any(n == 'qwen' or n.startswith('qwen.') for n in sys.modules)\n"
        "print(type(m.transformer.h[1].mlp.w2).__name__, m.qwen_quantization)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "int4")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Int4Linear", "gptq-int4:128"]


@pytest.mark.parametrize("case", ["int8", "act_order", "gptq_v2"])
def test_other_layouts_give_the_exact_weights(float_checkpoint, tmp_path, case):
    """8 bits and act-order groups have no packed form yet: they load dequantized, exactly; the
    gptq_v2 format stores the real zeros."""
    options = {"int8": dict(bits=8, symmetric=False), "act_order": dict(shuffle_groups=True),
               "gptq_v2": dict(checkpoint_format="gptq_v2", symmetric=False)}[case]
    expected = write_gptq(float_checkpoint, tmp_path / case, **options)
    model = QWenLMHeadModel.from_pretrained(tmp_path / case, dtype=torch.float32)
    packed = []
    for name, w in expected.items():
        layer = model.get_submodule(name)
        got = layer.dequantize(torch.float32) if isinstance(layer, Int4Linear) else layer.weight
        assert torch.equal(got, w), name
        packed.append(isinstance(layer, Int4Linear))
    if case == "act_order":  # a layer with one group is in order anyway; the others are reordered
        assert packed == [w.shape[1] == GROUP for w in expected.values()] and not all(packed)
    else:
        assert all(packed) == (case == "gptq_v2") and any(packed) == (case == "gptq_v2")


def test_broken_gptq_checkpoints_are_clear_errors(float_checkpoint, tmp_path):
    write_gptq(float_checkpoint, tmp_path / "no_zeros", drop="transformer.h.1.mlp.w1.qzeros")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.w1 lacks qzeros"):
        QWenLMHeadModel.from_pretrained(tmp_path / "no_zeros")
    write_gptq(float_checkpoint, tmp_path / "no_ln", drop="transformer.ln_f.weight")
    with pytest.raises(ValueError, match=r"missing transformer\.ln_f\.weight"):
        QWenLMHeadModel.from_pretrained(tmp_path / "no_ln")
    write_gptq(float_checkpoint, tmp_path / "three_bits")
    config = json.loads((tmp_path / "three_bits" / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (tmp_path / "three_bits" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only 4 and 8 bits"):
        QWenLMHeadModel.from_pretrained(tmp_path / "three_bits")
    with pytest.raises(ValueError, match="already GPTQ-quantized"):
        QWenLMHeadModel.from_pretrained(tmp_path / "no_zeros", quantization="int8")
