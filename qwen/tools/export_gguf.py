"""Export a Qwen (v1) checkpoint directory as one GGUF file that llama.cpp loads as is (architecture "qwen").

    python -m qwen.tools.export_gguf SRC OUT.gguf [--outtype {f16,bf16,f32}] [--force]

SRC is a checkpoint in the original format: config.json (QWenConfig fields, model_type "qwen"), the weights
(model.safetensors, shards with model.safetensors.index.json, or pytorch_model*.bin) and qwen.tiktoken.

What OUT holds (the names and keys llama.cpp's LLM_ARCH_QWEN loader reads):
- tensors: token_embd, output_norm, output and per block N: attn_norm (ln_1), attn_qkv weight and bias
  (c_attn, rows q|k|v), attn_output (attn.c_proj), ffn_norm (ln_2), ffn_up (mlp.w1), ffn_gate (mlp.w2, the
  SiLU-gated branch: our MLP is c_proj(w1(x) * silu(w2(x)))), ffn_down (mlp.c_proj). Matrices are written in
  --outtype (f16/bf16: one rounding from the checkpoint's values; f32: exact); 1-D tensors (norms, the qkv
  bias) are always F32, as llama.cpp expects ("mostly F16/BF16, except 1d tensors").
- qwen.* hyper-parameters: context_length = seq_length, embedding_length, block_count,
  feed_forward_length = intermediate_size (both SwiGLU branches: llama.cpp's Qwen loader makes each branch
  feed_forward_length/2 wide), attention.head_count(_kv), rope.dimension_count (the rotary dim; llama.cpp
  rotates NeoX-style, pairs offset by half of it, which is Qwen's rotate_half), rope.freq_base =
  rotary_emb_base, attention.layer_norm_rms_epsilon = layer_norm_epsilon.
- the tokenizer as llama.cpp expects for Qwen: model "gpt2" (byte-level BPE), pre-tokenizer "qwen2" (Qwen's
  regex), the 151643 regular tokens in byte-to-unicode form with their merges (recovered from the tiktoken
  ranks by qwen/tools/fast_tokenizer.py), the 208 control tokens (<|endoftext|>, <|im_start|>, <|im_end|>,
  <|extra_N|>) as CONTROL, ids up to vocab_size as unused "[PAD<id>]"; bos = eos = unk = pad =
  <|endoftext|> (eos/pad from generation_config.json when it names them) and no BOS/EOS added, so plain
  text gets QWenTokenizer's ids; the chatml chat template.
  Known differences on llama.cpp's side (seen with llama-cpp-python 0.3.36): it does not NFC-normalize
  (QWenTokenizer does), and it makes every token whose text is "</s>" a control, end-of-generation token,
  which in Qwen's vocabulary is the regular token 128247: with special-token parsing on, "</s>" in the text
  becomes that id (tiktoken splits it), generation stops there, and detokenizing without specials drops it.

Not carried over: dynamic NTK and LogN act only beyond seq_length (llama.cpp's Qwen graph has neither, so
longer contexts differ), and use_cache_quantization is a runtime option. Refused: no_bias=False (llama.cpp's
Qwen has no bias outside attn_qkv), per-layer attention windows, quantized (GPTQ) checkpoints and an
extra_vocab_file. Tensors are converted one at a time, in row chunks, so memory stays near the size of the
largest converted tensor.

OUT is written next to its final place and renamed into it, so a failed export leaves OUT as it was; an
existing OUT is replaced only with --force, and never when it is one of the source files being read.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..configuration_qwen import QWenConfig
from ..loading import check_chat_checkpoint
from ..modeling_qwen import checkpoint_weight_files
from . import run_cli_action

logger = logging.getLogger(__name__)

ARCH = "qwen"
VOCAB_FILE = "qwen.tiktoken"
# outtype -> (torch dtype of the matrices, general.file_type)
OUTTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_BF16
_CHUNK_BYTES = 64 << 20  # rows converted at a time (of the converted tensor)

# Qwen v1 per-layer tensor -> llama.cpp tensor (gguf.MODEL_TENSOR member name).
_LAYER_TENSORS = {
    "ln_1.weight": ("ATTN_NORM", "weight"),
    "attn.c_attn.weight": ("ATTN_QKV", "weight"),
    "attn.c_attn.bias": ("ATTN_QKV", "bias"),
    "attn.c_proj.weight": ("ATTN_OUT", "weight"),
    "ln_2.weight": ("FFN_NORM", "weight"),
    "mlp.w1.weight": ("FFN_UP", "weight"),  # w1 * silu(w2): w1 is the plain (up) branch
    "mlp.w2.weight": ("FFN_GATE", "weight"),  # w2 goes through SiLU: the gate
    "mlp.c_proj.weight": ("FFN_DOWN", "weight"),
}
_GLOBAL_TENSORS = {
    "transformer.wte.weight": ("TOKEN_EMBD", "weight"),
    "transformer.ln_f.weight": ("OUTPUT_NORM", "weight"),
    "lm_head.weight": ("OUTPUT", "weight"),
}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias")  # buffers, recomputed by every runtime
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # an ImportError is not an OSError/ValueError: say what to install
        raise ValueError("the `gguf` package is needed to write GGUF files: pip install 'qwen[gguf]' "
                         "(or pip install gguf)") from exc
    return gguf


# ----------------------------------------------------------------------------- config


def rotary_dim(config: QWenConfig) -> int:
    """The number of rotated dimensions per head (as QWenAttention computes it)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return head_dim if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)


def check_exportable(config: QWenConfig) -> None:
    """Raise a ValueError naming the first setting llama.cpp's Qwen architecture cannot express."""
    config.check_buildable()
    if not config.no_bias:
        raise ValueError("no_bias=False: this checkpoint has biases on attn.c_proj and the MLP, which llama.cpp's "
                         "Qwen architecture (bias on attn_qkv only) cannot express")
    windows = config.window_attn_sizes
    if windows is not None and any(w is not None and w > 0 for w in windows):
        raise ValueError(f"window_attn_sizes={windows}: llama.cpp's Qwen architecture has no per-layer windows")
    rot = rotary_dim(config)
    if rot <= 0 or rot % 2:
        raise ValueError(f"rotary dimension {rot} (kv_channels * rotary_pct): llama.cpp needs a positive even one")


def warn_dropped_features(config: QWenConfig) -> None:
    dropped = [name for name, on in (("dynamic NTK", config.use_dynamic_ntk), ("LogN", config.use_logn_attn)) if on]
    if dropped:
        logger.warning("%s not carried over: they act only beyond seq_length (%d), the GGUF context_length; "
                       "llama.cpp run with a longer context will differ from the original there",
                       " and ".join(dropped), config.seq_length)
    if config.use_cache_quantization:
        logger.warning("use_cache_quantization (the int8 KV cache) is a runtime option; not carried over")


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's name for a Qwen v1 checkpoint tensor; None for buffers that are not weights.
    Raises a ValueError for a tensor that has no place in the GGUF file (e.g. GPTQ's qweight)."""
    gguf = _gguf()
    if name in _GLOBAL_TENSORS:
        kind, suffix = _GLOBAL_TENSORS[name]
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]]}.{suffix}"
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    prefix = "transformer.h."
    if name.startswith(prefix):
        layer, _, rest = name[len(prefix):].partition(".")
        if layer.isdigit() and rest in _LAYER_TENSORS:
            kind, suffix = _LAYER_TENSORS[rest]
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=int(layer))}.{suffix}"
    raise ValueError(f"cannot export tensor {name!r}: it has no llama.cpp Qwen counterpart "
                     "(quantized checkpoints are not supported)")


def expected_shapes(config: QWenConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors the export needs, with their shapes (torch layout, [out, in])."""
    hidden, vocab, branch = config.hidden_size, config.vocab_size, config.intermediate_size // 2
    shapes = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    per_layer = {
        "ln_1.weight": (hidden,),
        "attn.c_attn.weight": (3 * hidden, hidden),
        "attn.c_attn.bias": (3 * hidden,),
        "attn.c_proj.weight": (hidden, hidden),
        "ln_2.weight": (hidden,),
        "mlp.w1.weight": (branch, hidden),
        "mlp.w2.weight": (branch, hidden),
        "mlp.c_proj.weight": (hidden, branch),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"transformer.h.{i}.{key}": shape for key, shape in per_layer.items()})
    return shapes


# ----------------------------------------------------------------------------- reading the weights


class _Weights:
    """The checkpoint's tensors by name, read lazily: shapes from the file headers, values by row ranges
    (safetensors slices; .bin files are memory-mapped)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where = {}  # name -> (file index, handle)
        for i, path in enumerate(files):
            if not path.is_file():
                raise FileNotFoundError(f"weight file {path} is missing")
            if path.suffix == ".safetensors":
                from safetensors import SafetensorError, safe_open

                try:
                    handle = safe_open(str(path), framework="pt")
                except SafetensorError as exc:
                    raise ValueError(f"cannot read {path}: {exc}") from exc
                names = handle.keys()
            else:
                try:
                    handle = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # pickle errors come in many types
                    raise ValueError(f"cannot read {path}: {exc}") from exc
                names = handle.keys()
            for name in names:
                if name in self._where:
                    raise ValueError(f"{name} appears in more than one weight file ({files[self._where[name][0]]}, "
                                     f"{path})")
                self._where[name] = (i, handle)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._where[name][1]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def is_float(self, name: str) -> bool:
        handle = self._where[name][1]
        if isinstance(handle, dict):
            return handle[name].is_floating_point()
        return handle.get_slice(name).get_dtype() in _SAFETENSORS_DTYPES

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        handle = self._where[name][1]
        if isinstance(handle, dict):
            return handle[name][start:stop]
        return handle.get_slice(name)[start:stop]


# ----------------------------------------------------------------------------- tokenizer


_TOKENIZER_CACHE: dict = {}  # the last vocabulary converted, by (sha256 of the tokenizer files, vocab_size)


def tokenizer_metadata(src: Path, vocab_size: int) -> dict:
    """Tokens, token types and merges for llama.cpp's "gpt2" BPE, from SRC's qwen.tiktoken. The result of
    the last call is kept, so exporting several outtypes of one model converts the vocabulary once."""
    import hashlib

    digest = hashlib.sha256((src / VOCAB_FILE).read_bytes())
    config = src / "tokenizer_config.json"  # may name an extra_vocab_file, which convert() refuses
    digest.update(config.read_bytes() if config.is_file() else b"")
    key = (digest.hexdigest(), vocab_size)
    if key not in _TOKENIZER_CACHE:
        result = _convert_tokenizer(src, vocab_size)
        _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = result
    return _TOKENIZER_CACHE[key]


def _convert_tokenizer(src: Path, vocab_size: int) -> dict:
    gguf = _gguf()
    from ..tokenization_qwen import SPECIAL_TOKENS, QWenTokenizer
    from .fast_tokenizer import convert

    tokenizer = QWenTokenizer.from_pretrained(src)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but config.json's vocab_size is {vocab_size}")
    backend = convert(tokenizer)  # refuses an extra_vocab_file; checks the control ids
    model = json.loads(backend.to_str())["model"]
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, token_id in model["vocab"].items():
        tokens[token_id] = text
        types[token_id] = int(gguf.TokenType.NORMAL)
    for text, token_id in SPECIAL_TOKENS.items():
        tokens[token_id] = text
        types[token_id] = int(gguf.TokenType.CONTROL)
    missing = [i for i in range(len(tokenizer)) if tokens[i] is None]
    if missing:
        raise ValueError(f"the tokenizer has no token for id(s) {missing[:5]}")
    for i in range(len(tokenizer), vocab_size):
        tokens[i] = f"[PAD{i}]"  # embedding rows the vocabulary does not use (151851.. in the published models)
    # tokenizers >= 0.20 stores merges as [left, right]; byte-level tokens never contain a space.
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def _special_ids(src: Path) -> dict[str, int]:
    from ..tokenization_qwen import ENDOFTEXT, SPECIAL_TOKENS

    eod = SPECIAL_TOKENS[ENDOFTEXT]
    ids = {"bos": eod, "eos": eod, "unk": eod, "pad": eod}
    path = src / "generation_config.json"
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        for key in ("eos", "pad"):
            value = generation.get(f"{key}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and value >= 0:
                ids[key] = value
    return ids


# ----------------------------------------------------------------------------- output file


def check_output(out, sources, force: bool) -> Path:
    """OUT as a path once it is safe to write it: not a directory, not one of the source files, and
    not an existing file unless `force`."""
    out = Path(out)
    target = out.resolve()
    for source in sources:
        if target == Path(source).resolve():
            raise ValueError(f"the output {out} is a file of the source checkpoint ({source}): choose another path")
    if target.is_dir():
        raise IsADirectoryError(f"{out} is a directory: OUT is the path of the .gguf file to write")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} exists: pass --force (force=True) to replace it")
    return out


def _check_free_space(directory: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(f"not enough disk space in {directory}: the GGUF file needs {needed / 1e9:.2f} GB, "
                      f"{free / 1e9:.2f} GB free")


# ----------------------------------------------------------------------------- export


def _plan(weights: _Weights, config: QWenConfig) -> list[tuple[str, str]]:
    """(checkpoint name, GGUF name) in llama.cpp's order, after checking names and shapes."""
    expected = expected_shapes(config)
    by_gguf = {}
    for name in weights.names():
        target = gguf_tensor_name(name)  # refuses unknown (e.g. quantized) tensors
        if target is None:
            continue
        if name not in expected:  # e.g. a layer index beyond num_hidden_layers
            raise ValueError(f"tensor {name} does not fit config.json ({config.num_hidden_layers} layers)")
        shape = weights.shape(name)
        if shape != expected[name]:
            raise ValueError(f"tensor {name} has shape {list(shape)}; config.json implies {list(expected[name])}")
        if not weights.is_float(name):
            raise ValueError(f"tensor {name} is not floating point (quantized checkpoints are not supported)")
        by_gguf[target] = name
    missing = sorted(set(expected) - set(by_gguf.values()))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")

    def order(item):  # token_embd, the blocks in order, output_norm, output (the order of the forward pass)
        target = item[0]
        if target.startswith("blk."):
            return (1, int(target.split(".")[1]), target)
        return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(target, 3), 0, target)

    return [(name, target) for target, name in sorted(by_gguf.items(), key=order)]


def _out_dtype(shape, outtype: str) -> torch.dtype:
    return OUTTYPES[outtype] if len(shape) > 1 else torch.float32  # 1-D tensors stay F32 (llama.cpp's rule)


def _to_numpy(tensor: torch.Tensor):
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: write the raw 16-bit patterns
        return tensor.view(torch.int16).numpy().view("uint16")
    return tensor.numpy()


def export_gguf(src, out, outtype: str = "f16", force: bool = False, name: str | None = None) -> Path:
    """Write the GGUF file `out` from the Qwen v1 checkpoint directory `src` (see the module docstring).
    Raises FileNotFoundError/ValueError with a one-line message for bad input, before writing anything."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    gguf = _gguf()
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"not a checkpoint directory: {src}")
    check_chat_checkpoint(str(src), chat=False)  # config.json with model_type "qwen", and qwen.tiktoken
    config = QWenConfig.from_pretrained(src)
    check_exportable(config)
    files = checkpoint_weight_files(src)
    sources = [*files, src / "config.json", src / VOCAB_FILE, src / "model.safetensors.index.json",
               src / "pytorch_model.bin.index.json", src / "generation_config.json", src / "tokenizer_config.json"]
    out = check_output(out, sources, force)
    weights = _Weights(files)
    plan = _plan(weights, config)
    warn_dropped_features(config)

    start = time.perf_counter()
    vocab = tokenizer_metadata(src, config.vocab_size)
    special = _special_ids(src)
    logger.info("tokenizer: %d tokens, %d merges (%.1f s)", len(vocab["tokens"]), len(vocab["merges"]),
                time.perf_counter() - start)

    from ..tokenization_qwen import DEFAULT_CHAT_TEMPLATE

    infos = []
    for ckpt_name, target in plan:
        shape = weights.shape(ckpt_name)
        dtype = _out_dtype(shape, outtype)
        infos.append((ckpt_name, target, shape, dtype, math.prod(shape) * dtype.itemsize))
    total = sum(info[4] for info in infos)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(out.parent, total + (64 << 20))

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets an ordinary file's mode
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name or src.resolve().name)
        writer.add_type("model")
        writer.add_file_type(_FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.seq_length)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)  # llama.cpp's Qwen halves it per branch
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_attention_heads)
        writer.add_rope_dimension_count(rotary_dim(config))
        writer.add_rope_freq_base(float(config.rotary_emb_base))
        writer.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
        writer.add_vocab_size(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_bos_token_id(special["bos"])
        writer.add_eos_token_id(special["eos"])
        writer.add_unk_token_id(special["unk"])
        writer.add_pad_token_id(special["pad"])
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(DEFAULT_CHAT_TEMPLATE)

        import numpy as np

        np_dtypes = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
        raw_types = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                     torch.bfloat16: gguf.GGMLQuantizationType.BF16}
        for _, target, shape, dtype, nbytes in infos:
            writer.add_tensor_info(target, shape, np.dtype(np_dtypes[dtype]), nbytes, raw_dtype=raw_types[dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        written = 0
        for i, (ckpt_name, target, shape, dtype, nbytes) in enumerate(infos, start=1):
            data = np.empty(shape, dtype=np_dtypes[dtype])
            row_bytes = max(1, nbytes // shape[0])
            step = max(1, _CHUNK_BYTES // row_bytes)
            for row in range(0, shape[0], step):
                chunk = weights.rows(ckpt_name, row, row + step).to(dtype)
                data[row:row + step] = _to_numpy(chunk.contiguous())
            writer.write_tensor_data(data)
            del data
            written += nbytes
            logger.info("[%d/%d] %s -> %s %s %s (%.0f%% of %.2f GB, %.1f s)", i, len(infos), ckpt_name, target,
                        list(shape), str(dtype).removeprefix("torch."), 100 * written / total, total / 1e9,
                        time.perf_counter() - start)
        writer.close()
        writer = None
        os.replace(tmp, out)  # replaces a symlink at OUT, never writes through it
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m qwen.tools.export_gguf",
        description=__doc__.split("\n\n")[0],
        epilog="Refused (error: ..., exit 2): no_bias=False, per-layer attention windows, quantized checkpoints, "
               "an extra_vocab_file. llama.cpp loads the file with architecture 'qwen' "
               "(e.g. llama-cli -m OUT.gguf, or llama_cpp.Llama(model_path=OUT)).",
    )
    parser.add_argument("src", help="Qwen v1 checkpoint directory (config.json, weights, qwen.tiktoken)")
    parser.add_argument("out", help="the GGUF file to write")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                        help="type of the weight matrices (1-D tensors are always f32); default f16")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--name", help="general.name in the file (default: SRC's directory name)")
    args = parser.parse_args(argv)

    def action():
        start = time.perf_counter()
        export_gguf(args.src, args.out, args.outtype, force=args.force, name=args.name)
        size = os.path.getsize(args.out)
        return f"wrote {args.out} ({args.outtype}, {size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s"

    return run_cli_action(action)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    sys.exit(main())
