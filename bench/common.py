"""Timing, floors and reporting shared by the benchmark suites (imported by conftest.py)."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
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


_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100/H200: 50 MB), as do_bench's flush


def time_cuda(fn, *, flush: bool, warmup_ms: float = 25, rep_ms: float = 200,
              estimate_ms: float | None = None, min_calls: int = 5) -> dict:
    """Median/p20/p80 milliseconds of one call, CUDA events around each call.

    flush: a 256 MB buffer is zeroed before each call (the L2 flushed), as
    `triton.testing.do_bench` does; otherwise back to back. Warm-up first, then at least
    ``min_calls`` timed calls, more while they fit in rep_ms (do_bench itself would take a single
    sample of a call longer than rep_ms). estimate_ms skips the 3-call estimate.
    """
    cache = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush else None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if estimate_ms is None:
        fn()
        torch.cuda.synchronize()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 3
    estimate_ms = max(estimate_ms, 1e-3)
    n_warm = max(1, int(warmup_ms / estimate_ms))
    n_rep = max(min_calls, min(2000, int(rep_ms / estimate_ms)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        if cache is not None:
            cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)], calls=n_rep)


def time_wall(fn, *, warmup_ms: float = 25, rep_ms: float = 300, min_calls: int = 10) -> dict:
    """Median/p20/p80 milliseconds of one call as its caller waits for it: the GPU synchronised
    before the clock starts and after the call. For calls whose host work (tokenizing, packing,
    launching) is part of what is measured: CUDA events would see only the GPU's share when the
    next call's host work overlaps this call's kernels."""
    fn()  # a first call may still set up (a PyLate or CUDA-graph first call): not the estimate
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - begin) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    times = []
    for _ in range(max(min_calls, min(2000, int(rep_ms / estimate_ms)))):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times, calls=len(times))


def _quantiles(times_ms: list[float], calls: int) -> dict:
    q = torch.quantile(torch.tensor(times_ms, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8],
                                                                                 dtype=torch.float64))
    return {"median_ms": q[0].item(), "p20_ms": q[1].item(), "p80_ms": q[2].item(), "calls": calls}


class Measure:
    """The `measure` fixture's callable (bench/conftest.py):
    measure(fn, suite=, shape=, impl=, floor_ms=None, floor_kind=None, ours=False,
            variant=False, wall=False, **extra) -> the record (``tokens=`` among the extras adds
            ``tokens_per_s`` from the median the reports compare).

    GPU work is timed with CUDA events twice, L2 flushed before each call (``cold``, the number
    the reports compare) and back to back (``warm``); ``wall=True`` times host + GPU as a caller
    waits for it (end-to-end and single-text latency), once, reported in both fields. Every
    record is also appended at once to ``partial_path`` (a step stopped mid-way keeps what it
    measured). The first call in a test also runs under pytest-benchmark (rounds of back-to-back
    calls closed by a synchronize), which takes one measurement per test.
    """

    def __init__(self, benchmark=None, partial_path: Path | None = None):
        self.benchmark, self.partial_path = benchmark, partial_path

    def __call__(self, fn, *, suite: str, shape: str, impl: str, floor_ms=None, floor_kind=None,
                 ours: bool = False, variant: bool = False, wall: bool = False, **extra) -> dict:
        if DRY_RUN:
            fn()
            torch.cuda.synchronize()
            return {"cold": None, "warm": {"median_ms": float("nan")}}
        if wall:
            cold = warm = time_wall(fn)
        else:
            cold = time_cuda(fn, flush=True, min_calls=10)
            warm = time_cuda(fn, flush=False, estimate_ms=cold["median_ms"])
        if self.benchmark is not None:
            self._pytest_benchmark(fn, f"{suite} | {shape}", warm["median_ms"],
                                   {"impl": impl, "cold": cold, "warm": warm, **extra})
            self.benchmark = None
        record = {"suite": suite, "shape": shape, "impl": impl, "ours": ours, "variant": variant,
                  "timing": "wall" if wall else "cuda-events", "cold": cold, "warm": warm,
                  "floor_ms": floor_ms, "floor_kind": floor_kind, **extra}
        if extra.get("tokens"):
            record["tokens_per_s"] = extra["tokens"] / (cold["median_ms"] / 1e3)
        RECORDS.append(record)
        if self.partial_path is not None:
            with self.partial_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _pytest_benchmark(self, fn, group: str, warm_ms: float, info: dict) -> None:
        calls = max(1, min(200, int(20.0 / max(warm_ms, 1e-3))))
        slow = warm_ms > 50  # already timed many times over: fewer pytest-benchmark rounds

        def rounds():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        self.benchmark.group = group
        self.benchmark.extra_info.update({**info, "calls_per_round": calls})
        self.benchmark.pedantic(rounds, rounds=3 if slow else 5, warmup_rounds=0 if slow else 1)


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
    for name in ("triton", "transformers", "tokenizers", "sentence-transformers", "pylate",
                 "flash-maxsim", "late-interaction-kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _autotuners(packages):
    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in packages:
            continue
        for attr, value in list(vars(module).items()):
            for _ in range(4):  # an Autotuner may sit under triton.heuristics wrappers
                if isinstance(value, Autotuner):
                    yield f"{name}.{attr}", value
                    break
                value = getattr(value, "fn", None)


def forget_autotuning(*packages: str) -> None:
    """Make the Triton autotuners of these (peer) packages tune again at their next call.

    Their keys leave out sizes our cases vary (the number of documents, d 96 and 128 in one
    padded width): a choice made on the first case would be reused on every later one, tuned for
    another shape. Called when a case starts, so each peer runs the configuration it picks for
    that shape; its disk cache is turned off for the same reason."""
    for _, tuner in _autotuners(packages):
        tuner.cache.clear()
        tuner.cache_results = False


def autotuned(*packages: str) -> dict[str, str]:
    """The configuration each autotuner of these packages chose since `forget_autotuning` (for
    the records: what a peer ran on this case)."""
    return {name: str(tuner.best_config) for name, tuner in _autotuners(packages)
            if tuner.cache and getattr(tuner, "best_config", None) is not None}


def format_report(records: list[dict]) -> str:
    """Per shape: each implementation's median (cold and warm), ratio to ours, our floor fraction."""
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in records):
        lines += [f"\n### {suite}\n",
                  "| shape | impl | cold median (ms) | warm median (ms) | its time / ours (cold) | floor (ms) | fraction of floor (cold) |",
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
                role = " (ours)" if r["ours"] else " (variant)" if r.get("variant") else ""
                clock = " [wall clock]" if r.get("timing") == "wall" else ""
                lines.append(
                    f"| {shape} | {r['impl']}{role}{clock} | "
                    f"{r['cold']['median_ms']:.4f} | {r['warm']['median_ms']:.4f} | {ratio} | "
                    f"{floor_txt} | {frac} |"
                )
    return "\n".join(lines)


