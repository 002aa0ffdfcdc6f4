"""The batched MaxSim kernel (`colbert_triton.kernels.maxsim`) against an fp64 reference.

The reference loops over (query, document) pairs and takes the max over the document's real
rows only, with the kernel's conventions: an empty document scores 0, ``pad_floor`` adds 0.0
to every row's max. 16-bit inputs are compared with a reference computed from the same rounded
values, so the tolerance only covers fp32 accumulation order.

Shapes are small: without CUDA the kernel runs in Triton's interpreter. Tests marked ``gpu`` use
larger shapes and the compiled kernel cache, and run only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from aot_compile import OTHER_GPUS, SHARED_MEMORY, compile_case
from conftest import (
    INTERPRETED,
    KERNEL_DEVICE,
    KERNEL_DTYPES,
    poisoned,
    require_reference,
)

from colbert_triton.kernels import maxsim as maxsim_module
from colbert_triton.kernels.maxsim import maxsim as maxsim_launcher

DEV = KERNEL_DEVICE


def maxsim(queries, doc_values, doc_starts, doc_lengths, **kwargs):
    """The launcher under test, writing into a poisoned output (with a guard band, see
    conftest.poisoned) unless the test passes its own ``out``."""
    well_formed = (isinstance(queries, torch.Tensor) and queries.dim() == 3
                   and isinstance(doc_starts, torch.Tensor) and doc_starts.dim() in (1, 2))
    if kwargs.get("out") is None and well_formed:
        shape = (queries.shape[0], doc_starts.shape[0]) if doc_starts.dim() == 1 else doc_starts.shape
        kwargs["out"] = poisoned(tuple(shape), torch.float32, queries.device)
    return maxsim_launcher(queries, doc_values, doc_starts, doc_lengths, **kwargs)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------
# Data and reference
# ----------------------------------------------------------------------------------------------


def unit_rows(*shape, dtype=torch.float32, gen=None, sign=0):
    """Random unit vectors (ColBERT embeddings are L2-normalised); sign=+1/-1 forces the sign."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if sign:
        x = sign * x.abs()
    x = x / x.norm(dim=-1, keepdim=True)
    return x.to(dtype)


def packed_docs(lengths, dim, dtype, gen, gap=3, sign=0):
    """Documents laid out with `gap` junk rows (value 1e3) before each: ranges must be exact."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lengths + gap, 0) - lengths
    total = int(starts[-1] + lengths[-1]) + gap if len(lengths) else gap
    values = torch.full((total, dim), 1e3, dtype=torch.float64)
    for s, n in zip(starts.tolist(), lengths.tolist()):
        values[s:s + n] = unit_rows(n, dim, gen=gen, dtype=torch.float64, sign=sign)
    return values.to(dtype), starts, lengths


def reference(queries, doc_values, starts, lengths, pad_floor=None):
    """fp64 loops over the real rows; [N] starts -> [Q, N], [Q, K] starts -> [Q, K]."""
    q = queries.double().cpu()
    values = doc_values.double().cpu()
    num_q = q.shape[0]
    starts, lengths = starts.cpu(), lengths.cpu()
    floor = pad_floor.cpu() if pad_floor is not None else None
    if starts.dim() == 1:
        starts, lengths = starts.expand(num_q, -1), lengths.expand(num_q, -1)
        floor = floor.expand(num_q, -1) if floor is not None else None
    out = torch.zeros(starts.shape, dtype=torch.float64)
    for i in range(num_q):
        for k in range(starts.shape[1]):
            s, n = int(starts[i, k]), int(lengths[i, k])
            if n == 0:
                best = torch.zeros(q.shape[1], dtype=torch.float64)
            else:
                best = (q[i] @ values[s:s + n].T).amax(dim=1)
            if floor is not None and bool(floor[i, k]):
                best = best.clamp(min=0.0)
            out[i, k] = best.sum()
    return out


def assert_scores(got, queries, doc_values, starts, lengths, pad_floor=None):
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    want = reference(queries, doc_values, starts, lengths, pad_floor)
    # The reference multiplies the same (rounded) inputs in fp64, so only the kernel's fp32
    # accumulation (and 3xTF32 for fp32 inputs) separates them: a few ulp of fp32. Anything
    # coarser (a 16-bit partial sum, plain TF32) fails this.
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=1e-5)


def to_dev(*tensors):
    return [t.to(DEV) for t in tensors]


# ----------------------------------------------------------------------------------------------
# All pairs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 96, 128, 100])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_all_pairs(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    lengths = [37, 0, 1, 150, 64, 5, 129, 0, 20]  # several tiles, exact tile, empty, 1 row
    values, starts, lens = packed_docs(lengths, dim, dtype, gen)
    queries = unit_rows(5, 32, dim, dtype=dtype, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens)
    assert got.shape == (5, len(lengths))
    assert_scores(got, queries, values, starts, lens)


@pytest.mark.parametrize("query_len", [1, 7, 64])
def test_query_lengths(query_len):
    gen = torch.Generator().manual_seed(query_len)
    values, starts, lens = packed_docs([12, 70, 0, 3], 96, torch.float16, gen)
    queries = unit_rows(3, query_len, 96, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    assert_scores(maxsim(queries, values, starts, lens), queries, values, starts, lens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_long_query_is_chunked(dtype):
    # Lq = 300 pads to 512 rows: processed in LQ_TILE-row chunks summed per document.
    cfg = maxsim_module._kernel_config(dtype, 64, 300, 2)
    assert cfg.num_lq_chunks > 1
    gen = torch.Generator().manual_seed(300)
    values, starts, lens = packed_docs([40, 0, 90], 64, dtype, gen)
    queries = unit_rows(2, 300, 64, dtype=dtype, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    assert_scores(maxsim(queries, values, starts, lens), queries, values, starts, lens)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_many_queries_several_query_blocks(dtype):
    # 19 queries: more than one query block and not a multiple of the block.
    num_q = 19
    cfg = maxsim_module._kernel_config(dtype, 96, 32, num_q)
    assert 1 < cfg.qb < num_q and num_q % cfg.qb != 0
    gen = torch.Generator().manual_seed(19)
    values, starts, lens = packed_docs([33, 2, 0, 71, 18, 40, 9], 96, dtype, gen)
    queries = unit_rows(num_q, 32, 96, dtype=dtype, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    assert_scores(maxsim(queries, values, starts, lens), queries, values, starts, lens)


@pytest.mark.parametrize("dim", [96, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_small_tiles_of_a_gpu_with_little_shared_memory(monkeypatch, dtype, dim):
    """The tiles chosen for a T4's 64 KiB of shared memory (compiled for sm_75 in
    test_launches_fit_the_shared_memory_of_other_gpus), run here: one 32-row query per tile, K
    chunks of at most 32 (d = 256: 4 x 64), long queries in 32-row chunks, candidates too."""
    monkeypatch.setattr(maxsim_module, "shared_memory_limit", lambda device: 65536)
    launched = []
    launch = maxsim_module._launch
    monkeypatch.setattr(maxsim_module, "_launch", lambda *args: launched.append(args[-1]) or launch(*args))
    gen = torch.Generator().manual_seed(dim)
    values, starts, lens = packed_docs([37, 0, 1, 70, 64, 5], dim, dtype, gen)
    for num_queries, query_len in [(3, 32), (2, 45)]:
        queries = unit_rows(num_queries, query_len, dim, dtype=dtype, gen=gen)
        q, v, st, ln = to_dev(queries, values, starts, lens)
        assert_scores(maxsim(q, v, st, ln), q, v, st, ln)
    pick = torch.tensor([[3, 1, 0], [5, 3, 2]])
    floor = torch.tensor([[True, False, True], [False, True, True]])
    q, v, st, ln, fl = to_dev(queries, values, starts[pick], lens[pick], floor)
    assert_scores(maxsim(q, v, st, ln, pad_floor=fl), q, v, st, ln, fl)
    assert len(launched) == 3 and all(cfg.qb * cfg.lq_tile == 32 for cfg in launched)
    assert all(cfg.block_k <= (64 if dim > 128 else 32) for cfg in launched)
    assert launched[1].num_lq_chunks == 2
    wide = torch.zeros(1, 4, 288, dtype=dtype, device=DEV)
    with pytest.raises(ValueError, match="64 KiB of shared memory a block.*dims up to 256, got 288"):
        maxsim(wide, wide[0], torch.tensor([0], device=DEV), torch.tensor([4], device=DEV))


def test_padded_layout_viewed_as_rows():
    # A padded [N, Ld, d] batch; padded slots hold large junk that must never be read.
    gen = torch.Generator().manual_seed(7)
    num_docs, max_len, dim = 6, 40, 96
    padded = torch.full((num_docs, max_len, dim), 50.0, dtype=torch.float64)
    lens = torch.tensor([40, 17, 0, 1, 33, 39])
    for i, n in enumerate(lens.tolist()):
        padded[i, :n] = unit_rows(n, dim, gen=gen, dtype=torch.float64)
    padded = padded.to(torch.float16)
    values = padded.view(num_docs * max_len, dim)
    starts = torch.arange(num_docs) * max_len
    queries = unit_rows(4, 32, dim, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    assert_scores(maxsim(queries, values, starts, lens), queries, values, starts, lens)


def test_empty_and_single_row_documents():
    gen = torch.Generator().manual_seed(1)
    values, starts, lens = packed_docs([0, 1, 0, 1, 1], 32, torch.float32, gen)
    queries = unit_rows(3, 32, 32, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens)
    assert_scores(got, queries, values, starts, lens)
    assert (got[:, 0] == 0).all() and (got[:, 2] == 0).all()


def test_zeroed_query_rows_contribute_nothing():
    gen = torch.Generator().manual_seed(3)
    values, starts, lens = packed_docs([25, 60, 4], 96, torch.float32, gen, sign=-1)
    queries = unit_rows(3, 32, 96, gen=gen)
    keep = 20
    masked = queries.clone()
    masked[0, keep:] = 0  # a short query padded with zero rows
    masked[1] = 0  # an all-masked query
    masked, values, starts, lens = to_dev(masked, values, starts, lens)
    got = maxsim(masked, values, starts, lens)
    short = maxsim(masked[:1, :keep].contiguous(), values, starts, lens)
    torch.testing.assert_close(got[0], short[0], atol=1e-5, rtol=1e-5)
    assert (got[1] == 0).all()
    assert_scores(got, masked, values, starts, lens)


# ----------------------------------------------------------------------------------------------
# Candidates and pairs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_candidate_mode(dtype):
    gen = torch.Generator().manual_seed(11)
    values, doc_starts, doc_lens = packed_docs([30, 0, 7, 90, 1, 45, 66, 12], 96, dtype, gen)
    # Each query's own 5 candidates, overlapping between queries, with repeats and empties.
    pick = torch.tensor([[0, 3, 3, 1, 7], [2, 4, 5, 6, 0], [1, 1, 1, 1, 1], [7, 6, 5, 4, 3]])
    starts, lens = doc_starts[pick], doc_lens[pick]
    queries = unit_rows(4, 32, 96, dtype=dtype, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens)
    assert got.shape == (4, 5)
    assert_scores(got, queries, values, starts, lens)


def test_pairwise_is_candidate_mode_with_one_candidate():
    gen = torch.Generator().manual_seed(12)
    values, starts, lens = packed_docs([5, 0, 77, 31, 1, 64], 128, torch.float16, gen)
    queries = unit_rows(6, 32, 128, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts[:, None], lens[:, None])
    got = maxsim(queries, values, starts, lens)
    assert got.shape == (6, 1)
    assert_scores(got, queries, values, starts, lens)


# ----------------------------------------------------------------------------------------------
# pad_floor
# ----------------------------------------------------------------------------------------------


def _negative_and_mixed_docs(dim, dtype, gen):
    """Queries with positive entries; docs 0..2 all-negative entries (every similarity < 0)."""
    neg_values, neg_starts, neg_lens = packed_docs([9, 40, 1], dim, dtype, gen, sign=-1)
    mix_values, mix_starts, mix_lens = packed_docs([21, 0, 70], dim, dtype, gen)
    values = torch.cat([neg_values, mix_values])
    starts = torch.cat([neg_starts, mix_starts + neg_values.shape[0]])
    lens = torch.cat([neg_lens, mix_lens])
    queries = unit_rows(3, 32, dim, dtype=dtype, gen=gen, sign=1)
    return queries, values, starts, lens


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_pad_floor_all_pairs(dtype):
    gen = torch.Generator().manual_seed(5)
    queries, values, starts, lens = _negative_and_mixed_docs(96, dtype, gen)
    floor = torch.tensor([True, False, True, True, True, False])
    queries, values, starts, lens, floor = to_dev(queries, values, starts, lens, floor)
    with_floor = maxsim(queries, values, starts, lens, pad_floor=floor)
    without = maxsim(queries, values, starts, lens)
    assert_scores(with_floor, queries, values, starts, lens, floor)
    assert_scores(without, queries, values, starts, lens)
    # The data is built so that the floor decides the negative documents' scores.
    assert (without[:, :3] < 0).all()
    assert (with_floor[:, 0] == 0).all() and (with_floor[:, 2] == 0).all()
    torch.testing.assert_close(with_floor[:, 1], without[:, 1])


def test_pad_floor_candidate_mode():
    gen = torch.Generator().manual_seed(6)
    queries, values, starts, lens = _negative_and_mixed_docs(64, torch.float32, gen)
    pick = torch.tensor([[0, 1, 3, 5], [2, 2, 4, 0], [5, 4, 3, 1]])
    floor = torch.tensor([[True, False, True, True], [False, True, True, True],
                          [True, False, False, True]])
    queries, values, cand_starts, cand_lens, floor = to_dev(
        queries, values, starts[pick], lens[pick], floor)
    got = maxsim(queries, values, cand_starts, cand_lens, pad_floor=floor)
    assert_scores(got, queries, values, cand_starts, cand_lens, floor)


def test_pad_floor_reproduces_pylate_torch_scores():
    scores = require_reference("pylate.scores")
    gen = torch.Generator().manual_seed(8)
    num_docs, max_len, dim = 5, 24, 32
    lens = torch.tensor([24, 10, 3, 24, 17])
    padded = torch.zeros(num_docs, max_len, dim)
    for i, n in enumerate(lens.tolist()):
        padded[i, :n] = unit_rows(n, dim, gen=gen, sign=-1 if i % 2 else 0)
    mask = (torch.arange(max_len) < lens[:, None]).float()
    queries = unit_rows(3, 16, dim, gen=gen, sign=1)
    want = scores.colbert_scores(queries, padded, documents_mask=mask, backend="torch")
    floor = lens < max_len  # PyLate's 0 enters the max only where a padded slot exists
    starts = torch.arange(num_docs) * max_len
    q, values, starts, lens, floor = to_dev(queries, padded.view(-1, dim), starts, lens, floor)
    got = maxsim(q, values, starts, lens, pad_floor=floor)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Layouts, index dtypes, out, invariance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes(index_dtype):
    gen = torch.Generator().manual_seed(2)
    values, starts, lens = packed_docs([14, 0, 33], 96, torch.float16, gen)
    queries = unit_rows(2, 32, 96, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts.to(index_dtype),
                                           lens.to(index_dtype))
    assert_scores(maxsim(queries, values, starts, lens), queries, values, starts, lens)


@pytest.mark.parametrize("dim", [96, 100], ids=["d96", "d100-masked-chunk"])
def test_strided_inputs(dim):
    """Both inputs column slices of wider buffers whose slack holds inf (the queries also every
    other row). With d = 100 the last d chunk is masked: a mask one column too wide on either
    side reads an inf there, and inf times the other side's masked 0 is NaN (a contiguous
    tensor hides it: its column d is the next row's finite column 0)."""
    gen = torch.Generator().manual_seed(4)
    values, starts, lens = packed_docs([20, 45, 0, 8], dim, torch.float32, gen)
    wide = torch.full((values.shape[0], dim + 8), float("inf"))
    wide[:, :dim] = values
    wide_queries = torch.full((3, 2 * 32, dim + 8), float("inf"))
    wide_queries[..., :dim] = unit_rows(3, 2 * 32, dim, gen=gen)
    queries = wide_queries[:, ::2, :dim]
    assert not queries.is_contiguous()
    queries, wide, starts, lens = to_dev(queries, wide, starts, lens)
    got = maxsim(queries, wide[:, :dim], starts, lens)
    assert_scores(got, queries, wide[:, :dim], starts, lens)


@pytest.mark.skipif(not INTERPRETED, reason="reads the interpreter's numpy warnings")
def test_queries_past_the_last_are_never_loaded():
    """The last query block has phantom queries when Q is not a multiple of QB; their scores are
    never stored, so no output shows whether their rows were loaded. Here the memory after the
    queries holds inf: had the kernel loaded it, the interpreter's numpy would warn of the inf
    arithmetic (a GPU would read another allocation, or fault)."""
    import warnings

    qb = maxsim_module._kernel_config(torch.float32, 32, 32, 1 << 10).qb
    assert qb > 1
    gen = torch.Generator().manual_seed(6)
    buffer = torch.full((2 * qb, 32, 32), float("inf"))
    buffer[: qb + 1] = unit_rows(qb + 1, 32, 32, gen=gen)
    queries = buffer[: qb + 1]
    values, starts, lens = packed_docs([5, 15, 0], 32, torch.float32, gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = maxsim(queries, values, starts, lens)
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert_scores(got, queries, values, starts, lens)


def test_out_is_written_everywhere_and_returned():
    gen = torch.Generator().manual_seed(9)
    values, starts, lens = packed_docs([3, 0, 50, 1, 17], 32, torch.float16, gen)
    queries = unit_rows(3, 32, 32, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    out = poisoned((3, 5), torch.float32)
    got = maxsim(queries, values, starts, lens, out=out)
    assert got is out
    assert_scores(out, queries, values, starts, lens)
    cand_out = poisoned((3, 2), torch.float32)
    cand_starts, cand_lens = starts[:2].repeat(3, 1), lens[:2].repeat(3, 1)
    maxsim(queries, values, cand_starts, cand_lens, out=cand_out)
    assert_scores(cand_out, queries, values, cand_starts, cand_lens)


def test_nan_propagates_like_torch():
    """A NaN embedding row makes exactly the scores it enters NaN (the GPU's plain max would drop
    it and return a finite, wrong score)."""
    gen = torch.Generator().manual_seed(19)
    values, starts, lens = packed_docs([40, 7, 130, 0], 96, torch.float16, gen)
    queries = unit_rows(3, 32, 96, dtype=torch.float16, gen=gen)
    values[starts[2] + 77, 5] = float("nan")  # document 2, inside a full tile
    values[starts[1] + 6, 0] = float("nan")  # document 1, its last (partial) tile
    queries[1, 31, 3] = float("nan")  # query 1's last row
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens).cpu()
    expected_nan = torch.zeros(3, 4, dtype=torch.bool)
    expected_nan[:, 1:3] = True
    expected_nan[1, :3] = True  # an empty document (3) scores 0 whatever the query holds
    assert torch.equal(got.isnan(), expected_nan), got


def test_scores_do_not_depend_on_batch_composition():
    gen = torch.Generator().manual_seed(10)
    values, starts, lens = packed_docs([31, 80, 2], 96, torch.float16, gen)
    queries = unit_rows(9, 32, 96, dtype=torch.float16, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    batch = maxsim(queries, values, starts, lens)
    for i in (0, 8):
        alone = maxsim(queries[i:i + 1], values, starts[1:], lens[1:])
        torch.testing.assert_close(alone[0], batch[i, 1:], atol=1e-5, rtol=1e-6)


def test_degenerate_sizes():
    values = torch.zeros(4, 32, device=DEV)
    starts = torch.tensor([0, 1], device=DEV)
    lens = torch.tensor([1, 3], device=DEV)
    assert maxsim(torch.zeros(0, 32, 32, device=DEV), values, starts, lens).shape == (0, 2)
    empty_n = maxsim(torch.zeros(2, 32, 32, device=DEV), values, starts[:0], lens[:0])
    assert empty_n.shape == (2, 0)
    no_tokens = maxsim(torch.zeros(2, 0, 32, device=DEV), values, starts, lens)
    assert (no_tokens == 0).all()
    no_rows = maxsim(torch.ones(2, 8, 32, device=DEV), values[:0], starts * 0, lens * 0)
    assert no_rows.shape == (2, 2) and (no_rows == 0).all()


# ----------------------------------------------------------------------------------------------
# Forced block configurations (the heuristic picks one per shape; these reach the other paths)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim,query_len,cfg",
    [
        # Short tiles: several full tiles plus a partial one per document.
        (96, 32, maxsim_module._Config(2, 32, 1, 16, 32, 3, 4, 2)),
        # Four d chunks (q3 in use), 16-row query chunks: Lq = 40 runs as 3 chunks.
        (64, 40, maxsim_module._Config(1, 16, 3, 32, 16, 4, 4, 2)),
        # d not a multiple of 16: last chunk masked.
        (50, 32, maxsim_module._Config(4, 32, 1, 32, 16, 4, 4, 2)),
    ],
)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-document"])
def test_forced_configs(dim, query_len, cfg, flat):
    gen = torch.Generator().manual_seed(dim)
    values, starts, lens = packed_docs([16, 0, 47, 1, 32], dim, torch.float32, gen)
    queries = unit_rows(5, query_len, dim, gen=gen)
    floor = torch.tensor([True, True, False, False, True])
    queries, values, starts, lens, floor = to_dev(queries, values, starts, lens, floor)
    out = poisoned((5, 5), torch.float32)
    maxsim_module._launch(queries, values, starts, lens, floor, out, cfg._replace(flat=flat))
    assert_scores(out, queries, values, starts, lens, floor)


@pytest.mark.parametrize("cfg", [
    maxsim_module._Config(2, 16, 1, 16, 32, 1, 4, 2),  # two queries per tile, 16-row tiles
    maxsim_module._Config(4, 16, 2, 16, 16, 2, 4, 3),  # a long query in two chunks
    maxsim_module._Config(1, 32, 1, 32, 16, 3, 4, 2),  # d = 48 in three dots
], ids=["qb2", "lq-chunks", "d48"])
@pytest.mark.parametrize("candidates", [False, True], ids=["all-pairs", "candidates"])
def test_flat_loop_equals_per_document_loop(monkeypatch, cfg, candidates):
    """The flat tile loop and the per-document loop give bit-identical scores (same dots, same
    order), on lengths around the tile size, empty documents first and last, documents spread
    over several steps, all-negative similarities and PyLate's floor."""
    monkeypatch.setattr(maxsim_module, "_MAX_DOCS_PER_PROGRAM", 4)
    gen = torch.Generator().manual_seed(cfg.block_n + candidates)
    bn = cfg.block_n
    pool = torch.tensor([0, 1, bn - 1, bn, bn + 1, 2 * bn, 3 * bn - 1, 5])
    lens = pool[torch.randint(0, len(pool), (11,), generator=gen)]
    lens[0] = lens[-1] = 0
    dim = cfg.block_k * cfg.num_k
    values, starts, lens = packed_docs(lens, dim, torch.float32, gen, sign=-1)
    queries = unit_rows(2 * cfg.qb + 1, cfg.lq_tile * cfg.num_lq_chunks - 3, dim, gen=gen)
    floor = torch.rand(11, generator=gen) < 0.5
    if candidates:
        pick = torch.randint(0, 11, (queries.shape[0], 6), generator=gen)
        starts, lens, floor = starts[pick], lens[pick], floor[pick]
    queries, values, starts, lens, floor = to_dev(queries, values, starts, lens, floor)
    shape = tuple(starts.shape) if candidates else (queries.shape[0], 11)
    for pad_floor in (None, floor):
        got = {}
        for flat in (True, False):
            got[flat] = poisoned(tuple(shape), torch.float32)
            maxsim_module._launch(queries, values, starts, lens, pad_floor, got[flat],
                                  cfg._replace(flat=flat))
        assert torch.equal(got[True], got[False])
        assert_scores(got[True], queries, values, starts, lens, pad_floor)


@pytest.mark.parametrize("candidates", [False, True], ids=["all-pairs", "candidates"])
def test_many_documents_per_program(monkeypatch, candidates):
    """A program with more documents than one flat tile loop holds (a grid capped at its limit)
    walks them in several steps; empty documents anywhere, one in the last lane of a step."""
    monkeypatch.setattr(maxsim_module, "_MAX_GRID", 3)
    monkeypatch.setattr(maxsim_module, "_MAX_DOCS_PER_PROGRAM", 4)
    gen = torch.Generator().manual_seed(21)
    doc_lens = torch.randint(0, 40, (45,), generator=gen).tolist()
    doc_lens[3] = doc_lens[20] = 0
    values, starts, lens = packed_docs(doc_lens, 32, torch.float32, gen)
    queries = unit_rows(3, 32, 32, gen=gen)
    if candidates:
        pick = torch.randint(0, 45, (3, 14), generator=gen)
        starts, lens = starts[pick], lens[pick]
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    out = poisoned(tuple(starts.shape) if candidates else (3, 45), torch.float32)
    maxsim(queries, values, starts, lens, out=out)
    assert_scores(out, queries, values, starts, lens)


_D96 = maxsim_module._Config(2, 32, 1, 16, 32, 3, 4, 2)  # d = 96 in three dots, 2 queries a tile
_D50_LQ40 = maxsim_module._Config(4, 16, 3, 32, 16, 4, 4, 2)  # d = 50 masked, Lq = 40 in 3 chunks
_D128 = maxsim_module._Config(1, 32, 1, 32, 64, 2, 4, 3)  # d = 128 in two dots


@pytest.mark.parametrize("cfg, dim, dtype, flat, candidates", [
    (_D96._replace(maxnreg=168), 96, torch.float16, True, False),  # maxnreg: a launch option
    (_D96, 96, torch.bfloat16, True, True),
    (_D96, 96, torch.float16, False, False),
    (_D50_LQ40, 50, torch.bfloat16, True, False),
    (_D50_LQ40, 50, torch.float16, False, True),
    (_D128, 128, torch.float16, True, True),
], ids=["d96-fp16", "d96-bf16-candidates", "d96-per-document", "d50-lq-chunks-bf16",
        "d50-lq-chunks-per-document-candidates", "d128-candidates"])
def test_query_tile_in_registers(cfg, dim, dtype, flat, candidates):
    """q_in_regs multiplies each query chunk by the identity when it is loaded (so Triton feeds
    it to wgmma from registers): exact for finite 16-bit inputs, so the scores equal the
    default path's bit for bit, with and without PyLate's floor, on the flat and per-document
    loops. (The interpreter's dots are exact either way, so this cannot see whether the switch
    reaches the compiled kernel: test_query_tile_in_registers_compiles_to_register_operands.)"""
    query_len = 40 if cfg.num_lq_chunks > 1 else 29
    gen = torch.Generator().manual_seed(dim + candidates)
    lens = [0, 1, cfg.block_n, cfg.block_n + 1, 2 * cfg.block_n - 1, 7, 0]
    values, starts, lens = packed_docs(lens, dim, dtype, gen)
    # Large and tiny magnitudes: an inexact identity product (a rounded or flushed value) shows.
    queries = unit_rows(cfg.qb + 1, query_len, dim, gen=gen) * 2.0 ** torch.randint(
        -20, 8, (1, 1, dim), generator=gen)
    queries = queries.to(dtype)
    floor = torch.rand(len(lens), generator=gen) < 0.5
    if candidates:
        pick = torch.randint(0, len(lens), (queries.shape[0], 5), generator=gen)
        starts, lens, floor = starts[pick], lens[pick], floor[pick]
    queries, values, starts, lens, floor = to_dev(queries, values, starts, lens, floor)
    shape = tuple(starts.shape) if candidates else (queries.shape[0], len(lens))
    for pad_floor in (None, floor):
        got = {}
        for q_in_regs in (False, True):
            got[q_in_regs] = poisoned(shape, torch.float32)
            maxsim_module._launch(queries, values, starts, lens, pad_floor, got[q_in_regs],
                                  cfg._replace(flat=flat, q_in_regs=q_in_regs))
        assert torch.equal(got[True], got[False])
        assert_scores(got[True], queries, values, starts, lens, pad_floor)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_query_tile_in_registers_turns_an_inf_query_into_nan():
    """The documented difference: inf * 0 in the identity product makes the inf's row chunk NaN,
    so its query scores NaN (the default path scores it +-inf or NaN); other queries are
    unaffected."""
    gen = torch.Generator().manual_seed(2)
    values, starts, lens = packed_docs([20, 9], 96, torch.float16, gen, sign=1)
    queries = unit_rows(3, 8, 96, dtype=torch.float16, gen=gen, sign=1)
    queries[0, 3, 5] = float("inf")
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = {}
    for q_in_regs in (False, True):
        got[q_in_regs] = poisoned((3, 2), torch.float32)
        maxsim_module._launch(queries, values, starts, lens, None, got[q_in_regs],
                              _D96._replace(q_in_regs=q_in_regs))
    assert torch.isposinf(got[False][0]).all() and got[True][0].isnan().all()
    assert torch.equal(got[True][1:], got[False][1:]) and got[True][1:].isfinite().all()


def test_query_tile_in_registers_needs_16_bit_inputs():
    gen = torch.Generator().manual_seed(0)
    values, starts, lens = to_dev(*packed_docs([5, 9], 32, torch.float32, gen))
    queries = unit_rows(2, 8, 32, gen=gen).to(DEV)
    cfg = maxsim_module._Config(1, 16, 1, 16, 32, 1, 4, 2, q_in_regs=True)
    with pytest.raises(ValueError, match="q_in_regs needs float16 or bfloat16"):
        maxsim_module._launch(queries, values, starts, lens, None, torch.empty(2, 2, device=DEV), cfg)


def test_split_dim_heuristic():
    split = maxsim_module._split_dim
    assert split(96) == (32, 3)  # no padding to 128
    assert split(128) == (128, 1)
    assert split(32) == (32, 1)
    assert split(384) == (128, 3)
    assert split(100) == (32, 4)  # not a multiple of 16: masked
    assert split(768) == (256, 3)
    assert split(128, 64) == (64, 2)  # fp32: 64-column chunks keep 3xTF32 dots spill-free
    for dim in range(1, 1025):
        block_k, num_k = split(dim)
        assert block_k >= 16 and block_k & (block_k - 1) == 0
        assert num_k <= 4 and block_k * num_k >= dim


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _good():
    q = torch.zeros(2, 8, 32, device=DEV)
    v = torch.zeros(10, 32, device=DEV)
    s = torch.tensor([0, 4], device=DEV)
    n = torch.tensor([4, 6], device=DEV)
    return q, v, s, n


BAD_INPUTS = {  # case: (build the arguments from _good(), the error, what its message says)
    "queries not a tensor": (lambda q, v, s, n: ([[0.0]], v, s, n, {}), TypeError,
                             "queries must be a torch.Tensor"),
    "doc_values not a tensor": (lambda q, v, s, n: (q, v.tolist(), s, n, {}), TypeError,
                                "doc_values must be a torch.Tensor"),
    "queries 2-D": (lambda q, v, s, n: (q[0], v, s, n, {}), ValueError, r"queries must be \[Q, Lq, d\]"),
    "doc_values 3-D": (lambda q, v, s, n: (q, v.view(2, 5, 32), s, n, {}), ValueError,
                       r"doc_values must be \[R, d\]"),
    "integer queries": (lambda q, v, s, n: (q.long(), v.long(), s, n, {}), TypeError,
                        "queries must be float32, float16 or bfloat16"),
    "dtype mismatch": (lambda q, v, s, n: (q, v.half(), s, n, {}), TypeError, "differs from queries dtype"),
    "dim mismatch": (lambda q, v, s, n: (q, v[:, :16], s, n, {}), ValueError, "embedding dims differ"),
    "zero dim": (lambda q, v, s, n: (q[..., :0], v[:, :0], s, n, {}), ValueError,
                 r"embedding dim must be in \[1, 1024\]"),
    "float starts": (lambda q, v, s, n: (q, v, s.float(), n, {}), TypeError, "doc_starts must be int32 or int64"),
    "int16 lengths": (lambda q, v, s, n: (q, v, s, n.short(), {}), TypeError, "doc_lengths must be int32 or int64"),
    "shape mismatch": (lambda q, v, s, n: (q, v, s, n[:1], {}), ValueError, "must have the same shape"),
    "3-D starts": (lambda q, v, s, n: (q, v, s.view(1, 1, 2), n.view(1, 1, 2), {}), ValueError,
                   r"\(shared documents\) or \[Q, K\]"),
    "candidates for wrong Q": (lambda q, v, s, n: (q, v, s[None], n[None], {}), ValueError, "candidate mode"),
    "negative length": (lambda q, v, s, n: (q, v, s, n - 5, {}), ValueError, "doc_lengths must be >= 0"),
    "negative start": (lambda q, v, s, n: (q, v, s - 1, n, {}), ValueError, "doc_starts must be >= 0"),
    "range past the rows": (lambda q, v, s, n: (q, v, s + 1, n, {}), ValueError, "runs past the 10 rows"),
    "pad_floor not bool": (lambda q, v, s, n: (q, v, s, n, {"pad_floor": n}), TypeError,
                           "pad_floor must be a bool tensor"),
    "pad_floor shape": (lambda q, v, s, n: (q, v, s, n, {"pad_floor": (n > 0)[:1]}), ValueError,
                        "pad_floor shape"),
    "out not a tensor": (lambda q, v, s, n: (q, v, s, n, {"out": [[0.0, 0.0]] * 2}), TypeError,
                         "out must be a torch.Tensor"),
    "out dtype": (lambda q, v, s, n: (q, v, s, n, {"out": torch.zeros(2, 2, dtype=torch.float64, device=DEV)}),
                  TypeError, "out must be float32"),
    "out shape": (lambda q, v, s, n: (q, v, s, n, {"out": torch.zeros(2, 3, device=DEV)}), ValueError,
                  "out has shape"),
    # 16-bit, so that the float32 limit (512) is not what fires.
    "dim too large": (lambda q, v, s, n: (q.new_zeros(2, 8, 1040, dtype=torch.float16),
                                          v.new_zeros(10, 1040, dtype=torch.float16), s, n, {}), ValueError,
                      r"embedding dim must be in \[1, 1024\]"),
    "fp32 dim over 512": (lambda q, v, s, n: (q.new_zeros(2, 8, 520), v.new_zeros(10, 520), s, n, {}),
                          ValueError, "float32 inputs support embedding dims up to 512"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_validation_errors(case):
    build, error, match = BAD_INPUTS[case]
    q, v, s, n, kwargs = build(*_good())
    if case in ("negative length", "negative start", "range past the rows"):
        kwargs["check_ranges"] = True  # free on the CPU, one sync on a GPU
    with pytest.raises(error, match=match):
        maxsim(q, v, s, n, **kwargs)


@pytest.mark.skipif(DEV != "cpu", reason="index tensors must share the queries' device on a GPU")
def test_cpu_index_tensors_are_range_checked_by_default():
    """check_ranges=None checks when the index tensors are on the CPU (free there)."""
    q, v, s, n = _good()
    with pytest.raises(ValueError, match="runs past the 10 rows"):
        maxsim(q, v, (s + 1).cpu(), n.cpu())


def test_cpu_tensors_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        maxsim(q, q[0], torch.tensor([0]), torch.tensor([4]))


def test_device_mismatch_is_rejected():
    q, v, s, n = _good()
    other = "cpu" if DEV == "cuda" else "meta"
    with pytest.raises(ValueError):
        maxsim(q, v.to(other), s, n)
    with pytest.raises(ValueError):
        maxsim(q, v, s.to(other), n.to(other))


def test_unchecked_bad_ranges_are_clipped_not_read():
    gen = torch.Generator().manual_seed(13)
    values = unit_rows(20, 32, gen=gen)
    queries = unit_rows(2, 8, 32, gen=gen)
    starts = torch.tensor([15, -3, 5])
    lens = torch.tensor([10, 5, -2])
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens, check_ranges=False)
    clipped_starts = torch.tensor([15, 0, 5], device=DEV)
    clipped_lens = torch.tensor([5, 2, 0], device=DEV)
    assert_scores(got, queries, values, clipped_starts, clipped_lens)


# ----------------------------------------------------------------------------------------------
# GPU only: larger shapes, and no recompilation as counts change
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dim", [96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_larger_shapes(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    lens = torch.randint(0, 301, (300,), generator=gen)
    values, starts, lens = packed_docs(lens.tolist(), dim, dtype, gen, gap=0)
    queries = unit_rows(37, 32, dim, dtype=dtype, gen=gen)
    queries, values, starts, lens = to_dev(queries, values, starts, lens)
    got = maxsim(queries, values, starts, lens)
    # fp32 torch reference on the GPU from the same rounded inputs (fp64 loops are too slow here).
    q32, v32 = queries.float(), values.float()
    want = torch.empty_like(got)
    for j, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        sim = torch.einsum("qtd,rd->qtr", q32, v32[s:s + n])
        want[:, j] = sim.amax(-1).sum(-1) if n else 0.0
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    cand = torch.randint(0, 300, (37, 50), generator=gen).to(DEV)
    got_cand = maxsim(queries, values, starts[cand], lens[cand])
    torch.testing.assert_close(got_cand, torch.gather(want, 1, cand), atol=2e-3, rtol=1e-4)


@gpu
@pytest.mark.parametrize("dim", [96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_query_tile_in_registers(dtype, dim):
    """The compiled q_in_regs tiles (wgmma with the queries in registers): bit for bit the same
    tile without the switch (the same products in the same order), and the default tile up to
    fp32 summation order (another tile height sums a query's rows in another order)."""
    gen = torch.Generator().manual_seed(dim)
    lens = torch.randint(0, 301, (200,), generator=gen)
    values, starts, lens = to_dev(*packed_docs(lens.tolist(), dim, dtype, gen, gap=0))
    queries = unit_rows(45, 32, dim, dtype=dtype, gen=gen).to(DEV)
    want = maxsim(queries, values, starts, lens)
    default = maxsim_module._kernel_config(dtype, dim, 32, 45)
    one_warpgroup = default._replace(qb=4, num_warps=4, maxnreg=168 if dim <= 96 else None)
    for cfg in (default, one_warpgroup, one_warpgroup._replace(flat=False)):
        got = {}
        for q_in_regs in (False, True):
            got[q_in_regs] = poisoned(tuple(want.shape), torch.float32, DEV)
            maxsim_module._launch(queries, values, starts, lens, None, got[q_in_regs],
                                  cfg._replace(q_in_regs=q_in_regs))
        assert torch.equal(got[True], got[False]), cfg
        torch.testing.assert_close(got[True], want, atol=1e-5, rtol=1e-6)


@gpu
def test_gpu_no_recompilation_when_counts_change():
    kernel = maxsim_module._maxsim_kernel
    device = torch.cuda.current_device()
    gen = torch.Generator().manual_seed(0)

    def run(num_q, lengths, candidates=None):
        values, starts, lens = packed_docs(lengths, 96, torch.float16, gen)
        queries = unit_rows(num_q, 32, 96, dtype=torch.float16, gen=gen)
        queries, values, starts, lens = to_dev(queries, values, starts, lens)
        if candidates is not None:
            pick = torch.randint(0, len(lengths), (num_q, candidates), generator=gen).to(DEV)
            starts, lens = starts[pick], lens[pick]
        maxsim(queries, values, starts, lens)

    def compiled():
        return len(kernel.device_caches[device][0])

    run(16, [30, 300, 7])
    run(3, [30, 5], candidates=4)
    before = compiled()
    run(16, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # other N and lengths
    run(40, [299] * 33)  # other Q (same query block size) and N
    run(9, [64] * 16 + [0])
    run(5, [30, 5, 9], candidates=17)  # other Q and K in candidate mode
    run(1000, [3] * 5, candidates=1)
    assert compiled() == before


@gpu
@pytest.mark.skipif(INTERPRETED, reason="compiled kernels only")
def test_gpu_launch_does_not_synchronize():
    values = torch.randn(1000, 96, device=DEV, dtype=torch.float16)
    queries = torch.randn(1, 32, 96, device=DEV, dtype=torch.float16)
    starts = torch.arange(10, device=DEV) * 100
    lens = torch.full((10,), 100, device=DEV)
    maxsim(queries, values, starts, lens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        maxsim(queries, values, starts, lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_colbert_launches_compile_for_sm90():
    """Compile the ColBERT-shaped launches for an H100 (the interpreter checks no GPU limit)."""
    launches = compile_case("maxsim")
    assert len(launches) == 30, launches
    for launch in launches:
        assert launch["shared"] <= 227 * 1024, launch
        if launch["dtype"] != "torch.float32" and launch["config"].get("NUM_LQ_CHUNKS") == 1:
            assert launch["spill_bytes"] in (0, None), launch  # the ColBERT configurations
            if launch["config"]["num_warps"] == 8 and launch["registers"] is not None:
                # Many-query tiles: two programs per SM (one's MMAs overlap the other's row
                # max): 2 x 256 threads x registers <= 64K, 2 x (shared + 1 KiB) <= 228 KiB.
                assert launch["registers"] <= 128, launch
                assert 2 * (launch["shared"] + 1024) <= 228 * 1024, launch
            if launch["config"]["QB"] * launch["config"]["LQ_TILE"] >= 64:
                # wgmma tiles read both operands from shared memory unless q_in_regs says
                # otherwise (test_query_tile_in_registers_compiles_to_register_operands).
                assert launch["wgmma"] and not any("registers" in k for k in launch["wgmma"]), launch


@pytest.mark.parametrize("arch", OTHER_GPUS)
def test_launches_fit_the_shared_memory_of_other_gpus(arch):
    """The same launches compiled for a T4 (sm_75: 64 KiB of shared memory a block, small tiles),
    an A100 (163 KiB), an RTX 30/A10 (sm_86, 99 KiB; sm_89's budget is the same), a B200
    (sm_100, 227 KiB) and an RTX 50 (sm_120, 99 KiB): each fits, and the 16-bit ColBERT
    configurations spill nothing."""
    launches = compile_case("maxsim", arch)
    assert len(launches) == 30, launches
    for launch in launches:
        assert launch["shared"] <= SHARED_MEMORY[arch], launch
        if launch["dtype"] != "torch.float32" and launch["config"].get("NUM_LQ_CHUNKS") == 1:
            assert launch["spill_bytes"] in (0, None), launch
        if arch == 75:
            assert launch["config"]["QB"] * launch["config"]["LQ_TILE"] == 32, launch


def test_query_tile_in_registers_compiles_to_register_operands():
    """q_in_regs through the launcher (the many-query tile, and 128 rows on one warpgroup with
    a 168-register cap at d = 96; flat and per-document loops): every tile-loop wgmma (N =
    BLOCK_N) takes the query chunk from registers, only the identity products (N = BLOCK_K)
    read it from shared memory, also for a long query's reloaded chunks; the flat loop spills
    nothing at d = 96, and the capped tile fits three programs per SM."""
    launches = compile_case("maxsim-query-registers")
    assert len(launches) == 18, launches
    capped = 0
    for launch in launches:
        cfg, wgmma = launch["config"], launch["wgmma"]
        assert cfg["Q_IN_REGS"] and cfg["BLOCK_K"] != cfg["BLOCK_N"], launch
        assert wgmma.get(f"n{cfg['BLOCK_N']} registers", 0) > 0, launch
        assert f"n{cfg['BLOCK_N']} shared" not in wgmma, launch
        assert launch["shared"] <= 227 * 1024, launch
        if cfg["FLAT"] and cfg["BLOCK_K"] * cfg["NUM_K"] <= 96:
            assert launch["spill_bytes"] in (0, None), launch
        if cfg.get("maxnreg"):
            capped += 1
            if launch["registers"] is not None:  # None: no cuobjdump to read them with
                assert launch["registers"] <= cfg["maxnreg"], launch  # the cap reached ptxas
                if cfg["FLAT"]:
                    assert 3 * 32 * cfg["num_warps"] * launch["registers"] <= 65536, launch
                    assert 3 * (launch["shared"] + 1024) <= 228 * 1024, launch
    assert capped == 4  # the launcher passed the cap: d = 96, fp16 and bf16, both loops


def test_strided_inputs_and_output(monkeypatch):
    """Column-major queries, documents and scores: the scores are written in place, the inputs
    reach the kernel with unit column strides (its column offsets are int32: a column-major
    corpus of 2^31 / d rows would wrap them)."""
    gen = torch.Generator().manual_seed(0)
    values, starts, lens = packed_docs([5, 0, 40, 1], 48, torch.float32, gen)
    queries = unit_rows(3, 12, 48, gen=gen)
    q_strided = queries.transpose(1, 2).contiguous().transpose(1, 2).to(DEV)
    v_strided = values.t().contiguous().t().to(DEV)
    out = torch.full((4, 3), float("nan"), device=DEV).t()
    kernel, seen = maxsim_module._maxsim_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args[0].stride(2), args[1].stride(1)))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(maxsim_module, "_maxsim_kernel", Recorder())
    got = maxsim(q_strided, v_strided, *to_dev(starts, lens), out=out)
    assert seen == [(1, 1)]
    assert got.data_ptr() == out.data_ptr()
    assert_scores(got, queries, values, starts, lens)


def test_counts_and_lengths_share_one_compiled_variant():
    """The CPU twin of test_gpu_no_recompilation_when_counts_change: Triton's JIT keys a variant
    on its specialisation (ints equal to 1 or divisible by 16 included, unless marked
    do_not_specialize); calls with other Q, N, K and lengths must all get the same one per mode."""
    keys = {launch["key"] for launch in compile_case("maxsim-counts")}
    assert len(keys) == 2, keys  # shared documents, per-query candidates


@pytest.mark.parametrize("dtype, dim", [(torch.float16, 1024), (torch.float32, 512)])
def test_largest_supported_dims(dtype, dim):
    """The widest d each dtype takes (four 256- or 128-column chunks)."""
    gen = torch.Generator().manual_seed(21)
    values, starts, lens = packed_docs([3, 0, 17], dim, dtype, gen)
    queries = unit_rows(2, 5, dim, dtype=dtype, gen=gen)
    got = maxsim(*to_dev(queries, values, starts, lens))
    assert_scores(got, queries, values, starts, lens)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's own state; compiled launches are re-entrant")
def test_interpreted_launches_from_several_threads():
    """Triton's interpreter keeps the grid in one global: launches from several threads at once
    (a server sharing a model, on the CPU) failed with 'x >= grid_dim[0]' unless serialised."""
    import threading

    from colbert_triton import score

    gen = torch.Generator().manual_seed(11)
    work = [(torch.randn(1 + i, 4, 16, generator=gen), [torch.randn(2 + j, 16, generator=gen) for j in range(3 + i)])
            for i in range(4)]
    expected = [score(q, d, backend="torch") for q, d in work]
    results = [None] * len(work)
    barrier = threading.Barrier(len(work))

    def call(i):
        barrier.wait()
        try:
            results[i] = score(*work[i], backend="triton")
        except Exception as error:  # noqa: BLE001 - reported below
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert not isinstance(got, Exception), got
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
