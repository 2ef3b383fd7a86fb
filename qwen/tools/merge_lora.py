"""Merge a LoRA adapter (from finetune.py --use_lora) into its base model and write a complete checkpoint.

    python -m qwen.tools.merge_lora ADAPTER_DIR OUT [--base BASE] [--dtype auto|bfloat16|float16|float32] [--force]

OUT loads directly (`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`, or with
`import qwen`): weights, config.json, generation_config.json, the tokenizer files (the adapter's, else
the base's) and our remote code. The base is the adapter's `base_model_name_or_path` unless --base
is given. Trained embeddings (LoRA on a base model also trains wte and lm_head) are merged too.
A non-empty OUT is refused unless --force (see qwen/tools/output_dir.py); OUT is written in one
step, so a failure leaves it as it was.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from . import run_cli_action
from .output_dir import staged_output

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PRECISION_FLAGS = ("bf16", "fp16", "fp32")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def adapter_base(adapter: Path) -> str:
    """The base model an adapter directory names; ValueError when it is no LoRA adapter."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not a LoRA adapter directory")
    config = _read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, only LoRA adapters can be merged")
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base_model_name_or_path: pass --base")
    return base


def merge_lora(adapter, out, base=None, dtype: str = "auto", force: bool = False) -> Path:
    """Write the merged checkpoint to `out`; returns `out`."""
    from peft import PeftModel

    from ..modeling_qwen import QWenLMHeadModel
    from ..tokenization_qwen import QWenTokenizer

    adapter = Path(adapter)
    base = base or adapter_base(adapter)
    base_path = Path(base)
    if not (base_path / "config.json").is_file():
        raise FileNotFoundError(f"base model {base} is not a local checkpoint directory (no config.json): pass --base")
    base_config = _read_json(base_path / "config.json")
    if base_config.get("quantization_config"):
        raise ValueError(f"the base {base} is quantized (GPTQ): a Q-LoRA adapter cannot be merged into int4 weights; "
                         "merge it into the float model it was quantized from with --base")
    if dtype == "auto":
        dtype = base_config.get("dtype") or base_config.get("torch_dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    with staged_output(out, force, sources=[adapter, base_path]) as staging:  # refuses before any work
        model = QWenLMHeadModel.from_pretrained(base_path, dtype=torch.float32)  # merge in fp32
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.to(DTYPES[dtype])
        for flag in PRECISION_FLAGS:  # the base's precision flags, not those of the fp32 merge
            setattr(merged.config, flag, bool(base_config.get(flag, False)))
        merged.config.use_cache = base_config.get("use_cache", True)
        merged.config.dtype = DTYPES[dtype]
        merged.save_pretrained(staging)
        tokenizer_dir = adapter if (adapter / QWenTokenizer.vocab_files_names["vocab_file"]).is_file() else base_path
        QWenTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    return Path(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qwen.tools.merge_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="LoRA adapter directory (finetune.py --use_lora True output)")
    parser.add_argument("out", help="output directory for the merged checkpoint")
    parser.add_argument("--base", help="base checkpoint directory (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype to write (auto: the base's)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT: replace the checkpoint there and delete its stale weight "
                             "files (other files stay)")
    args = parser.parse_args(argv)

    def action():
        merge_lora(args.adapter, args.out, args.base, args.dtype, args.force)
        return f"wrote the merged checkpoint to {args.out}"

    return run_cli_action(action)


if __name__ == "__main__":
    sys.exit(main())
