"""Element offsets past 2^31 in every kernel: no row offset a kernel computes may wrap in int32.

The real cases are large: an encoder batch of 1.4 M tokens (T x 1536 FFN columns pass 2^31
elements), a corpus of 23 M token rows at d = 96 for MaxSim, Q x N scores. An int32 product
there wraps, and the kernel reads or writes rows elsewhere: a fault on a GPU, or wrong rows. The
encoder kernels take any row stride, so a few hundred rows laid ROW_STRIDE elements apart give
their row offsets the same size; MaxSim's corpus is 23 M rows as in use. On the CPU these
tensors live in sparse mappings, of which only the rows written take memory (Linux; the
interpreter reads them in place), on a GPU in real memory (~4 GB each). Each launch must give
what it gives on compact copies of the same rows, to the bit (a cuBLAS GEMM on a GPU: to fp16
rounding); in the interpreter memcheck also names a wrapped access that leaves the launch's
tensors.
"""

from __future__ import annotations

import fcntl
import mmap
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_DEVICE, randn
from test_maxsim_kernel import assert_scores, unit_rows

from colbert_triton.kernels import maxsim as maxsim_module
from colbert_triton.kernels import pooling
from colbert_triton.kernels.attention import varlen_attention
from colbert_triton.kernels.embedding import embed_layernorm
from colbert_triton.kernels.head import project_normalize
from colbert_triton.kernels.linear import (
    bias_residual_layernorm,
    layernorm,
    linear,
    linear_residual_layernorm,
)

pytestmark = pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not sys.platform.startswith("linux"),
                                reason="sparse mappings (MAP_NORESERVE) as Linux makes them")

ROW_STRIDE = 2**23 + 8  # elements from one row to the next: row 256 starts past 2^31
# Rows of each far-apart tensor. Sequences stay under 256 rows: offsets within a sequence are
# int32 in the kernels by design (at most 512 rows x 3 x 1024 columns).
ROWS = 260
DTYPE = torch.float16
_MAP_NORESERVE = 0x4000  # Linux's value; Python's mmap names it from 3.13 only


@pytest.fixture(autouse=True)
def _one_at_a_time_on_a_gpu():
    """On a GPU each test holds 9-17 GB: the device run's pytest-xdist workers share one GPU, so
    these tests take turns (a lock file) and give their memory back after each."""
    if KERNEL_DEVICE == "cpu":
        yield
        return
    with open(Path(tempfile.gettempdir()) / "colbert-triton-large-offsets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    if KERNEL_DEVICE != "cpu":
        return torch.empty(numel, dtype=dtype, device=KERNEL_DEVICE)
    nbytes = numel * dtype.itemsize
    nbytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except (OSError, ValueError) as error:
        pytest.skip(f"no {nbytes / 2**30:.1f} GiB sparse mapping on this machine: {error}")
    return torch.frombuffer(mapping, dtype=dtype, count=numel)  # keeps the mapping alive


def far_apart(rows: torch.Tensor, stride: int = ROW_STRIDE) -> torch.Tensor:
    """``rows`` ([R, ...]) copied into a view whose rows are ``stride`` elements apart."""
    row = rows[0].contiguous()
    view = _buffer((len(rows) - 1) * stride + row.numel(), rows.dtype)
    view = view.as_strided(rows.shape, (stride, *row.stride()))
    view.copy_(rows)
    return view


def far_output(num_rows: int, cols: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """An output view with far-apart rows, NaN until written."""
    return far_apart(torch.full((num_rows, cols), float("nan"), dtype=dtype))


def _ln(gen, n):
    return randn(gen, n, scale=0.1, shift=1.0, dtype=DTYPE), randn(gen, n, scale=0.1, dtype=DTYPE)


def assert_same(far: torch.Tensor, compact: torch.Tensor, exact: bool = True):
    """To the bit; or, for cuBLAS (which may pick another algorithm for another row stride), to
    fp16 rounding: a wrapped offset gives other rows, or leaves NaN where nothing was written."""
    assert bool(torch.isfinite(compact).all())
    if exact:
        assert torch.equal(far.cpu(), compact.cpu())
    else:
        torch.testing.assert_close(far.cpu(), compact.cpu(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_rows_past_int32_offsets(backend):
    gen = torch.Generator().manual_seed(0)
    x = randn(gen, ROWS, 64, dtype=DTYPE)
    w, b = randn(gen, 48, 64, scale=0.1, dtype=DTYPE), randn(gen, 48, dtype=DTYPE)
    compact = linear(x, w, b, "gelu", backend=backend)
    out = far_output(ROWS, 48)
    linear(far_apart(x), w, b, "gelu", out=out, backend=backend)
    assert_same(out, compact, exact=backend == "triton" or KERNEL_DEVICE == "cpu")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_residual_layernorm_rows_past_int32_offsets(backend):
    gen = torch.Generator().manual_seed(1)
    x, residual = randn(gen, ROWS, 64, dtype=DTYPE), randn(gen, ROWS, 48, dtype=DTYPE)
    w, b = randn(gen, 48, 64, scale=0.1, dtype=DTYPE), randn(gen, 48, dtype=DTYPE)
    ln_w, ln_b = _ln(gen, 48)
    compact = linear_residual_layernorm(x, w, b, residual, ln_w, ln_b, 1e-12, backend=backend)
    out = far_output(ROWS, 48)
    linear_residual_layernorm(far_apart(x), w, b, far_apart(residual), ln_w, ln_b, 1e-12, out=out,
                              backend=backend)
    assert_same(out, compact, exact=backend == "triton" or KERNEL_DEVICE == "cpu")


def test_layernorms_rows_past_int32_offsets():
    gen = torch.Generator().manual_seed(2)
    x, residual = randn(gen, ROWS, 48, dtype=DTYPE), randn(gen, ROWS, 48, dtype=DTYPE)
    b = randn(gen, 48, dtype=DTYPE)
    ln_w, ln_b = _ln(gen, 48)
    out = far_output(ROWS, 48)
    bias_residual_layernorm(far_apart(x), b, far_apart(residual), ln_w, ln_b, 1e-12, out=out)
    assert_same(out, bias_residual_layernorm(x, b, residual, ln_w, ln_b, 1e-12))
    out = far_output(ROWS, 48)
    layernorm(far_apart(x), ln_w, ln_b, 1e-12, out=out)
    assert_same(out, layernorm(x, ln_w, ln_b, 1e-12))


def test_embeddings_rows_past_int32_offsets():
    """Far-apart rows in the output and in both tables (the ids pick rows past 2^31 / stride)."""
    gen = torch.Generator().manual_seed(3)
    word, position = randn(gen, 300, 64, dtype=DTYPE), randn(gen, 300, 64, dtype=DTYPE)
    token_type = randn(gen, 64, dtype=DTYPE)
    ln_w, ln_b = _ln(gen, 64)
    ids = torch.randint(250, 300, (ROWS,), generator=gen).to(KERNEL_DEVICE)
    positions = torch.randint(0, 300, (ROWS,), generator=gen).to(KERNEL_DEVICE)
    compact = embed_layernorm(ids, positions, word, position, token_type, ln_w, ln_b, 1e-12)
    out = far_output(ROWS, 64)
    embed_layernorm(ids, positions, far_apart(word), far_apart(position), token_type, ln_w, ln_b, 1e-12,
                    out=out)
    assert_same(out, compact)


@pytest.mark.parametrize("gather", [False, True], ids=["all-rows", "gathered-rows"])
def test_head_rows_past_int32_offsets(gather):
    gen = torch.Generator().manual_seed(4)
    x = randn(gen, ROWS, 64, dtype=DTYPE)
    w, b = randn(gen, 96, 64, scale=0.1, dtype=DTYPE), randn(gen, 96, dtype=DTYPE)
    rows = torch.tensor([0, 255, 259, 7, 258], device=KERNEL_DEVICE) if gather else None
    compact = project_normalize(x, w, b, rows)
    out = far_output(ROWS if rows is None else len(rows), 96)
    project_normalize(far_apart(x), w, b, rows, out=out)
    assert_same(out, compact)


def test_attention_rows_past_int32_offsets():
    """Sequences starting past 2^31 / stride rows; keys limited in some."""
    gen = torch.Generator().manual_seed(5)
    num_heads, head_dim = 2, 32
    seq_lens = [1, 63, 64, 64, 64, 3, 1]  # the last two start at rows 256 and 259
    key_lens = [1, 50, 64, 3, 64, 2, 1]
    qkv = randn(gen, ROWS, 3 * num_heads * head_dim, dtype=DTYPE)
    cu_seqlens = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_seqlens = cu_seqlens.to(KERNEL_DEVICE)
    key_lens = torch.tensor(key_lens, dtype=torch.int32).to(KERNEL_DEVICE)
    compact = varlen_attention(qkv, cu_seqlens, key_lens, max(seq_lens), num_heads, head_dim)
    out = far_output(ROWS, num_heads * head_dim)
    varlen_attention(far_apart(qkv), cu_seqlens, key_lens, max(seq_lens), num_heads, head_dim, out=out)
    assert_same(out, compact)


def test_pooling_rows_past_int32_offsets():
    """Documents past 2^31 / stride rows pooled (distances, clustering, means), after 125
    two-row documents copied as they are."""
    gen = torch.Generator().manual_seed(7)
    lengths = [2] * 125 + [4, 6]
    values = unit_rows(ROWS, 96, dtype=DTYPE, gen=gen).to(KERNEL_DEVICE)
    compact_rows, compact_lengths = pooling.pool_documents(values, lengths, 2, 1).result()
    far_rows, far_lengths = pooling.pool_documents(far_apart(values), lengths, 2, 1).result()
    assert list(far_lengths) == list(compact_lengths) and compact_lengths[-2:].tolist() == [2, 3]
    assert_same(far_rows, compact_rows)


@pytest.mark.parametrize("flat", [True, False], ids=["flat-loop", "per-document-loop"])
@pytest.mark.parametrize("candidates", [False, True], ids=["shared-documents", "candidates"])
def test_maxsim_rows_past_int32_offsets(candidates, flat):
    """A corpus of 23 M token rows at d = 96 (documents past row 2^31 / 96), as in use; the
    queries and the scores' rows far apart. Both document loops of the kernel."""
    dim, corpus_rows = 96, 23_000_000
    gen = torch.Generator().manual_seed(6)
    values = _buffer(corpus_rows * dim, DTYPE).view(corpus_rows, dim)
    starts = torch.tensor([5, corpus_rows - 300, corpus_rows - 1, 2**31 // dim + 7])
    lengths = torch.tensor([40, 300, 1, 77])
    for start, length in zip(starts.tolist(), lengths.tolist()):
        values[start:start + length] = unit_rows(length, dim, dtype=DTYPE, gen=gen).to(KERNEL_DEVICE)
    queries = far_apart(unit_rows(3, 32, dim, dtype=DTYPE, gen=gen).to(KERNEL_DEVICE), stride=2**30)
    # The reference reads a compact copy of the four documents (not 23 M rows).
    compact = torch.cat([values[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
    compact_starts = torch.cumsum(lengths, 0) - lengths
    if candidates:  # each query its own list: the four in another order
        starts, compact_starts, lengths = (t.flip(0).repeat(3, 1) for t in (starts, compact_starts, lengths))
    out = far_apart(torch.full((3, 4), float("nan")), stride=2**30)  # Q x N past 2^31 scores
    cfg = maxsim_module._kernel_config(DTYPE, dim, 32, 1 if candidates else 3)._replace(flat=flat)
    maxsim_module._launch(queries, values, starts.to(KERNEL_DEVICE), lengths.to(KERNEL_DEVICE), None, out,
                          cfg)
    assert_scores(out, queries, compact, compact_starts, lengths)
