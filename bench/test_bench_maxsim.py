"""Batched MaxSim: our Triton kernel against eager PyTorch, PyLate and the Triton peers.

One run compares, per shape, every implementation that is installed:

- ``ours``: `colbert_triton.kernels.maxsim.maxsim` on the packed corpus (rows + starts/lengths).
- ``ours-qregs``, ``ours-qregs-128``: the same kernel with the query tile held in registers as
  wgmma's A operand (``q_in_regs``; several-query shapes only), on the heuristic's tile and on
  128 rows with one warpgroup: candidate defaults measured beside it.
- ``eager``: a careful eager PyTorch implementation on padded documents: one matmul per chunk
  of documents in the input dtype, padded slots filled with -inf, max, sum in fp32.
- ``pylate``: `pylate.scores.colbert_scores(..., backend="torch")` (einsum, masks multiplied in),
  called on document chunks so its ``[Q, N, Lq, Ld]`` similarity tensor fits in memory.
- ``flash-maxsim`` 0.3.0: `flash_maxsim_batched` (padded documents + lengths; ``shared_docs=False``
  with per-query gathered documents in candidate mode), and for single queries
  `flash_maxsim_rerank` on the packed corpus and `flash_maxsim_rerank_direct` with its document
  starts and lengths given (its zero-copy rerank paths; they convert bf16 documents to fp16
  inside the call, which counts against them).
- ``lik``: late-interaction-kernels 0.4.5 `maxsim` (no argmax saved without gradients) on padded
  documents with a bool mask (4-D documents in candidate mode), and `maxsim_varlen` on the
  packed corpus for variable lengths.
- What a PyLate user gets (fp16, d = 96 only: the drop-in's cost over the kernel, not a new
  kernel): ``pylate-auto``, PyLate's `colbert_scores` / `colbert_kd_scores` as called, with its
  default backend (flash-maxsim where installed), and ``ours-pylate-dropin``, the same call on
  `colbert_triton.pylate` (its input checks and mask folding included; a row of ours reported
  as a variant). On batches of up to 64k candidates also the retriever's call, `rank.rerank(ids,
  queries, candidates)` with each query's candidates as a list of tensors (the whole call, host
  work and result dicts included, by the wall clock): ``pylate-rerank`` and ``ours-pylate-rerank``;
  ``-host`` the same with the candidates as a Voyager index hands them, float32 numpy arrays in
  host memory (with float32 queries, scored on the GPU).

Inputs of every implementation (padding, packing, masks, gathered candidates) are prepared
outside the timed call, and every implementation's scores are checked against ours once before
it is timed. Floors: FLOPs = 2 Q Lq sum(Ld) d, bytes = document bytes (in candidate mode those of the
distinct candidates) + query bytes + 4 Q N.
Without CUDA the whole module is skipped (bench/conftest.py); it still imports and collects.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import pytest
import torch
from common import autotuned, floor_ms, forget_autotuning

from colbert_triton.kernels import maxsim as maxsim_module
from colbert_triton.kernels.maxsim import maxsim

SUITE = "maxsim"
QUERY_LEN = 32
DEVICE = "cuda"  # a module constant so the preparation code can be dry-run on the CPU


@dataclass(frozen=True)
class Case:
    name: str
    num_queries: int
    num_docs: int  # corpus size (all pairs) or candidates per query (candidate mode)
    min_len: int
    max_len: int
    dim: int
    dtype: torch.dtype
    candidates: bool = False
    corpus: int = 0  # corpus the candidates are drawn from

    @property
    def lens(self) -> str:
        same = self.min_len == self.max_len
        return str(self.max_len) if same else f"{self.min_len}-{self.max_len}"

    @property
    def ident(self) -> str:
        kind = f"K{self.num_docs}" if self.candidates else f"N{self.num_docs}"
        dt = {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return f"{self.name}-Q{self.num_queries}-{kind}-Ld{self.lens}-d{self.dim}-{dt}"

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        docs = (f"{self.num_docs} own candidates of {self.corpus}" if self.candidates
                else f"{self.num_docs}")
        return (f"{self.name}: Q{self.num_queries} x N{docs} x Ld {self.lens}, Lq{QUERY_LEN}, "
                f"d{self.dim}, {dt}")


def _cases():
    shapes = [
        ("rerank", 1, 1_000, 300, 300, False, 0),
        ("rerank-varlen", 1, 1_000, 20, 300, False, 0),
        ("batch", 32, 1_000, 300, 300, False, 0),
        ("batch", 64, 10_000, 300, 300, False, 0),
        ("batch-varlen", 64, 10_000, 20, 300, False, 0),
        ("candidates", 64, 100, 20, 300, True, 10_000),
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for dim in (96, 128):
            for name, q, n, lo, hi, cand, corpus in shapes:
                yield Case(name, q, n, lo, hi, dim, dtype, cand, corpus)


CASES = list(_cases())
# Other configurations of our kernel, candidates for its default: checked against ours exactly.
KERNEL_VARIANTS = ("ours-qregs", "ours-qregs-128")
# PyLate's own calls as its users make them (its einsum; its default backend; the retriever's
# rerank), and our PyLate drop-in's entry points (colbert_triton.pylate), timed beside them.
PYLATE_OWN = ("pylate", "pylate-auto", "pylate-rerank", "pylate-rerank-host")
DROPIN = ("ours-pylate-dropin", "ours-pylate-rerank", "ours-pylate-rerank-host")
# Rows of ours other than the kernel's default: reported in a column of their own, never as peers.
VARIANTS = (*KERNEL_VARIANTS, *DROPIN)
# Rows under PyLate's semantics (a padded slot enters the max as 0.0): checked against ours so.
ZERO_PADDING = (*PYLATE_OWN, *DROPIN)
# The whole call, host work included (the retriever's rerank: lists in, dicts out).
WALL_CLOCK = ("pylate-rerank", "ours-pylate-rerank", "pylate-rerank-host", "ours-pylate-rerank-host")
# The variants come last: a configuration never run before that faulted the GPU would take the
# rest of its case with it, not the peers'.
IMPLS = ["ours", "eager", "pylate", "flash-maxsim", "flash-maxsim-rerank", "flash-maxsim-rerank-direct",
         "lik", "lik-varlen", *KERNEL_VARIANTS]
# PyLate's calls as its users make them, on PyLate and on our drop-in (fp16, d = 96): a test of
# their own after every kernel row, so a step its time cap cuts short loses these first.
PYLATE_CALLS = (*PYLATE_OWN[1:], *DROPIN)
PYLATE_CASES = [c for c in CASES if c.dtype == torch.float16 and c.dim == 96]
# The peers' packages (their Triton autotuners retune for each case) per implementation.
PEER_PACKAGES = {"flash-maxsim": "flash_maxsim", "flash-maxsim-rerank": "flash_maxsim",
                 "flash-maxsim-rerank-direct": "flash_maxsim",
                 "pylate-auto": "flash_maxsim", "pylate-rerank": "flash_maxsim",  # PyLate's default on CUDA
                 "lik": "late_interaction_kernels", "lik-varlen": "late_interaction_kernels"}


# ----------------------------------------------------------------------------------------------
# Data (built once per case, on the GPU)
# ----------------------------------------------------------------------------------------------


@dataclass
class Data:
    queries: torch.Tensor  # [Q, Lq, d]
    values: torch.Tensor  # packed corpus [T, d]
    starts: torch.Tensor  # [N] int64 (corpus)
    lengths: torch.Tensor  # [N] int64
    padded: torch.Tensor  # [N, Lmax, d]
    mask: torch.Tensor  # [N, Lmax] bool
    pick: torch.Tensor | None  # [Q, K] candidate ids (candidate mode)
    reference: torch.Tensor  # fp32 scores from the eager path on upcast inputs


_DATA: dict[Case, Data] = {}


def _unit(*shape, dtype, gen):
    x = torch.randn(*shape, device=DEVICE, generator=gen)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def get_data(case: Case) -> Data:
    if case in _DATA:
        return _DATA[case]
    _DATA.clear()
    forget_autotuning(*set(PEER_PACKAGES.values()))
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    corpus = case.corpus if case.candidates else case.num_docs
    lengths = torch.randint(case.min_len, case.max_len + 1, (corpus,), device=DEVICE, generator=gen)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    values = _unit(total, case.dim, dtype=case.dtype, gen=gen)
    positions = torch.arange(case.max_len, device=DEVICE)
    mask = positions < lengths[:, None]
    padded = torch.zeros(corpus, case.max_len, case.dim, device=DEVICE, dtype=case.dtype)
    padded[mask] = values
    queries = _unit(case.num_queries, QUERY_LEN, case.dim, dtype=case.dtype, gen=gen)
    pick = None
    if case.candidates:
        pick = torch.randint(0, corpus, (case.num_queries, case.num_docs), device=DEVICE,
                             generator=gen)
    full = eager_all_pairs(queries.float(), padded.float(), mask)
    reference = torch.gather(full, 1, pick) if pick is not None else full
    _DATA[case] = Data(queries, values, starts, lengths, padded, mask, pick, reference)
    return _DATA[case]


# ----------------------------------------------------------------------------------------------
# Eager PyTorch baseline
# ----------------------------------------------------------------------------------------------


def eager_all_pairs(queries, padded, mask, budget=1 << 28):
    """[Q, N] scores: per chunk of documents one matmul, -inf on padded slots, max, fp32 sum."""
    num_q, len_q, dim = queries.shape
    num_docs, max_len, _ = padded.shape
    q = queries.reshape(num_q * len_q, dim)
    out = torch.empty(num_q, num_docs, device=queries.device, dtype=torch.float32)
    step = max(1, budget // (num_q * len_q * max_len))
    for lo in range(0, num_docs, step):
        hi = min(num_docs, lo + step)
        sim = (q @ padded[lo:hi].reshape(-1, dim).T).view(num_q, len_q, hi - lo, max_len)
        sim = sim.masked_fill(~mask[lo:hi][None, None], float("-inf"))
        out[:, lo:hi] = sim.amax(-1).float().sum(1)
    return out


def eager_candidates(queries, cand_padded, cand_mask):
    """[Q, K] scores of each query against its own gathered [K, Lmax, d] candidates."""
    sim = torch.einsum("qid,qkjd->qkij", queries, cand_padded)
    sim = sim.masked_fill(~cand_mask[:, :, None, :], float("-inf"))
    return sim.amax(-1).float().sum(-1)


# ----------------------------------------------------------------------------------------------
# Implementations: each returns a zero-argument callable (inputs prepared here, not timed)
# ----------------------------------------------------------------------------------------------


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed here ({exc})")


def our_ranges(case: Case, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """Row starts and lengths our kernel takes: the corpus [N], or each query's candidates [Q, K]."""
    if case.candidates:
        return data.starts[data.pick], data.lengths[data.pick]
    return data.starts, data.lengths


def prepare(impl: str, case: Case, data: Data):
    q = data.queries
    varlen = case.min_len != case.max_len
    if impl == "ours":
        starts, lengths = our_ranges(case, data)
        # NaN, not torch.empty: the allocator may hand back a buffer holding another run's scores.
        out = torch.full(data.reference.shape, float("nan"), device=DEVICE)
        return lambda: maxsim(q, data.values, starts, lengths, out=out)

    if impl in KERNEL_VARIANTS:
        # Our kernel with the query tile as wgmma's register operand (maxsim._Config.q_in_regs),
        # candidate defaults timed beside it (bench/NOTES.md): the heuristic's tile, and 128
        # rows on one warpgroup (at d <= 96 capped at 168 registers: three programs per SM).
        if case.candidates or case.num_queries < 2:
            pytest.skip("q_in_regs is for tiles of several queries (>= 64 rows: wgmma)")
        if case.dtype != torch.float16:
            # The same instructions in bf16: timed once, in fp16, within the step's time cap.
            pytest.skip("our variants are timed on the fp16 shapes only")
        cfg = maxsim_module._kernel_config(q.dtype, case.dim, QUERY_LEN, case.num_queries)
        cfg = cfg._replace(q_in_regs=True)
        if impl == "ours-qregs-128":
            cfg = cfg._replace(qb=max(1, 128 // cfg.lq_tile), num_warps=4,
                               maxnreg=168 if case.dim <= 96 else None)
        starts, lengths = our_ranges(case, data)
        out = torch.full(data.reference.shape, float("nan"), device=DEVICE)

        def run():  # maxsim()'s path with the config given: validation included, as in ours
            maxsim_module._validate(q, data.values, starts, lengths, None, out)
            maxsim_module._launch(q, data.values, starts, lengths, None, out, cfg)
            return out
        return run

    if impl == "eager":
        if case.candidates:
            cand, cand_mask = data.padded[data.pick], data.mask[data.pick]
            return lambda: eager_candidates(q, cand, cand_mask)
        return lambda: eager_all_pairs(q, data.padded, data.mask)

    if impl == "pylate":
        scores = _import("pylate.scores")
        if case.candidates:
            cand, cand_mask = data.padded[data.pick], data.mask[data.pick].to(q.dtype)
            kd = scores.colbert_kd_scores  # its einsum: "auto" would dispatch to flash-maxsim
            return lambda: kd(q, cand, documents_mask=cand_mask, backend="torch")
        doc_mask = data.mask.to(q.dtype)
        # colbert_scores materialises [Q, N, Lq, Ld] (plus a masked copy): chunk the documents.
        step = max(1, (1 << 28) // (case.num_queries * QUERY_LEN * case.max_len))

        def run():
            return torch.cat([
                scores.colbert_scores(q, data.padded[lo:lo + step],
                                      documents_mask=doc_mask[lo:lo + step], backend="torch")
                for lo in range(0, case.num_docs, step)], dim=1)
        return run

    if impl in PYLATE_CALLS:
        return _prepare_pylate_call(impl, case, data)

    if impl == "flash-maxsim":
        fm = _import("flash_maxsim")
        if case.candidates:
            cand = data.padded[data.pick].contiguous()  # [Q, K, Lmax, d]
            lens = data.lengths[data.pick].reshape(-1).to(torch.int32).contiguous()
            return lambda: fm.flash_maxsim_batched(q, cand, doc_lengths=lens, shared_docs=False)
        lens = data.lengths.to(torch.int32)
        return lambda: fm.flash_maxsim_batched(q, data.padded, doc_lengths=lens, shared_docs=True)

    if impl == "flash-maxsim-rerank":
        if case.num_queries != 1 or case.candidates:
            pytest.skip("flash_maxsim_rerank scores a single query")
        fm = _import("flash_maxsim")
        cu = torch.zeros(case.num_docs + 1, device=DEVICE, dtype=torch.int32)
        cu[1:] = torch.cumsum(data.lengths, 0)
        max_len = int(data.lengths.max())
        return lambda: fm.flash_maxsim_rerank(q[0], data.values, cu, max_len)[None]

    if impl == "flash-maxsim-rerank-direct":
        if case.num_queries != 1 or case.candidates:
            pytest.skip("flash_maxsim_rerank_direct scores a single query")
        fm = _import("flash_maxsim")
        # Its zero-copy entry point: starts and lengths as int32 made here, so the call launches
        # only its kernel (flash_maxsim_rerank derives them from cu_seqlens in every call).
        starts, lengths = data.starts.to(torch.int32), data.lengths.to(torch.int32)
        max_len = int(data.lengths.max())
        return lambda: fm.flash_maxsim_rerank_direct(q[0], data.values, starts, lengths, max_len)[None]

    if impl == "lik":
        lik = _import("late_interaction_kernels")
        if case.candidates:
            cand, cand_mask = data.padded[data.pick].contiguous(), data.mask[data.pick].contiguous()
            return lambda: lik.maxsim(q, cand, d_mask=cand_mask)
        return lambda: lik.maxsim(q, data.padded, d_mask=data.mask)

    if impl == "lik-varlen":
        if not varlen or case.candidates:
            pytest.skip("maxsim_varlen is the packed-corpus entry point: variable lengths only")
        lik = _import("late_interaction_kernels")
        q_packed = q.reshape(-1, case.dim)
        cu_q = torch.arange(0, case.num_queries + 1, device=DEVICE, dtype=torch.int32) * QUERY_LEN
        cu_d = torch.zeros(case.num_docs + 1, device=DEVICE, dtype=torch.int32)
        cu_d[1:] = torch.cumsum(data.lengths, 0)
        max_len = int(data.lengths.max())
        return lambda: lik.maxsim_varlen(q_packed, data.values, cu_q, cu_d, QUERY_LEN, max_len)

    raise ValueError(impl)


def _prepare_pylate_call(impl: str, case: Case, data: Data):
    """PyLate's scoring calls as its users make them, on PyLate's functions or on ours."""
    if case.dtype != torch.float16 or case.dim != 96:
        pytest.skip("the PyLate calls are timed at fp16, d = 96 only (the drop-in's cost, not a kernel's)")
    ours = impl.startswith("ours-")
    q = data.queries
    if "-rerank" in impl:
        if case.num_queries * case.num_docs > 64 * 1_000:
            pytest.skip("the retriever's rerank call is timed on batches of up to 64k candidates")
        rank = _import("colbert_triton.pylate" if ours else "pylate.rank")
        # A retriever's batch: each query with its candidates, a list of [Ld, d] tensors (ids:
        # their positions, so the check can put the scores back in order). "-host": as a Voyager
        # index hands them, float32 numpy arrays in host memory, scored on the queries' GPU.
        host = impl.endswith("-host")
        if host and case.num_queries * case.num_docs > 6_400:
            pytest.skip("from host memory the retriever's call is timed on up to 6,400 candidates "
                        "(seconds a call past that)")
        values = data.values.float().cpu().numpy() if host else data.values
        ends = torch.cumsum(data.lengths, 0).tolist()
        rows = [values[end - n : end] for end, n in zip(ends, data.lengths.tolist())]
        candidates = ([[rows[j] for j in picks] for picks in data.pick.tolist()] if case.candidates
                      else [rows] * case.num_queries)
        ids = [list(range(case.num_docs))] * case.num_queries
        queries = list(q.float() if host else q)
        kwargs = {"backend": "triton"} if ours else {}
        return lambda: rank.rerank(ids, queries, candidates, device=str(q.device), **kwargs)
    scores = _import("colbert_triton.pylate" if ours else "pylate.scores")
    backend = "triton" if ours else None  # PyLate's default: flash-maxsim where installed
    if case.candidates:
        cand, cand_mask = data.padded[data.pick], data.mask[data.pick].to(q.dtype)
        return lambda: scores.colbert_kd_scores(q, cand, documents_mask=cand_mask, backend=backend)
    doc_mask = data.mask.to(q.dtype)  # PyLate's attention masks: numbers, multiplied in
    return lambda: scores.colbert_scores(q, data.padded, documents_mask=doc_mask, backend=backend)


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def floors(case: Case, data: Data):
    elem = data.queries.element_size()
    if case.candidates:
        pairs = case.num_queries * case.num_docs
        flops = 2 * QUERY_LEN * int(data.lengths[data.pick].sum()) * case.dim  # each query, its own rows
        # Each distinct candidate is read from memory once at best (6,400 picks of 10k repeat some).
        doc_rows = int(data.lengths[data.pick.unique()].sum())
    else:
        doc_rows = int(data.lengths.sum())
        pairs = case.num_queries * case.num_docs
        flops = 2 * case.num_queries * QUERY_LEN * doc_rows * case.dim
    bytes_moved = (doc_rows * case.dim * elem + case.num_queries * QUERY_LEN * case.dim * elem
                   + 4 * pairs)
    return floor_ms(flops=flops, bytes_moved=bytes_moved)


def ranked_scores(ranked: list[list[dict]], case: Case, data: Data) -> torch.Tensor:
    """A rerank call's result (per query, dicts of candidate position and score, best first) as
    [Q, N] scores in candidate order, comparable with the other implementations'."""
    scores = torch.full(data.reference.shape, float("nan"))
    assert len(ranked) == case.num_queries
    for row, results in zip(scores, ranked):
        row[[r["id"] for r in results]] = torch.tensor([r["score"] for r in results])
    return scores.to(data.queries.device)


def ours_with_zero_padding(case: Case, data: Data, longest_candidate: bool = False) -> torch.Tensor:
    """Our scores under PyLate's semantics for the padded inputs it is given: a document shorter
    than the padded width (case.max_len; with ``longest_candidate``, each query's longest
    candidate, to which rerank pads) also offers 0.0 to every query row's max."""
    starts, lengths = our_ranges(case, data)
    width = lengths.amax(-1, keepdim=True) if longest_candidate else case.max_len
    return maxsim(data.queries, data.values, starts, lengths, pad_floor=lengths < width).float()


def checked(impl: str, case: Case, data: Data):
    """The implementation's callable, after one run checked against ours (and ours against the
    fp32 eager reference): a benchmark never times a wrong answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = prepare(impl, case, data)
        with torch.no_grad():
            got = ranked_scores(fn(), case, data) if impl in WALL_CLOCK else fn().float()
    ours = prepare("ours", case, data)().float() if impl != "ours" else got
    torch.testing.assert_close(ours, data.reference, atol=1e-2, rtol=1e-3)
    if impl in ZERO_PADDING:
        ours = ours_with_zero_padding(case, data, longest_candidate=impl in WALL_CLOCK)
    # Eager and PyLate compute similarities in 16 bits and round them before the max: a looser
    # tolerance, still far below the error of a wrong mask (a whole row's max, ~0.3 each). Our
    # kernel variants compute the same fp32 products and differ at most in summation order; the
    # drop-in returns PyLate's dtype (fp16 here: scores of ~30 round by ~0.016).
    if impl in KERNEL_VARIANTS:
        atol, rtol = 1e-5, 1e-6
    else:
        atol, rtol = (0.15, 2e-2) if impl in ("eager", *PYLATE_OWN) else (2e-2, 2e-2)
    torch.testing.assert_close(got, ours, atol=atol, rtol=rtol, msg=lambda m: f"{impl}: {m}")
    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.ident for c in CASES])
def test_maxsim(case, impl, measure):
    run_case(case, impl, measure)


@pytest.mark.parametrize("impl", PYLATE_CALLS)
@pytest.mark.parametrize("case", PYLATE_CASES, ids=[c.ident for c in PYLATE_CASES])
def test_maxsim_pylate_calls(case, impl, measure):
    run_case(case, impl, measure)


def run_case(case: Case, impl: str, measure) -> None:
    data = get_data(case)
    fn = checked(impl, case, data)
    floor, kind = floors(case, data)

    def timed():
        with torch.no_grad():
            return fn()

    # A variant is another configuration of our kernel: reported beside ours, never as a peer.
    # What the peer's autotuner chose for this case (in the check's first call).
    configs = autotuned(PEER_PACKAGES[impl]) if impl in PEER_PACKAGES else {}
    measure(timed, suite=SUITE, shape=case.label, impl=impl, floor_ms=floor, floor_kind=kind,
            ours=impl == "ours", variant=impl in VARIANTS, wall=impl in WALL_CLOCK,
            **({"autotuned": configs} if configs else {}))
