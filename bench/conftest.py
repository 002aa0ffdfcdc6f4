"""Shared machinery of the GPU benchmark suites.

Every benchmark goes through the `measure` fixture (`common.Measure`), which
- times the callable on the GPU with CUDA events after warm-up, median of many runs, once with
  the L2 cache flushed before each run (``cold``) and once back to back (``warm``), or, for
  calls whose host work counts (``wall=True``: end to end, one text), by the wall clock with
  the GPU synchronised around each call;
- also runs the first measurement of each test under pytest-benchmark (rounds of back-to-back
  calls closed by a synchronize), so the usual pytest-benchmark tables and ``--benchmark-json``
  work;
- records the result, with the shape, the implementation and the physical floor, appended at
  once to a ``*_partial-<pid>.jsonl`` file, and at the end in the session report: a JSON file
  in ``bench/results/`` named by date, device and commit, with the versions, and a table (per
  shape: each implementation's median, ratio to ours, our fraction of the floor) printed at the
  end and written next to it as Markdown; the partial file is then removed.

Benchmarks need CUDA; elsewhere the whole folder is skipped.

``BENCH_DRY=1`` makes `measure` run the callable once and time nothing: every case is still
prepared and checked against the reference, so a dry pass spread over workers
(``pytest -n 12``, bench/device/run.sh ``precompile``) fills Triton's on-disk cache with every
kernel the timed, serial pass will launch, and the device time of that pass goes to timing.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from common import (DRY_RUN, RECORDS, RESULTS_DIR, Measure, device_peaks, format_report, git_commit,
                    versions)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cuda_faults import end_process_on_cuda_fault


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)


_STARTED = _dt.datetime.now(_dt.timezone.utc)


def _out_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR))


def _stem(now: _dt.datetime, device: str, commit: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    return f"{now:%Y-%m-%d}_{slug}_{commit}"


@functools.lru_cache(maxsize=1)  # one file a session (git_commit runs git)
def _partial_path() -> Path:
    """Records are appended here as they are measured; the session's report replaces it at the
    end. A step stopped before its end (a timeout, a hung kernel) leaves it for summarize.py."""
    out_dir = _out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out_dir / f"{_stem(_STARTED, device, git_commit())}_partial-{os.getpid()}.jsonl"


@pytest.fixture(autouse=True)
def _cuda_faults_stop_the_process(request):
    """A kernel that faulted the GPU ends this process (the rest of a serial step would only
    repeat the fault; an xdist worker is replaced): as in the tests."""
    yield
    end_process_on_cuda_fault(request.node.nodeid)


@pytest.fixture
def measure(benchmark):
    """measure(fn, suite=, shape=, impl=, floor_ms=None, floor_kind=None, ours=False,
    variant=False, wall=False, **extra): common.Measure; any number of calls per test."""
    return Measure(benchmark, None if DRY_RUN else _partial_path())


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own, which may raise
def pytest_sessionfinish(session, exitstatus):
    if not RECORDS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    commit = git_commit()
    payload = {"device": device, "date": now.isoformat(timespec="seconds"), "commit": commit,
               "versions": versions(), "peaks": device_peaks(), "records": RECORDS}
    out_dir = _out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    suites = "-".join(sorted({r["suite"] for r in RECORDS}))
    stem = f"{_stem(now, device, commit)}_{suites}"
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    _partial_path().unlink(missing_ok=True)  # the report holds every record
    table = (f"# {suites} on {device}, {now:%Y-%m-%d}, commit {commit}\n\n"
             f"versions: {json.dumps(payload['versions'])}\n"
             f"measured ceilings: {payload['peaks']['flops'] / 1e12:.0f} TFLOP/s bf16 GEMM, "
             f"{payload['peaks']['bytes'] / 1e12:.2f} TB/s copy\n" + format_report(RECORDS))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
