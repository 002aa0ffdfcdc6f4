#!/usr/bin/env bash
# Run ON the GPU machine from the repository root (after bench/device/prepare.sh here), e.g.
#   run(command="BENCH_COMMIT=<sha> bash bench/device/run.sh", carry=[".whl", ".carry"])
# 1. the whole test suite natively (no interpreter), 2. the benchmarks, 3. a short table last.
# Everything lands under $OUT: test log, benchmark JSON/Markdown, pytest-benchmark JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD/src:/tmp/site" || exit 1
export COLBERT_TRITON_MINILM_DIR="$PWD/.carry/minilm"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

python3 -m pytest tests -q -x --durations=15 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}

BENCH_RESULTS_DIR="$OUT/results" python3 -m pytest bench -q -p no:cacheprovider \
  --benchmark-json="$OUT/results/pytest-benchmark.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -120
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
