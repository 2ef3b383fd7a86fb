"""The int8 KV-cache CUDA kernels (qwen/cache_kernels.*): the sources compile with nvcc and against
torch's headers here (no GPU needed), a model asking for them without CUDA falls back to the torch
path with the same tokens, and on a CUDA machine the kernels match the torch path."""

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import qwen
from qwen import cache_kernels
from qwen.modeling_qwen import REMOTE_CODE_FILES
from qwen.tools.tiny_checkpoint import build

SOURCES = Path(qwen.__file__).parent
IN_CI = os.environ.get("CI") == "true"


def _tool(name):
    path = shutil.which(name) or (f"/usr/local/cuda/bin/{name}" if Path(f"/usr/local/cuda/bin/{name}").exists()
                                  else None)
    if path is None and not IN_CI:
        pytest.skip(f"{name} is not installed")
    assert path, f"{name} is needed in CI: the CUDA sources must compile"
    return path


def _cuda_include() -> str:
    nvcc = Path(_tool("nvcc")).resolve()
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc.parent.parent):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root) / "include")
    raise AssertionError("nvcc is installed but cuda_runtime.h is not found (set CUDA_HOME)")


def test_the_kernel_file_compiles_with_nvcc(tmp_path):
    out = subprocess.run([_tool("nvcc"), "-c", "-O3", "-std=c++17", "-arch=sm_80", str(SOURCES / "cache_kernels.cu"),
                          "-o", str(tmp_path / "kernels.o")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "kernels.o").stat().st_size > 0


def test_the_binding_compiles_against_torch_headers():
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), _cuda_include(), sysconfig.get_paths()["include"]]
    out = subprocess.run(["g++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=qwen_cache_kernels",
                          *(f"-I{p}" for p in includes), str(SOURCES / "cache_kernels.cpp")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_sources_ship_as_remote_code(tmp_path):
    assert {"cache_kernels.py", "cache_kernels.cpp", "cache_kernels.cu"} <= set(REMOTE_CODE_FILES)
    assert cache_kernels.source_dir() == SOURCES.resolve()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cache_kernels") / "chat", chat=True, dtype="float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is what runs without CUDA")
def test_without_cuda_the_model_falls_back_with_the_same_tokens(checkpoint, caplog):
    ids = torch.tensor([qwen.QWenTokenizer.from_pretrained(checkpoint).encode("int8 cache, kernel or not")])
    outputs = {}
    for kernel in (False, True):
        model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, use_cache_quantization=True,
                                                     use_cache_kernel=kernel).eval()
        with caplog.at_level(logging.INFO, logger="qwen.cache_kernels"):
            outputs[kernel] = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None,
                                             top_p=None, top_k=None, repetition_penalty=None)
    assert torch.equal(outputs[True], outputs[False])
    assert cache_kernels.load(None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels_match_the_torch_path(dtype):
    ext = cache_kernels.load(None)
    assert ext is not None, "the extension did not build"
    generator = torch.Generator().manual_seed(0)
    for batch, heads, positions, tokens, head_dim in [(1, 2, 1, 1, 64), (2, 3, 5, 300, 128), (1, 4, 129, 1000, 80)]:
        x = torch.randn(batch, heads, tokens, head_dim, generator=generator)
        q, scale, zero = qwen.modeling_qwen.quantize_kv(x.to(dtype))
        query = torch.randn(batch, heads, positions, head_dim, generator=generator).to(dtype)
        probs = torch.softmax(torch.randn(batch, heads, positions, tokens, generator=generator), -1).to(dtype)
        cuda = [t.cuda() for t in (query, q, scale, zero, probs)]
        want_qk = cache_kernels.qk_torch(query.float(), q, scale.float(), zero.float())
        want_pv = cache_kernels.pv_torch(probs.float(), q, scale.float(), zero.float())
        got_qk = cache_kernels.qk(ext, *cuda[:4]).float().cpu()
        got_pv = cache_kernels.pv(ext, cuda[4], *cuda[1:4]).float().cpu()
        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got_qk, want_qk, rtol=tol, atol=tol * want_qk.abs().max().item())
        torch.testing.assert_close(got_pv, want_pv, rtol=tol, atol=tol * want_pv.abs().max().item())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
