"""Block-size sweeps for a GPU session: every kernel's candidate configs, checked and timed, in one call.

The launchers pick block sizes with fixed heuristics (``maxsim._kernel_config``,
``linear.linear_config``, ``linear.fused_layernorm_config``, ``attention.attention_config``);
nothing is autotuned on the request path. This script measures those heuristics against a
grid of alternatives at the model's real sizes, so that a GPU session can correct them from one
table. It changes nothing in the package: the heuristics are edited by hand from the table.

On the GPU machine (after ``bash bench/device/prepare.sh`` here):
    run(command="bash bench/device/run.sh tune-maxsim tune-encoder", carry=[".whl", ".carry"])
or ``python3 bench/device/tune.py {maxsim,encoder,all} --budget-s 300 --out $OUT/tune.json``.
On a CPU, ``--smoke`` runs tiny shapes and two configs per kernel under TRITON_INTERPRET=1, so
the script itself is tested without a GPU (tests/test_tune_smoke.py).

How (METHOD.md: warm up, median of many runs, baseline and candidates in the same run):
1. Compile: every (case, config) launch runs once in a pool of worker processes that share
   Triton's on-disk cache, so the timing pass finds every variant compiled (serially, ~300
   variants would take several minutes of device time). Configs that fail to compile or
   launch (shared memory, registers) are recorded with their error and skipped.
2. Check: each config's output is compared with the heuristic's on the same inputs; a mismatch
   is a bug in the kernel or the config, printed as ``MISMATCH``.
3. Time: ``triton.testing.do_bench`` median with an L2 flush, heuristic first, in order of
   priority until ``--budget-s`` is spent (what is left is reported as not timed).
For MaxSim a second pass tries, around the best block config of the first, the per-document
loop, the query tile in registers or not, d padded to one dot, and the grid knobs (programs per
SM, documents per program).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import numpy as np  # noqa: E402

from colbert_triton.kernels import attention as attention_mod  # noqa: E402
from colbert_triton.kernels import linear as linear_mod  # noqa: E402
from colbert_triton.kernels import maxsim as maxsim_mod  # noqa: E402
from colbert_triton.model.ops import PackedBatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 384, 12, 32, 1536, 30522
QUERY_LEN = 32


# ----------------------------------------------------------------------------------------------
# Cases: a kernel at one shape. params are plain tuples so cases pickle to the workers.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str  # maxsim | linear | linear_ln | attention
    label: str
    params: tuple
    dtype: str = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def maxsim_cases(smoke: bool) -> list[Case]:
    """(Q, N, min_len, max_len, d, candidates K or 0), most important first."""
    if smoke:
        return [Case("maxsim", "smoke Q3 N5 d96", (3, 5, 1, 40, 96, 0)),
                Case("maxsim", "smoke cand Q2 K3 d32", (2, 6, 1, 20, 32, 3))]
    shapes = [
        ("rerank Q1 N1000 Ld300 d96", (1, 1000, 300, 300, 96, 0)),
        ("batch Q64 N10000 Ld300 d96", (64, 10_000, 300, 300, 96, 0)),
        ("batch Q32 N1000 Ld300 d96", (32, 1000, 300, 300, 96, 0)),
        ("varlen Q64 N10000 Ld20-300 d96", (64, 10_000, 20, 300, 96, 0)),
        ("rerank Q1 N1000 Ld300 d128", (1, 1000, 300, 300, 128, 0)),
        ("batch Q64 N10000 Ld300 d128", (64, 10_000, 300, 300, 128, 0)),
        ("candidates Q64 K100 of 10000 d96", (64, 10_000, 20, 300, 96, 100)),
        ("rerank-varlen Q1 N1000 Ld20-300 d96", (1, 1000, 20, 300, 96, 0)),
    ]
    return [Case("maxsim", label, params) for label, params in shapes]


def encoder_cases(smoke: bool) -> list[Case]:
    """Per op of one layer: (lengths seed/kind, N, K) for GEMMs, the batch kind for attention."""
    batches = ["smoke"] if smoke else ["docs", "queries", "one-query"]
    cases = []
    for batch in batches:
        cases += [
            Case("linear", f"{batch} qkv 384->1152", (batch, 3 * HIDDEN, HIDDEN, "")),
            Case("linear", f"{batch} ffn-up 384->1536 gelu", (batch, FFN, HIDDEN, "gelu")),
            Case("linear_ln", f"{batch} attn-out 384->384 +res+LN", (batch, HIDDEN, HIDDEN)),
            Case("linear_ln", f"{batch} ffn-down 1536->384 +res+LN", (batch, HIDDEN, FFN)),
            Case("attention", f"{batch} attention 12x32", (batch,)),
        ]
    return cases


# ----------------------------------------------------------------------------------------------
# Inputs (seeded, identical in every process)
# ----------------------------------------------------------------------------------------------


def _batch_lengths(kind: str) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(0)
    if kind == "smoke":
        seqs = [1, 17, 40, 5]
        return seqs, seqs
    if kind == "one-query":  # the smallest CUDA-graph bucket: one query and the filler
        return [QUERY_LEN, 64 - QUERY_LEN], [10, 1]
    if kind == "queries":  # 512 ColBERT queries: 32 rows, 5-32 of them keys
        return [QUERY_LEN] * 512, rng.integers(5, QUERY_LEN + 1, size=512).tolist()
    lengths, total = [], 0  # documents of 20-300 tokens, ~16k tokens in all
    while total < 16384:
        lengths.append(int(rng.integers(20, 301)))
        total += lengths[-1]
    return lengths, lengths


def make_inputs(case: Case) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    dtype = case.torch_dtype

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale + shift).to(dtype)

    if case.family == "maxsim":
        num_queries, num_docs, lo, hi, dim, k = case.params
        lengths = torch.randint(lo, hi + 1, (num_docs,), generator=torch.Generator().manual_seed(0))
        starts = torch.cumsum(lengths, 0) - lengths
        values = randn(int(lengths.sum()), dim)
        values = values / values.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(dtype)
        queries = randn(num_queries, QUERY_LEN, dim)
        queries = queries / queries.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(dtype)
        if k:
            pick = torch.randint(0, num_docs, (num_queries, k), generator=torch.Generator().manual_seed(1))
            starts, lengths = starts[pick], lengths[pick]
            out = torch.empty(num_queries, k, device=DEVICE)
        else:
            out = torch.empty(num_queries, num_docs, device=DEVICE)
        return {"queries": queries, "values": values, "starts": starts.to(DEVICE),
                "lengths": lengths.to(DEVICE), "out": out}

    seq_lens, key_lens = _batch_lengths(case.params[0])
    rng = np.random.default_rng(2)
    batch = PackedBatch.from_sequences([rng.integers(1000, VOCAB, size=n) for n in seq_lens],
                                       key_lens, DEVICE)
    num_tokens = int(sum(seq_lens))
    if case.family == "attention":
        return {"qkv": randn(num_tokens, 3 * HIDDEN), "batch": batch,
                "out": torch.empty(num_tokens, HIDDEN, device=DEVICE, dtype=dtype)}
    n, k = case.params[1], case.params[2]
    inputs = {"x": randn(num_tokens, k), "weight": randn(n, k, scale=k**-0.5), "bias": randn(n, scale=0.1),
              "out": torch.empty(num_tokens, n, device=DEVICE, dtype=dtype)}
    if case.family == "linear_ln":
        inputs.update(residual=randn(num_tokens, n), ln_weight=randn(n, scale=0.1, shift=1.0),
                      ln_bias=randn(n, scale=0.05))
    return inputs


# ----------------------------------------------------------------------------------------------
# Configs: the heuristic's first, then the grid
# ----------------------------------------------------------------------------------------------


def _maxsim_default(case: Case, inputs: dict) -> dict:
    q = inputs["queries"]
    qb_limit = 1 if case.params[5] else q.shape[0]
    cfg = maxsim_mod._kernel_config(q.dtype, q.shape[2], q.shape[1], qb_limit)
    return {**cfg._asdict(), "programs_per_sm": maxsim_mod._PROGRAMS_PER_SM,
            "max_docs_per_program": maxsim_mod._MAX_DOCS_PER_PROGRAM}


def maxsim_block_configs(case: Case, inputs: dict, smoke: bool) -> list[dict]:
    default = _maxsim_default(case, inputs)
    q = inputs["queries"]
    qb_cap = 1 if case.params[5] else maxsim_mod._next_pow2(q.shape[0])
    lq_pad = maxsim_mod._next_pow2(max(q.shape[1], 16))
    configs = [default]
    rows_options = (32, 64) if smoke else (32, 64, 128, 256)
    for rows in rows_options:
        lq_tile = min(lq_pad, rows)
        qb = rows // lq_tile
        if qb > qb_cap:
            continue
        for block_n in ((16, 32) if smoke else (32, 64, 128, 256)):
            if rows * block_n > 256 * 128:  # the fp32 similarity tile: > 128 registers a thread
                continue
            # One warpgroup (4 warps) per 64 rows of M: wgmma's M per warpgroup is 64. Below 64
            # rows the dots are mma.sync; 2 warps stack along M, so a tile's row max needs no
            # cross-warp (shared-memory) reduction, which 4 warps split along BLOCK_N do.
            # 16 warps at 256 x 128: half the shared-memory reads per MMA of 256 x 64 (NOTES.md,
            # session 4), 64 similarity registers a thread, one program per SM.
            wide = rows >= 256 and block_n >= 128
            for warps in ((2, 4) if rows <= 32 else (4,) if rows <= 64 else (8, 16) if wide else (8,)):
                for stages in ((2,) if smoke else (2, 3, 4)):
                    cfg = {**default, "qb": qb, "lq_tile": lq_tile,
                           "num_lq_chunks": -(-q.shape[1] // lq_tile), "block_n": block_n,
                           "num_warps": warps, "num_stages": stages}
                    if cfg not in configs:
                        configs.append(cfg)
    # The query tile as wgmma's register operand (maxsim._Config.q_in_regs, 16-bit only): half
    # the shared-memory reads per MMA for ~50 more registers a thread at d = 96 (sm_90: 176 at
    # 256 x 64, one program per SM; 168 under a maxnreg cap at 128 x 64 on one warpgroup, three).
    # Tiles of >= 64 rows (wgmma); the smoke run takes one small tile to exercise the path.
    # Most likely first (the budget may not reach the end of a case's list): the same tile as
    # the heuristic's, then 128 rows with three programs per SM. The cap is for d <= 96 only
    # (d = 128 needs 202 registers: it would spill).
    register_tiles = [(32, 16, 2, None)] if smoke else [
        (256, 64, 8, None), (128, 64, 4, 168), (128, 64, 4, None), (128, 32, 4, None),
        (128, 64, 8, None), (128, 128, 8, None), (256, 32, 8, None)]
    register_configs = []
    for rows, block_n, warps, maxnreg in register_tiles if q.dtype != torch.float32 else []:
        lq_tile = min(lq_pad, rows)
        if rows // lq_tile > qb_cap or (maxnreg and q.shape[2] > 96):
            continue
        for stages in ((2,) if smoke else (2, 3)):
            register_configs.append({**default, "qb": rows // lq_tile, "lq_tile": lq_tile,
                                     "num_lq_chunks": -(-q.shape[1] // lq_tile), "block_n": block_n,
                                     "num_warps": warps, "num_stages": stages, "q_in_regs": True,
                                     "maxnreg": maxnreg})
    # The register tiles right after the heuristic: timed before the budget runs out.
    return configs[:2] + register_configs[:1] if smoke else configs[:1] + register_configs + configs[1:]


def maxsim_variant_configs(best: dict, dim: int, smoke: bool) -> list[dict]:
    """Second pass, around the best block config: the per-document loop instead of the flat
    one, the query tile in registers or not (q_in_regs, tiles of >= 64 rows), d padded to one
    power-of-two dot (one wgmma chain, no waits between chunk dots, for 33% more MMA work at
    d = 96), and the grid knobs (programs per SM, documents per program)."""
    variants = [{**best, "flat": not best["flat"]}]
    if best["q_in_regs"] or best["qb"] * best["lq_tile"] >= 64:  # the MaxSim cases are fp16
        variants.append({**best, "q_in_regs": not best["q_in_regs"]})
    padded_k = maxsim_mod._next_pow2(dim)
    if (best["block_k"], best["num_k"]) != (padded_k, 1) and padded_k <= 256:
        variants.append({**best, "block_k": padded_k, "num_k": 1})
    knobs = [(4, 16), (16, 16), (8, 4), (8, 64), (2, 64)] if not smoke else [(2, 2)]
    variants += [{**best, "programs_per_sm": p, "max_docs_per_program": m} for p, m in knobs
                 if (p, m) != (best["programs_per_sm"], best["max_docs_per_program"])]
    return variants


def _linear_default(case: Case) -> dict:
    _, n, k, *_ = case.params
    if case.family == "linear":
        return linear_mod.linear_config(n, k, case.torch_dtype)
    return linear_mod.fused_layernorm_config(n, k, case.torch_dtype,
                                             linear_mod.shared_memory_limit(torch.device(DEVICE)))


def linear_configs(case: Case, smoke: bool) -> list[dict]:
    default = _linear_default(case)
    configs = [default]
    if case.family == "linear" and case.params[3] == "gelu":
        # The same tile with GELU's erf as a rational approximation (linear.GELU_ERF): whether
        # the exact-erf epilogue limits FFN-up (bench/NOTES.md, session 4).
        configs.append({**default, "ERF": "rational"})
    if smoke:
        alt = {**default, "BLOCK_M": 16, "num_warps": 4, "num_stages": 2}
        return configs + [alt] if alt != default else configs
    if case.family == "linear":
        for bm in (64, 128):
            for bn in (64, 128, 256):
                for bk in (32, 64):
                    for warps in (4, 8):
                        for stages in (3, 4):
                            if bm * bn > 128 * 128 and warps == 4:
                                continue
                            cfg = {**default, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                                   "num_warps": warps, "num_stages": stages}
                            if cfg not in configs:
                                configs.append(cfg)
    else:
        for bm in (16, 32, 64, 128):
            for bk in (32, 64):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        if bm * default["BLOCK_N"] * default["NUM_CHUNKS"] > 64 * 512 and warps == 4:
                            continue
                        if bm == 128 and stages > 2:  # 128 x 384 accumulators + 3 stages of x/W
                            continue
                        # The residual prefetch holds 3 more [BLOCK_M, 128] tiles in registers:
                        # only up to 64 rows (it spills beyond).
                        cfg = {**default, "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps,
                               "num_stages": stages,
                               "PREFETCH_RESIDUAL": default["PREFETCH_RESIDUAL"] and bm <= 64}
                        if cfg not in configs:
                            configs.append(cfg)
    return configs


def attention_configs(case: Case, inputs: dict, smoke: bool) -> list[dict]:
    default = attention_mod.attention_config(HEAD_DIM, inputs["batch"].max_seqlen, case.torch_dtype)
    configs = [default]
    grid = [(16, 16, 4, 1)] if smoke else [
        (bm, bn, w, s) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8)
        for s in (1, 2, 3)]
    for bm, bn, warps, stages in grid:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        if cfg not in configs:
            configs.append(cfg)
    return configs


def configs_for(case: Case, inputs: dict, smoke: bool) -> list[dict]:
    if case.family == "maxsim":
        return maxsim_block_configs(case, inputs, smoke)
    if case.family == "attention":
        return attention_configs(case, inputs, smoke)
    return linear_configs(case, smoke)


# ----------------------------------------------------------------------------------------------
# Running one config
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def launcher(case: Case, inputs: dict, config: dict):
    """(context manager that installs the config, zero-argument call that runs the kernel)."""
    if case.family == "maxsim":
        cfg = maxsim_mod._Config(*(config[name] for name in maxsim_mod._Config._fields))
        ctx = _patched(maxsim_mod, _PROGRAMS_PER_SM=config["programs_per_sm"],
                       _MAX_DOCS_PER_PROGRAM=config["max_docs_per_program"])
        i = inputs
        return ctx, lambda: maxsim_mod._launch(i["queries"], i["values"], i["starts"], i["lengths"],
                                               None, i["out"], cfg)
    if case.family == "attention":
        ctx = _patched(attention_mod, attention_config=lambda *_: config)
        b = inputs["batch"]
        # The model's path: the batch's host-built tile table for this config's tile height.
        table = attention_mod.attention_tile_table(b.seq_lens_host, b.key_lens_host, config["BLOCK_M"])
        tiles = attention_mod.AttentionTiles(torch.from_numpy(table).to(DEVICE), config["BLOCK_M"])
        return ctx, lambda: attention_mod.varlen_attention(
            inputs["qkv"], b.cu_seqlens, b.key_lens, b.max_seqlen, HEADS, HEAD_DIM, out=inputs["out"],
            tiles=tiles)
    i = inputs
    if case.family == "linear":
        ctx = _patched(linear_mod, linear_config=lambda *_: config,
                       GELU_ERF=config.get("ERF", linear_mod.GELU_ERF))
        return ctx, lambda: linear_mod.linear(i["x"], i["weight"], i["bias"], case.params[3] or None,
                                              out=i["out"], backend="triton")
    ctx = _patched(linear_mod, fused_layernorm_config=lambda *_: config)
    return ctx, lambda: linear_mod.linear_residual_layernorm(
        i["x"], i["weight"], i["bias"], i["residual"], i["ln_weight"], i["ln_bias"], 1e-12,
        out=i["out"], backend="triton")


def reference_launcher(case: Case, inputs: dict):
    """The obvious alternative timed beside the configs: cuBLAS + the Triton epilogue for GEMMs."""
    i = inputs
    if case.family == "linear":
        return lambda: linear_mod.linear(i["x"], i["weight"], i["bias"], case.params[3] or None,
                                         out=i["out"], backend="torch")
    if case.family == "linear_ln":
        return lambda: linear_mod.linear_residual_layernorm(
            i["x"], i["weight"], i["bias"], i["residual"], i["ln_weight"], i["ln_bias"], 1e-12,
            out=i["out"], backend="torch")
    return None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def run_once(case: Case, inputs: dict, config: dict) -> torch.Tensor:
    """One launch with the output poisoned first; returns a copy of the output."""
    out = inputs["out"]
    out.fill_(float("nan"))
    ctx, fn = launcher(case, inputs, config)
    with ctx:
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out.clone()


def _compile_worker(jobs: list[tuple[Case, list[dict]]]) -> list[tuple[str, str, str]]:
    """Launch each (case, config) once so the shared Triton cache holds it; report failures.

    A config that cannot compile or launch (shared memory, registers) is a result. An error
    that kills this process's CUDA context (an illegal address) would make every later launch
    here fail too: the worker stops and leaves its remaining configs to the timing pass."""
    failures = []
    for case, configs in jobs:
        try:
            inputs = make_inputs(case)
        except Exception:  # noqa: BLE001 - the context is gone
            return failures
        for config in configs:
            try:
                run_once(case, inputs, config)
            except Exception as exc:  # noqa: BLE001
                failures.append((case.label, json.dumps(config, sort_keys=True), _error(exc)))
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a sticky error: stop here
                    return failures
    return failures


def precompile(jobs: list[tuple[Case, list[dict]]], workers: int, deadline: float) -> dict:
    """Spread the configs over worker processes (each its own CUDA context, one Triton cache),
    in small pieces whose results are kept as they come: at the deadline (or when a worker died
    and its piece never returns) what compiled is kept and the rest compiles in the timing pass."""
    if workers <= 1:
        return {(label, cfg): err for label, cfg, err in _compile_worker(jobs)}
    pieces = [[(case, configs[w::workers])] for case, configs in jobs for w in range(workers)
              if configs[w::workers]]
    failures = {}
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(_compile_worker, pieces)
        for _ in pieces:
            part = results.next(timeout=max(0.1, deadline - time.monotonic()))
            failures.update({(label, cfg): err for label, cfg, err in part})
    except multiprocessing.TimeoutError:
        print("precompile: stopped at the deadline (or a worker died); what is left compiles "
              "in the timing pass", flush=True)
    finally:
        pool.terminate()
    return failures


def time_ms(fn, smoke: bool) -> float:
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


@dataclass
class Entry:
    case: str
    family: str
    config: dict
    default: bool
    ms: float | None = None
    error: str | None = None
    max_abs_diff: float | None = None
    note: str = ""


@dataclass
class Sweep:
    deadline: float
    smoke: bool
    workers: int
    out: Path | None = None
    meta: dict = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    skipped: int = 0

    def save(self) -> None:
        """Write everything measured so far (after every case: a stopped run keeps its data)."""
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": {**self.meta, "skipped": self.skipped},
                "entries": [asdict(e) for e in self.entries]}
        self.out.write_text(json.dumps(data, indent=1, allow_nan=False))

    def measure(self, case: Case, inputs: dict, configs: list[dict], failures: dict,
                tolerance: float, expected: torch.Tensor | None = None) -> list[Entry]:
        """Check and time each config. Without ``expected``, configs[0] is the heuristic and
        its output the one the others must match."""
        first_is_default = expected is None
        done = []
        for index, config in enumerate(configs):
            entry = Entry(case.label, case.family, config, default=first_is_default and index == 0)
            key = (case.label, json.dumps(config, sort_keys=True))
            if key in failures:
                entry.error = failures[key]
            elif time.monotonic() > self.deadline:
                self.skipped += len(configs) - index
                break
            else:
                try:
                    got = run_once(case, inputs, config)
                    if expected is None:
                        expected = got.float()
                    diff = (got.float() - expected).abs().nan_to_num(float("inf")).max().item()
                    entry.max_abs_diff = diff if math.isfinite(diff) else None  # None: NaN/inf
                    if not diff <= tolerance:
                        entry.note = "MISMATCH"
                    ctx, fn = launcher(case, inputs, config)
                    with ctx:
                        entry.ms = time_ms(fn, self.smoke)
                except Exception as exc:  # noqa: BLE001
                    entry.error = _error(exc)
            self.entries.append(entry)
            done.append(entry)
        return done


def _best(entries: list[Entry]) -> Entry | None:
    timed = [e for e in entries if e.ms is not None and e.note != "MISMATCH"]
    return min(timed, key=lambda e: e.ms) if timed else None


def sweep_family(sweep: Sweep, cases: list[Case]) -> None:
    if time.monotonic() >= sweep.deadline:
        print(f"tune: no time left for {cases[0].family if cases else 'nothing'}...", flush=True)
        return
    prepared = []
    for case in cases:
        inputs = make_inputs(case)
        prepared.append((case, inputs, configs_for(case, inputs, sweep.smoke)))
    start = time.monotonic()
    # At most half of what is left: the sweep is for timing, and a pass that compiled
    # everything but timed nothing would be lost.
    failures = precompile([(c, cfgs) for c, _, cfgs in prepared], sweep.workers,
                          start + (sweep.deadline - start) / 2)
    print(f"compiled {sum(len(cfgs) for *_, cfgs in prepared)} configs in "
          f"{time.monotonic() - start:.0f} s ({len(failures)} failed)", flush=True)
    for case, inputs, configs in prepared:
        tolerance = 2e-2 if case.family == "maxsim" else 5e-2
        entries = sweep.measure(case, inputs, configs, failures, tolerance)
        if case.family == "maxsim":
            default, best = entries[0] if entries else None, _best(entries)
            if best is not None and default.ms is not None and time.monotonic() < sweep.deadline:
                expected = run_once(case, inputs, default.config).float()
                variants = maxsim_variant_configs(best.config, case.params[4], sweep.smoke)
                sweep.measure(case, inputs, variants, {}, tolerance, expected=expected)
        reference = reference_launcher(case, inputs)
        if reference is not None and time.monotonic() < sweep.deadline:
            entry = Entry(case.label, case.family, {"impl": "cublas+triton-epilogue"}, default=False)
            try:
                reference()
                entry.ms = time_ms(reference, sweep.smoke)
            except Exception as exc:  # noqa: BLE001
                entry.error = _error(exc)
            sweep.entries.append(entry)
        _print_case(case.label, [e for e in sweep.entries if e.case == case.label])
        sweep.save()


def _short(config: dict) -> str:
    keys = {"qb": "QB", "lq_tile": "LQ", "block_n": "BN", "num_warps": "w", "num_stages": "s",
            "programs_per_sm": "pps", "max_docs_per_program": "dpp", "flat": "flat",
            "block_k": "BK", "num_k": "NK", "BLOCK_M": "BM",
            "BLOCK_N": "BN", "BLOCK_K": "BK", "impl": "", "ERF": "erf",
            "q_in_regs": "qregs", "maxnreg": "maxnreg"}
    optional = ("q_in_regs", "maxnreg")  # shown only when set
    return " ".join(f"{keys[k]}{'' if v is True else v}" for k, v in config.items()
                    if k in keys and (v or k not in optional))


def _print_case(label: str, entries: list[Entry]) -> None:
    default = next((e for e in entries if e.default), None)
    best = _best([e for e in entries if "impl" not in e.config])
    bad = [e for e in entries if e.note == "MISMATCH"]
    errors = [e for e in entries if e.error]
    timed = [e for e in entries if e.ms is not None]
    line = f"{label}: {len(timed)} timed, {len(errors)} failed"
    if default is not None and default.ms is not None and best is not None:
        line += (f" | heuristic {default.ms * 1e3:.1f} us [{_short(default.config)}]"
                 f" | best {best.ms * 1e3:.1f} us [{_short(best.config)}] x{default.ms / best.ms:.2f}")
    for e in entries:
        if "impl" in e.config and e.ms is not None:
            line += f" | {e.config['impl']} {e.ms * 1e3:.1f} us"
    print(line, flush=True)
    for e in bad:
        print(f"  MISMATCH {_short(e.config)}: max abs diff {e.max_abs_diff}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["maxsim", "encoder", "all"], nargs="?", default="all")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop timing new configs after this many seconds (compiles included)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two configs each")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of every measurement")
    args = parser.parse_args(argv)
    if DEVICE != "cuda" and not args.smoke:
        parser.error("no CUDA device: only --smoke runs on the CPU")
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("BENCH_COMMIT", ""),
            "budget_s": args.budget_s}
    sweep = Sweep(deadline=time.monotonic() + args.budget_s, smoke=args.smoke, workers=args.workers,
                  out=args.out, meta=meta)
    try:
        if args.what in ("maxsim", "all"):
            sweep_family(sweep, maxsim_cases(args.smoke))
        if args.what in ("encoder", "all"):
            sweep_family(sweep, encoder_cases(args.smoke))
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - keep what was measured
        print(f"tune: stopped early: {_error(exc)}", flush=True)
        sweep.meta["stopped_early"] = _error(exc)
    finally:
        sweep.save()
    mismatches = [e for e in sweep.entries if e.note == "MISMATCH"]
    print(f"tune: {len(sweep.entries)} entries, {len(mismatches)} mismatches, "
          f"{sweep.skipped} configs not timed (budget)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
