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
    assert {"cache_kernels.py", "cache_kernels.cpp", "cache_kernels.cu", "cache_kernels.cuh"} <= set(REMOTE_CODE_FILES)
    assert cache_kernels.source_dir() == SOURCES.resolve()


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """tests/cache_kernels_host.cpp built with g++: the kernels' per-thread code run on the CPU."""
    import ctypes

    library = tmp_path_factory.mktemp("host") / "cache_kernels_host.so"
    out = subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{SOURCES}",
                          str(Path(__file__).with_name("cache_kernels_host.cpp")), "-o", str(library)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lib = ctypes.CDLL(str(library))
    pointer, number = ctypes.c_void_p, ctypes.c_int
    for name in ("host_qk", "host_pv"):
        getattr(lib, name).argtypes = [pointer] * 5 + [number, pointer] + [number] * 4
        getattr(lib, name).restype = number
    return lib


def _int8_cache(generator, batch, heads, tokens, head_dim, spare, device="cpu", dtype=torch.float32):
    """A quantized cache as the model holds it: views of [batch, heads, tokens + spare, .] buffers."""
    x = torch.randn(batch, heads, tokens + spare, head_dim, generator=generator)
    q, scale, zero = qwen.modeling_qwen.quantize_kv(x)
    # per-token scales (the cache concatenates chunks, each with its own): vary them along tokens
    scale = scale * torch.rand(batch, heads, tokens + spare, 1, generator=generator).add(0.5)
    zero = zero + torch.randint(-3, 4, zero.shape, generator=generator)
    buffers = q.to(device), scale.to(device, dtype), zero.to(device, dtype)
    return [t.narrow(2, 0, tokens) for t in buffers]


def _host_call(function, activations, q, scale, zero, out):
    strides = torch.tensor([q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), zero.stride(0),
                            zero.stride(1)], dtype=torch.int64)
    batch, heads, positions = activations.shape[:3]
    assert activations.is_contiguous() and out.is_contiguous()
    return function(activations.data_ptr(), q.data_ptr(), scale.data_ptr(), zero.data_ptr(), strides.data_ptr(),
                    heads, out.data_ptr(), batch * heads, positions, q.shape[2], q.shape[3])


def _assert_float32_sum(got, product, activations, q, scale, zero, terms, rounding=0.0):
    """got equals the exact (float64) product up to float32 summation error: each element within
    (terms + 4) * 2**-24 of the sum of its terms' magnitudes (the classic bound for a sum of that many
    rounded products, any order), plus `rounding` times its size (the final cast to a 16-bit dtype)."""
    want = product(activations.double(), q, scale.double(), zero.double())
    dequantized = (scale.double() * (q - zero.double())).abs()
    magnitude = torch.matmul(activations.double().abs(), dequantized.mT if product is cache_kernels.qk_torch
                             else dequantized)
    bound = (terms + 4) * 2.0 ** -24 * magnitude + rounding * want.abs() + (2.0 ** -25 if rounding else 0.0)
    error = (got.double() - want).abs()
    assert not got.isnan().any(), "an output element was never written"
    assert (error <= bound).all(), f"error {(error - bound).max().item():.3g} over the float32 bound"


# (batch, heads, positions, tokens, head_dim, spare buffer tokens): head sizes of Qwen (128) and odd
# ones (80: 16-byte loads; 36: 4-byte loads; 7: byte loads), token counts off every tile, one and
# several pv splits, dense caches and views of longer buffers.
HOST_CASES = [(1, 1, 1, 1, 128, 0), (2, 3, 1, 1000, 128, 24), (1, 2, 5, 300, 80, 0), (2, 2, 3, 129, 36, 7),
              (3, 1, 2, 70, 7, 5), (1, 2, 40, 64, 128, 64), (2, 1, 1, 4097, 16, 3)]


@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: "x".join(map(str, c)))
def test_the_kernel_threads_compute_the_torch_products(host_kernels, case):
    batch, heads, positions, tokens, head_dim, spare = case
    generator = torch.Generator().manual_seed(sum(case))
    q, scale, zero = _int8_cache(generator, batch, heads, tokens, head_dim, spare)
    query = torch.randn(batch, heads, positions, head_dim, generator=generator)
    probs = torch.softmax(torch.randn(batch, heads, positions, tokens, generator=generator) * 3, -1)
    scores = torch.full((batch, heads, positions, tokens), float("nan"))
    out = torch.full((batch, heads, positions, head_dim), float("nan"))

    width = _host_call(host_kernels.host_qk, query, q, scale, zero, scores)
    splits = _host_call(host_kernels.host_pv, probs, q, scale, zero, out)

    assert width == (16 if head_dim % 16 == 0 else 4 if head_dim % 4 == 0 else 1)
    # plan: enough chunks to make ~4096 blocks of the (rows x positions) pairs, no chunk under 64
    # tokens (but the last), as many chunks as `chunk` tokens each take to cover the cache
    wanted = max(1, min(-(-4096 // (batch * heads * positions)), -(-tokens // 64)))
    assert splits == -(-tokens // -(-tokens // wanted))
    assert (splits > 1) == (batch * heads * positions < 4096 and tokens > 64)
    _assert_float32_sum(scores, cache_kernels.qk_torch, query, q, scale, zero, head_dim)
    _assert_float32_sum(out, cache_kernels.pv_torch, probs, q, scale, zero, tokens)


def test_the_pv_plan_splits_long_caches_when_decoding(host_kernels):
    """One decode step of a 7B (32 heads) over 8k cached tokens: split-K gives thousands of blocks;
    a long prompt (many positions) needs none."""
    plan = {}
    for positions in (1, 512):
        q, scale, zero = _int8_cache(torch.Generator().manual_seed(positions), 1, 32, 8192, 4, 0)
        probs = torch.softmax(torch.randn(1, 32, positions, 8192), -1)
        out = torch.empty(1, 32, positions, 4)
        plan[positions] = _host_call(host_kernels.host_pv, probs, q, scale, zero, out)
        _assert_float32_sum(out, cache_kernels.pv_torch, probs, q, scale, zero, 8192)
    assert 32 * plan[1] >= 4096 and plan[512] == 1


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
    """The same cases as on the CPU, on the GPU in each activation dtype, the caches read in place as
    views of longer buffers; the only extra error is the final rounding to the dtype."""
    ext = cache_kernels.load(None)
    assert ext is not None, "the extension did not build"
    rounding = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    for batch, heads, positions, tokens, head_dim, spare in HOST_CASES:
        generator = torch.Generator().manual_seed(tokens)
        q, scale, zero = _int8_cache(generator, batch, heads, tokens, head_dim, spare, "cuda", dtype)
        query = torch.randn(batch, heads, positions, head_dim, generator=generator).to("cuda", dtype)
        probs = torch.softmax(torch.randn(batch, heads, positions, tokens, generator=generator), -1).to("cuda", dtype)
        inputs = [t.cpu() for t in (query, q, scale, zero, probs)]  # .cpu() of a view: a dense copy
        _assert_float32_sum(cache_kernels.qk(ext, query, q, scale, zero).cpu(), cache_kernels.qk_torch,
                            *inputs[:4], head_dim, rounding)
        _assert_float32_sum(cache_kernels.pv(ext, probs, q, scale, zero).cpu(), cache_kernels.pv_torch,
                            inputs[4], *inputs[1:4], tokens, rounding)


def _our_cuda_kernels_run(work):
    """(work()'s result, whether our kernels ran on the GPU meanwhile): CUPTI's record of the kernels
    launched in this process (any thread), not a log line, which the extension writes once per process."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        result = work()
        torch.cuda.synchronize()
    return result, any("qwen_cache::" in event.name for event in trace.events())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_model_gives_the_same_tokens_with_the_kernels(checkpoint):
    """generate(): the prompt goes through the torch path (more than CACHE_KERNEL_MAX_POSITIONS new
    tokens), each decode step through the kernels."""
    ids = torch.tensor([qwen.QWenTokenizer.from_pretrained(checkpoint).encode("int8 cache on a GPU")]).cuda()
    outputs = {}
    for kernel in (False, True):
        model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, use_cache_quantization=True,
                                                     use_cache_kernel=kernel).cuda().eval()
        outputs[kernel], ran = _our_cuda_kernels_run(lambda: model.generate(  # noqa: B023 (called at once)
            ids, do_sample=False, max_new_tokens=24, eos_token_id=None, top_p=None, top_k=None,
            repetition_penalty=None))
        assert ran == kernel
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_engine_gives_the_same_tokens_with_the_kernels(checkpoint):
    """The serving engine's int8 cache feeds the kernels too (rows of different lengths in one batch)."""
    from qwen.serving import Engine, SamplingParams

    tokenizer = qwen.QWenTokenizer.from_pretrained(checkpoint)
    prompts = [tokenizer.encode(text) for text in ("a short one", "a somewhat longer prompt for the int8 cache")]
    params = SamplingParams(max_new_tokens=16, do_sample=False)
    tokens = {}
    for kernel in (False, True):
        model = qwen.QWenLMHeadModel.from_pretrained(checkpoint, use_cache_quantization=True,
                                                     use_cache_kernel=kernel).cuda().eval()
        engine = Engine(model, tokenizer, max_running=2)
        try:
            def both():
                streams = [engine.submit(ids, params) for ids in prompts]  # noqa: B023 (called at once)
                return [stream.result().token_ids for stream in streams]

            tokens[kernel], ran = _our_cuda_kernels_run(both)
        finally:
            engine.shutdown()
        assert ran == kernel
    assert tokens[True] == tokens[False] and all(len(t) == 16 for t in tokens[True])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
