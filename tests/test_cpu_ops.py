"""The decode-step ops of qwen/kernels/cpu_ops.cpp (attention over the cache for a few new queries,
RMSNorm, rotary) on every vector path this CPU offers, against float64 references or torch's own
ops, and their use by the model."""

import copy
import math
import pickle

import pytest
import torch

import qwen
from qwen import kernels
from qwen.kernels.linear import use_kernels, use_torch
from qwen.modeling_qwen import QWenAttention, QWenRMSNorm, apply_rotary
from qwen.tools.tiny_checkpoint import build

from test_kernels import OFFERED

ON = kernels.backend() != "torch"
needs_kernels = pytest.mark.skipif(not ON, reason="qwen.kernels does not run here (QWEN_KERNELS=off or no build)")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def reference(q, k, v, bias=None, causal=False):
    """float64 attention, [B, T, H * d]."""
    B, H, T, d = q.shape
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.double()
    if causal:
        L = k.shape[2]
        allowed = torch.arange(L)[None, :] <= torch.arange(T)[:, None] + (L - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.double()
    return out.transpose(1, 2).reshape(B, T, H * d)


def bound(dtype, want):
    """The output is rounded once to `dtype`: half an ulp of the largest value, plus fp32 slack."""
    return (torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6) * (want.abs().max().item() + 1)


# (B, H, T, L, d): a decode step of Qwen's head size; several queries; head sizes not a multiple
# of 8 or 16 lanes; one key; as many queries as the kernel takes.
SHAPES = [(1, 16, 1, 80, 128), (2, 3, 5, 37, 20), (1, 2, 16, 16, 7), (3, 1, 1, 1, 33), (1, 4, 16, 300, 64)]


@needs_kernels
@pytest.mark.parametrize("level", OFFERED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_float64(level, dtype, shape):
    B, H, T, L, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(B, H, T, d, generator=g).to(dtype)
    # keys and values as views of a larger cache buffer (capacity beyond the cached length)
    k = torch.randn(B, H, L + 9, d, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(B, H, L + 9, d, generator=g).to(dtype)[:, :, :L]
    want = reference(q, k, v)
    got = kernels._attention_at(q, k, v, None, False, d ** -0.5, level)
    assert got.dtype == dtype and got.shape == (B, T, H * d)
    assert (got.double() - want).abs().max().item() <= bound(dtype, want)

    bias = torch.randn(B, 1, T, L, generator=g) * 4  # broadcast over heads
    bias[..., 0] = torch.finfo(torch.float32).min  # a masked key, as the serving engine's bias has
    want = reference(q, k, v, bias)
    got = kernels._attention_at(q, k, v, bias.to(dtype) if dtype != torch.float32 else bias, False, d ** -0.5, level)
    assert (got.double() - want).abs().max().item() <= bound(dtype, want) * 2

    if T <= L:
        want = reference(q, k, v, causal=True)
        got = kernels._attention_at(q, k, v, None, True, d ** -0.5, level)
        assert (got.double() - want).abs().max().item() <= bound(dtype, want)


@needs_kernels
def test_attention_declines_what_it_does_not_take():
    q = torch.randn(1, 2, 17, 8, dtype=torch.bfloat16)  # more queries than MAX_ROWS
    k = torch.randn(1, 2, 20, 8, dtype=torch.bfloat16)
    assert kernels.attention(q, k, k) is None
    q = torch.randn(1, 2, 1, 8, dtype=torch.bfloat16)
    assert kernels.attention(q, k.float(), k.float()) is None  # mixed dtypes
    assert kernels.attention(q, k, k, bias=torch.zeros(1, 1, 1, 19)) is None  # wrong bias length
    leaf = q.clone().requires_grad_()
    assert kernels.attention(leaf, k, k) is None  # autograd would have nothing to record with
    with torch.no_grad():
        assert kernels.attention(leaf, k, k) is not None


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rounds_as_torch(dtype):
    norm = QWenRMSNorm(2048, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(5, 3, 2048, generator=torch.Generator().manual_seed(2)).to(dtype) * 3
        want = norm(x)
        got = kernels.rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # Only the summation order of the mean differs: in 16 bits one rounding step apart, rarely (in
    # fp32 a row's factor may differ in its last bit, and with it the whole row).
    diff = (got.float() - want.float()).abs()
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert (diff <= 2 * ulp).all()
    if dtype != torch.float32:
        assert (diff == 0).float().mean() > 0.99
    assert kernels.rms_norm(x, norm.weight.float() if dtype != torch.float32 else norm.weight.half(), 1e-6) is None


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [32, 16])  # full rotary, and rotary_pct < 1 (the rest copied)
def test_rotary_qk_equals_apply_rotary_bit_for_bit(dtype, rot):
    B, T, H, d = 2, 3, 2, 32
    g = torch.Generator().manual_seed(rot)
    qkv = torch.randn(B, T, 3 * H * d, generator=g).to(dtype)
    for rows in (B, 1):  # per-row tables (the serving engine) and one shared table
        cos, sin = torch.randn(rows, 1, T, rot, generator=g), torch.randn(rows, 1, T, rot, generator=g)
        q, k, _ = (t.view(B, T, H, d).transpose(1, 2) for t in qkv.split(H * d, dim=2))
        got_q, got_k = kernels.rotary_qk(qkv, cos, sin, H, d)
        assert torch.equal(got_q, apply_rotary(q, cos, sin)) and torch.equal(got_k, apply_rotary(k, cos, sin))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ops") / "chat", chat=True, dtype="bfloat16")


@needs_kernels
def test_the_model_uses_the_ops_and_use_torch_removes_them(checkpoint):
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    ops_modules = [m for m in model.modules() if isinstance(m, (QWenRMSNorm, QWenAttention))]
    assert ops_modules and all(m._cpu_ops for m in ops_modules)
    copied = copy.deepcopy(model)  # a flag, not the extension module, is kept on the modules
    assert all(m._cpu_ops for m in copied.modules() if isinstance(m, (QWenRMSNorm, QWenAttention)))
    pickle.loads(pickle.dumps(model))
    use_torch(model)
    assert not any(m._cpu_ops for m in ops_modules)
    use_kernels(model)
    assert all(m._cpu_ops for m in ops_modules)


@needs_kernels
def test_generation_with_the_ops_follows_torch(checkpoint, block_decodes, plans):
    """Greedy decoding (prefill on torch, decode steps through the ops, in C++ blocks): the first
    tokens agree with the torch-only model (tiny random weights: later near-ties may differ in 16-bit)."""
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    reference = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16")
    use_torch(reference)
    ids = torch.randint(0, 151000, (2, 20), generator=torch.Generator().manual_seed(3))  # > 16: a torch prefill
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    layers = len(model.transformer.h)
    assert block_decodes == [(1, "run")] * 7 * layers  # decode steps only: the prefill took the modules
    assert plans == [True] * 7 * layers
    want = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert not block_decodes[7 * layers:] and not plans[7 * layers:]  # use_torch: no ops at all
    assert torch.equal(got[:, : 20 + 4], want[:, : 20 + 4])


def _steps(model, ids, steps, attention_mask=None):
    """Logits of a prefill and `steps` greedy decode steps (one model call each), concatenated."""
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attention_mask, use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for _ in range(steps):
            ids = out.logits[:, -1:].argmax(-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(ids)], dim=1)
            out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.fixture
def block_decodes(monkeypatch):
    """Each block's module-free decode step, in order: (new tokens, "run") for a block that
    QWenModel._run_blocks ran (in one C++ call with the blocks before it), (new tokens, "block") for
    one that QWenBlock.decode ran."""
    from qwen.modeling_qwen import QWenBlock, QWenModel

    calls = []
    real_run, real_decode = QWenModel._run_blocks, QWenBlock.decode

    def running(self, hidden_states, *args):
        out, done = real_run(self, hidden_states, *args)
        calls.extend([(hidden_states.shape[1], "run")] * done)
        return out, done

    def decoding(self, hidden_states, *args, **kwargs):
        calls.append((hidden_states.shape[1], "block"))
        return real_decode(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(QWenModel, "_run_blocks", running)
    monkeypatch.setattr(QWenBlock, "decode", decoding)
    return calls


def _without_run_blocks(monkeypatch):
    """Decode steps block by block (QWenBlock.decode), as where kernels.run_blocks does not apply."""
    from qwen.modeling_qwen import QWenModel

    monkeypatch.setattr(QWenModel, "_run_blocks", lambda self, hidden_states, *args: (hidden_states, 0))


@pytest.fixture
def plans(monkeypatch):
    """What kernels.block_plan gave QWenBlock.decode, a bool per block and step (True: the C++ step)."""
    given = []
    real = kernels.block_plan

    def recording(block):
        plan = real(block)
        given.append(plan is not None)
        return plan

    monkeypatch.setattr(kernels, "block_plan", recording)
    return given


def _from(checkpoint, weights):
    """The test checkpoint in bf16 or fp16, or quantized to int8 / int4 (bf16 activations)."""
    if weights in ("int8", "int4"):
        return qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16", quantization=weights).eval()
    return qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype=weights).eval()


@needs_kernels
@pytest.mark.parametrize("weights", ["bfloat16", "float16", "int8", "int4"])
@pytest.mark.parametrize("batch, prompt, padded", [(1, 4, False), (2, 20, False), (2, 5, True)])
def test_decode_path_is_bit_for_bit_the_module_path(checkpoint, block_decodes, plans, monkeypatch, weights, batch,
                                                    prompt, padded):
    """QWenModel runs decode steps (<= 16 new tokens, 16-bit) without the modules: all blocks in one
    C++ call that also stores their keys and values (kernels.run_blocks), or block by block
    (QWenBlock.decode) in C++ or, without it, calling the same ops from Python, in the same order as
    the modules' forward: the logits are identical all four ways. A 4-token prompt on an empty cache
    takes the block-by-block path (causal); a 20-token one takes the modules; a left-padded batch
    takes the decode path with its padding mask."""
    from qwen.modeling_qwen import QWenModel

    model = _from(checkpoint, weights)
    layers = len(model.transformer.h)
    ids = torch.randint(0, 151000, (batch, prompt), generator=torch.Generator().manual_seed(5))
    mask = None
    if padded:
        mask = torch.ones(batch, prompt, dtype=torch.long)
        mask[0, :2] = 0
    fast = _steps(model, ids, 6, attention_mask=mask)
    assert block_decodes == ([(prompt, "block")] if prompt <= 16 else []) * layers + [(1, "run")] * 6 * layers
    assert plans and all(plans)  # every block's every step in C++
    _without_run_blocks(monkeypatch)
    assert torch.equal(fast, _steps(model, ids, 6, attention_mask=mask))
    monkeypatch.setattr(kernels, "block_plan", lambda block: None)
    assert torch.equal(fast, _steps(model, ids, 6, attention_mask=mask))
    monkeypatch.setattr(QWenModel, "_decode_writers", lambda *args: None)
    assert torch.equal(fast, _steps(model, ids, 6, attention_mask=mask))


@needs_kernels
def test_cpp_run_of_the_blocks_grows_crops_and_reorders_the_cache_as_the_modules(checkpoint, block_decodes,
                                                                               monkeypatch):
    """kernels.run_blocks stores keys and values into the plain cache's buffers itself: past the
    end of a buffer (max_length 21 after a 20-token prompt: it grows at every step), after crop and
    after reorder_cache (no longer a prefix view: a fresh buffer), the logits equal the modules'."""
    from qwen.modeling_qwen import QWenCache, QWenModel

    model = _from(checkpoint, "bfloat16")
    ids = torch.randint(0, 151000, (2, 20), generator=torch.Generator().manual_seed(11))

    def run():
        cache, logits = QWenCache(model.config, max_length=21), []
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            for step in range(6):
                if step == 3:
                    cache.crop(-1)
                if step == 4:
                    cache.reorder_cache(torch.tensor([1, 0]))
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, dim=1), cache.get_seq_length()

    fast, length = run()
    assert length == 25 and block_decodes == [(1, "run")] * 6 * len(model.transformer.h)
    monkeypatch.setattr(QWenModel, "_decode_writers", lambda *args: None)
    want, _ = run()
    assert torch.equal(fast, want)


@needs_kernels
def test_a_cpp_step_that_declines_midway_hands_over_to_the_modules(checkpoint, plans, block_decodes, monkeypatch):
    """An fp16 model with one int8 layer (the int8 kernel takes bf16 activations only): that block's
    C++ step declines after the attention, and the modules finish it (the C++ run of the blocks
    stops there: the rest go block by block); the logits equal the module path's."""
    from qwen.modeling_qwen import QWenModel
    from qwen.quantization import Int8Linear

    model = _from(checkpoint, "float16")
    block = model.transformer.h[1]
    block.mlp.w1 = Int8Linear.from_linear(block.mlp.w1)
    ids = torch.randint(0, 151000, (2, 5), generator=torch.Generator().manual_seed(8))
    calls = []
    real = type(block.attn).decode_attend

    def counting(self, *args):
        calls.append(self.layer_idx)
        return real(self, *args)

    monkeypatch.setattr(type(block.attn), "decode_attend", counting)
    fast = _steps(model, ids, 3)
    assert plans and all(plans)
    assert calls == [1] * 4  # the prompt and 3 steps: block 1 only, from the attention on
    layers = len(model.transformer.h)  # each step: blocks 0 and 1 in the C++ run, the rest block by block
    assert block_decodes[layers:] == ([(1, "run")] * 2 + [(1, "block")] * (layers - 2)) * 3
    monkeypatch.setattr(QWenModel, "_decode_writers", lambda *args: None)
    assert torch.equal(fast, _steps(model, ids, 3))


@needs_kernels
def test_cpp_steps_follow_replaced_weights_and_use_torch(checkpoint, plans, monkeypatch):
    """A block's C++ step is rebuilt when one of its tensors is replaced (and dropped when use_torch
    swaps its layers back): the logits keep equal to the module path's. The model stays
    deep-copyable after C++ steps ran."""
    from qwen.modeling_qwen import QWenModel

    model = _from(checkpoint, "bfloat16")
    ids = torch.randint(0, 151000, (1, 3), generator=torch.Generator().manual_seed(9))
    before = _steps(model, ids, 2)
    mlp = model.transformer.h[0].mlp
    mlp.w2.weight = torch.nn.Parameter(mlp.w2.weight.detach() * 2, requires_grad=False)
    after = _steps(model, ids, 2)
    assert all(plans) and not torch.equal(before, after)
    copy.deepcopy(model)
    with monkeypatch.context() as patch:
        patch.setattr(QWenModel, "_decode_writers", lambda *args: None)
        assert torch.equal(after, _steps(model, ids, 2))
    use_torch(model)
    assert kernels.block_plan(model.transformer.h[0]) is None  # its layers are nn.Linear again


@needs_kernels
@pytest.mark.parametrize("quantization", [None, "int4"])
@pytest.mark.parametrize("requests, path", [(2, "block"), (1, "run")])
def test_engine_decode_steps_take_the_decode_path_bit_for_bit(checkpoint, block_decodes, monkeypatch, quantization,
                                                              requests, path):
    """The serving engine's decode steps run through the decode path with the engine's cache: rows
    of different lengths in one batch (per-row positions and a mask) block by block, a single
    sequence in one C++ run that writes into its slot. Every token and logprob equals the module
    path's."""
    from qwen.modeling_qwen import QWenModel
    from qwen.serving import Engine, SamplingParams

    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16", quantization=quantization).eval()
    tokenizer = qwen.QWenTokenizer.from_pretrained(checkpoint)
    prompts = [list(range(100, 107)), list(range(300, 320))][:requests]
    params = SamplingParams(max_new_tokens=8, do_sample=False, logprobs=2, stop_token_ids=[])

    def run():
        engine = Engine(model, tokenizer, max_running=2, prefix_slots=0)
        try:
            with engine._lock:  # both queued before the engine's first step: the same batches each run
                streams = [engine.submit(p, params) for p in prompts]
            return [(o.token_ids, [(t.token_id, t.logprob, t.top) for t in o.logprobs])
                    for o in (s.result() for s in streams)]
        finally:
            engine.shutdown()

    fast = run()
    # Two requests: decode steps only (the batch's 20-token prefill takes the modules); one: its
    # 7-token prompt too.
    assert block_decodes and set(block_decodes) == ({(1, path)} if requests == 2 else {(7, path), (1, path)})
    monkeypatch.setattr(QWenModel, "_decode_writers", lambda *args: None)
    assert fast == run()


@needs_kernels
def test_decode_path_steps_aside_for_hooks_and_fp32(checkpoint, block_decodes):
    """A forward hook on any module the decode path would call directly, fp32 activations or
    output_hidden_states: the modules run (and the hook sees every step)."""
    model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="bfloat16").eval()
    ids = torch.randint(0, 151000, (2, 3), generator=torch.Generator().manual_seed(6))
    seen = []
    handle = model.transformer.h[-1].mlp.w2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    _steps(model, ids, 2)
    handle.remove()
    assert len(seen) == 3 and not block_decodes
    with torch.inference_mode():
        model(input_ids=ids, output_hidden_states=True, use_cache=True)
    assert not block_decodes
    _steps(qwen.QWenLMHeadModel.from_pretrained(checkpoint, dtype="float32").eval(), ids, 2)
    assert not block_decodes
    _steps(model, ids, 2)
    assert block_decodes  # and with none of these, it runs