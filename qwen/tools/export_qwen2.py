"""Export a Qwen (v1) checkpoint as a transformers-native Qwen2ForCausalLM checkpoint.

    python -m qwen.tools.export_qwen2 SRC OUT [--dtype {auto,bfloat16,float16,float32}] [--force]

The output has model_type "qwen2", so transformers, vLLM and llama.cpp's converter load the
weights without remote code. Within `seq_length` the exported model computes the same function:
c_attn is split into q/k/v (with bias), w2 is the gate, w1 the up projection, c_proj the down
projection. Dynamic NTK and LogN (active only beyond seq_length) have no Qwen2 equivalent and
are dropped, so max_position_embeddings is set to seq_length. In fp32 the logits are identical; in
bf16/fp16 Qwen2 applies RoPE in the model dtype (we do it in fp32), so logits differ by bf16 rounding
and greedy tokens can part at near-ties. OUT may not be SRC nor contain it, and a non-empty OUT is
refused unless --force; a refused or failed export leaves OUT as it was (see qwen/tools/output_dir.py).

OUT holds config.json, generation_config.json (SRC's, copied) and model.safetensors (or shards and
their index). When SRC has a tokenizer (qwen.tiktoken), OUT also gets a transformers-native fast
tokenizer: tokenizer.json, tokenizer_config.json (class Qwen2Tokenizer, eos = pad = <|endoftext|>,
model_max_length = seq_length) and chat_template.jinja (QWenTokenizer's chatml template), which give
QWenTokenizer's ids (see qwen/tools/fast_tokenizer.py for the two known differences); and a copy of
qwen.tiktoken, so `qwen.QWenTokenizer.from_pretrained(OUT)` still works. No *.py and no auto_map are
written: `AutoTokenizer.from_pretrained(OUT)` and `vllm serve OUT` need no remote code.
"""

import argparse
import copy
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..configuration_qwen import QWenConfig
from ..modeling_qwen import checkpoint_weight_files
from . import run_cli_action
from .fast_tokenizer import save_fast_tokenizer
from .output_dir import staged_output

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VOCAB_FILE = "qwen.tiktoken"

# Renames of the per-layer tensors (c_attn is split separately).
_LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",  # w2 is the gated (SiLU) branch
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# Buffers some original checkpoints carry; they are recomputed, never loaded.
_IGNORED_KEY = re.compile(r".*\.(rotary_emb\.inv_freq|attn\.masked_bias)$")


# ----------------------------------------------------------------------------- config


def check_exportable(config: QWenConfig) -> None:
    """Raise a ValueError naming the first field whose setting Qwen2 cannot express."""
    config.check_buildable()
    if not config.no_bias:
        raise ValueError(
            "no_bias=False: this checkpoint has biases on attn.c_proj and the MLP, which Qwen2 "
            "(bias on q/k/v only) cannot express"
        )
    if config.rotary_pct != 1:
        raise ValueError(
            f"rotary_pct={config.rotary_pct}: Qwen2 rotates the whole head (rotary_pct must be 1)"
        )
    windows = config.window_attn_sizes
    if windows is not None and any(w is not None and w > 0 for w in windows):
        raise ValueError(
            f"window_attn_sizes={windows}: Qwen2 cannot express per-layer attention windows"
        )


def warn_dropped_features(config: QWenConfig) -> None:
    dropped = [name for name, on in (("dynamic NTK", config.use_dynamic_ntk), ("LogN", config.use_logn_attn)) if on]
    if dropped:
        logger.warning(
            "%s not carried over: they act only beyond seq_length (%d), which the Qwen2 checkpoint takes as "
            "max_position_embeddings; longer inputs will differ from the original",
            " and ".join(dropped), config.seq_length,
        )
    if config.use_cache_quantization:
        logger.warning("use_cache_quantization (the int8 KV cache) is a runtime option Qwen2 does not have; dropped")


def qwen2_config(config: QWenConfig, dtype: torch.dtype | None = None, generation_config=None) -> Qwen2Config:
    """The Qwen2Config computing the same function as `config` within seq_length."""
    check_exportable(config)
    eos = getattr(generation_config, "eos_token_id", None)
    pad = getattr(generation_config, "pad_token_id", None)
    qcfg = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // 2,  # Qwen v1 counts both SwiGLU branches
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=config.seq_length,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.layer_norm_epsilon,
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        use_sliding_window=False,
        max_window_layers=config.num_hidden_layers,
        attention_dropout=config.attn_dropout_prob,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    qcfg.architectures = ["Qwen2ForCausalLM"]
    if dtype is not None:
        qcfg.dtype = dtype
    return qcfg


# ----------------------------------------------------------------------------- tensors


def convert_tensor(name: str, tensor: torch.Tensor, hidden_size: int) -> list[tuple[str, torch.Tensor]]:
    """The Qwen2 (name, tensor) pairs for one Qwen v1 tensor; [] for buffers that are not weights.
    Raises a ValueError for a name that has no Qwen2 counterpart (e.g. GPTQ's qweight)."""
    if name in _GLOBAL_RENAMES:
        return [(_GLOBAL_RENAMES[name], tensor)]
    if _IGNORED_KEY.match(name):
        return []
    match = _LAYER_KEY.fullmatch(name)
    if match:
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            if tensor.shape[0] != 3 * hidden_size:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {3 * hidden_size} rows (q|k|v)")
            kind = rest.rsplit(".", 1)[1]
            # Each part gets its own storage (a view into c_attn cannot be saved on its own).
            parts = (t.clone() for t in tensor.split(hidden_size, dim=0))
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", parts)]
    raise ValueError(
        f"cannot export tensor {name!r}: it has no Qwen2 counterpart (quantized checkpoints are not supported)"
    )


def convert_state_dict(
    items: Iterable[tuple[str, torch.Tensor]], config: QWenConfig, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The converted tensors, floating ones cast to `dtype` when given."""
    for name, tensor in items:
        for new_name, new in convert_tensor(name, tensor, config.hidden_size):
            yield new_name, new.to(dtype) if dtype is not None and new.is_floating_point() else new


def expected_keys(config: Qwen2Config) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        keys |= {prefix + name for name in _LAYER_RENAMES.values()}
        keys |= {f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")}
    return keys


def _check_complete(found: set[str], qcfg: Qwen2Config) -> None:
    missing = sorted(expected_keys(qcfg) - found)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) a Qwen2 model needs, e.g. {missing[:3]}")


# ----------------------------------------------------------------------------- in memory


def to_qwen2(model, dtype: torch.dtype | None = None) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM (eval mode) with a copy of `model`'s weights, optionally cast to `dtype`."""
    from transformers.initialization import no_init_weights

    config = model.config
    dtype = dtype or next(model.parameters()).dtype
    qcfg = qwen2_config(config, dtype, getattr(model, "generation_config", None))
    qcfg._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            qwen2 = Qwen2ForCausalLM(qcfg)
    finally:
        torch.set_default_dtype(previous)
    state = dict(convert_state_dict(model.state_dict().items(), config, dtype))
    _check_complete(set(state), qcfg)
    qwen2.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        qwen2.generation_config = copy.deepcopy(model.generation_config)
    return qwen2.to(next(model.parameters()).device).eval()


# ----------------------------------------------------------------------------- on disk


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def _export_dir(src: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Convert shard by shard (one source shard in memory at a time), keeping the shard layout."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = QWenConfig.from_pretrained(src)
    generation_config = None
    if (src / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(src)
    qcfg = qwen2_config(config, dtype, generation_config)  # refuses before anything is written
    warn_dropped_features(config)
    files = checkpoint_weight_files(src)
    weight_map, total_size, found_dtype = {}, 0, None
    for i, path in enumerate(files, start=1):
        name = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
        state = dict(convert_state_dict(_read_weights(path).items(), config, dtype))
        for key, tensor in state.items():
            if key in weight_map:
                raise ValueError(f"{key} appears in more than one shard of {src}")
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()
            if found_dtype is None and tensor.is_floating_point():
                found_dtype = tensor.dtype
        save_file(state, str(out / name), metadata={"format": "pt"})
        del state
    _check_complete(set(weight_map), qcfg)
    qcfg.dtype = dtype or found_dtype
    qcfg.save_pretrained(out)
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if generation_config is not None:
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")


def _export_tokenizer(src: Path, out: Path) -> bool:
    """The fast tokenizer files and a copy of qwen.tiktoken, when SRC has a tokenizer."""
    if not (src / VOCAB_FILE).is_file():
        return False
    from ..tokenization_qwen import QWenTokenizer

    start = time.perf_counter()
    tokenizer = QWenTokenizer.from_pretrained(src)
    save_fast_tokenizer(tokenizer, out, model_max_length=QWenConfig.from_pretrained(src).seq_length)
    shutil.copyfile(src / VOCAB_FILE, out / VOCAB_FILE)
    logger.info("converted the tokenizer to tokenizer.json in %.1fs", time.perf_counter() - start)
    return True


def export_qwen2(model_or_dir, out, dtype: str | torch.dtype | None = None, force: bool = False) -> Path:
    """Write a Qwen2ForCausalLM checkpoint to `out` from a Qwen v1 model (QWenLMHeadModel) or
    checkpoint directory. `dtype` (None/"auto": keep the source's) casts the floating tensors.
    Raises ValueError, naming the field, for settings Qwen2 cannot express; `out` must not be the
    source directory nor contain it, and must be empty unless `force` (qwen/tools/output_dir.py)."""
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES[dtype]
    out = Path(out)
    if isinstance(model_or_dir, (str, Path)):
        src = Path(model_or_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"not a checkpoint directory: {src}")
        with staged_output(out, force, sources=[src]) as staging:
            _export_dir(src, staging, dtype)
            _export_tokenizer(src, staging)
        return out
    model = model_or_dir
    with staged_output(out, force) as staging:
        qwen2 = to_qwen2(model, dtype)  # refuses before anything is written
        warn_dropped_features(model.config)
        qwen2.save_pretrained(staging)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m qwen.tools.export_qwen2",
        description=__doc__.split("\n\n")[0],
        epilog="Refused (ValueError): no_bias=False, rotary_pct != 1, window_attn_sizes with a window.",
    )
    parser.add_argument("src", help="Qwen v1 checkpoint directory (config.json + weights, optionally qwen.tiktoken)")
    parser.add_argument("out", help="output directory for the Qwen2ForCausalLM checkpoint")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="weight dtype to write (auto: as stored in SRC)"
    )
    parser.add_argument(
        "--force", action="store_true",
        help="write into a non-empty OUT: replace the checkpoint there and delete its stale weight files "
             "(other files stay; remote code that is not ours is kept as *.py.orig)",
    )
    args = parser.parse_args(argv)

    def action():
        export_qwen2(args.src, args.out, args.dtype, force=args.force)
        return f"wrote a Qwen2ForCausalLM checkpoint to {args.out}"

    return run_cli_action(action)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    sys.exit(main())
