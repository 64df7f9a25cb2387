#!/usr/bin/env bash
# The first GPU run (issue [gpu], ../shared/GPU.md): ONE call to the lent machine, under 8 minutes,
# everything it makes under $OUT (the device tool copies that folder back).
#
#   run: bash bench/gpu_check.sh      (carry [".whl"] with bitsandbytes' wheel, see ../shared/GPU.md)
#
# 1. the machine, the commit; 2. the `gpu`-marked tests natively (no interpreter), in the test files that
# hold them (the others import serving packages the GPU machine lacks); 3. bench.codec (batched Mimi against
# the per-stream loop, 1/8/32 streams, CUDA graphs); 4. bench.gpu_suite at the real sizes in what is left of
# the budget. Each step has its own timeout so a hang cannot eat the rest.
set -uo pipefail
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log") 2>&1
start=$(date +%s)

git rev-parse HEAD > "$OUT/commit" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if ls .whl/*.whl >/dev/null 2>&1; then  # bitsandbytes (and anything else) the machine lacks
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
unset TRITON_INTERPRET

echo "== gpu tests ($(($(date +%s) - start)) s)"
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --junitxml "$OUT/gpu-tests.xml" \
    tests/test_kernels.py tests/test_engine.py tests/test_golden.py tests/test_codec.py
echo "gpu tests exit $?"

echo "== codec ($(($(date +%s) - start)) s)"  # issue [codec]: batched Mimi vs the per-stream loop, real-size Mimi
timeout 90 python3 -m bench.codec --streams 1 8 32 --frames 5 --json "$OUT/codec.json"
echo "codec exit $?"

left=$((450 - ($(date +%s) - start)))
echo "== gpu_suite ($left s left)"
timeout "$left" python3 -m bench.gpu_suite --out "$OUT/suite" --budget-min "$(python3 -c "print(max(1.0, ($left - 30) / 60))")"
echo "gpu_suite exit $?; total $(($(date +%s) - start)) s"
