"""Timing, floors and reporting shared by the benchmark suites (imported by conftest.py)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
RECORDS: list[dict] = []
# A dry pass (BENCH_DRY=1, bench/conftest.py) runs every case once and times nothing.
DRY_RUN = os.environ.get("BENCH_DRY") == "1"

@functools.lru_cache(maxsize=1)
def device_peaks() -> dict:
    """This GPU's two ceilings, measured once per session (METHOD.md: datasheets are leads):
    'flops' = a large bf16 cuBLAS matrix product, 'bytes' = a large device-to-device copy counting
    bytes read plus written. The floors in every report divide by these."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500)
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return {"flops": 2 * n**3 / (gemm_ms * 1e-3), "bytes": 2 * (1 << 30) / (copy_ms * 1e-3),
            "device": torch.cuda.get_device_name()}


def floor_ms(*, flops: float = 0.0, bytes_moved: float = 0.0) -> tuple[float, str]:
    """The physical floor of a workload: max(compute time, memory time), and which one binds."""
    if DRY_RUN:  # nothing is timed: skip measuring the ceilings
        return float("nan"), "dry"
    peaks = device_peaks()
    compute, memory = flops / peaks["flops"] * 1e3, bytes_moved / peaks["bytes"] * 1e3
    return (compute, "compute") if compute >= memory else (memory, "memory")


def time_cuda(fn, *, flush: bool, warmup_ms: float = 25, rep_ms: float = 200,
              estimate_ms: float | None = None) -> dict:
    """Median/p20/p80 milliseconds of one call, CUDA events around each call.

    flush: `triton.testing.do_bench`, which zeroes a 256 MB buffer (the L2 flushed) before each
    call. Otherwise back to back, warm-up first; at least 5 timed calls, more while they fit in
    rep_ms. estimate_ms (e.g. the flushed median) skips the 5-call estimate: a device session's
    minutes go to calls that count (an end-to-end encode can take a second).
    """
    import triton.testing

    if flush:
        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if estimate_ms is None:
        fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 5
    estimate_ms = max(estimate_ms, 1e-3)
    n_warm = max(1, int(warmup_ms / estimate_ms))
    n_rep = max(5, min(2000, int(rep_ms / estimate_ms)))
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


def git_commit() -> str:
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


def versions() -> dict:
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
                    f"| {shape} | {r['impl']}{' (ours)' if r['ours'] else ' (variant)' if r.get('variant') else ''} | "
                    f"{r['cold']['median_ms']:.4f} | {r['warm']['median_ms']:.4f} | {ratio} | "
                    f"{floor_txt} | {frac} |"
                )
    return "\n".join(lines)


