"""Exact top-k search over a corpus in host memory, streamed to the GPU (`scoring.search`).

A corpus larger than the GPU stays in host memory; `search` copies it to the GPU once, in
blocks of at most 256 MB, each copied while the previous one is scored. This suite measures
that path against the same search with the corpus already on the GPU, on 64 queries x 32 rows
and a packed corpus of ~2 GiB (d = 96, fp16, documents of 20-300 rows):

- ``host-pinned``: the corpus in pinned memory (``values.pin_memory()``): copies straight from it;
- ``host-pageable``: the corpus in ordinary memory: each block goes through a pinned staging copy;
- ``on-device``: the corpus on the GPU: what streaming adds is the difference;
- ``host-pageable-torch``: as ``host-pageable`` on the PyTorch scorer (the CUDA default until
  the kernels have run natively; what the CLI does with a saved corpus too large for the GPU).

All with the default ``check_inputs=True`` (a streamed corpus is checked block by block on the
GPU), as users call it.

Floor: the corpus bytes over the host-to-device bandwidth measured here (a pinned 1 GiB copy),
or the MaxSim compute floor if higher. Not in bench/device/run.sh's default plan: run it as
the ``search`` step or by name. Skipped without CUDA (bench/conftest.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from common import DRY_RUN, floor_ms

from colbert_triton import PackedEmbeddings, search

SUITE = "search"
QUERIES, QUERY_LEN, DIM, K = 64, 32, 96, 10
CORPUS_BYTES = 2 << 30


@functools.lru_cache(maxsize=1)
def _host_to_device_bytes_per_s() -> float:
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = triton.testing.do_bench(lambda: dst.copy_(src, non_blocking=True), warmup=50, rep=300)
    return (1 << 30) / (ms * 1e-3)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    rows_wanted = CORPUS_BYTES // (DIM * 2)
    lengths = rng.integers(20, 301, size=rows_wanted // 160 + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), rows_wanted)) + 1]
    values = torch.randn(int(lengths.sum()), DIM, device="cuda")
    values = (values / values.norm(dim=-1, keepdim=True)).half()
    on_device = PackedEmbeddings.from_lengths(values, lengths.tolist())
    pageable = on_device.to("cpu")
    pinned = PackedEmbeddings(pageable.values.pin_memory(), pageable.offsets, pageable.lengths_host)
    return {"on-device": on_device, "host-pinned": pinned, "host-pageable": pageable}


def test_bench_search_host_corpus(measure, corpus):
    gen = torch.Generator(device="cuda").manual_seed(1)
    queries = torch.randn(QUERIES, QUERY_LEN, DIM, device="cuda", generator=gen)
    queries = (queries / queries.norm(dim=-1, keepdim=True)).half()
    runs = {name: functools.partial(search, queries, docs, K, backend="triton")
            for name, docs in corpus.items()}
    runs["host-pageable-torch"] = functools.partial(search, queries, corpus["host-pageable"], K,
                                                    backend="torch")
    # Never time a wrong answer: each equals its scorer's search of the corpus on the GPU.
    want = {"triton": runs["on-device"](),
            "torch": search(queries, corpus["on-device"], K, backend="torch")}
    for name, run in runs.items():
        scores, index = run()
        if name.endswith("-torch"):  # blocks change the einsum batching: rounding, near-ties
            torch.testing.assert_close(scores, want["torch"][0], atol=2e-3, rtol=0, msg=name)
        else:
            assert torch.equal(index, want["triton"][1]) and torch.equal(scores, want["triton"][0]), name
    values = corpus["on-device"].values
    corpus_bytes = values.numel() * values.element_size()
    if DRY_RUN:
        floor_value, floor_kind = float("nan"), "dry"
    else:
        compute, _ = floor_ms(flops=2.0 * QUERIES * QUERY_LEN * values.shape[0] * DIM)
        pcie = corpus_bytes / _host_to_device_bytes_per_s() * 1e3
        floor_value, floor_kind = (pcie, "host-to-device") if pcie >= compute else (compute, "compute")
    shape = (f"search top-{K}: Q{QUERIES} x Lq{QUERY_LEN} over {len(corpus['on-device'])} docs "
             f"(20-300 rows, {corpus_bytes / 2**30:.2f} GiB fp16, d{DIM})")
    for name, run in runs.items():
        measure(run, suite=SUITE, shape=shape, impl=name, floor_ms=floor_value,
                floor_kind=floor_kind, ours=name == "host-pinned", corpus_bytes=corpus_bytes)


def test_bench_search_merge_share(measure, corpus):
    """What the running top-k costs beside the scoring, for one full search chunk (64 queries x
    32,768 documents, k = 10): `merge_topk` sorts the chunk's [Q, k + chunk] scores in full
    (stable, for the lower-index tie rule). Timed beside the MaxSim of that chunk, to decide
    whether a partial selection is worth its complexity (bench/NOTES.md)."""
    from colbert_triton.kernels.maxsim import maxsim
    from colbert_triton.scoring import merge_topk

    chunk = 32768
    docs = corpus["on-device"]
    gen = torch.Generator(device="cuda").manual_seed(2)
    queries = torch.randn(QUERIES, QUERY_LEN, DIM, device="cuda", generator=gen)
    queries = (queries / queries.norm(dim=-1, keepdim=True)).half()
    starts, lengths = docs.starts[:chunk], docs.lengths[:chunk]
    block = maxsim(queries, docs.values, starts, lengths)
    best_scores, best_index = merge_topk(block[:, :0], block[:, :0].long(), block[:, :K], 0, K)
    shape = f"one search chunk: Q{QUERIES} x Lq{QUERY_LEN} x {chunk} docs (20-300 rows, d{DIM}, fp16), k={K}"
    measure(lambda: merge_topk(best_scores, best_index, block, K, K), suite="search-merge", shape=shape,
            impl="merge_topk", ours=True)
    measure(lambda: maxsim(queries, docs.values, starts, lengths), suite="search-merge", shape=shape,
            impl="maxsim-triton")
