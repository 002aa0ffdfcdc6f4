"""Batched ColBERT MaxSim: ``score(q, d) = sum_i max_j <q_i, d_j>`` in one Triton kernel.

The kernel streams each document's rows through a FlashAttention-style loop: one ``tl.dot`` per
document tile gives the similarities of a block of query rows against ``BLOCK_N`` document rows,
a running per-row max lives in registers, and the similarity matrix never reaches global
memory. What it does differently from the published peers (flash-maxsim, late-interaction-
kernels, see ``research/maxsim-peers.md``):

* **Several queries per document tile.** In all-pairs mode (documents shared by every query) a
  program stacks ``QB`` queries' rows into the MMA M dimension (``QB * LQ_TILE`` rows, up to 256
  for 16-bit inputs), so one load of a document tile feeds ``QB`` queries. At the end of each
  document the running row maxima are reshaped to ``[QB, LQ_TILE]`` and summed along the token
  axis: a segmented sum that yields ``QB`` scores at once. Peers give each program one query
  and re-read every document tile from L2 once per query, which caps the batch case far below
  the tensor-core floor.
* **Each document is read over its own length, in one pipelined stream.** A program scores a
  query block against up to ``DOCS_PER_STEP`` consecutive documents in ONE loop over all their
  tiles (``_flat_tile_loop``): each document contributes ``cdiv(length, BLOCK_N)`` tiles, not a
  padded or maximum length, and tile t finds its document from per-document tile counts held
  in registers, so the software pipeline prefetches across document boundaries instead of
  restarting (and loading the partial last tile synchronously) at every document. No tile
  is masked: a partial tile's rows past the document's end re-read its last row, and a
  duplicate cannot change a max (masks cost ~20% of the loop's registers in the sm_90 build,
  the difference between 1 and 2 resident programs per SM at 256 rows). ``FLAT=False`` keeps
  the simpler loop per document (full tiles, then the masked partial one) until a GPU
  measurement settles which is faster.
* **The query tile stays resident across documents.** The query rows are loaded once per
  program, for all its ``docs_per_program`` documents.
* **The query tile can be wgmma's register operand** (``_Config.q_in_regs``, 16-bit inputs).
  Triton's sm_90 pipeline stages both dot operands in shared memory unless the A operand is
  the result of another MMA (its ``MMAV3UseRegOperand`` pattern, made for FlashAttention's P),
  and at 256 x 64 tiles every wgmma then reads 4 KB of shared memory per 32 tensor-core
  clocks, the SM's whole shared-memory bandwidth (bench/NOTES.md). Multiplying each query
  chunk by the identity when it is loaded (once per program, or per chunk of a long query;
  exact for finite 16-bit values in fp32 accumulation) makes it an MMA result, so the tile
  loop's wgmmas read only the document tile from shared memory, for ~50 more registers a
  thread at d = 96 (176: one 256-row program per SM; 128 rows on one warpgroup under a
  ``maxnreg`` cap of 168: three). Off by default until a GPU measurement says which wins
  (bench ``ours-qregs*``, tune.py).
* **No padding of d to a power of two.** The embedding dim is split into ``NUM_K`` chunks of
  ``BLOCK_K`` columns (the largest power of two dividing d: 96 -> 3 x 32, 128 -> 1 x 128) and the
  chunk products accumulate into one fp32 tile, so d = 96 costs 96 columns of MMA work, not
  128. Only a d that is not a multiple of 16 pads its last chunk, with masked loads.
* **No recompilation per call shape.** Counts, lengths, strides that follow N or K are runtime
  arguments (``do_not_specialize`` where Triton would key on divisibility); only the dtype, the
  d split, the query tile and the block sizes are compile-time, all picked by a small heuristic
  (``_kernel_config``), never by autotuning on the request path.

Candidate mode (``doc_starts`` of shape ``[Q, K]``, each query with its own candidates) is the
same kernel with one query per program: documents are gathered in place by ``(start, length)``
from ``doc_values``, never copied.

Grid: one axis, ``num_qblocks * ceil(docs_per_query / docs_per_program)`` programs, the query
block varying fastest so that the programs running together share their documents (one read
from HBM) while every query block stays in L2.

Precision: 16-bit inputs run 16-bit tensor-core dots with fp32 accumulation; fp32 inputs run
3xTF32 dots (fp32-level accuracy on tensor cores).

Conventions (the contract tests/test_maxsim_kernel.py checks against an fp64 reference):

* Scores accumulate and are returned in fp32.
* A query row that is all zeros contributes exactly 0 (its dot products are 0), so callers mask
  query tokens by zeroing them; the kernel's own padding rows (``Lq`` up to ``LQ_TILE``, queries
  past ``Q`` in the last block) are zero rows too.
* ``pad_floor[doc] = True`` adds 0.0 to every query row's max for that document. This
  reproduces PyLate's torch path, which multiplies padded similarities by a 0 mask, so a padded
  slot takes part in the max as 0 (it matters when all of a row's real similarities are < 0).
* An empty document (length 0) scores 0.0: each row's max over no rows is taken as 0, the
  convention of late-interaction-kernels (flash-maxsim returns -inf). Never -inf or NaN.
* Non-finite inputs: a NaN makes exactly the scores it enters NaN. With ``q_in_regs`` an inf
  in a query chunk turns that chunk of its row into NaN (inf * 0 in the identity product), so
  such a query scores NaN where the default path may give +-inf; the public API refuses
  non-finite embeddings before they reach the kernel.
* Rows outside ``doc_values`` are never read: a range ``[start, start + length)`` is clipped to
  ``[0, R)`` inside the kernel. The launcher raises on such ranges when checking them is free
  (index tensors on the CPU) or when asked to (``check_ranges=True``, one device sync).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import SM90_SHARED_MEMORY, on_device, shared_memory_limit

__all__ = ["maxsim", "takes"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_K_CHUNKS = 4  # query chunks held in registers (q0..q3 in the kernel)
_MAX_DIM = 1024
_MAX_DIM_FP32 = 512
_MAX_DOCS_PER_PROGRAM = 16
_PROGRAMS_PER_SM = 8  # grid size target of the document split (bench/device/tune.py sweeps it)
_MAX_GRID = 2**31 - 1
# The largest default tile takes 82 KiB of shared memory on sm_80-sm_89: a GPU offering less
# (sm_75, the T4: 64 KiB) gets the small tiles of _kernel_config.
_SMALL_TILES_BELOW = 84 * 1024
_MAX_DIM_SMALL_TILES = 256  # K chunks of 128 and more (d > 256) exceed 64 KiB there


def takes(dtype: torch.dtype, dim: int, device: torch.device | None = None) -> bool:
    """Whether the kernel scores embeddings of this dtype and dim (float64 counts as float32,
    the dtype the scoring layer converts it to) on ``device`` (None: a GPU with the shared memory
    of the sm_90 build; a T4's 64 KiB takes dims up to 256). When no backend is named, others
    are scored by PyTorch."""
    if dtype == torch.float64:
        dtype = torch.float32
    if dtype not in _FLOAT_DTYPES:
        return False
    # Only dims past the small tiles' limit read the device (ColBERT's never do: a hot path).
    if dim > _MAX_DIM_SMALL_TILES and device is not None and _small_tiles(shared_memory_limit(device)):
        return False
    return 1 <= dim <= (_MAX_DIM_FP32 if dtype == torch.float32 else _MAX_DIM)


def _small_tiles(max_shared: int) -> bool:
    """Whether a GPU with this much shared memory a block gets the small tiles (sm_75)."""
    return max_shared < _SMALL_TILES_BELOW


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_query_chunk(q_ptrs, row_valid, k_offs, dim, q_k_stride, CHUNK: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, Q_IN_REGS: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Columns [CHUNK * BLOCK_K, (CHUNK + 1) * BLOCK_K) of the query rows: [BLOCK_M, BLOCK_K]."""
    if EVEN_K:
        mask = row_valid[:, None]
    else:
        mask = row_valid[:, None] & ((k_offs + CHUNK * BLOCK_K) < dim)[None, :]
    x = tl.load(q_ptrs + CHUNK * BLOCK_K * q_k_stride, mask=mask, other=0.0)
    if Q_IN_REGS:
        # x @ I, exact for finite 16-bit x (fp32 sums of x_ij * 1 and zeros; an inf gives
        # inf * 0 = NaN across its row), once per load: the chunk becomes an MMA result, the
        # one kind of operand Triton's sm_90 pipeline (MMAV3UseRegOperand) feeds to wgmma from
        # registers, so the tile loop's dots read only the document tile from shared memory.
        eye = (k_offs[:, None] == k_offs[None, :]).to(x.dtype)
        x = tl.dot(x, eye, input_precision=PRECISION).to(x.dtype)
    return x


@triton.jit
def _load_doc_chunk(d_ptrs, row_valid, k_offs, dim, doc_k_stride, CHUNK: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Columns [CHUNK * BLOCK_K, (CHUNK + 1) * BLOCK_K) of a document tile, loaded k-major as
    [BLOCK_K, BLOCK_N]: it is the dot's B operand as loaded (no transpose through registers),
    which lets the compiler stage it in shared memory with pipelined async copies."""
    chunk_ptrs = d_ptrs + CHUNK * BLOCK_K * doc_k_stride
    col_valid = (k_offs + CHUNK * BLOCK_K) < dim
    if MASK_ROWS:
        if EVEN_K:
            x = tl.load(chunk_ptrs, mask=row_valid[None, :], other=0.0)
        else:
            x = tl.load(chunk_ptrs, mask=col_valid[:, None] & row_valid[None, :], other=0.0)
    else:
        if EVEN_K:
            x = tl.load(chunk_ptrs)
        else:
            x = tl.load(chunk_ptrs, mask=col_valid[:, None], other=0.0)
    return x


@triton.jit
def _load_query_tile(q_ptrs, row_valid, k_offs, dim, q_k_stride, NUM_K: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, Q_IN_REGS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """The query rows as NUM_K column chunks kept on chip (unused slots repeat chunk 0)."""
    q0 = _load_query_chunk(q_ptrs, row_valid, k_offs, dim, q_k_stride, 0, BLOCK_K, EVEN_K,
                           Q_IN_REGS, PRECISION)
    q1 = q0
    q2 = q0
    q3 = q0
    if NUM_K > 1:
        q1 = _load_query_chunk(q_ptrs, row_valid, k_offs, dim, q_k_stride, 1, BLOCK_K, EVEN_K,
                               Q_IN_REGS, PRECISION)
    if NUM_K > 2:
        q2 = _load_query_chunk(q_ptrs, row_valid, k_offs, dim, q_k_stride, 2, BLOCK_K, EVEN_K,
                               Q_IN_REGS, PRECISION)
    if NUM_K > 3:
        q3 = _load_query_chunk(q_ptrs, row_valid, k_offs, dim, q_k_stride, 3, BLOCK_K, EVEN_K,
                               Q_IN_REGS, PRECISION)
    return q0, q1, q2, q3


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _doc_tile_max(row_max, q0, q1, q2, q3, d_ptrs, row_valid, k_offs, dim, doc_k_stride,
                  NUM_K: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  MASK_ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """row_max updated with one document tile: S = Q @ D^T summed over the d chunks."""
    d0 = _load_doc_chunk(d_ptrs, row_valid, k_offs, dim, doc_k_stride, 0, BLOCK_K, EVEN_K,
                         MASK_ROWS)
    sim = tl.dot(q0, d0, input_precision=PRECISION)
    if NUM_K > 1:
        d1 = _load_doc_chunk(d_ptrs, row_valid, k_offs, dim, doc_k_stride, 1, BLOCK_K, EVEN_K,
                             MASK_ROWS)
        sim = tl.dot(q1, d1, sim, input_precision=PRECISION)
    if NUM_K > 2:
        d2 = _load_doc_chunk(d_ptrs, row_valid, k_offs, dim, doc_k_stride, 2, BLOCK_K, EVEN_K,
                             MASK_ROWS)
        sim = tl.dot(q2, d2, sim, input_precision=PRECISION)
    if NUM_K > 3:
        d3 = _load_doc_chunk(d_ptrs, row_valid, k_offs, dim, doc_k_stride, 3, BLOCK_K, EVEN_K,
                             MASK_ROWS)
        sim = tl.dot(q3, d3, sim, input_precision=PRECISION)
    if MASK_ROWS:
        # Rows past the document's end loaded as 0 but must not enter the max (a 0 could win).
        sim = tl.where(row_valid[None, :], sim, float("-inf"))
    # NaN-propagating max (max.NaN.f32, full rate): the GPU's plain max drops a NaN operand,
    # which would hide a NaN embedding (the interpreter and torch.amax propagate it).
    tile_max = tl.reduce(sim, 1, _max_propagate_nan)
    return tl.maximum(row_max, tile_max, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _flat_tile_loop(
    q0, q1, q2, q3, q_row_base, q_rows, m_offs, n_offs, k_offs,
    doc_ptr, starts_ptr, lengths_ptr, floor_ptr, out_ptr, out_q, step_begin, slot_end,
    num_queries, query_len, dim, num_doc_rows, q_t_stride, q_k_stride,
    doc_row_stride, doc_k_stride, out_q_stride, out_doc_stride,
    QB: tl.constexpr, LQ_TILE: tl.constexpr, NUM_LQ_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_PAD_FLOOR: tl.constexpr, PRECISION: tl.constexpr,
    DOCS_PER_STEP: tl.constexpr, Q_IN_REGS: tl.constexpr,
):
    """Scores of the query block against documents [step_begin, min(step_begin + DOCS_PER_STEP,
    slot_end)) in ONE loop over all their tiles.

    A loop per document restarts the software pipeline at every document: its first tile
    waits for memory and its partial last tile loads synchronously. Here tile t of the flat
    sequence finds its document from the per-document tile counts held in registers
    (DOCS_PER_STEP lanes), so its address depends only on t and the pipeline prefetches across
    document boundaries. Rows past a document's end re-read its last row (no masks); at its
    last tile the row maxima are summed into the document's lane of ``scores`` and reset.
    Empty documents own no tile and keep their 0. Every offset stays below one document's
    length, so no int32 product can wrap.
    """
    BLOCK_M: tl.constexpr = QB * LQ_TILE
    lanes = tl.arange(0, DOCS_PER_STEP)
    slots = step_begin + lanes
    slot_ok = slots < slot_end
    starts = tl.load(starts_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    lengths = tl.load(lengths_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
    # Clip to [0, R): a bad range must never read outside doc_values.
    row_end = tl.minimum(starts + lengths, num_doc_rows)
    starts = tl.maximum(starts, 0)
    lengths = tl.maximum(row_end - starts, 0).to(tl.int32)
    # No int32 overflow for any length < 2^31 (lengths + BLOCK_N - 1 could wrap).
    tiles = lengths // BLOCK_N + (lengths % BLOCK_N != 0).to(tl.int32)
    tile_end = tl.cumsum(tiles, 0)  # flat index one past each document's last tile
    first_tile = tile_end - tiles
    num_tiles = tl.sum(tiles, 0)
    if HAS_PAD_FLOOR:
        floors = tl.load(floor_ptr + slots, mask=slot_ok, other=0).to(tl.int32)

    scores = tl.zeros([QB, DOCS_PER_STEP], tl.float32)
    for c in range(NUM_LQ_CHUNKS):
        if NUM_LQ_CHUNKS > 1:
            # Long queries: one LQ_TILE-row chunk at a time, the documents re-streamed per chunk.
            q_valid = (q_rows < num_queries) & (c * LQ_TILE + (m_offs % LQ_TILE) < query_len)
            q0, q1, q2, q3 = _load_query_tile(q_row_base + c * LQ_TILE * q_t_stride, q_valid,
                                              k_offs, dim, q_k_stride, NUM_K, BLOCK_K, EVEN_K,
                                              Q_IN_REGS, PRECISION)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for t in range(0, num_tiles):
            # The tile's document: the lane whose tile range holds t (elementwise, no reduction);
            # its start, first tile and length by three independent lane reductions.
            this = (first_tile <= t) & (t < tile_end)
            start = tl.sum(tl.where(this, starts, 0), 0)
            off = (t - tl.sum(tl.where(this, first_tile, 0), 0)) * BLOCK_N  # < length < 2^31
            rows_left = tl.sum(tl.where(this, lengths, 0), 0) - off  # in [1, length]
            # Rows past the end re-read the document's last row: a duplicate cannot change a
            # max, so neither the loads nor the similarities need masks.
            n_rows = tl.minimum(n_offs, rows_left - 1)
            d_ptrs = (doc_ptr + (start + off) * doc_row_stride + k_offs[:, None] * doc_k_stride
                      + n_rows[None, :] * doc_row_stride)
            row_max = _doc_tile_max(row_max, q0, q1, q2, q3, d_ptrs, n_offs < BLOCK_N, k_offs,
                                    dim, doc_k_stride, NUM_K, BLOCK_K, EVEN_K, False, PRECISION)
            if rows_left <= BLOCK_N:  # the document's last tile
                if HAS_PAD_FLOOR:
                    floor = tl.sum(tl.where(this, floors, 0), 0) != 0
                    row_max = tl.where(floor, tl.maximum(row_max, 0.0,
                                                         propagate_nan=tl.PropagateNan.ALL),
                                       row_max)
                # Segmented sum: the QB queries' rows are contiguous LQ_TILE-row segments.
                doc_scores = tl.sum(tl.reshape(row_max, (QB, LQ_TILE)), axis=1)
                scores += tl.where(this[None, :], doc_scores[:, None], 0.0)
                row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)

    out_ptrs = (out_ptr + out_q.to(tl.int64)[:, None] * out_q_stride
                + slots.to(tl.int64)[None, :] * out_doc_stride)
    tl.store(out_ptrs, scores, mask=(out_q < num_queries)[:, None] & slot_ok[None, :])


@triton.jit(do_not_specialize=["num_queries", "query_len", "docs_per_query", "docs_per_program",
                               "num_qblocks", "num_doc_rows", "idx_q_stride", "out_q_stride"])
def _maxsim_kernel(
    q_ptr, doc_ptr, starts_ptr, lengths_ptr, floor_ptr, out_ptr,
    num_queries, query_len, dim, docs_per_query, docs_per_program, num_qblocks, num_doc_rows,
    q_q_stride, q_t_stride, q_k_stride,
    doc_row_stride, doc_k_stride,
    idx_q_stride,  # 0 when documents are shared by all queries, K in candidate mode
    out_q_stride, out_doc_stride,
    QB: tl.constexpr,  # queries stacked per program (1 in candidate mode)
    LQ_TILE: tl.constexpr,  # query tokens per query in the tile: next pow2 >= Lq (>= 16), capped
    NUM_LQ_CHUNKS: tl.constexpr,  # cdiv(Lq, LQ_TILE): > 1 only for queries longer than the cap
    BLOCK_N: tl.constexpr,  # document rows per tile
    BLOCK_K: tl.constexpr,  # columns of d per dot
    NUM_K: tl.constexpr,  # dots per tile: BLOCK_K * NUM_K >= d
    EVEN_K: tl.constexpr,  # d == BLOCK_K * NUM_K: no column masks
    HAS_PAD_FLOOR: tl.constexpr,
    PRECISION: tl.constexpr,
    FLAT: tl.constexpr,  # one tile loop across the program's documents (see _flat_tile_loop)
    DOCS_PER_STEP: tl.constexpr,  # FLAT: documents per tile loop, a power of two
    Q_IN_REGS: tl.constexpr,  # the query tile as wgmma's register operand (16-bit inputs)
):
    # Grid: axis 0 only (no 65535 limit) = num_qblocks * document groups, query block fastest, so
    # the programs resident at one time share a document group and each document comes from HBM
    # about once while the (small) query blocks stay in L2.
    pid = tl.program_id(0)
    qblock = pid % num_qblocks
    group = pid // num_qblocks

    # Tile rows: QB queries x LQ_TILE tokens. Row r is token r % LQ_TILE of query r // LQ_TILE.
    BLOCK_M: tl.constexpr = QB * LQ_TILE
    m_offs = tl.arange(0, BLOCK_M)
    n_offs = tl.arange(0, BLOCK_N)
    k_offs = tl.arange(0, BLOCK_K)
    q_rows = qblock * QB + m_offs // LQ_TILE
    q_row_base = (q_ptr + q_rows.to(tl.int64)[:, None] * q_q_stride
                  + (m_offs % LQ_TILE)[:, None] * q_t_stride + k_offs[None, :] * q_k_stride)

    # Rows past Lq and queries past Q load as 0: zero rows add exactly 0 to a score. Long
    # queries (NUM_LQ_CHUNKS > 1) reload their chunks inside the document loops.
    q_valid = (q_rows < num_queries) & ((m_offs % LQ_TILE) < query_len)
    q0, q1, q2, q3 = _load_query_tile(q_row_base, q_valid, k_offs, dim, q_k_stride,
                                      NUM_K, BLOCK_K, EVEN_K, Q_IN_REGS, PRECISION)

    # This program's documents: slots [slot_begin, slot_end) of the query block's list.
    idx_base = qblock.to(tl.int64) * QB * idx_q_stride
    out_q = qblock * QB + tl.arange(0, QB)
    slot_begin = group * docs_per_program
    slot_end = tl.minimum(slot_begin + docs_per_program, docs_per_query)
    if FLAT:
        for step_begin in range(slot_begin, slot_end, DOCS_PER_STEP):
            _flat_tile_loop(
                q0, q1, q2, q3, q_row_base, q_rows, m_offs, n_offs, k_offs,
                doc_ptr, starts_ptr + idx_base, lengths_ptr + idx_base, floor_ptr + idx_base,
                out_ptr, out_q, step_begin, slot_end,
                num_queries, query_len, dim, num_doc_rows, q_t_stride, q_k_stride,
                doc_row_stride, doc_k_stride, out_q_stride, out_doc_stride,
                QB, LQ_TILE, NUM_LQ_CHUNKS, BLOCK_N, BLOCK_K, NUM_K, EVEN_K, HAS_PAD_FLOOR,
                PRECISION, DOCS_PER_STEP, Q_IN_REGS)
        return
    # 64-bit offsets: Q * N scores may pass 2^31 elements.
    out_ptrs = (out_ptr + out_q.to(tl.int64) * out_q_stride
                + slot_begin.to(tl.int64) * out_doc_stride)
    for slot in range(slot_begin, slot_end):
        start = tl.load(starts_ptr + idx_base + slot).to(tl.int64)
        length = tl.load(lengths_ptr + idx_base + slot).to(tl.int64)
        # Clip to [0, R): a bad range must never read outside doc_values.
        row_end = tl.minimum(start + length, num_doc_rows)
        start = tl.maximum(start, 0)
        length = tl.maximum(row_end - start, 0).to(tl.int32)
        row_max_init = tl.full([BLOCK_M], float("-inf"), tl.float32)
        if HAS_PAD_FLOOR:
            floor = tl.load(floor_ptr + idx_base + slot) != 0
            row_max_init = tl.where(floor, 0.0, row_max_init)
        doc_base = doc_ptr + start * doc_row_stride
        full_end = (length // BLOCK_N) * BLOCK_N

        score = tl.zeros([QB], tl.float32)
        # A runtime loop (not static_range): unrolled chunks cost registers and spilled.
        for c in range(NUM_LQ_CHUNKS):
            if NUM_LQ_CHUNKS > 1:
                # Long queries: one LQ_TILE-row chunk at a time, the document re-streamed per chunk.
                q_tok = c * LQ_TILE + (m_offs % LQ_TILE)
                q_valid = (q_rows < num_queries) & (q_tok < query_len)
                q0, q1, q2, q3 = _load_query_tile(q_row_base + c * LQ_TILE * q_t_stride, q_valid,
                                                  k_offs, dim, q_k_stride, NUM_K, BLOCK_K,
                                                  EVEN_K, Q_IN_REGS, PRECISION)
            row_max = row_max_init
            d_ptrs = doc_base + k_offs[:, None] * doc_k_stride + n_offs[None, :] * doc_row_stride
            # Full tiles: the loop runs over this document's own length, no row masks.
            for _ in range(0, full_end, BLOCK_N):
                row_max = _doc_tile_max(row_max, q0, q1, q2, q3, d_ptrs, n_offs < BLOCK_N,
                                        k_offs, dim, doc_k_stride, NUM_K, BLOCK_K, EVEN_K,
                                        False, PRECISION)
                d_ptrs += BLOCK_N * doc_row_stride
            # The partial last tile, rows past the end masked to -inf.
            if full_end < length:
                row_max = _doc_tile_max(row_max, q0, q1, q2, q3, d_ptrs,
                                        n_offs < (length - full_end), k_offs, dim, doc_k_stride,
                                        NUM_K, BLOCK_K, EVEN_K, True, PRECISION)
            # Empty document: the max over no rows is taken as 0 (never -inf into the sum).
            row_max = tl.where(length > 0, row_max, 0.0)
            # Segmented sum: the QB queries' rows are contiguous LQ_TILE-row segments.
            score += tl.sum(tl.reshape(row_max, (QB, LQ_TILE)), axis=1)

        tl.store(out_ptrs, score, mask=out_q < num_queries)
        out_ptrs += out_doc_stride


# ----------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    qb: int  # queries per program
    lq_tile: int  # query rows per query in the tile
    num_lq_chunks: int
    block_n: int
    block_k: int
    num_k: int
    num_warps: int
    num_stages: int
    flat: bool = True  # one tile loop across a program's documents (_flat_tile_loop)
    q_in_regs: bool = False  # the query tile as the dots' register operand (16-bit inputs)
    maxnreg: int | None = None  # register cap a thread (ptxas), to fit one more program per SM


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _split_dim(dim: int, max_block_k: int = 128) -> tuple[int, int]:
    """(BLOCK_K, NUM_K): chunks of d for the dots, exact when d is a multiple of 16.

    The largest power of two dividing d (at most max_block_k) gives an exact split: 96 -> 3 x 32,
    128 -> 1 x 128, 384 -> 3 x 128. A d that is not a multiple of 16 (tl.dot needs K >= 16), or
    whose exact split needs more than _MAX_K_CHUNKS chunks, takes the smallest power-of-two
    chunk that covers d in _MAX_K_CHUNKS pieces, the last one masked (100 -> 4 x 32).
    """
    if dim % 16 == 0:
        block_k = min(dim & -dim, max_block_k)
        if dim // block_k <= _MAX_K_CHUNKS:
            return block_k, dim // block_k
    block_k = max(16, _next_pow2(-(-dim // _MAX_K_CHUNKS)))
    return block_k, -(-dim // block_k)


@functools.lru_cache(maxsize=256)
def _kernel_config(dtype: torch.dtype, dim: int, query_len: int, qb_limit: int,
                   max_shared: int = SM90_SHARED_MEMORY) -> _Config:
    """Block sizes from the dtype, d, Lq, how many queries may share a tile, and the shared
    memory a block may use on the device (no autotuning).

    Checked ahead of time by compiling for sm_90 and sm_89 and reading cuobjdump's resource
    usage: the ColBERT configurations (16-bit, d <= 128, Lq <= 128; on sm_90 also Lq = 300)
    use no local memory; 256-row chunks of long queries at d = 128 on sm_89, d > 256, and fp32
    with long queries spill a little (tests/test_maxsim_kernel.py compiles them for sm_90, and
    for sm_75, sm_80, sm_86, sm_100 and sm_120 and their shared memory). Not yet timed on a GPU:
    max_rows and BLOCK_N are the first numbers to tune.
    - Tile rows (M = QB * LQ_TILE): up to 256 for 16-bit inputs with d <= 128. The more queries
      share a document tile, the fewer L2->SM bytes per FLOP: M = 256 needs ~4 TB/s at the
      H100's tensor rate, M = 128 ~8 TB/s. 128 rows for d <= 256, 32 beyond (register budget).
      fp32 runs 3xTF32 dots (fp32-level accuracy on tensor cores): 64 rows, 32 above d = 128.
    - LQ_TILE: Lq padded to a power of two >= 16 (the tl.dot M minimum), at most the row
      budget; longer queries run in NUM_LQ_CHUNKS chunks.
    - QB: the row budget over LQ_TILE, at most next_pow2(queries that can share documents), so
      a single query does not pay for empty MMA rows (QB takes at most ~5 values per d and Lq:
      a bounded number of compiled variants).
    - BLOCK_N: 128 document rows when M <= 64 (memory-bound shapes: more bytes in flight), 64
      for larger M (the fp32 [M, BLOCK_N] similarity tile stays <= 64 registers per thread),
      32 for fp32 and for d > 256.
    - num_warps: 8 from 128 rows on (two warpgroups share the wgmma M), else 4.
      num_stages: 3, or 2 for fp32 and d > 256 (shared memory), and 2 for 256-row tiles at
      d = 128: a program's loop is serial (wgmma chain, wait, barrier, row max), so the tensor
      cores are kept busy by a second resident program whose MMAs overlap this one's row max.
      With 3 stages that tile takes 136 registers (1 program per SM), with 2 stages 128 (2 per
      SM: 2 x 256 threads x 128 = the whole register file); tests/test_maxsim_kernel.py checks
      the 2-per-SM fit of the 256-row configurations in the sm_90 build.
    - Small tiles below _SMALL_TILES_BELOW of shared memory (sm_75): 32 rows, K chunks of at
      most 32, 64 document rows (16-bit). sm_75's dots take both operands from registers, so
      larger tiles spill there too; these fit (at most 40 KiB up to d = 256, the limit there)
      and spill nothing at Lq = 32, d <= 128 (compiled for sm_75 in tests/test_maxsim_kernel.py).
      Untimed: no T4 has been lent to this project.
    """
    is_fp32 = dtype == torch.float32
    small = _small_tiles(max_shared)
    block_k, num_k = _split_dim(dim, 32 if small else 64 if is_fp32 else 128)
    d_eff = block_k * num_k
    if small:
        max_rows = 32
    elif is_fp32:
        max_rows = 64 if d_eff <= 128 else 32
    else:
        max_rows = 256 if d_eff <= 128 else 128 if d_eff <= 256 else 32
    lq_pad = _next_pow2(max(query_len, 16))
    lq_tile = min(lq_pad, max_rows)
    num_lq_chunks = -(-query_len // lq_tile)
    qb = max(1, min(max_rows // lq_tile, _next_pow2(qb_limit)))
    rows = qb * lq_tile
    if is_fp32 or d_eff > 256:
        block_n = 32
    else:
        block_n = 128 if rows <= 64 and d_eff <= 128 and not small else 64
    num_warps = 8 if rows >= 128 else 4
    num_stages = 2 if is_fp32 or d_eff > 256 or (rows >= 256 and d_eff > 96) else 3
    return _Config(qb, lq_tile, num_lq_chunks, block_n, block_k, num_k, num_warps, num_stages)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewer, longer programs run faster


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _validate(queries, doc_values, doc_starts, doc_lengths, pad_floor, out):
    for name, t in (("queries", queries), ("doc_values", doc_values),
                    ("doc_starts", doc_starts), ("doc_lengths", doc_lengths)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if queries.dim() != 3:
        raise ValueError(f"queries must be [Q, Lq, d], got shape {tuple(queries.shape)}")
    if doc_values.dim() != 2:
        raise ValueError(f"doc_values must be [R, d] (view a padded [N, Ld, d] tensor as "
                         f"[N * Ld, d]), got shape {tuple(doc_values.shape)}")
    if queries.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"queries must be float32, float16 or bfloat16, got {queries.dtype}")
    if doc_values.dtype != queries.dtype:
        raise TypeError(f"doc_values dtype {doc_values.dtype} differs from queries dtype "
                        f"{queries.dtype}")
    dim = queries.shape[2]
    if doc_values.shape[1] != dim:
        raise ValueError(f"embedding dims differ: queries d={dim}, doc_values d="
                         f"{doc_values.shape[1]}")
    if dim < 1 or dim > _MAX_DIM:
        raise ValueError(f"embedding dim must be in [1, {_MAX_DIM}], got {dim}")
    if queries.dtype == torch.float32 and dim > _MAX_DIM_FP32:
        # 3xTF32 keeps split copies of both operands in shared memory: d > 512 exceeds sm_90's.
        raise ValueError(f"float32 inputs support embedding dims up to {_MAX_DIM_FP32}, got {dim}: "
                         f"cast them to float16 or bfloat16")
    device = queries.device
    if doc_values.device != device:
        raise ValueError(f"doc_values is on {doc_values.device}, queries on {device}")
    for name, t in (("doc_starts", doc_starts), ("doc_lengths", doc_lengths)):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, queries on {device}")
    if doc_starts.shape != doc_lengths.shape:
        raise ValueError(f"doc_starts {tuple(doc_starts.shape)} and doc_lengths "
                         f"{tuple(doc_lengths.shape)} must have the same shape")
    if doc_starts.dim() == 1:
        out_shape = (queries.shape[0], doc_starts.shape[0])
    elif doc_starts.dim() == 2:
        if doc_starts.shape[0] != queries.shape[0]:
            raise ValueError(f"candidate mode: doc_starts is {tuple(doc_starts.shape)} but there "
                             f"are {queries.shape[0]} queries (expected [Q, K])")
        out_shape = tuple(doc_starts.shape)
    else:
        raise ValueError(f"doc_starts/doc_lengths must be [N] (shared documents) or [Q, K] "
                         f"(per-query candidates), got shape {tuple(doc_starts.shape)}")
    if pad_floor is not None:
        if not isinstance(pad_floor, torch.Tensor) or pad_floor.dtype != torch.bool:
            raise TypeError("pad_floor must be a bool tensor shaped like doc_starts")
        if pad_floor.shape != doc_starts.shape:
            raise ValueError(f"pad_floor shape {tuple(pad_floor.shape)} differs from doc_starts "
                             f"{tuple(doc_starts.shape)}")
        if pad_floor.device != device:
            raise ValueError(f"pad_floor is on {pad_floor.device}, queries on {device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if tuple(out.shape) != out_shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {out_shape}")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, queries on {device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton MaxSim kernel needs CUDA tensors (got {device}); set "
                         f"TRITON_INTERPRET=1 to run it on the CPU")
    return out_shape


def _check_ranges(doc_starts, doc_lengths, num_rows):
    """Data checks: they read the index tensors, a device sync unless those live on the CPU."""
    if doc_lengths.numel() == 0:
        return
    lengths = doc_lengths.to(torch.int64)
    starts = doc_starts.to(torch.int64)
    nonempty = lengths > 0
    # The three checks in one tensor: a single read back to the host.
    negative_length, negative_start, past_end = torch.stack([
        (lengths < 0).any(), (nonempty & (starts < 0)).any(),
        (nonempty & (starts + lengths > num_rows)).any()]).tolist()
    if negative_length:
        raise ValueError("doc_lengths must be >= 0")
    if negative_start:
        raise ValueError("doc_starts must be >= 0")
    if past_end:
        raise ValueError(f"a document range [start, start + length) runs past the {num_rows} "
                         f"rows of doc_values")


def maxsim(queries, doc_values, doc_starts, doc_lengths, *, pad_floor=None, out=None,
           check_ranges=None) -> torch.Tensor:
    """MaxSim scores of queries against documents given as row ranges of ``doc_values``.

    queries: [Q, Lq, d] float32/float16/bfloat16. Query rows that must not count are zeroed by
        the caller (a zero row contributes exactly 0), so there is no query mask.
    doc_values: [R, d], same dtype and device: all document rows, any layout (a packed corpus
        [T, d], or a padded [N, Ld, d] viewed as [N * Ld, d]).
    doc_starts, doc_lengths: int32 or int64, same shape, either
        [N]    -> documents shared by all queries; returns [Q, N] (all pairs), or
        [Q, K] -> query q's own K candidates; returns [Q, K] (reranking; pairwise with K = 1).
        Document = rows doc_values[start : start + length]; length 0 is an empty document.
    pad_floor: optional bool tensor shaped like doc_starts. Where True every query row's max also
        includes 0.0 (PyLate's zero-padding semantics).
    out: optional preallocated float32 output of the result's shape.
    check_ranges: whether to check lengths >= 0 and that every range lies inside doc_values.
        None (default): only when the index tensors are on the CPU (free there); True: always
        (one device sync); False: never. Unchecked bad ranges are clipped, never read past.

    Empty documents score 0.0. Returns float32 scores (``out`` when given).
    """
    out_shape = _validate(queries, doc_values, doc_starts, doc_lengths, pad_floor, out)
    max_shared = shared_memory_limit(queries.device)
    if _small_tiles(max_shared) and queries.shape[2] > _MAX_DIM_SMALL_TILES:
        raise ValueError(f"on this GPU ({max_shared // 1024} KiB of shared memory a block) the Triton "
                         f"MaxSim kernel takes embedding dims up to {_MAX_DIM_SMALL_TILES}, got "
                         f"{queries.shape[2]}: score them with backend='torch'")
    num_rows = doc_values.shape[0]
    if check_ranges or (check_ranges is None and doc_starts.device.type == "cpu"):
        _check_ranges(doc_starts, doc_lengths, num_rows)
    if out is None:
        out = torch.empty(out_shape, device=queries.device, dtype=torch.float32)
    num_queries, query_len, dim = queries.shape
    candidate_mode = doc_starts.dim() == 2
    docs_per_query = out_shape[1]
    if num_queries == 0 or docs_per_query == 0:
        return out
    if query_len == 0 or num_rows == 0:
        return out.zero_()  # no query rows, or every document empty (and no pointer to pass)
    cfg = _kernel_config(queries.dtype, dim, query_len, 1 if candidate_mode else num_queries, max_shared)
    _launch(queries, doc_values, doc_starts, doc_lengths, pad_floor, out, cfg)
    return out


def _launch(queries, doc_values, doc_starts, doc_lengths, pad_floor, out, cfg: _Config):
    """Run the kernel with the given block sizes (tests call this to force small configs)."""
    num_queries, query_len, dim = queries.shape
    candidate_mode = doc_starts.dim() == 2
    docs_per_query = out.shape[1]
    # Index tensors are read with one shared (query, slot) stride pair; contiguous() is a no-op
    # for the usual contiguous input.
    doc_starts = doc_starts.contiguous()
    doc_lengths = doc_lengths.contiguous()
    # Row offsets are int64 in the kernel but column offsets are int32 (k * column stride): a
    # column-major view of a large corpus (d * stride >= 2^31) would wrap. One copy makes such a
    # rare view row-major, and a unit column stride is then a compile-time constant.
    if doc_values.stride(1) != 1:
        doc_values = doc_values.contiguous()
    if queries.stride(2) != 1:
        queries = queries.contiguous()
    if pad_floor is not None:
        pad_floor = pad_floor.contiguous().view(torch.uint8)
    idx_q_stride = doc_starts.stride(0) if candidate_mode else 0
    qb = 1 if candidate_mode else cfg.qb
    if cfg.q_in_regs and queries.dtype == torch.float32:
        # The identity dot that moves the queries into registers is exact for 16-bit inputs
        # only (3xTF32 drops low bits of the fp32 residual).
        raise ValueError("q_in_regs needs float16 or bfloat16 inputs")

    num_qblocks = -(-num_queries // qb)
    # Documents per program: enough programs for ~_PROGRAMS_PER_SM per SM, at most
    # _MAX_DOCS_PER_PROGRAM (the query tile is loaded once per program), and never a grid past
    # 2^31 - 1.
    groups_wanted = max(1, (_PROGRAMS_PER_SM * _num_sms(queries.device)) // num_qblocks)
    docs_per_program = min(_MAX_DOCS_PER_PROGRAM, -(-docs_per_query // groups_wanted))
    docs_per_program = max(docs_per_program, -(-docs_per_query * num_qblocks // _MAX_GRID), 1)
    num_groups = -(-docs_per_query // docs_per_program)

    # fp32: 3xTF32 (fp32-level accuracy on tensor cores); 16-bit dots ignore the setting.
    precision = "tf32x3" if queries.dtype == torch.float32 else "tf32"
    q_strides, doc_strides, out_strides = queries.stride(), doc_values.stride(), out.stride()
    # Grid: one axis (no 65535 limit): num_qblocks x document groups, query block fastest.
    with on_device(queries):
        _maxsim_kernel[(num_qblocks * num_groups,)](
            queries, doc_values, doc_starts, doc_lengths,
            pad_floor if pad_floor is not None else doc_lengths, out,
            num_queries, query_len, dim, docs_per_query, docs_per_program, num_qblocks,
            doc_values.shape[0],
            q_strides[0], q_strides[1], q_strides[2],
            doc_strides[0], doc_strides[1],
            idx_q_stride,
            out_strides[0], out_strides[1],
            QB=qb, LQ_TILE=cfg.lq_tile, NUM_LQ_CHUNKS=cfg.num_lq_chunks,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_K=cfg.num_k,
            EVEN_K=cfg.block_k * cfg.num_k == dim,
            HAS_PAD_FLOOR=pad_floor is not None, PRECISION=precision,
            FLAT=cfg.flat, DOCS_PER_STEP=_next_pow2(_MAX_DOCS_PER_PROGRAM),
            Q_IN_REGS=cfg.q_in_regs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        )
