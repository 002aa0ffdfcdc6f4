"""The scripts of a GPU session (bench/device/) work the first time there: device time is short.

run.sh's shell is parsed here, and summarize.py, which prints the table that closes a device
call, is run on a report shaped like the benchmark suites' (bench/conftest.py).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE_DIR = Path(__file__).resolve().parents[1] / "bench" / "device"
sys.path.insert(0, str(DEVICE_DIR))

import summarize  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_parses():
    for script in ("run.sh", "prepare.sh"):
        done = subprocess.run(["bash", "-n", str(DEVICE_DIR / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def _record(suite, shape, impl, ms, ours=False, **extra):
    return {"suite": suite, "shape": shape, "impl": impl, "ours": ours,
            "cold": {"median_ms": ms}, "warm": {"median_ms": ms / 2}, **extra}


def test_summarize_compares_ours_with_the_fastest_other(tmp_path, capsys):
    records = [
        _record("maxsim", "rerank", "ours", 0.02, ours=True, floor_ms=0.017, floor_kind="memory"),
        _record("maxsim", "rerank", "eager", 0.5),
        _record("maxsim", "rerank", "flash-maxsim", 0.06),
        _record("maxsim", "rerank", "lik", 0.08),
        _record("maxsim", "rerank", "ours-qregs", 0.01, variant=True),  # faster, but no peer
        # A whole call by the wall clock is not compared with ours (CUDA events): listed apart.
        _record("maxsim", "rerank", "pylate-rerank", 0.05, timing="wall"),
        _record("maxsim", "no ours here", "eager", 1.0),
        _record("encoder", "docs", "ours-torch", 2.0),
        _record("encoder", "docs", "hf-sdpa", 3.0),
        _record("encoder", "docs", "ours-triton", 1.0, ours=True, tokens_per_s=6e6),
    ]
    (tmp_path / "report.json").write_text(json.dumps(
        {"device": "GPU", "commit": "abc", "peaks": {"flops": 8e14, "bytes": 4.3e12}, "records": records}))
    (tmp_path / "pytest-benchmark-maxsim.json").write_text(json.dumps({"benchmarks": []}))
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| maxsim") or line.startswith("| encoder")]
    assert len(rows) == 3, out
    rerank = rows[0].split(" | ")
    assert rerank[3:8] == ["flash-maxsim", "0.0600", "3.00", "eager 25.00", "85%"]
    assert rerank[-1] == "ours-qregs 0.0100, pylate-rerank 0.0500 (wall) |"
    # A shape without our record (a failed check, a cut step) keeps its peers' times.
    assert rows[1].split(" | ")[1:4] == ["no ours here", "(no record)", "eager 1.0000"]
    # The encoder's baseline is HF sdpa (the yardstick), though our PyTorch path ran too.
    docs = rows[2].split(" | ")
    assert docs[3:7] == ["ours-torch", "2.0000", "2.00", "hf-sdpa 3.00"] and docs[-2:] == ["6.00", "- |"]


def test_summarize_without_reports(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 0
    assert "no benchmark reports" in capsys.readouterr().out


def test_a_cuda_fault_ends_the_process_that_hit_it(monkeypatch):
    import cuda_faults as conftest

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    exits = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(conftest.os, "_exit", exits.append)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    conftest.end_process_on_cuda_fault("tests/x.py::test_ok")
    assert exits == []
    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    conftest.end_process_on_cuda_fault("tests/x.py::test_bad")  # an xdist worker: the process ends
    assert exits == [3]
    stops = []
    monkeypatch.setattr(conftest.pytest, "exit", lambda reason, returncode: stops.append(reason))
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    conftest.end_process_on_cuda_fault("tests/x.py::test_bad")  # a serial run: pytest stops
    assert exits == [3] and len(stops) == 1
    assert "test_bad: CUDA error: an illegal memory access" in stops[0]


def test_the_device_run_skips_the_compile_checks(monkeypatch):
    """run.sh's tests step leaves the ahead-of-time compile checks to CI (the same Triton, and
    ~5 CPU-minutes of device time); they still run wherever the variable is unset."""
    from aot_compile import compile_case

    monkeypatch.setenv("COLBERT_TRITON_SKIP_AOT", "1")
    with pytest.raises(pytest.skip.Exception, match="CI runs them"):
        compile_case("encoder")
    assert "COLBERT_TRITON_SKIP_AOT=${COLBERT_TRITON_SKIP_AOT:-1} timeout" in (DEVICE_DIR / "run.sh").read_text()


# One launch recorded as bench/device/warm_cache.py records it, compiled into a cache for sm_90,
# then the same launch made with real tensors in a fresh process (Triton's JIT as on the GPU,
# with a driver that only names the target): it must find the compiled kernel, and a launch that
# Triton keys differently (a table not 16-byte aligned) must not.
_WARM_CACHE_SCRIPT = r"""
import json, os, sys
import torch
import aot_compile, warm_cache
from colbert_triton.kernels import embedding

phase, cache, launches = sys.argv[1:4]

def launch(aligned):
    recorders = aot_compile._record([(embedding, "_embed_layernorm_kernel")])
    hidden, vocab = 384, 1000
    word = torch.zeros(vocab * hidden + 1, dtype=torch.float16)
    word = (word[:-1] if aligned else word[1:]).view(vocab, hidden)
    rows = [torch.zeros(hidden) for _ in range(3)]
    ids = torch.zeros(37, dtype=torch.int64)
    embedding.embed_layernorm(ids, ids, word, torch.zeros(512, hidden, dtype=torch.float16), *rows, 1e-12)
    recorder = recorders["_embed_layernorm_kernel"]
    embedding._embed_layernorm_kernel = recorder.kernel
    (args, kwargs), = recorder.launches
    return recorder.kernel, args, kwargs

if phase == "compile":
    kernel, args, kwargs = launch(aligned=True)
    with open(launches, "w") as f:
        f.write(json.dumps(warm_cache.describe_launch(kernel.fn, {"do_not_specialize": kernel.do_not_specialize},
                                                      args, kwargs)) + "\n")
    sys.exit(warm_cache.compile_launches(launches, cache, binaries_only=True))

os.environ["TRITON_CACHE_DIR"] = cache
from triton import knobs
from triton.runtime import driver
driver.set_active(warm_cache._CompileOnlyDriver(warm_cache.ARCH))
hits = []
knobs.compilation.listener = lambda cache_hit, **_: hits.append(cache_hit)
for aligned in (True, False):
    kernel, args, kwargs = launch(aligned)
    kernel.warmup(*args, grid=(1,), **kwargs)
print(json.dumps(hits))
"""


def test_a_recorded_launch_is_found_in_the_warmed_cache(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton.runtime.jit

    if not hasattr(triton.runtime.jit, "native_specialize_impl"):
        pytest.skip("needs Triton >= 3.6 (native_specialize_impl)")
    root = DEVICE_DIR.parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), str(DEVICE_DIR)])
    cache, launches = tmp_path / "cache", tmp_path / "launches.jsonl"

    def run(phase):
        done = subprocess.run([sys.executable, "-c", _WARM_CACHE_SCRIPT, phase, str(cache), str(launches)],
                              check=False, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
            pytest.skip("no ptxas for the CUDA backend on this machine")
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    assert "1 of 1 recorded launches compiled or found, 0 skipped" in run("compile")
    assert sorted(p.suffix for p in cache.glob("*/_embed_layernorm_kernel.*")) == [".cubin", ".json"]
    # Packed and unpacked elsewhere as prepare.sh and run.sh do (the groups name absolute paths).
    archive = tmp_path / "triton-cache.tar.xz"
    subprocess.run(["tar", "-C", str(cache), "-cJf", str(archive), "."], check=True)
    shutil.rmtree(cache)
    cache = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, str(DEVICE_DIR / "warm_cache.py"), "unpack", str(archive), str(cache)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "matches this Triton" in done.stdout, done.stdout + done.stderr
    assert json.loads(run("launch").splitlines()[-1]) == [True, False]  # found; the unaligned one compiled
