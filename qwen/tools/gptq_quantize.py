"""GPTQ-quantize a Qwen (v1) checkpoint into a complete, directly loadable directory (`run_gptq.py`).

    python run_gptq.py --model_name_or_path Qwen-7B-Chat-merged --data_path calib.json --out_path Qwen-7B-Chat-Int4
    python -m qwen.tools.gptq_quantize ...        # the same

The calibration data is the fine-tuning format (a JSON list or JSON Lines of {"id", "conversations":
[{"from", "value"}]}), encoded as fine-tuning encodes it (chatml, system prompt), unpadded and cut
to --max_len tokens; malformed records are reported by id and index (--skip_invalid drops them).
The quantization itself is gptqmodel's (the maintained successor of auto-gptq), with the original
run_gptq.py's settings: damp 0.01, desc_act off, symmetric, true-sequential, --bits 4 or 8,
--group-size 128. It runs on a GPU when there is one, else on the CPU.

OUT then holds model.safetensors in the AutoGPTQ layout, config.json with `quantization_config`,
quantize_config.json, the tokenizer, generation_config.json and our remote code: it loads with
`QWenLMHeadModel.from_pretrained(OUT)` (no GPTQ library needed; see qwen/gptq.py), with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`, and with gptqmodel. None of
the original's copy-and-rename steps. A non-empty OUT is refused unless --force.

Needs the `gptq` extra (gptqmodel, which requires torch >= 2.14.1; see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import run_cli_action


def calibration_examples(data_path, tokenizer, max_len: int, skip_invalid: bool = False) -> list[dict]:
    """{"input_ids", "attention_mask"} lists (plain dicts, as gptqmodel wants) of every record."""
    from ..finetune.data import SupervisedDataset

    dataset = SupervisedDataset(data_path, tokenizer, max_len, skip_invalid=skip_invalid)
    return [{"input_ids": ex["input_ids"], "attention_mask": [1] * len(ex["input_ids"])} for ex in dataset.examples]


def quantize(model_path, data_path, out_path, bits: int = 4, group_size: int = 128, max_len: int = 8192,
             skip_invalid: bool = False, force: bool = False, device: str | None = None) -> Path:
    """Quantize `model_path` with gptqmodel into `out_path` (see the module docstring); returns OUT."""
    import torch

    from ..modeling_qwen import write_remote_code
    from ..tokenization_qwen import QWenTokenizer
    from .output_dir import staged_output

    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"--group-size must be a positive integer or -1, got {group_size}")
    if max_len < 1:
        raise ValueError(f"--max_len must be >= 1, got {max_len}")
    source = Path(model_path)
    if not (source / "config.json").is_file():
        raise ValueError(f"{model_path} is not a checkpoint directory (no config.json)")
    config = json.loads((source / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gptq":
        raise ValueError(f"{model_path} is already GPTQ-quantized; quantize the float (merged) model")
    tokenizer = QWenTokenizer.from_pretrained(source)
    examples = calibration_examples(data_path, tokenizer, max_len, skip_invalid)
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as exc:
        raise ValueError(f"GPTQ quantization needs gptqmodel (pip install 'qwen[gptq]'): {exc}") from None
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = source.resolve()
    with staged_output(out_path, force, sources=[source]) as staging, \
            tempfile.TemporaryDirectory(dir=staging.parent) as scratch:
        here = os.getcwd()
        os.chdir(scratch)  # gptqmodel writes its own logs/ into the working directory: not into the user's
        try:
            settings = QuantizeConfig(bits=bits, group_size=group_size, damp_percent=0.01, desc_act=False, sym=True,
                                      true_sequential=True)
            model = GPTQModel.load(str(source), settings, device=device, trust_remote_code=True)
            print(f"quantizing {model_path} to {bits} bits (group {group_size}) on {device} with "
                  f"{len(examples)} calibration record(s)", flush=True)
            model.quantize(examples)
            model.tokenizer = None  # ours is saved below (gptqmodel's tokenizer wrapper cannot save it)
            saved = Path(scratch) / "saved"
            model.save(str(saved))
        finally:
            os.chdir(here)
        _finish_directory(saved, staging, source, tokenizer)
        write_remote_code(staging)
    return Path(out_path)


def _finish_directory(saved: Path, staging: Path, source: Path, tokenizer) -> None:
    """What gptqmodel saved, made complete: the weights as model.safetensors, the quantization settings
    in config.json (where transformers and our loader look), tokenizer and generation config."""
    weights = sorted(saved.glob("*.safetensors"))
    index = saved / "model.safetensors.index.json"
    if len(weights) == 1 and not index.is_file():
        shutil.copyfile(weights[0], staging / "model.safetensors")
    elif weights:  # sharded: keep the shards and their index as saved
        for path in weights + ([index] if index.is_file() else []):
            shutil.copyfile(path, staging / path.name)
    else:
        raise ValueError(f"gptqmodel saved no *.safetensors weights in {saved}")
    settings_file = saved / "quantize_config.json"
    config = json.loads((saved / "config.json").read_text()) if (saved / "config.json").is_file() else \
        json.loads((source / "config.json").read_text())
    settings = config.get("quantization_config")
    if settings_file.is_file():
        settings = {**json.loads(settings_file.read_text()), **(settings or {})}
    if not settings:
        raise ValueError("gptqmodel saved no quantization settings (quantize_config.json)")
    settings.setdefault("quant_method", "gptq")
    settings["model_file_base_name"] = "model"
    config["quantization_config"] = settings
    (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (staging / "quantize_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    tokenizer.save_pretrained(staging)
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", staging / "generation_config.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="run_gptq.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="the float (merged) checkpoint directory")
    parser.add_argument("--data_path", required=True, help="calibration data in the fine-tuning JSON/JSONL format")
    parser.add_argument("--out_path", required=True, help="output directory")
    parser.add_argument("--max_len", type=int, default=8192, help="calibration records are cut to this many tokens")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight (default: 4)")
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128,
                        help="inputs per quantization group, -1 for one group per row (default: 128)")
    parser.add_argument("--skip_invalid", action="store_true", help="drop malformed calibration records (counted)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT (replaces the checkpoint there and its stale weight files)")
    args = parser.parse_args(argv)

    def action():
        out = quantize(args.model_name_or_path, args.data_path, args.out_path, args.bits, args.group_size,
                       args.max_len, args.skip_invalid, args.force, args.device)
        return f"wrote the {args.bits}-bit GPTQ checkpoint to {out}"

    return run_cli_action(action)


if __name__ == "__main__":
    sys.exit(main())
