#!/usr/bin/env bash
# Every GPU check of the int8 KV-cache CUDA kernels in one run, for a session lent a CUDA machine:
#   1. tests/test_cache_kernels.py: the sources compile (nvcc, torch's headers), the kernels'
#      per-thread code on the CPU, and on the GPU the built extension against the torch path across
#      shapes and dtypes, and the model's and the serving engine's greedy tokens with and without them;
#   2. bench/cache_kernels.py: the kernels against dequantize-then-matmul (decode steps of 1, 4 and
#      16 positions), and the bytes per token of the int8 cache against the 16-bit one.
# What they print goes to OUTDIR (machine.txt, tests.txt, bench.txt); the exit status is nonzero
# when either failed. Arguments after OUTDIR go to pytest (e.g. `-k cuda` for a rerun).
#
#   bash bench/gpu_check.sh [OUTDIR [PYTEST_ARGS...]]     # PYTHON=... picks the interpreter (python3)
#
# A machine with torch but without this project's other needs: carry wheels downloaded where PyPI is
# reachable (the vocabulary ships in dashscope; transformers >= 5.24) and name their folder in WHEELS:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl dashscope transformers==5.24.0
#   WHEELS=.whl bash bench/gpu_check.sh "$OUT"
set -uo pipefail

out=$(realpath -m "${1:-gpu_check}")
shift $(( $# > 0 ? 1 : 0 ))
python=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2

if [ -n "${WHEELS:-}" ]; then  # installed beside, not into, the interpreter's own packages
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QWEN_KERNEL_CACHE=${QWEN_KERNEL_CACHE:-$out/kernel-cache}  # a fresh build, timed by the tests

"$python" - <<'EOF' 2>&1 | tee "$out/machine.txt"
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers {transformers.__version__} | {gpu}")
EOF
"$python" -m pytest -q -p no:cacheprovider -rs tests/test_cache_kernels.py "$@" 2>&1 | tee "$out/tests.txt"
tests=$?
"$python" bench/cache_kernels.py --positions 1 4 16 --bandwidth-gib 0.25 2>&1 | tee "$out/bench.txt"
bench=$?
echo "tests: exit $tests, bench: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
