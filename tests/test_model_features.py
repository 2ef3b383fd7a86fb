"""Model behaviour beyond the golden vectors: attention paths agree, the KV cache is consistent
(including multi-token chunks, window attention and the int8 cache), dynamic NTK per sample."""

import math

import pytest
import torch

from qwen import QWenCache, QWenConfig, QWenLMHeadModel
from qwen.modeling_qwen import apply_rotary, ntk_alpha, rotary_cos_sin

torch.manual_seed(0)


def tiny_config(**overrides):
    fields = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, kv_channels=16,
        intermediate_size=172, seq_length=32, fp32=True,
    )
    fields.update(overrides)
    return QWenConfig(**fields)


def tiny_model(**overrides):
    torch.manual_seed(1)
    model = QWenLMHeadModel(tiny_config(**overrides)).eval()
    # Random init with std 0.02 gives near-uniform logits; larger weights make differences visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides", [{}, {"window_attn_sizes": [4, 8, None]}, {"rotary_pct": 0.5}])
def test_sdpa_and_eager_paths_agree(overrides):
    model = tiny_model(**overrides)
    fast = logits(model, IDS)
    eager = logits(model, IDS, output_attentions=True)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=0)


CHUNK_CASES = [
    {},
    {"window_attn_sizes": [4, 8, None]},
    {"use_dynamic_ntk": False, "seq_length": 8},  # LogN active, from absolute positions
    {"use_cache_quantization": True},
]


@pytest.mark.parametrize("overrides", CHUNK_CASES)
def test_chunk_after_cache_is_causal(overrides):
    """Prefill 10 tokens, then feed 14 at once. The original built no mask for such a chunk (a bug
    we fix): here changing the chunk's last token leaves every earlier position unchanged, and
    without int8 rounding the logits equal one full pass."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        prefix = model(IDS[:, :10], use_cache=True)
        chunk = model(IDS[:, 10:], cache=prefix.cache, use_cache=True).logits
        altered_ids = IDS[:, 10:].clone()
        altered_ids[:, -1] = (altered_ids[:, -1] + 1) % 256
        altered = model(altered_ids, cache=model(IDS[:, :10], use_cache=True).cache, use_cache=True).logits
    if not overrides.get("use_cache_quantization"):
        full = logits(model, IDS)
        torch.testing.assert_close(torch.cat([prefix.logits, chunk], 1), full, atol=1e-4, rtol=0)
        assert torch.equal(chunk[:, :-1], altered[:, :-1])
    else:
        # int8: the chunk shares one scale, which depends on every token in it; earlier positions
        # still cannot see later ones, so they change only through that shared scale (slightly).
        assert (chunk[:, :-1] - altered[:, :-1]).abs().max() < (chunk[:, -1] - altered[:, -1]).abs().max()


@pytest.mark.parametrize("overrides", [{}, {"window_attn_sizes": [3, 6, 12]}, {"no_bias": False}])
def test_token_by_token_decoding_matches_full_pass(overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():
        cache, outs = None, []
        for t in range(IDS.shape[1]):
            out = model(IDS[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            outs.append(out.logits)
    torch.testing.assert_close(torch.cat(outs, 1), logits(model, IDS), atol=1e-4, rtol=0)


def reference_attention(attn, x, window):
    """A from-scratch masked full-attention computation for one layer (no LogN: short input)."""
    batch, length, hidden = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.c_attn(x).split(hidden, dim=2)
    q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = rotary_cos_sin(torch.arange(length), head_dim, 10000.0, 1.0)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) & (j > i - window if window else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, hidden)
    return attn.c_proj(out), probs


@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_attention_matches_masked_full_attention(window):
    model = tiny_model(window_attn_sizes=[window, 2 * window, None], seq_length=64)
    x = torch.randn(2, 20, 64)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        expected, expected_probs = reference_attention(attn, model.transformer.h[0].ln_1(x), window)
    captured = {}
    handle = attn.register_forward_hook(lambda module, args, output: captured.update(out=output))
    with torch.no_grad():
        model.transformer(inputs_embeds=x, use_cache=False)  # the fast (SDPA) path
        eager_probs = model.transformer(inputs_embeds=x, use_cache=False, output_attentions=True).attentions[0]
    handle.remove()
    torch.testing.assert_close(captured["out"][0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager_probs, expected_probs, atol=1e-6, rtol=0)
    # Nothing outside the window gets weight.
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    assert eager_probs[..., (j <= i - window) | (j > i)].abs().max() == 0


def test_default_config_has_no_window_and_full_windows_change_nothing():
    assert QWenConfig().window_attn_sizes is None
    base = tiny_model()
    wide = tiny_model(window_attn_sizes=[100, 100, 100])
    assert torch.equal(logits(base, IDS), logits(wide, IDS))


def test_window_sizes_must_match_layers():
    with pytest.raises(ValueError, match="window_attn_sizes"):
        QWenLMHeadModel(tiny_config(window_attn_sizes=[4, 8]))


def test_ntk_alpha_formula():
    assert [ntk_alpha(n, 16) for n in (1, 16, 17, 32, 33, 64, 65)] == [1, 1, 3, 3, 7, 7, 15]


def test_per_sample_ntk_alpha_in_padded_batch_is_frozen_for_decoding():
    model = tiny_model(seq_length=8)
    mask = torch.zeros(3, 24, dtype=torch.long)
    for row, true_len in enumerate([6, 12, 24]):
        mask[row, 24 - true_len :] = 1
    ids = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.cache.ntk_alphas == [1, 3, 7]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step = model(ids[:, -1:], attention_mask=mask, cache=out.cache, use_cache=True)
    assert step.cache.ntk_alphas == [1, 3, 7]  # decoding keeps the prefill's alphas
    # Row 2 is unpadded: its logits equal a single-sample pass over the same 24 tokens.
    torch.testing.assert_close(out.logits[2], logits(model, ids[2:3])[0], atol=1e-5, rtol=0)


def test_int8_cache_stores_uint8_and_supports_beam_search():
    model = tiny_model(use_cache_quantization=True)
    with torch.no_grad():
        out = model(IDS[:, :5], use_cache=True)
    layer = out.cache.layers[0]
    assert layer.keys.dtype == torch.uint8 and layer.keys.shape == (2, 4, 5, 16)
    assert layer.key_params[0].shape == (2, 4, 5, 1)
    beams = model.generate(IDS[:1, :5], num_beams=3, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert beams.shape == (1, 9)


def test_hidden_states_and_attentions_outputs():
    model = tiny_model()
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True, output_attentions=True, use_cache=False)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert out.attentions[0].shape == (2, 4, 24, 24)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 24))


def test_cache_object_and_legacy_tuple_error():
    model = tiny_model()
    with torch.no_grad():
        out = model(IDS, use_cache=True)
    assert isinstance(out.cache, QWenCache) and out.cache.get_seq_length() == 24
    with pytest.raises(TypeError, match="Cache"):
        model(IDS[:, :1], past_key_values=((torch.zeros(1),),))


def test_attn_implementation_eager_is_honoured(monkeypatch):
    """`attn_implementation="eager"` (as with any transformers model) runs the manual path."""
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    model = tiny_model()
    sdpa_logits = logits(model, IDS)
    assert len(calls) == 3  # one per layer
    model.config._attn_implementation = "eager"
    eager_logits = logits(model, IDS)
    assert len(calls) == 3
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


def test_bf16_model_keeps_model_dtype_logits_and_loss():
    """Logits stay in the model dtype and the loss is taken on them without an upcast."""
    model = tiny_model(fp32=False, bf16=True)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(IDS, labels=IDS, use_cache=False)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.bfloat16
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), IDS[:, 1:].reshape(-1))
    assert torch.equal(out.loss, manual)
    # bf16 stays close to the same weights in fp32.
    reference = logits(model.float(), IDS)
    assert (out.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_out_of_vocabulary_ids_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="token id 256, outside the model's vocabulary"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_7b_shape_has_the_published_parameter_count():
    """Qwen-7B: model.safetensors.index.json's total_size 15442649088 bytes = 7,721,324,544 bf16 params."""
    config = QWenConfig(seq_length=8192, max_position_embeddings=32768, bf16=True)  # every other field: 7B default
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    assert model.num_parameters() == 7_721_324_544
    names = {name for name, _ in model.named_parameters()}
    assert "transformer.h.31.attn.c_attn.bias" in names and "transformer.h.0.mlp.c_proj.bias" not in names


@pytest.mark.parametrize("int8", [False, True])
def test_cache_writes_decode_steps_in_place(int8):
    """Decoding writes each token into the preallocated buffer (no per-step copy of the history),
    and gives exactly the logits of a cache that is rebuilt from scratch by concatenation."""
    model = tiny_model(use_cache_quantization=int8)
    cache = QWenCache(model.config, max_length=40)
    with torch.no_grad():
        model(IDS[:, :10], cache=cache, use_cache=True)
        layer = cache.layers[1]
        first = layer.keys.data_ptr()
        steps = [model(IDS[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(10, 24)]
    assert layer.keys.data_ptr() == first and layer.get_seq_length() == 24
    assert layer._buffers["keys" if not int8 else "key"].shape[-2] <= 40  # capped by max_length
    reference = tiny_model(use_cache_quantization=int8)
    reference_cache = QWenCache(reference.config)
    with torch.no_grad():
        reference(IDS[:, :10], cache=reference_cache, use_cache=True)
        for t, got in zip(range(10, 24), steps):
            # Every step on a fresh copy of the history: contiguous tensors, nothing shared.
            for lay in reference_cache.layers:
                lay._buffers = {}
                if int8:
                    lay.keys, lay.values = lay.keys.clone(), lay.values.clone()
                    lay.key_params = tuple(p.clone() for p in lay.key_params)
                    lay.value_params = tuple(p.clone() for p in lay.value_params)
                else:
                    lay.keys, lay.values = lay.keys.clone(), lay.values.clone()
            want = reference(IDS[:, t : t + 1], cache=reference_cache, use_cache=True).logits
            assert torch.equal(got, want)


def test_cache_grows_past_its_first_buffer_and_survives_crop_and_reorder():
    model = tiny_model()
    cache = QWenCache(model.config)  # no max_length: grows by doubling
    with torch.no_grad():
        model(IDS[:, :4], cache=cache, use_cache=True)
        cache.crop(-1)  # drop the newest token
        assert cache.get_seq_length() == 3
        cache.reorder_cache(torch.tensor([1, 0]))
        out = model(IDS.flip(0)[:, 3:24], cache=cache, use_cache=True).logits
    full = logits(model, IDS.flip(0))
    torch.testing.assert_close(out, full[:, 3:], atol=1e-5, rtol=1e-5)


def test_rotary_table_rows_equal_positions_computed_alone():
    model = tiny_model()
    cos, sin = model.transformer._rotary_table(3.0, 700, torch.device("cpu"))
    assert cos.shape[0] >= 700
    for position in (0, 1, 255, 256, 699):
        alone = rotary_cos_sin(torch.tensor([position]), model.transformer.rotary_dim, 10000.0, 3.0)
        assert torch.equal(cos[position], alone[0][0]) and torch.equal(sin[position], alone[1][0])
