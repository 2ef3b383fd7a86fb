"""More parity with the original implementation, beyond the shared golden set: bf16 and fp16
models (bit-exact), the int8 cache in bf16 and with softmax_in_fp32, and left-padded batches
longer than seq_length (per-sample dynamic NTK), with and without the int8 cache.

The vectors were produced by the original remote code (see the fixture's "source")."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen import QWenLMHeadModel

FIXTURES = Path(__file__).parent / "fixtures"
DATA = json.loads((FIXTURES / "original_extra_golden.json").read_text())
CASES = {case["name"]: case for case in DATA["cases"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each case's checkpoint: a golden one with the case's config edits."""
    loaded = {}

    def load(name):
        if name not in loaded:
            case = CASES[name]
            directory = tmp_path_factory.mktemp(name)
            shutil.copytree(FIXTURES / "golden_models" / case["golden_dir"], directory, dirs_exist_ok=True)
            config = json.loads((directory / "config.json").read_text())
            config.update(case["config_edits"])
            (directory / "config.json").write_text(json.dumps(config))
            loaded[name] = QWenLMHeadModel.from_pretrained(directory).eval()
        return loaded[name]

    return load


def prompts(kind=None):
    return [
        pytest.param(name, key, id=f"{name}-{key}")
        for name, case in CASES.items()
        for key in case["prompts"]
        if kind is None or case["kind"] == kind
    ]


@pytest.mark.parametrize("name,key", prompts())
def test_logits_match_original(models, name, key):
    case, prompt = CASES[name], CASES[name]["prompts"][key]
    model = models(name)
    assert str(model.dtype) == f"torch.{case['model_dtype']}"
    ids = torch.tensor(prompt["input_ids"])
    mask = torch.tensor(prompt["attention_mask"]) if prompt["attention_mask"] is not None else None
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    batch = case["kind"] == "batch"  # batch: positions and logits per row; single: for row 0
    positions = prompt["logits_positions"] if batch else [prompt["logits_positions"]]
    expected_rows = prompt["logits"] if batch else [prompt["logits"]]
    for row, (row_positions, expected) in enumerate(zip(positions, expected_rows)):
        got = logits[row, row_positions]
        want = torch.tensor(expected, dtype=got.dtype)
        if got.dtype == torch.float32:  # stored to 6 significant digits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        else:  # 16-bit values are stored exactly: bit-for-bit equality
            assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("name,key", prompts())
def test_greedy_with_cache_matches_original(models, name, key):
    prompt = CASES[name]["prompts"][key]
    model = models(name)
    current = torch.tensor(prompt["input_ids"])
    mask = torch.tensor(prompt["attention_mask"]) if prompt["attention_mask"] is not None else None
    cache, tokens = None, []
    with torch.no_grad():
        for _ in range(prompt["new_tokens"]):
            out = model(current, attention_mask=mask, cache=cache, use_cache=True)
            cache, current = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(current)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(current)], dim=1)
    assert torch.cat(tokens, 1).tolist() == prompt["greedy_tokens"]
