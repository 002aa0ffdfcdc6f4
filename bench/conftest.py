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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
_RECORDS: list[dict] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)


# Dense tensor-core rate (fp16/bf16, FLOP/s) and HBM bandwidth (bytes/s) from the vendors' data
# sheets; matched by substring of torch.cuda.get_device_name(). The floors in the reports use these.
PEAKS = {
    "H200": {"flops": 989e12, "bytes": 4.8e12},
    "H100 PCIe": {"flops": 756e12, "bytes": 2.0e12},
    "H100": {"flops": 989e12, "bytes": 3.35e12},
    "A100": {"flops": 312e12, "bytes": 2.0e12},
    "L4": {"flops": 121e12, "bytes": 0.3e12},
}


def device_peaks() -> dict:
    """{'flops': dense fp16/bf16 FLOP/s, 'bytes': HBM bytes/s} of this GPU (H100 SXM if unknown)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, value in PEAKS.items():
        if key in name:
            return value
    return PEAKS["H100"]


def floor_ms(*, flops: float = 0.0, bytes_moved: float = 0.0) -> tuple[float, str]:
    """The physical floor of a workload: max(compute time, memory time), and which one binds."""
    peaks = device_peaks()
    compute, memory = flops / peaks["flops"] * 1e3, bytes_moved / peaks["bytes"] * 1e3
    return (compute, "compute") if compute >= memory else (memory, "memory")


def _time_cuda(fn, *, flush: bool, warmup_ms: float = 25, rep_ms: float = 200) -> dict:
    """Median/p20/p80 milliseconds of one call, CUDA events around each call."""
    import triton.testing

    if flush:
        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / estimate))
    n_rep = max(10, min(2000, int(rep_ms / estimate)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)])
    q = torch.quantile(times, torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


@pytest.fixture
def measure(benchmark):
    """measure(fn, suite=, shape=, impl=, floor_ms=None, floor_kind=None, ours=False, **extra)."""

    def run(fn, *, suite: str, shape: str, impl: str, floor_ms=None, floor_kind=None,
            ours: bool = False, **extra):
        cold = _time_cuda(fn, flush=True)
        warm = _time_cuda(fn, flush=False)
        calls = max(1, min(200, int(20.0 / max(warm["median_ms"], 1e-3))))

        def rounds():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        benchmark.group = f"{suite} | {shape}"
        benchmark.extra_info.update(
            {"impl": impl, "calls_per_round": calls, "cold": cold, "warm": warm, **extra}
        )
        benchmark.pedantic(rounds, rounds=5, warmup_rounds=1)
        record = {
            "suite": suite, "shape": shape, "impl": impl, "ours": ours,
            "cold": cold, "warm": warm, "floor_ms": floor_ms, "floor_kind": floor_kind, **extra,
        }
        _RECORDS.append(record)
        return record

    return run


def _git_commit() -> str:
    env = os.environ.get("BENCH_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
            check=True, cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "pylate", "flash-maxsim", "late-interaction-kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_report(records: list[dict]) -> str:
    """Per shape: each implementation's median (cold and warm), ratio to ours, our floor fraction."""
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in records):
        lines += [f"\n### {suite}\n",
                  "| shape | impl | cold median (ms) | warm median (ms) | ours vs this (cold) | floor (ms) | fraction of floor (cold) |",
                  "|---|---|---|---|---|---|---|"]
        rows = [r for r in records if r["suite"] == suite]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            group = [r for r in rows if r["shape"] == shape]
            ours = next((r for r in group if r["ours"]), None)
            for r in group:
                ratio = (f"{r['cold']['median_ms'] / ours['cold']['median_ms']:.2f}x"
                         if ours else "-")
                floor = r.get("floor_ms")
                frac = f"{floor / r['cold']['median_ms']:.0%}" if floor else "-"
                floor_txt = f"{floor:.4f} ({r.get('floor_kind')})" if floor else "-"
                lines.append(
                    f"| {shape} | {r['impl']}{' (ours)' if r['ours'] else ''} | "
                    f"{r['cold']['median_ms']:.4f} | {r['warm']['median_ms']:.4f} | {ratio} | "
                    f"{floor_txt} | {frac} |"
                )
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    commit = _git_commit()
    payload = {"device": device, "date": now.isoformat(timespec="seconds"), "commit": commit,
               "versions": _versions(), "records": _RECORDS}
    out_dir = Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    suites = "-".join(sorted({r["suite"] for r in _RECORDS}))
    stem = f"{now:%Y-%m-%d}_{slug}_{commit}_{suites}"
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = (f"# {suites} on {device}, {now:%Y-%m-%d}, commit {commit}\n\n"
             f"versions: {json.dumps(payload['versions'])}\n" + format_report(_RECORDS))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
