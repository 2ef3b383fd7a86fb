"""Parity with the original implementation: golden logits, greedy tokens and losses of tiny
checkpoints saved by the original code (fp32, CPU)."""

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from qwen import QWenLMHeadModel
from qwen.kernels.linear import use_torch
from qwen.machine import fingerprint

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "tiny_model_golden.json").read_text())["cases"]
CASES = {case["name"]: case for case in GOLDEN}
ATOL = 1e-4  # fp32 logits, on any CPU
# The golden set does not record its machine. Known: fp32, torch CPU capability AVX512 (inferred:
# its kv_int8 decode steps reproduce within 5e-6 under AVX512 kernels, not under AVX2).
GOLDEN_RECORDED_ON = {"torch_cpu_capability": "AVX512", "dtype": "float32"}
# kv_int8 step logits on another class: the int8 cache's truncation turns last-bit differences
# into whole quantization steps (measured up to 4.8e-3 under AVX2 and DEFAULT). The tokens stay
# exact: every top-2 margin on these greedy paths is >= 0.0199, more than twice this bound.
KV_INT8_OTHER_CPU_ATOL = 8e-3


@lru_cache(maxsize=None)
def load(name: str) -> QWenLMHeadModel:
    # Parity with the original's numbers is torch's kernels' (tests/test_cpu_kernels.py holds ours
    # to the cross-CPU tolerance).
    return torch_linear(QWenLMHeadModel.from_pretrained(FIXTURES / "golden_models" / CASES[name]["dir"]).eval())


def cases_with(key):
    return [name for name, case in CASES.items() if case.get(key) is not None]


def greedy_with_cache(model, ids, steps, attention_mask=None):
    """One forward over the prompt, then one token per forward with the cache, as the golden run did.
    Returns the new tokens and the last-position logits of every forward (steps + 1 of them)."""
    cache, current, tokens, step_logits = None, ids, [], []
    with torch.no_grad():
        for step in range(steps + 1):
            out = model(current, attention_mask=attention_mask, cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits[:, -1])
            if step == steps:
                break
            current = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(current)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(current)], dim=1)
    return torch.cat(tokens, dim=1), step_logits


@pytest.mark.parametrize("name", cases_with("logits_short"))
@pytest.mark.parametrize("length", ["short", "long"])
def test_logits_match_original(name, length):
    case = CASES[name]
    with torch.no_grad():
        logits = load(name)(torch.tensor(case[f"prompt_{length}"]), use_cache=False).logits
    torch.testing.assert_close(logits[0], torch.tensor(case[f"logits_{length}"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", cases_with("greedy_short"))
@pytest.mark.parametrize("length", ["short", "long"])
def test_greedy_with_cache_matches_original(name, length):
    case = CASES[name]
    expected = torch.tensor(case[f"greedy_{length}"])
    tokens, step_logits = greedy_with_cache(load(name), torch.tensor(case[f"prompt_{length}"]), expected.shape[1])
    assert tokens.tolist() == expected.tolist()
    # Golden step logits: steps 0, 1 and the forward over the last generated token. kv_int8 off
    # the golden's CPU class: within KV_INT8_OTHER_CPU_ATOL (tokens exact, checked above).
    same_class = fingerprint()["torch_cpu_capability"] == GOLDEN_RECORDED_ON["torch_cpu_capability"]
    atol = KV_INT8_OTHER_CPU_ATOL if name == "kv_int8" and not same_class else ATOL
    for got, want in zip([step_logits[0], step_logits[1], step_logits[-1]], case[f"greedy_{length}_step_logits"]):
        torch.testing.assert_close(got, torch.tensor(want).reshape(got.shape), atol=atol, rtol=0)


@pytest.mark.parametrize("name", cases_with("logits_batch"))
def test_left_padded_batch_logits_match_original(name):
    case = CASES[name]
    with torch.no_grad():
        logits = load(name)(
            torch.tensor(case["prompt_batch"]), attention_mask=torch.tensor(case["mask_batch"]), use_cache=False
        ).logits
    torch.testing.assert_close(logits, torch.tensor(case["logits_batch"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", cases_with("greedy_batch"))
def test_left_padded_batch_greedy_matches_original(name):
    case = CASES[name]
    expected = torch.tensor(case["greedy_batch"])
    tokens, step_logits = greedy_with_cache(
        load(name), torch.tensor(case["prompt_batch"]), expected.shape[1], torch.tensor(case["mask_batch"])
    )
    assert tokens.tolist() == expected.tolist()
    for got, want in zip([step_logits[0], step_logits[1], step_logits[-1]], case["greedy_batch_step_logits"]):
        torch.testing.assert_close(got, torch.tensor(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", cases_with("greedy_batch"))
def test_generate_on_padded_batch_matches_original(name):
    """transformers' generate() (our cache, mask extension, stop handling) gives the golden tokens."""
    case = CASES[name]
    model = load(name)
    expected = case["greedy_batch"]
    out = model.generate(
        torch.tensor(case["prompt_batch"]),
        attention_mask=torch.tensor(case["mask_batch"]),
        max_new_tokens=len(expected[0]),
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert out[:, len(case["prompt_batch"][0]) :].tolist() == expected


@pytest.mark.parametrize("name", cases_with("greedy_long"))
def test_generate_matches_manual_greedy(name):
    case = CASES[name]
    prompt = torch.tensor(case["prompt_long"])
    out = load(name).generate(prompt, max_new_tokens=len(case["greedy_long"][0]), do_sample=False, eos_token_id=None)
    assert out[:, prompt.shape[1] :].tolist() == case["greedy_long"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_matches_original(name):
    case = CASES[name]
    ids = torch.tensor(case["prompt_long"])
    with torch.no_grad():
        loss = load(name)(ids, labels=ids, use_cache=False).loss
    assert abs(loss.item() - case["loss_long"]) < ATOL


def test_loss_ignores_minus_100():
    model = load("default")
    ids = torch.tensor(CASES["default"]["prompt_long"])
    labels = ids.clone()
    labels[:, :20] = -100
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        loss = model(ids, labels=labels, use_cache=False).loss
    manual = torch.nn.functional.cross_entropy(logits[0, 19:-1], ids[0, 20:])
    torch.testing.assert_close(loss, manual)


def torch_linear(model):
    use_torch(model)
    return model
