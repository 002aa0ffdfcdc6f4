"""The short table a device call prints last: per benchmark shape, ours against the best peer.

Reads the session reports the benchmark suites write (``bench/conftest.py``: JSON files holding
``records``, and the ``*_partial-*.jsonl`` records of a session stopped before its end) from a
folder and prints, per suite and shape, our cold median, the fastest other
implementation and its median, the ratio (> 1: we are faster), eager PyTorch's ratio where it
ran, our fraction of the physical floor, tokens/s where recorded, and the medians of our kernel's
variants (other configurations timed beside the default, ``variant`` records). The full tables stay in
the Markdown reports next to the JSON.

    python3 bench/device/summarize.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The baseline column's reference, first found: eager PyTorch for MaxSim, HF sdpa for the
# encoder (the yardstick), then our own PyTorch path, the per-op suite's torch ops.
BASELINES = ("eager", "hf-sdpa", "ours-torch", "TorchOps")


def summarize(records: list[dict]) -> list[str]:
    header = ("| suite | shape | ours ms | best other | its ms | ours x faster | vs baseline | floor frac "
              "| Mtok/s | our variants, wall-clock rows (ms) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["shape"]), []).append(r)
    for (suite, shape), group in groups.items():
        ours = next((r for r in group if r["ours"]), None)
        if ours is None:  # ours failed its check or was cut: the shape stays, its peers listed
            times = ", ".join(f"{r['impl']} {r['cold']['median_ms']:.4f}" for r in group)
            lines.append(f"| {suite} | {shape} | (no record) | {times or '-'} | - | - | - | - | - | - |")
            continue
        ours_ms = ours["cold"]["median_ms"]
        # Variants are other rows of ours (kernel configurations, candidates for the default; the
        # PyLate drop-in's calls): listed in their own column, never taken as the best peer. So
        # are rows timed otherwise than ours (a whole call by the wall clock, host work included):
        # only like is compared with like.
        timing = ours.get("timing", "cuda-events")
        variants = [r for r in group if not r["ours"]
                    and (r.get("variant") or r.get("timing", "cuda-events") != timing)]
        others = [r for r in group if not r["ours"] and r not in variants]
        best = min(others, key=lambda r: r["cold"]["median_ms"], default=None)
        baseline = next((r for b in BASELINES for r in others if r["impl"] == b), None)
        floor = ours.get("floor_ms")
        tps = ours.get("tokens_per_s")
        cells = [
            suite, shape, f"{ours_ms:.4f}",
            best["impl"] if best else "-",
            f"{best['cold']['median_ms']:.4f}" if best else "-",
            f"{best['cold']['median_ms'] / ours_ms:.2f}" if best else "-",
            f"{baseline['impl']} {baseline['cold']['median_ms'] / ours_ms:.2f}" if baseline else "-",
            f"{floor / ours_ms:.0%}" if floor else "-",
            f"{tps / 1e6:.2f}" if tps else "-",
            ", ".join(f"{r['impl']} {r['cold']['median_ms']:.4f}"
                      + (" (wall)" if r.get("timing", "cuda-events") != timing else "") for r in variants) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path("bench/results")
    found = False
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{path.name}: unreadable ({exc})")
            continue
        if not isinstance(payload, dict) or "records" not in payload:
            continue  # pytest-benchmark's own JSON, tune sweeps
        found = True
        peaks = payload.get("peaks", {})
        print(f"\n{path.name}: {payload.get('device')} commit {payload.get('commit')}, "
              f"ceilings {peaks.get('flops', 0) / 1e12:.0f} TFLOP/s, {peaks.get('bytes', 0) / 1e12:.2f} TB/s")
        print("\n".join(summarize(payload["records"])))
    for path in sorted(folder.glob("*_partial-*.jsonl")):
        # A session that did not reach its end (stopped, killed) left only what it measured.
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # the last line, cut mid-write
        if records:
            found = True
            print(f"\n{path.name}: PARTIAL (the step stopped before its end), {len(records)} records")
            print("\n".join(summarize(records)))
    if not found:
        print(f"no benchmark reports in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
