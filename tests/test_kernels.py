"""qwen.kernels: the small-M bf16/fp16 CPU kernel against an fp32 reference, on every code path this
CPU offers (in process, and in subprocesses under QWEN_KERNELS / ATEN_CPU_CAPABILITY caps), its
fallbacks to F.linear, and the build failure path.

Error bound. The inputs are bf16/fp16 values, so every product x_k * w_k is exact in fp32 (8x8 or
11x11 significand bits), and the kernel and the reference both sum them in fp32, in different
orders: each sum is within gamma_K * S of the exact dot product, S = sum_k |x_k w_k| + |b| and
gamma_K ~ K * 2^-24. The kernel then rounds once to the output dtype, adding at most u * |y|
(u = 2^-8 for bf16, 2^-11 for fp16: 8 and 11 significand bits; below the normal range half
the subnormal spacing, u * smallest_normal). So
    |kernel - reference| <= u * |reference| + 3 * K * 2^-24 * S + u * smallest_normal
holds for a correct kernel whatever its summation order; a wrong element or a dropped tail exceeds
it, and so can rounding partial sums to 16 bits (torch's own bf16 F.linear exceeds it on some
inputs, so where gemv falls back to torch it is compared with F.linear itself). As a check that the
rounding is to nearest and the fp32 sums are really fp32, most outputs must also equal the reference
rounded to the dtype exactly.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen import kernels

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.bfloat16, torch.float16]
NAMES = {0: "torch", 1: "avx2", 2: "avx512", 3: "avx512_bf16"}
# K and N around the vector widths (16 fp32 lanes, 32 bf16) and the 4-row tiles, plus real sizes.
KS = [1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 2048, 2049]
NS = [1, 3, 4, 5, 17, 1024]
MS = [1, 2, 5, 16]


# ----------------------------------------------------------------------------- what this machine offers


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


X86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def cpu_level() -> int:
    """The best kernel path the CPU flags allow (Linux clears a flag the OS does not enable)."""
    if not X86:
        return 0
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return 0
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return 1
    return 3 if "avx512_bf16" in flags else 2


CPU_LEVEL = cpu_level()
OFFERED = list(range(1, CPU_LEVEL + 1))  # the paths this CPU runs; an AVX2-only machine has [1]


def expected_level(env) -> int:
    setting = env.get("QWEN_KERNELS", "auto").strip().lower()
    off = {"off", "torch", "none", "0", "false", "no"}
    cap = 0 if setting in off else {"avx2": 1, "avx512": 2, "avx512_bf16": 3}.get(setting, 3)
    if env.get("ATEN_CPU_CAPABILITY", "").strip().lower() in ("avx2", "default"):
        cap = min(cap, 1)
    return min(cap, CPU_LEVEL)


@pytest.fixture(scope="module")
def built():
    """The backend of this process. The extension is built (or loaded) here, even where the
    environment caps this process at torch, so that the subprocesses load it from the cache."""
    name = kernels.backend()
    if X86:
        kernels._extension()
    return name


# ----------------------------------------------------------------------------- the reference


def unit_roundoff(dtype) -> float:
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]  # 8 and 11 significand bits


def check_against_fp32(y, x, w, b, what="") -> float:
    """Assert the bound in the module docstring; returns the fraction of outputs equal to the
    correctly rounded reference."""
    n, k = w.shape
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n), what
    xf, wf = x.reshape(-1, k).float(), w.float()
    ref = xf @ wf.T
    size = xf.abs() @ wf.abs().T
    if b is not None:
        ref = ref + b.float()
        size = size + b.float().abs()
    u = unit_roundoff(x.dtype)
    bound = u * ref.abs() + 3 * k * 2.0**-24 * size + u * torch.finfo(x.dtype).smallest_normal
    err = (y.reshape(-1, n).float() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g} (max error {err.max().item():.3g})"
    return (y.reshape(-1, n) == ref.to(x.dtype)).float().mean().item()


def check_gemv(y, x, w, b, what=""):
    """kernels.gemv's result y: within the bound where our kernel ran, else exactly F.linear's (whose
    bf16 kernels may round more than once: they are not held to the bound)."""
    if kernels.backend() != "torch" and kernels.supports(x, w):
        check_against_fp32(y, x, w, b, what)
    else:
        assert torch.equal(y, F.linear(x, w, b)), what


def random_case(m, n, k, dtype, bias, generator):
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    b = None if bias is None else torch.randn(n, generator=generator).to(bias)
    return x, w, b


# ----------------------------------------------------------------------------- backend choice


def test_backend_matches_cpu_flags(built):
    seen = NAMES[kernels._cpu_level]
    assert kernels._cpu_level == CPU_LEVEL, f"extension sees {seen}, /proc/cpuinfo {NAMES[CPU_LEVEL]}"
    assert built == NAMES[expected_level(os.environ)]
    assert kernels.MAX_ROWS >= 16
    if CPU_LEVEL:
        assert kernels._ext.max_rows == kernels.MAX_ROWS


# ----------------------------------------------------------------------------- every path against fp32


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_matches_fp32_reference(built, level, dtype):
    generator = torch.Generator().manual_seed(level * 10 + DTYPES.index(dtype))
    exact, total = 0.0, 0
    for k in KS:
        for n in NS:
            for m in MS:
                bias = [None, dtype, torch.float32][(k + n + m) % 3]
                x, w, b = random_case(m, n, k, dtype, bias, generator)
                y = kernels._gemv_at(x, w, b, level)
                exact += check_against_fp32(y, x, w, b, f"{NAMES[level]} M={m} N={n} K={k} bias={bias}") * m * n
                total += m * n
    assert exact / total > 0.99, f"only {exact / total:.1%} of outputs are the correctly rounded fp32 result"


@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_rows_and_threads_do_not_change_results(built, level):
    """Each output is one fixed-order fp32 sum: the same bits whatever M, the M blocking or the threads."""
    generator = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        x, w, b = random_case(13, 1029, 2049, dtype, dtype, generator)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(max(threads, 2))  # the rows split over (at least) two threads
            full = kernels._gemv_at(x, w, b, level)
            for i in range(x.shape[0]):
                assert torch.equal(kernels._gemv_at(x[i:i + 1], w, b, level), full[i:i + 1])
            torch.set_num_threads(1)
            single = kernels._gemv_at(x, w, b, level)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single, full)


def test_large_layer_uses_the_backend(built):
    """A Qwen-1.8B sized layer through the public gemv (whatever backend runs here)."""
    generator = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for m in (1, 4):
            x, w, b = random_case(m, 2048, 5504, dtype, dtype, generator)
            assert kernels.supports(x, w) == (built != "torch")
            check_gemv(kernels.gemv(x, w, b), x, w, b, f"{dtype} M={m}")


# ----------------------------------------------------------------------------- shapes, layouts, fallbacks


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_leading_dims_and_vectors(built, dtype):
    generator = torch.Generator().manual_seed(1)
    x, w, b = random_case(6, 40, 96, dtype, dtype, generator)
    x3 = x.reshape(2, 3, 96)
    y3 = kernels.gemv(x3, w, b)
    assert y3.shape == (2, 3, 40)
    check_gemv(y3, x3, w, b, "[B, T, K]")
    assert kernels.supports(x3, w) == (built != "torch")
    y1 = kernels.gemv(x[0], w)  # a 1-D activation, like F.linear
    assert y1.shape == (40,)
    check_gemv(y1, x[0], w, None, "[K]")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_non_contiguous_inputs(built, dtype):
    generator = torch.Generator().manual_seed(2)
    x, w, b = random_case(4, 33, 70, dtype, dtype, generator)
    strided_x = torch.randn(4, 140, generator=generator).to(dtype)[:, ::2]  # every other column
    assert not strided_x.is_contiguous()
    assert kernels.supports(strided_x, w) == (built != "torch")  # copied: M * K elements
    check_gemv(kernels.gemv(strided_x, w, b), strided_x, w, b, "strided x")
    strided_x3 = torch.randn(3, 2, 70, generator=generator).to(dtype).transpose(0, 1)  # [B, T, K] view
    assert kernels.supports(strided_x3, w) == (built != "torch")
    check_gemv(kernels.gemv(strided_x3, w, b), strided_x3, w, b, "strided [B, T, K]")
    transposed_x = x.T.contiguous().T
    check_gemv(kernels.gemv(transposed_x, w, b), transposed_x, w, b, "transposed x")
    strided_b = torch.randn(66, generator=generator).to(dtype)[::2]
    check_gemv(kernels.gemv(x, w, strided_b), x, w, strided_b, "strided bias")
    # A non-contiguous weight is not ours (copying it would cost more than the product): F.linear.
    w_t = w.T.contiguous().T
    assert not kernels.supports(x, w_t)
    assert torch.equal(kernels.gemv(x, w_t, b), F.linear(x, w_t, b))


def test_unsupported_falls_back_to_linear(built):
    generator = torch.Generator().manual_seed(4)
    cases = []
    x, w, b = random_case(kernels.MAX_ROWS + 1, 8, 16, torch.bfloat16, torch.bfloat16, generator)
    cases.append(("too many rows", x, w, b))
    x, w, b = random_case(3, 8, 16, torch.float32, torch.float32, generator)
    cases.append(("fp32", x, w, b))
    x, w, b = random_case(3, 8, 0, torch.bfloat16, None, generator)
    cases.append(("K = 0", x, w, b))
    cases.append(("M = 0", torch.zeros(0, 16, dtype=torch.bfloat16), w.new_zeros(8, 16), None))
    x, w, b = random_case(2, 8, 16, torch.bfloat16, None, generator)
    cases.append(("N = 0", x, w[:0], None))
    for what, x, w, b in cases:
        assert not kernels.supports(x, w), what
        assert torch.equal(kernels.gemv(x, w, b), F.linear(x, w, b)), what
    x, w, b = random_case(2, 8, 16, torch.bfloat16, None, generator)
    with pytest.raises(RuntimeError):  # mixed dtypes: whatever F.linear says
        kernels.gemv(x, w.half())


def test_autograd_falls_back(built):
    generator = torch.Generator().manual_seed(5)
    x, w, b = random_case(2, 8, 16, torch.bfloat16, torch.bfloat16, generator)
    w = torch.nn.Parameter(w)
    assert not kernels.supports(x, w)  # grad mode on and the weight requires grad
    y = kernels.gemv(x, w, b)
    y.float().sum().backward()
    assert w.grad is not None and torch.equal(w.grad, x.sum(0, keepdim=True).expand_as(w).to(w.grad.dtype))
    with torch.no_grad():
        assert kernels.supports(x, w) == (built != "torch")
        check_gemv(kernels.gemv(x, w, b), x, w.detach(), b, "Parameter under no_grad")
    with torch.inference_mode():
        check_gemv(kernels.gemv(x, w, b), x, w.detach(), b, "Parameter under inference_mode")


# ----------------------------------------------------------------------------- the many-row GEMM (cpu_gemm.cpp)
#
# Runs at every offered level (it is 256-bit AVX2 code; qwen.kernels.gemm uses it on the avx2 path,
# and on Zen 4's AVX-512 paths).
# The shapes cross its blocks: M over 480 rows (and not a multiple of the 6-row tile), N not a multiple
# of the 16-column tile, K over 256 (and not a multiple of the 8-element loads).

def gemm_expected(backend_name: str) -> bool:
    """Where the public gemm runs: the avx2 path, and the AVX-512 paths of a Zen 4."""
    return backend_name == "avx2" or (backend_name != "torch" and kernels.half_width_avx512())


def test_half_width_avx512_is_zen_4_only():
    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: 17\n"
    intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
    assert kernels.half_width_avx512(amd.format(25))  # Zen 3 / Zen 4 (Zen 3 has no AVX-512 path)
    assert not kernels.half_width_avx512(amd.format(26))  # Zen 5: full-width AVX-512
    assert not kernels.half_width_avx512(amd.format(23))  # Zen 2: AVX2 only anyway
    assert not kernels.half_width_avx512(intel)
    assert not kernels.half_width_avx512("")
    assert kernels.gemm_runs() == (GEMM_ON and gemm_expected(kernels.backend()))


GEMM_ON = kernels.GEMM
GEMM_SHAPES = [(1, 1, 1), (5, 17, 9), (6, 16, 8), (37, 100, 300), (487, 33, 520), (70, 260, 257)]
GEMM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.skipif(not OFFERED, reason="the GEMM needs AVX2 + FMA + F16C")
@pytest.mark.parametrize("x_dtype", DTYPES, ids=["bf16", "fp16"])
def test_gemm_matches_fp32_reference(built, x_dtype):
    generator = torch.Generator().manual_seed(20)
    exact, total = 0.0, 0
    for w_dtype in GEMM_DTYPES:
        for i, (m, n, k) in enumerate(GEMM_SHAPES):
            bias = [None, x_dtype, torch.float32][i % 3]
            x = torch.randn(m, k, generator=generator).to(x_dtype)
            w = torch.randn(n, k, generator=generator).to(w_dtype)
            b = None if bias is None else torch.randn(n, generator=generator).to(bias)
            y = kernels._gemm_at(x, w, b, None, 1)
            if w_dtype == torch.float32:  # products no longer exact in fp32: compare with fp32 products
                w = w.to(torch.float64)
            exact += check_against_fp32(y, x, w, b, f"{w_dtype} M={m} N={n} K={k} bias={bias}") * m * n
            total += m * n
    assert exact / total > 0.99, f"only {exact / total:.1%} of outputs are the correctly rounded fp32 result"


@pytest.mark.skipif(not OFFERED, reason="the GEMM needs AVX2 + FMA + F16C")
def test_gemm_fp32_activations():
    generator = torch.Generator().manual_seed(21)
    x, w = torch.randn(50, 300, generator=generator), torch.randn(70, 300, generator=generator).half()
    y = kernels._gemm_at(x, w, None, None, 1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ w.float().T, rtol=0, atol=1e-4)


@pytest.mark.skipif(not OFFERED, reason="the GEMM needs AVX2 + FMA + F16C")
def test_gemm_rows_threads_and_out_slices_do_not_change_results(built):
    """One fixed-order fp32 sum per output: the same bits whatever M, the threads, or whether the
    result goes into a column slice of a wider tensor (whose other columns stay as they were)."""
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(490, 300, generator=generator).to(torch.float16)
    w = torch.randn(100, 300, generator=generator).to(torch.float16)
    b = torch.randn(100, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        full = kernels._gemm_at(x, w, b, None, 1)
        for rows in (slice(0, 1), slice(5, 11), slice(479, 490)):
            assert torch.equal(kernels._gemm_at(x[rows], w, b, None, 1), full[rows])
        torch.set_num_threads(1)
        single = kernels._gemm_at(x, w, b, None, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, full)
    wide = torch.full((490, 130), 7.0, dtype=torch.float16)
    returned = kernels._gemm_at(x, w[:40], b[:40], wide[:, 10:50], 1)
    assert returned.data_ptr() == wide[:, 10:50].data_ptr()
    assert torch.equal(wide[:, 10:50], full[:, :40])
    assert (wide[:, :10] == 7).all() and (wide[:, 50:] == 7).all()


@pytest.mark.skipif(not OFFERED, reason="the GEMM needs AVX2 + FMA + F16C")
def test_gemm_declines_what_it_does_not_take(built):
    generator = torch.Generator().manual_seed(23)
    x, w = torch.randn(8, 32, generator=generator).half(), torch.randn(16, 32, generator=generator).half()
    declined = {
        "columns not contiguous": (x.T.contiguous().T, w, None, None),
        "weight columns not contiguous": (x, w.T.contiguous().T, None, None),
        "K differs": (x, w[:, :16], None, None),
        "integer weight": (x, w.to(torch.int8), None, None),
        "3-D activations": (x.reshape(2, 4, 32), w, None, None),
        "bias of the wrong length": (x, w, torch.zeros(15), None),
        "out of another dtype": (x, w, None, torch.empty(8, 16)),
        "out of another shape": (x, w, None, torch.empty(8, 17, dtype=torch.float16)),
        "M = 0": (x[:0], w, None, None),
    }
    for what, (xx, ww, bb, out) in declined.items():
        assert kernels._gemm_at(xx, ww, bb, out, 1) is None, what
    p = torch.nn.Parameter(w.clone())
    assert kernels._gemm_at(x, p, None, None, 1) is None  # an autograd graph to record
    with torch.no_grad():
        assert kernels._gemm_at(x, p, None, None, 1) is not None
    assert (kernels.gemm(x, w) is not None) == gemm_expected(built)


# ----------------------------------------------------------------------------- subprocesses: caps and failures


CHILD = textwrap.dedent(
    """
    import importlib.util, json, logging, pathlib, sys, types, warnings
    root, broken = sys.argv[1], sys.argv[2]
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.name, record.getMessage()))
    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    import torch
    # qwen.kernels by itself (it imports only torch): the package's __init__ imports transformers,
    # which would cost seconds per subprocess.
    spec = importlib.util.spec_from_file_location("qwen.kernels", root + "/qwen/kernels/__init__.py")
    kernels = importlib.util.module_from_spec(spec)
    package = types.ModuleType("qwen")
    package.__path__, package.kernels = [], kernels
    sys.modules.update({"qwen": package, "qwen.kernels": kernels})
    spec.loader.exec_module(kernels)
    if broken:  # a source that does not compile
        kernels._source_dir = lambda: pathlib.Path(broken)
    sys.path.insert(0, root)
    from tests.test_kernels import check_gemv, random_case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = kernels.backend()
    generator = torch.Generator().manual_seed(11)
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in ((1, 17, 33), (5, 67, 2049), (16, 3, 7)):
            x, w, b = random_case(m, n, k, dtype, dtype, generator)
            check_gemv(kernels.gemv(x.reshape(1, m, k), w, b), x.reshape(1, m, k), w, b, f"{name} {m} {n} {k}")
            assert kernels.supports(x, w) == (name != "torch")
    from tests.test_kernels import check_int8, check_int4, int8_case, int4_case
    for m, n, k in ((1, 17, 33), (5, 67, 2049), (16, 3, 7)):
        x, q, s, b = int8_case(m, n, k, torch.bfloat16, generator)
        check_int8(kernels.int8_gemv(x, q, s, b), x, q, s, b, f"{name} int8 {m} {n} {k}")
        assert kernels.supports_int8(x, q, s) == (name != "torch")
    for m, n, k, g in ((1, 17, 64, 32), (5, 67, 2048, 64), (16, 3, 256, 128), (3, 5, 512, 256)):
        x, packed, scales, mins, b = int4_case(m, n, k, g, None, generator)
        check_int4(kernels.int4_gemv(x, packed, scales, mins, g, b), x, packed, scales, mins, g, b,
                   f"{name} int4 {m} {n} {k} {g}", kernels._level)
        assert kernels.supports_int4(x, packed, scales, mins, g) == (name != "torch")
    from tests.test_kernels import check_against_fp32, gemm_expected
    x, w, b = random_case(40, 70, 300, torch.float16, torch.float16, generator)
    y = kernels.gemm(x, w, b)
    assert (y is not None) == gemm_expected(name), name
    if y is not None:
        check_against_fp32(y, x, w, b, "gemm")
    print(json.dumps({"backend": name, "records": records, "warnings": [str(w.message) for w in caught]}))
    """
)


def run_child(broken="", **env_changes):
    """Run CHILD (backend, correctness, log records) under `env_changes`, with `broken`: a directory
    whose cpu_gemv.cpp replaces ours."""
    env = {key: value for key, value in os.environ.items() if key not in ("QWEN_KERNELS", "ATEN_CPU_CAPABILITY")}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO_ROOT), str(broken)], check=False,
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


CAPS = [{}, {"QWEN_KERNELS": "avx2"}, {"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"},
        {"QWEN_KERNELS": "avx512"}, {"QWEN_KERNELS": "off"}]


@pytest.mark.parametrize("env", CAPS, ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()) or "auto")
def test_environment_caps_the_path(built, env):
    result = run_child(**env)
    assert result["backend"] == NAMES[expected_level(env)]
    infos = [message for level, name, message in result["records"] if name == "qwen.kernels" and level == "INFO"]
    assert len(infos) == 1 and result["backend"] in infos[0], result["records"]
    if expected_level(env):  # built by the fixture: this process only loads it
        assert "loaded from" in infos[0], infos
    assert not [r for r in result["records"] if r[0] in ("WARNING", "ERROR")] and not result["warnings"], result


@pytest.mark.parametrize("failure", ["no compiler", "compiler fails", "compile error"])
def test_build_failure_falls_back_to_torch(built, tmp_path, failure):
    """No build: one warning, backend "torch", gemv still right (an empty cache dir, so nothing prebuilt)."""
    env = {"QWEN_KERNEL_CACHE": str(tmp_path / "cache")}
    broken = ""
    if failure == "no compiler":
        env["CXX"] = str(tmp_path / "no-such-compiler")
    elif failure == "compiler fails":
        env["CXX"] = "/bin/false"
    else:
        broken = tmp_path / "broken"
        broken.mkdir()
        # Every source broken, so each compile job fails at once (one broken file among good ones
        # waits for the good compiles the build runs beside it: ~30 s more, the same outcome).
        for source in kernels._SOURCES:
            (broken / source).write_text("this is not C++;\n")
        for header in kernels._HEADERS:
            (broken / header).write_text((REPO_ROOT / "qwen" / "kernels" / header).read_text())
    result = run_child(broken, **env)
    assert result["backend"] == "torch"
    problems = [r for r in result["records"] if r[0] in ("WARNING", "ERROR")] + result["warnings"]
    if not X86:  # no kernel for this machine: nothing is built, nothing to warn about
        assert not problems, problems
        return
    assert len(problems) == 1 and problems[0][1] == "qwen.kernels" and "using torch" in problems[0][2], problems
    if failure == "compile error":
        assert "error:" in problems[0][2], problems  # the compiler's message, not just "it failed"
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_bench_smoke():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gemv.py"), "--smoke"], check=False,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory read bandwidth" in proc.stdout and "ours/torch" in proc.stdout


# ----------------------------------------------------------------------------- int8 / int4 weights
#
# The quantized kernels (cpu_qgemv.cpp) multiply bf16 activations by the exact integer q (a bf16 x
# times q is exact in fp32) and sum in fp32, applying the scales (and the int4 group minimum, through
# the group sums of x) in fp32; so against the float64 product of x with the canonical fp32 weights
# W~ (int8 q * scale, int4 q * scale + min), with S = sum_k |x_k| (|q_k| scale + |min|) + |bias|
# (int8: sum_k |x_k w~_k| + |bias|), each output is within
#     u * |reference| + 3 * (K + 64) * 2^-24 * S + u * smallest_normal      (u = 2^-8: bf16 output)
# the one bf16 rounding of the output plus fp32 summation (a dropped tail, a wrong nibble order or
# scale exceeds it by orders of magnitude). Approach (a) of issue 13: no activation rounding; level 1
# runs approach (c) instead, whose activation rounding adds fixed16_bound below (int8: groups of 128,
# the last one shorter where K is not a multiple of 128).

GROUPS = [32, 64, 128, 256]


def int8_case(m, n, k, bias, generator):
    x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, generator=generator) * 0.02
    if n > 2:
        scale[1] = 0  # an all-zero row
    b = None if bias is None else torch.randn(n, generator=generator).to(bias)
    return x, q, scale, b


def int4_case(m, n, k, g, bias, generator):
    x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    packed = torch.randint(0, 256, (n, k // 2), generator=generator, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=generator) * 0.01
    mins = -torch.rand(n, k // g, generator=generator) * 0.08
    b = None if bias is None else torch.randn(n, generator=generator).to(bias)
    return x, packed, scales, mins, b


def int4_weight(packed, scales, mins, g):
    """The canonical fp32 weight (one fused rounding of q * scale + min), and |q| * scale + |min|."""
    n = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, -1, g).float()
    w = torch.addcmul(mins[..., None], q, scales[..., None]).view(n, -1)
    size = (q * scales[..., None] + mins[..., None].abs()).view(n, -1)
    return w, size


def check_quantized(y, x, w, w_size, b, what="", extra=0.0):
    """The bound above (plus `extra`) for y against x @ w.T (+ b) in float64; returns the share of
    outputs equal to the correctly rounded reference."""
    n, k = w.shape
    assert y.dtype == torch.bfloat16 and y.shape == (*x.shape[:-1], n), what
    xd = x.reshape(-1, k).double()
    ref = xd @ w.double().T
    size = xd.abs() @ w_size.double().T
    if b is not None:
        ref = ref + b.double()
        size = size + b.double().abs()
    u = 2.0**-8
    bound = u * ref.abs() + 3 * (k + 64) * 2.0**-24 * size + u * torch.finfo(torch.bfloat16).smallest_normal
    bound = bound + (1 + u) * extra
    err = (y.reshape(-1, n).double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g} (max error {err.max().item():.3g})"
    return (y.reshape(-1, n) == ref.to(torch.bfloat16)).float().mean().item()


def check_int8(y, x, q, scale, b, what="", level=None):
    """level: the kernels' path that computed y (default: the one running)."""
    level = kernels._level if level is None else level
    w = q.float() * scale[:, None]
    return check_quantized(y, x, w, w.abs(), b, what, fixed16_bound(x, w.abs(), 128) if level == 1 else 0.0)


def fixed16_bound(x, size, g):
    """Approach (c) (level 1): each x becomes a multiple of its group's unit d = 2^(e - 14),
    2^e <= max |x| of the group < 2^(e + 1), exactly where it can (|x| >= 2^-7 max |x|), so
    |x - x~| <= d / 2: the output moves by at most sum_k (|q_k| scale + |min|) d_k / 2. Groups of g
    consecutive k, the last one shorter where g does not divide K."""
    xd = x.reshape(-1, x.shape[-1]).double()
    k = xd.shape[1]
    padded = torch.nn.functional.pad(xd, (0, -k % g))
    amax = padded.view(xd.shape[0], -1, g).abs().amax(-1)
    unit = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax.clamp_min(1e-300))) - 14), 0.0)
    return (unit.repeat_interleave(g, dim=1)[:, :k] / 2) @ size.double().T


def check_int4(y, x, packed, scales, mins, g, b, what="", level=3):
    w, size = int4_weight(packed, scales, mins, g)
    return check_quantized(y, x, w, size, b, what, fixed16_bound(x, size, g) if level == 1 else 0.0)


@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_int8_matches_reference(built, level):
    generator = torch.Generator().manual_seed(100 + level)
    exact, total = 0.0, 0
    for k in KS:
        for n in NS:
            for m in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16) if k in (33, 2049) else MS:
                bias = [None, torch.bfloat16, torch.float32][(k + n + m) % 3]
                x, q, s, b = int8_case(m, n, k, bias, generator)
                if m >= 2:
                    x[1, ::128] *= 1024  # an outlier per group: level 1 rounds the small activations
                y = kernels._int8_at(x, q, s, b, level)
                exact += check_int8(y, x, q, s, b, f"{NAMES[level]} M={m} N={n} K={k} bias={bias}", level) * m * n
                total += m * n
    assert exact / total > 0.99, f"only {exact / total:.1%} of outputs are the correctly rounded result"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_int4_matches_reference(built, level, group):
    generator = torch.Generator().manual_seed(200 + level * 7 + group)
    exact, total = 0.0, 0
    for k in sorted({group, 2 * group, 3 * group, 5 * group, 2048 // group * group}):
        for n in NS:
            for m in range(1, 17) if k == 3 * group and n == 17 else MS:
                bias = [None, torch.bfloat16, torch.float32][(k + n + m) % 3]
                x, packed, scales, mins, b = int4_case(m, n, k, group, bias, generator)
                if m >= 2:
                    x[1, ::group] *= 1024  # an outlier per group: level 1 rounds the small activations
                y = kernels._int4_at(x, packed, scales, mins, group, b, level)
                what = f"{NAMES[level]} g={group} M={m} N={n} K={k} bias={bias}"
                exact += check_int4(y, x, packed, scales, mins, group, b, what, level) * m * n
                total += m * n
    assert exact / total > 0.97, f"only {exact / total:.1%} of outputs are the correctly rounded result"


@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_int4_non_finite_activation_is_not_hidden(built, level):
    """An inf or NaN activation makes its rows' outputs non-finite, as in the fp32 reference (level 1
    rescales activations per group: a non-finite group must not turn into zeros)."""
    generator = torch.Generator().manual_seed(11)
    x, packed, scales, mins, _ = int4_case(3, 5, 256, 64, None, generator)
    x[0, 70], x[1, 3] = float("inf"), float("nan")
    y = kernels._int4_at(x, packed, scales, mins, 64, None, level)
    assert not torch.isfinite(y[:2]).any() and torch.isfinite(y[2]).all()


@pytest.mark.parametrize("level", OFFERED, ids=[NAMES[level] for level in OFFERED])
def test_quantized_rows_and_threads_do_not_change_results(built, level):
    generator = torch.Generator().manual_seed(9)
    x, q, s, b = int8_case(13, 1029, 2049, torch.bfloat16, generator)
    _, packed, scales, mins, _ = int4_case(13, 1029, 2048 + 64, 32, None, generator)
    x4 = torch.randn(13, 2048 + 64, generator=generator).to(torch.bfloat16)
    calls = [lambda xs: kernels._int8_at(xs, q, s, b, level),
             lambda xs: kernels._int4_at(xs, packed, scales, mins, 32, b, level)]
    threads = torch.get_num_threads()
    for call, xx in zip(calls, (x, x4)):
        try:
            torch.set_num_threads(max(threads, 2))
            full = call(xx)
            for i in range(xx.shape[0]):
                assert torch.equal(call(xx[i:i + 1]), full[i:i + 1])
            torch.set_num_threads(1)
            single = call(xx)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single, full)


def test_quantized_public_api_and_fallbacks(built):
    """int8_gemv / int4_gemv: our kernel where supports_*, else the fp32 reference rounded to x.dtype."""
    generator = torch.Generator().manual_seed(12)
    on = built != "torch"
    x, q, s, b = int8_case(3, 40, 96, torch.bfloat16, generator)
    x3 = x.reshape(3, 1, 96)
    assert kernels.supports_int8(x3, q, s) == on
    y = kernels.int8_gemv(x3, q, s, b)
    assert y.shape == (3, 1, 40)
    check_int8(y, x3, q, s, b, "[B, T, K]")
    check_int8(kernels.int8_gemv(x[0], q, s), x[0], q, s, None, "[K]")
    x4, packed, scales, mins, b4 = int4_case(2, 24, 128, 64, torch.float32, generator)
    assert kernels.supports_int4(x4, packed, scales, mins, 64) == on
    check_int4(kernels.int4_gemv(x4, packed, scales, mins, 64, b4), x4, packed, scales, mins, 64, b4, "int4")
    # Not ours: fp32 activations, too many rows, a group size that is not 32 or a multiple of 64,
    # non-contiguous or wrongly typed buffers: the reference path, same results up to the bound.
    many = torch.randn(kernels.MAX_ROWS + 1, 96, generator=generator).to(torch.bfloat16)
    for what, xx, qq, ss in [("fp32 x", x.float(), q, s), ("rows", many, q, s), ("strided q", x, q.T.contiguous().T[:, :96], s),
                             ("bf16 scale", x, q, s.bfloat16())]:
        if what != "strided q":
            assert not kernels.supports_int8(xx, qq, ss), what
        y = kernels.int8_gemv(xx, qq, ss, b)
        assert y.dtype == xx.dtype, what
        check_int8(y.bfloat16() if xx.dtype != torch.bfloat16 else y, xx.bfloat16(), qq, ss.float(), b, what)
    assert not kernels.supports_int8(x, q.T.contiguous().T, s)
    x96, p96, s96, m96, _ = int4_case(2, 8, 192, 96, None, generator)
    assert not kernels.supports_int4(x96, p96, s96, m96, 96)  # group 96: not a kernel group size
    check_int4(kernels.int4_gemv(x96, p96, s96, m96, 96), x96, p96, s96, m96, 96, None, "group 96")
    assert kernels._int8_or_none(x.float(), q, s) is None


def test_quantized_autograd_falls_back(built):
    generator = torch.Generator().manual_seed(13)
    x, q, s, b = int8_case(2, 8, 32, torch.bfloat16, generator)
    x = x.requires_grad_()
    assert not kernels.supports_int8(x, q, s)
    y = kernels.int8_gemv(x, q, s, b)
    y.float().sum().backward()
    assert x.grad is not None


# Approach (b) (exact=False: avx2 and avx512 with VPMADDUBSW, avx512_bf16 with AVX512_VNNI's VPDPBUSD;
# an avx512_bf16 CPU without VNNI keeps the exact kernel): the activations rounded to int8 per
# block of 32 k, d = max |x| / 127 of the block, |x_k - d round(x_k / d)| <= d / 2 (plus a few fp32
# ulps of d from computing x / d), so the bound above gains sum_k |q_k| scale_k * d_block(k) * (1/2 + 2^-10).


def activation_rounding_bound(x, packed, scales, g):
    """sum_k |q_k| s_k * d_block(k) * (1/2 + 2^-10) for each (row of x, weight row)."""
    n = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, -1, g).double()
    qs = (q * scales.double()[..., None]).view(n, -1)
    xd = x.reshape(-1, x.shape[-1]).double()
    d = xd.view(xd.shape[0], -1, 32).abs().amax(dim=2, keepdim=True).expand(-1, -1, 32).reshape(xd.shape) / 127
    return (d * (0.5 + 2.0**-10)) @ qs.T


VNNI = CPU_LEVEL >= 3 and "avx512_vnni" in cpu_flags()
INT8_ACTIVATION_LEVELS = [level for level in OFFERED if level < 3 or VNNI]


@pytest.mark.parametrize("level", INT8_ACTIVATION_LEVELS, ids=[NAMES[level] for level in INT8_ACTIVATION_LEVELS])
@pytest.mark.parametrize("group", GROUPS)
def test_int4_int8_activations_within_bound(built, group, level):
    assert level < 3 or kernels._ext.has_vnni()
    generator = torch.Generator().manual_seed(300 + group)
    differ = 0
    for k in sorted({group, 3 * group, 5 * group, 2048 // group * group}):
        for n in NS:
            for m in (1, 2, 4, 5, 16):
                bias = [None, torch.bfloat16, torch.float32][(k + n + m) % 3]
                x, packed, scales, mins, b = int4_case(m, n, k, group, bias, generator)
                if m == 2:
                    x[1, :32] = 0  # an all-zero block: scale 0
                y = kernels._int4_at(x, packed, scales, mins, group, b, level, exact=False)
                exact = kernels._int4_at(x, packed, scales, mins, group, b, level, exact=True)
                w, size = int4_weight(packed, scales, mins, group)
                n_, k_ = w.shape
                xd = x.reshape(-1, k_).double()
                ref = xd @ w.double().T + (0 if b is None else b.double())
                total = xd.abs() @ size.double().T + (0 if b is None else b.double().abs())
                u = 2.0**-8
                bound = (u * ref.abs() + 3 * (k_ + 64) * 2.0**-24 * total + u * torch.finfo(torch.bfloat16).smallest_normal
                         + (1 + u) * activation_rounding_bound(x, packed, scales, group))
                err = (y.reshape(-1, n_).double() - ref).abs()
                assert (err <= bound).all(), f"g={group} M={m} N={n} K={k}: exceeds by {(err - bound).max().item():.3g}"
                differ += int((y != exact).sum())
    assert differ > 0  # the rounding really happens (outputs differ from the exact kernel's)
    # rows and threads: the same bits whatever M
    x, packed, scales, mins, b = int4_case(13, 67, 2048, group, None, generator)
    full = kernels._int4_at(x, packed, scales, mins, group, b, level, exact=False)
    for i in range(13):
        assert torch.equal(kernels._int4_at(x[i:i + 1], packed, scales, mins, group, b, level, exact=False), full[i:i + 1])


INT4_ENV_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from qwen import kernels
    from tests.test_kernels import int4_case
    kernels.backend()
    x, packed, scales, mins, b = int4_case(2, 67, 2048, 64, None, torch.Generator().manual_seed(5))
    y = kernels.int4_gemv(x, packed, scales, mins, 64, b)
    at = [kernels._int4_at(x, packed, scales, mins, 64, b, kernels._level, exact=e) for e in (False, True)]
    print(kernels._level, torch.equal(y, at[0]), torch.equal(y, at[1]))
    """
)


@pytest.mark.skipif(not OFFERED, reason="the GEMM needs AVX2 + FMA + F16C")
def test_quantized_gemm_matches_reference(built):
    """cpu_gemm.cpp's int8 / int4 weights, dequantized (the canonical fp32 w~) as they are packed:
    the bound above without activation rounding, over shapes that cross the GEMM's blocks."""
    generator = torch.Generator().manual_seed(24)
    for i, (m, n, k) in enumerate([(1, 1, 64), (5, 17, 9), (37, 100, 300), (487, 33, 520), (70, 260, 768)]):
        bias = [None, torch.bfloat16, torch.float32][i % 3]
        x, q, scale, b = int8_case(m, n, k, bias, generator)
        check_int8(kernels._ext.gemm_int8(x, q, scale, b, None, 1), x, q, scale, b, f"int8 M={m} N={n} K={k}", level=3)
        for g in GROUPS:
            kk = max(g, k // g * g)
            x, packed, scales, mins, b = int4_case(m, n, kk, g, bias, generator)
            y = kernels._ext.gemm_int4(x, packed, scales, mins, g, b, None, 1)
            check_int4(y, x, packed, scales, mins, g, b, f"int4 M={m} N={n} K={kk} g={g}")
    x, packed, scales, mins, b = int4_case(4, 8, 128, 64, None, generator)
    for what, args in {"group not dividing K": (x, packed, scales[:, :1], mins[:, :1], 96),
                       "fp16 scales": (x, packed, scales.half(), mins, 64),
                       "K differs": (x[:, :64], packed, scales, mins, 64)}.items():
        assert kernels._ext.gemm_int4(*args, None, None, 1) is None, what
    x, q, scale, b = int8_case(4, 8, 16, None, generator)
    assert kernels._ext.gemm_int8(x, q.T.contiguous().T, scale, None, None, 1) is None
    assert kernels._ext.gemm_int8(x, q, scale.double(), None, None, 1) is None
    public = kernels.int8_gemm(x, q, scale), kernels.int4_gemm(*int4_case(4, 8, 128, 64, None, generator)[:4], 64)
    assert all((y is not None) == gemm_expected(built) for y in public)


@pytest.mark.parametrize("setting", ["int8", "bf16"])
def test_int4_activations_setting(built, setting):
    """QWEN_INT4_ACTIVATIONS=int8 (README) makes the model's int4 products round activations to int8
    (approach (b)) where the CPU has that kernel; the default keeps the exact-activation kernel."""
    env = dict(os.environ, QWEN_INT4_ACTIVATIONS=setting)
    if expected_level(env) == 0:
        pytest.skip("the kernels are off here (torch path): no int4 kernel to choose")
    proc = subprocess.run([sys.executable, "-c", INT4_ENV_CHILD, str(REPO_ROOT)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    level, as_int8, as_exact = proc.stdout.split()[-3:]
    level = int(level)
    assert level == expected_level(env)
    rounds = setting == "int8" and (level < 3 or VNNI)
    assert (as_int8, as_exact) == (("True", "False") if rounds else ("False", "True"))


def test_every_kernel_source_ships_in_the_package():
    """The extension is built from the installed package's files: pyproject's package-data must
    cover each source and header the build reads."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qwen"]
    for name in kernels._SOURCES + kernels._HEADERS:
        assert any(fnmatch.fnmatch(f"kernels/{name}", g) for g in globs), name
        assert (REPO_ROOT / "qwen" / "kernels" / name).is_file()
