"""Supervised fine-tuning on the Hugging Face Trainer: full-parameter, LoRA or Q-LoRA (PEFT), with or
without DeepSpeed. `finetune.py` (and the finetune/*.sh launchers) call `main`.

The arguments and defaults are the original finetune.py's (QWEN_SPEC §7) plus the Trainer's own, and
--skip_invalid. What differs from the original, on purpose:
- batches are padded to their longest row (the original pads every row to model_max_length), and
  --packing packs a batch's short records into full rows (attention kept within each record);
- the DeepSpeed configs carry no optimizer or scheduler, so --optim / --lr_scheduler_type / --warmup_ratio
  are what runs (the original's WarmupLR silently replaced the cosine schedule);
- --resume_from_checkpoint True resumes from the latest checkpoint in output_dir (LoRA included);
- the saved directory is complete: adapter + tokenizer files for LoRA, the full checkpoint with our
  remote code for full fine-tuning (ZeRO-3 weights gathered).
On a machine without CUDA a DeepSpeed run uses DeepSpeed's CPU accelerator with gloo (see
finetune/README.md for the environment it needs; this module sets what it can).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["c_attn", "c_proj", "w1", "w2"]
BASE_MODEL_MODULES_TO_SAVE = ["wte", "lm_head"]


class FinetuneError(ValueError):
    """Bad arguments or inputs; the message is one line."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen-7B", metadata={"help": "checkpoint directory or hub name"})


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "training data: a JSON list or JSON Lines file"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data, same format"})
    lazy_preprocess: bool = field(default=False, metadata={
        "help": "tokenize records when first used (JSON Lines files are then streamed, not loaded whole)"})
    skip_invalid: bool = field(default=False, metadata={
        "help": "drop malformed records (reported with a count) instead of stopping"})
    packing: bool = field(default=False, metadata={
        "help": "pack each batch's records into as few rows of --model_max_length tokens as fit, attention kept "
                "within each record (fewer, fuller rows for short records)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(default=8192, metadata={
        "help": "maximum sequence length; longer conversations are cut (batches are padded to their longest row)"})
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of every weight"})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "the original's name for a warmup fraction: sets --warmup_steps (a float in [0, 1) is a ratio)"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise FinetuneError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    lora_weight_path: str = field(default="", metadata={"help": "an existing adapter to continue training"})
    lora_bias: str = "none"
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained whole beside the adapter (default: wte and lm_head for base models, "
                "none for chat models and Q-LoRA, the original's rule; 'none' for none)"})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on a GPTQ Int4 checkpoint"})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps() -> bool:
    import torch

    return torch.backends.mps.is_available()


def prepare_environment(argv: list[str]) -> list[str]:
    """Make a run work on this machine, before TrainingArguments is built; returns argv, completed.

    Without CUDA: the Trainer on the CPU (--use_cpu True, which --bf16 needs there and without which
    DeepSpeed's batch-size check fails with 2 processes) and DeepSpeed's CPU accelerator
    (DS_ACCELERATOR=cpu, with gloo). A plain
    `python finetune.py --deepspeed ...` gets a one-process rendezvous (RANK, WORLD_SIZE, ...),
    and the process group is set up first (ZeRO-3 with 2 processes needs it before the Trainer's
    arguments are read)."""
    argv = list(argv)
    cuda = _has_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # transformers imports DeepSpeed when it is installed
        if not _mps() and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in argv):
            argv += ["--use_cpu", "True"]  # else --bf16 and DeepSpeed's batch-size check refuse the CPU
    if not any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        return argv
    if not cuda:
        argv = _fp16_to_bf16(argv)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend=None if cuda else "gloo")
    return argv


def parse_arguments(argv: list[str]):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, LoraArguments),
        description="Fine-tune a Qwen (v1) checkpoint on conversations: full, LoRA (--use_lora) or Q-LoRA (--q_lora).",
    )
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    if not data_args.data_path:
        raise FinetuneError("--data_path is required (a JSON list or JSON Lines file of conversations)")
    if training_args.model_max_length < 8:
        raise FinetuneError(f"--model_max_length must be at least 8, got {training_args.model_max_length}")
    if lora_args.q_lora and not training_args.use_lora:
        raise FinetuneError("--q_lora trains a LoRA adapter: pass --use_lora True too")
    return model_args, data_args, training_args, lora_args


def is_chat_model(model_name_or_path: str) -> bool:
    """The original's rule ("chat" in the name), plus a local checkpoint whose generation config is chatml."""
    if "chat" in model_name_or_path.lower():
        return True
    path = Path(model_name_or_path) / "generation_config.json"
    if path.is_file():
        import json

        return json.loads(path.read_text(encoding="utf-8")).get("chat_format") == "chatml"
    return False


def resolve_resume(value, output_dir: str):
    """--resume_from_checkpoint: None, a checkpoint path, or the latest checkpoint-N in output_dir for "true"."""
    if value is None or str(value).lower() in ("", "false", "0", "no"):
        return None
    if str(value).lower() in ("true", "1", "yes"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FinetuneError(f"--resume_from_checkpoint True: no checkpoint-N directory in {output_dir}")
        return last
    if not os.path.isdir(value):
        raise FinetuneError(f"--resume_from_checkpoint {value}: no such directory")
    return value


def _fp16_to_bf16(argv: list[str]) -> list[str]:
    """--fp16 True -> --bf16 True: DeepSpeed's CPU accelerator has no fp16 ("Type fp16 is not supported
    on your device"); the Q-LoRA launchers ask for fp16, as the original does on GPUs."""
    out, i, changed = [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == "--fp16" and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "1", "yes"):
            out += ["--bf16", "True"]
            i, changed = i + 2, True
            continue
        if arg.lower() in ("--fp16=true", "--fp16=1", "--fp16=yes"):
            arg, changed = "--bf16=True", True
        out.append(arg)
        i += 1
    if changed:
        logger.warning("--fp16 with DeepSpeed on the CPU: its CPU accelerator has no fp16, training in bf16 instead")
    return out


def load_dtype(training_args, lora: bool):
    """The dtype to load the weights in: the compute dtype (--bf16/--fp16, else fp32) for LoRA and under
    DeepSpeed; fp32 master weights for full fine-tuning without DeepSpeed (the Trainer autocasts)."""
    import torch

    compute = torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32
    return compute if training_args.deepspeed or lora else torch.float32


def lora_modules_to_save(model_args, lora_args) -> list[str] | None:
    """--lora_modules_to_save, else the original's rule: wte and lm_head for base models (not Q-LoRA)."""
    if lora_args.lora_modules_to_save is not None:
        return [m for m in lora_args.lora_modules_to_save if m.lower() != "none"] or None
    if lora_args.q_lora or is_chat_model(model_args.model_name_or_path):
        return None
    return list(BASE_MODEL_MODULES_TO_SAVE)


def load_model(model_args, training_args, lora_args):
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    import qwen  # noqa: F401  (registers the Auto classes: no remote code needed)

    path = model_args.model_name_or_path
    modules_to_save = lora_modules_to_save(model_args, lora_args) if training_args.use_lora else None
    if modules_to_save and is_deepspeed_zero3_enabled():  # refused before the weights are read
        raise FinetuneError(
            f"LoRA that also trains {', '.join(modules_to_save)} (by default: on a base model) does not work under "
            "ZeRO-3: use ZeRO-2 (finetune/ds_config_zero2.json), a chat model, or --lora_modules_to_save none"
        )
    dtype = load_dtype(training_args, training_args.use_lora)
    config = transformers.AutoConfig.from_pretrained(path, cache_dir=training_args.cache_dir, trust_remote_code=True)
    config.use_cache = False
    if lora_args.q_lora:
        if getattr(config, "quantization_config", None) is None:
            raise FinetuneError(f"--q_lora needs a GPTQ Int4 checkpoint (with a quantization_config); {path} has none")
        # Our from_pretrained unpacks GPTQ itself (qwen/gptq.py): 4-bit layers become Int4Linear, which
        # trains LoRA on top on the CPU or the GPU (qwen.quantization). fp16 as the original on GPUs.
        if torch.cuda.is_available():
            dtype = torch.float16
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, cache_dir=training_args.cache_dir, dtype=dtype, trust_remote_code=True
    )
    model.config.use_cache = False
    if not training_args.use_lora:
        return model
    from peft import (
        LoraConfig,
        PeftModel,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    if lora_args.q_lora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.activation_checkpointing)
    if lora_args.lora_weight_path:
        model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        lora = LoraConfig(
            r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, target_modules=lora_args.lora_target_modules,
            lora_dropout=lora_args.lora_dropout, bias=lora_args.lora_bias, task_type="CAUSAL_LM",
            modules_to_save=modules_to_save,
        )
        if lora_args.q_lora:  # PEFT's own LoRA linear around our quantized layers (frozen, x-gradients only)
            from peft.tuners.lora.layer import Linear as LoraLinear

            from qwen.quantization import Int4Linear, Int8Linear

            lora._register_custom_module({Int4Linear: LoraLinear, Int8Linear: LoraLinear})
        model = get_peft_model(model, lora)
    if training_args.activation_checkpointing:
        model.enable_input_require_grads()
    if training_args.should_log:
        model.print_trainable_parameters()
    return model


def load_tokenizer(model_args, training_args):
    import qwen  # noqa: F401

    return transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length, padding_side="right", trust_remote_code=True,
    )


def build_trainer(model_args, data_args, training_args, lora_args):
    """Tokenizer, datasets, model and Trainer; returns (trainer, checkpoint to resume from or None).
    Every problem with the inputs surfaces here, before any training."""
    from .data import DataCollator, make_dataset

    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    local = Path(model_args.model_name_or_path)
    if local.is_dir():  # an absolute path in adapter_config.json: the adapter loads from anywhere
        model_args.model_name_or_path = str(local.resolve())
    tokenizer = load_tokenizer(model_args, training_args)
    datasets = {
        name: make_dataset(path, tokenizer, training_args.model_max_length, data_args.lazy_preprocess,
                           data_args.skip_invalid)
        for name, path in (("train", data_args.data_path), ("eval", data_args.eval_data_path)) if path
    }
    model = load_model(model_args, training_args, lora_args)
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=datasets["train"], eval_dataset=datasets.get("eval"),
        data_collator=DataCollator(pad_id=tokenizer.eod_id,
                                   pack_length=training_args.model_max_length if data_args.packing else None),
        processing_class=tokenizer,
    )
    # QWenPreTrainedModel.accepts_loss_kwargs is False; said again here because a PEFT wrapper may
    # hide the attribute from the Trainer's check.
    trainer.model_accepts_loss_kwargs = False
    return trainer, resume


def train(model_args, data_args, training_args, lora_args):
    """Build everything, train, and save the result to output_dir; returns the Trainer."""
    trainer, resume = build_trainer(model_args, data_args, training_args, lora_args)
    run(trainer, resume, model_args, training_args)
    return trainer


def run(trainer, resume, model_args, training_args) -> None:
    trainer.train(resume_from_checkpoint=resume)
    if not training_args.use_lora:
        keep_base_precision(trainer.model, model_args.model_name_or_path, bool(training_args.deepspeed))
    trainer.save_model(training_args.output_dir)  # gathers ZeRO-3 weights; writes the tokenizer too
    trainer.save_state()  # last: trainer_state.json in output_dir marks a finished run (the launchers check it)


def keep_base_precision(model, base: str, deepspeed: bool) -> None:
    """A full fine-tune is saved like its base: the same precision flags and, without DeepSpeed (whose
    saved weights are already 16-bit when training was), the same weight dtype instead of the fp32
    master weights."""
    import json

    import torch

    path = Path(base) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for flag in ("bf16", "fp16", "fp32"):
        setattr(model.config, flag, bool(config.get(flag, False)))
    name = config.get("dtype") or config.get("torch_dtype")
    if not deepspeed and name in ("bfloat16", "float16", "float32"):
        model.to(getattr(torch, name))
        model.config.dtype = getattr(torch, name)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        parse_arguments(["-h"])
    from ..loading import error_text
    from .data import DataError

    try:
        argv = prepare_environment(argv)
        args = parse_arguments(argv)
    except (FinetuneError, ValueError) as exc:
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args[2].should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            trainer, resume = build_trainer(*args)
        except (FinetuneError, DataError, OSError, ValueError) as exc:  # bad paths, checkpoints, data, options
            print(f"error: {error_text(exc)}", file=sys.stderr)
            return 2
        run(trainer, resume, args[0], args[2])
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
