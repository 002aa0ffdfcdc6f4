"""Shared machinery of the GPU benchmark suites.

Every benchmark goes through the `measure` fixture, which
- times the callable on the GPU with CUDA events after warm-up, median of many runs, once with
  the L2 cache flushed before each run (``cold``, `triton.testing.do_bench`) and once back to
  back (``warm``);
- also runs it under pytest-benchmark (rounds of back-to-back calls closed by a synchronize),
  so the usual pytest-benchmark tables and ``--benchmark-json`` work;
- records the result, with the shape, the implementation and the physical floor, for the
  session report: a JSON file in ``bench/results/`` named by date, device and commit, with the
  versions, and a table (per shape: each implementation's median, ratio to ours, our fraction
  of the floor) printed at the end and written next to it as Markdown.

Benchmarks need CUDA; elsewhere the whole folder is skipped.

``BENCH_DRY=1`` makes `measure` run the callable once and time nothing: every case is still
prepared and checked against the reference, so a dry pass spread over workers
(``pytest -n 12``, bench/device/run.sh ``precompile``) fills Triton's on-disk cache with every
kernel the timed, serial pass will launch, and the device time of that pass goes to timing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import pytest
import torch
from common import (DRY_RUN, RECORDS, RESULTS_DIR, device_peaks, format_report, git_commit,
                    time_cuda, versions)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def measure(benchmark):
    """measure(fn, suite=, shape=, impl=, floor_ms=None, floor_kind=None, ours=False, **extra)."""

    def run(fn, *, suite: str, shape: str, impl: str, floor_ms=None, floor_kind=None,
            ours: bool = False, **extra):
        if DRY_RUN:
            fn()
            torch.cuda.synchronize()
            return {"cold": None, "warm": {"median_ms": float("nan")}}
        cold = time_cuda(fn, flush=True)
        warm = time_cuda(fn, flush=False, estimate_ms=cold["median_ms"])
        calls = max(1, min(200, int(20.0 / max(warm["median_ms"], 1e-3))))
        slow = warm["median_ms"] > 50  # already timed many times over: fewer pytest-benchmark rounds

        def rounds():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        benchmark.group = f"{suite} | {shape}"
        benchmark.extra_info.update(
            {"impl": impl, "calls_per_round": calls, "cold": cold, "warm": warm, **extra}
        )
        benchmark.pedantic(rounds, rounds=3 if slow else 5, warmup_rounds=0 if slow else 1)
        record = {
            "suite": suite, "shape": shape, "impl": impl, "ours": ours,
            "cold": cold, "warm": warm, "floor_ms": floor_ms, "floor_kind": floor_kind, **extra,
        }
        RECORDS.append(record)
        return record

    return run


def pytest_sessionfinish(session, exitstatus):
    if not RECORDS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    commit = git_commit()
    payload = {"device": device, "date": now.isoformat(timespec="seconds"), "commit": commit,
               "versions": versions(), "peaks": device_peaks(), "records": RECORDS}
    out_dir = Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    suites = "-".join(sorted({r["suite"] for r in RECORDS}))
    stem = f"{now:%Y-%m-%d}_{slug}_{commit}_{suites}"
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = (f"# {suites} on {device}, {now:%Y-%m-%d}, commit {commit}\n\n"
             f"versions: {json.dumps(payload['versions'])}\n"
             f"measured ceilings: {payload['peaks']['flops'] / 1e12:.0f} TFLOP/s bf16 GEMM, "
             f"{payload['peaks']['bytes'] / 1e12:.2f} TB/s copy\n" + format_report(RECORDS))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
