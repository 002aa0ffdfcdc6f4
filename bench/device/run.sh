#!/usr/bin/env bash
# Run ON the GPU machine from the repository root, after `bash bench/device/prepare.sh` here:
#   run(command="BENCH_COMMIT=<sha> bash bench/device/run.sh", carry=[".whl", ".carry"], timeout_s=600)
# With no arguments it runs the session plan, sized for a 15-minute device lease (one ~10-min
# call after a 1-2 min start, so the tool's 30-s warm window still allows one short rerun):
#   warm:60 tests:200 precompile:80 maxsim/fp16:120 encoder:110 maxsim/bf16   (DEADLINE_S=560)
# the fp16 shapes of both families first (the issues' targets), then bf16 with what is left;
# a second call runs what was cut (e.g. `maxsim/bf16 encoder-ops`), at once (the machine is
# given back after 30 s idle), with DEADLINE_S ~60 s under the lease's budget_left_s and the
# call's timeout_s ~20 s above DEADLINE_S: a call the tool ends returns no run.tgz.
# Steps, in the order given, each optionally capped at CAP seconds (STEP:CAP):
#   warm        the kernel variants the tests and benchmarks launch (bench/device/launches.jsonl),
#               compiled once each over all the machine's cores (warm_cache.py), unless the cache
#               carried from prepare.sh is this Triton build's (then nothing: it holds them)
#   tests       the whole test suite natively (no interpreter), spread over TEST_WORKERS (12)
#               pytest-xdist workers, which compile what the warm step left (each step's
#               summary line counts the kernels compiled) into Triton's shared on-disk cache (the
#               ahead-of-time compile checks are skipped: ~5 CPU-minutes that CI already spends
#               with the same Triton; COLBERT_TRITON_SKIP_AOT=0 keeps them). A worker
#               whose test faulted the GPU (tests/conftest.py) or hung past --timeout (a watchdog
#               thread: a signal cannot interrupt a CUDA wait) exits, and xdist starts a new one
#   precompile  the benchmark suites with BENCH_DRY=1 over the same workers: every case
#               prepared, checked and run once, so ours and the peers are compiled (and checked)
#               before the serial, timed passes (not the pooled cases: each worker would start
#               8 pooling processes; their untimed first call compiles the pooling kernels)
#   maxsim | encoder | encoder-ops | search | pooling   that benchmark family, timed, serially
#               (encoder = the whole encoder, encoder-ops = its kernels one by one, search = a
#               host-memory corpus streamed to the GPU, pooling = encoding with PyLate's token
#               pooling, and one batch's pooling alone, on the GPU and on the host; the last
#               three not in the default plan). FAMILY/EXPR
#               narrows one to the tests matching pytest's -k EXPR too (maxsim/fp16, encoder/query).
#               A test running past 120 s (a hung kernel) is ended, not the whole step.
#   tune-maxsim | tune-encoder | tune   bench/device/tune.py's sweep (TUNE_BUDGET_S, default 300)
# Every step gets at most what is left of DEADLINE_S and is stopped with SIGINT, so pytest and
# tune.py still write what they measured. Logs and results go to $OUT/r and are packed at the
# end into $OUT/run.tgz (the tool returns at most 8 files); a short table is printed last.
# Extra pytest options go in PYTEST_ADDOPTS (e.g. "-k 'rerank and d96'").
# Exit status: the steps' statuses OR-ed (124/130 = a step ran out of time; 4 = a step skipped).
set -uo pipefail
[ $# -gt 0 ] || set -- warm:60 tests:200 precompile:80 maxsim/fp16:120 encoder:110 maxsim/bf16
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
R="$OUT/r"
mkdir -p "$R/results"
deadline=$((SECONDS + ${DEADLINE_S:-560}))
workers=${TEST_WORKERS:-12}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site" || exit 1
export COLBERT_TRITON_MINILM_DIR="$PWD/.carry/minilm"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$R/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$R/env.txt"
# A carried wheel can shadow the machine's packages (PYTHONPATH comes first): the references the
# benchmarks and parity tests need must still import, or they would be skipped silently.
python3 -c "import pyarrow; print('pyarrow', pyarrow.__version__)" 2>&1 | tee -a "$R/env.txt"
python3 -c "import transformers, sentence_transformers, pylate; print('transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__, 'pylate', pylate.__version__)" 2>&1 | tee -a "$R/env.txt" \
  || echo "run.sh: WARNING: the reference packages do not import (stale .whl? re-run bench/device/prepare.sh)"
# Kernels compiled here ahead of time (bench/device/prepare.sh): the JIT finds them if this
# machine's Triton is the build they were compiled with (said here; else the warm step compiles
# them on this machine); each step's summary line counts the kernels compiled on the device.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
carried_cache=0
if [ -f .carry/triton-cache.tar.xz ]; then
  python3 bench/device/warm_cache.py unpack .carry/triton-cache.tar.xz "$TRITON_CACHE_DIR" 2>&1 | tee -a "$R/env.txt"
  [ "${PIPESTATUS[0]}" != 0 ] || carried_cache=1
fi
touch "$R/.cache-mark"
compiled_here() { find "$TRITON_CACHE_DIR" -name '*.cubin' -newer "$R/.cache-mark" 2>/dev/null | wc -l; }
parallel=()
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n "$workers"); else echo "run.sh: no pytest-xdist: tests run serially"; fi

rc=0
summary=()
for spec in "$@"; do
  step=${spec%%:*}
  cap=${spec#"$step"}; cap=${cap#:}
  family=${step%%/*}
  narrow=${step#"$family"}; narrow=${narrow#/}
  left=$((deadline - SECONDS))
  [ -z "$cap" ] || [ "$cap" -ge "$left" ] || left=$cap
  if [ "$left" -lt 45 ]; then
    echo "run.sh: no time left for $step"; summary+=("$step: skipped (no time left)"); rc=$((rc | 4)); continue
  fi
  echo "=== $step (${left} s) ==="
  started=$SECONDS
  before=$(compiled_here)
  limit=$((left - 10))
  case "$family" in
    warm)
      if [ "$carried_cache" = 1 ]; then
        echo "run.sh: the carried compile cache is this Triton's: nothing to compile"
      else
        timeout -s INT -k 10 "$limit" python3 bench/device/warm_cache.py compile bench/device/launches.jsonl \
          "$TRITON_CACHE_DIR" --jobs "$(nproc)" 2>&1 | tee "$R/warm.log" | tail -5
      fi ;;
    tests)
      COLBERT_TRITON_SKIP_AOT=${COLBERT_TRITON_SKIP_AOT:-1} timeout -s INT -k 10 "$limit" python3 -m pytest tests -q --durations=25 -p no:cacheprovider -o addopts="" \
        "${parallel[@]}" --timeout=120 --timeout-method=thread -rs 2>&1 | tee "$R/tests.log" | tail -40 ;;
    precompile)
      BENCH_DRY=1 timeout -s INT -k 10 "$limit" python3 -m pytest bench -q -p no:cacheprovider -o addopts="" \
        -k "(maxsim or encoder) and not pooled" "${parallel[@]}" --benchmark-disable 2>&1 | tee "$R/precompile.log" | tail -15 ;;
    maxsim|encoder|encoder-ops|search|pooling)
      # Peers that autotune (late-interaction-kernels keeps its choice on disk) chose during the
      # precompile pass, under 12 workers' contention: forgotten, so they tune on a quiet GPU
      # (the MaxSim suite also makes them retune for every case: bench/common.py).
      find "$TRITON_CACHE_DIR" -name '*.autotune.json' -delete 2>/dev/null
      case "$family" in
        encoder) select="encoder and not encoder_ops and not pooled" ;;
        pooling) select="pooled" ;;
        encoder-ops) select="encoder_ops" ;;
        *) select="$family" ;;
      esac
      [ -z "$narrow" ] || select="($select) and ($narrow)"
      name=${step//\//-}
      BENCH_RESULTS_DIR="$R/results" timeout -s INT -k 10 "$limit" python3 -m pytest bench -q -p no:cacheprovider \
        -k "$select" --timeout=120 --timeout-method=thread \
        --benchmark-json="$R/results/pytest-benchmark-$name.json" --benchmark-disable-gc \
        2>&1 | tee "$R/bench-$name.log" | tail -8 ;;
    tune|tune-maxsim|tune-encoder)
      family=${family#tune}; family=${family#-}; family=${family:-all}
      budget=${TUNE_BUDGET_S:-300}; [ "$budget" -lt $((left - 40)) ] || budget=$((left - 40))
      timeout -s INT -k 10 "$limit" python3 bench/device/tune.py "$family" --budget-s "$budget" \
        --out "$R/results/tune-$family.json" 2>&1 | tee "$R/tune-$family.log" | tail -40 ;;
    *)
      echo "run.sh: unknown step $step"; summary+=("$step: unknown step"); rc=$((rc | 8)); continue ;;
  esac
  status=${PIPESTATUS[0]}
  rc=$((rc | status))
  summary+=("$step: rc=$status in $((SECONDS - started)) s (cap $left s), $(($(compiled_here) - before)) kernels compiled")
done

echo "=== summary ==="
printf '%s\n' "${summary[@]}" | tee "$R/steps.txt"
grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$R"/tests.log "$R"/precompile.log "$R"/bench-*.log 2>/dev/null | tail -40
python3 bench/device/summarize.py "$R/results" 2>&1 | tee "$R/summary.txt"
tar czf "$OUT/run.tgz" -C "$R" . && cp "$R/summary.txt" "$R/steps.txt" "$OUT/" && rm -rf "$R"
echo "run.sh $*: rc=$rc"
exit $rc
