"""CUDA kernels for attention over the int8 KV cache (`use_cache_quantization=True, use_cache_kernel=True`).

This file is also written into saved checkpoints as remote code, with the kernel sources
cache_kernels.cu, cache_kernels.cpp and their shared header cache_kernels.cuh beside it: it imports
only torch and the standard library.

    from qwen import cache_kernels
    ext = cache_kernels.load(model.config)     # the built extension, or None (then the torch path runs)
    scores = cache_kernels.qk(ext, query, key_q, scale, zero)    # query @ dequantized(keys)^T
    out = cache_kernels.pv(ext, probs, value_q, scale, zero)     # probs @ dequantized(values)

The sources are found next to this file, else in the checkpoint directory (`config._name_or_path`:
transformers copies only the .py files of remote code into its module cache), never in the working
directory. The extension is built on first use with torch.utils.cpp_extension into
`$QWEN_KERNEL_CACHE/cache-<hash>` (default ~/.cache/qwen/kernels), so later processes load it
without compiling. Without CUDA, without the sources or when the build fails, `load` returns None
and one log line says why: the model then computes the same products by dequantizing (`qk_torch`,
`pv_torch`), as the original's torch path. The kernels sum in float32 in a fixed order; the torch
path multiplies in the model dtype, so the two differ by rounding (fp16: ~1e-3 relative).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = ("cache_kernels.cpp", "cache_kernels.cu")  # compiled
HEADERS = ("cache_kernels.cuh",)  # included by both: needed beside them, and part of the build's hash

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # source directory -> extension (or None after a failure)
_by_checkpoint: dict[str | None, str] = {}  # config._name_or_path -> its source directory (a key of _loaded)


def source_dir(config=None) -> Path | None:
    """The directory holding the kernel sources: beside this file, else the checkpoint's."""
    candidates = [Path(__file__).resolve().parent]
    name = getattr(config, "_name_or_path", None)
    if name and Path(name).is_dir():
        candidates.append(Path(name).resolve())
    for directory in candidates:
        if all((directory / source).is_file() for source in SOURCES + HEADERS):
            return directory
    return None


def _build_dir(directory: Path) -> Path:
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update((directory / source).read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda}".encode())
    root = Path(os.environ.get("QWEN_KERNEL_CACHE") or Path.home() / ".cache" / "qwen" / "kernels")
    path = root / f"cache-{digest.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(config=None):
    """The built extension (module with `qk` and `pv`), or None when the torch path must run."""
    if not torch.cuda.is_available():
        return _give_up("no CUDA device")
    # Every attention layer asks on every step: answer from memory, without looking at files again.
    name = getattr(config, "_name_or_path", None)
    if name in _by_checkpoint:
        return _loaded.get(_by_checkpoint[name])
    directory = source_dir(config)
    if directory is None:
        return _give_up(f"the sources {', '.join(SOURCES + HEADERS)} are not beside {__file__} nor in the checkpoint")
    key = str(directory)
    with _lock:
        if key not in _loaded:
            try:
                from torch.utils import cpp_extension

                build = _build_dir(directory)
                _loaded[key] = cpp_extension.load(
                    name=f"qwen_cache_kernels_{build.name.split('-')[1]}",
                    sources=[str(directory / source) for source in SOURCES],
                    build_directory=str(build), extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False,
                )
                logger.info("int8 KV cache: CUDA kernels (%s)", build)
            except Exception as exc:  # noqa: BLE001  (no nvcc, no ninja, a compile error: fall back)
                _loaded[key] = None
                logger.warning("int8 KV cache: the CUDA kernels could not be built (%s: %s); using the torch path",
                               type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        _by_checkpoint[name] = key
        return _loaded[key]


_said: set[str] = set()


def _give_up(reason: str):
    if reason not in _said:
        _said.add(reason)
        logger.info("int8 KV cache: torch path (%s)", reason)
    return None


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def qk(ext, query, key_q, scale, zero):
    """query [B, N, T, d] @ dequantized(key_q [B, N, K, d])^T -> [B, N, T, K] in query's dtype."""
    if ext is None:
        return qk_torch(query, key_q, scale, zero)
    dtype = query.dtype
    with torch.cuda.device(query.device):
        return ext.qk(query, key_q, scale.to(dtype), zero.to(dtype), _stream(query))


def pv(ext, probs, value_q, scale, zero):
    """probs [B, N, T, K] @ dequantized(value_q [B, N, K, d]) -> [B, N, T, d] in probs' dtype."""
    if ext is None:
        return pv_torch(probs, value_q, scale, zero)
    dtype = probs.dtype
    with torch.cuda.device(probs.device):
        return ext.pv(probs, value_q, scale.to(dtype), zero.to(dtype), _stream(probs))


def qk_torch(query, key_q, scale, zero):
    """The torch path: dequantize (scale * (q - zero), in scale's dtype), then matmul."""
    return torch.matmul(query, (scale * (key_q - zero)).to(query.dtype).transpose(-1, -2))


def pv_torch(probs, value_q, scale, zero):
    return torch.matmul(probs, (scale * (value_q - zero)).to(probs.dtype))
