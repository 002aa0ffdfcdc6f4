"""Varlen (unpadded) multi-head self-attention over packed tokens: one flash-attention kernel.

Design
------
The encoder keeps every activation packed, ``[T, hidden]``: all tokens of all sequences end to
end, sequence ``b`` occupying rows ``[cu_seqlens[b], cu_seqlens[b + 1])``. The QKV projection
writes one ``[T, 3 * hidden]`` matrix whose columns are ``[q | k | v]``, each in Hugging Face head
order (head ``h`` owns columns ``h * head_dim ... (h + 1) * head_dim``). The kernel reads q, k and
v straight out of that matrix through strides (no split, no transpose, no padding) and writes the
context ``[T, hidden]`` in the same head order, which is what the output projection consumes.

Every token of a sequence is a query row, but only its first ``key_lens[b]`` tokens are keys and
values: a ColBERT query's [MASK] expansion rows are computed without being attended to. The key
bound comes from the length arrays, so no mask tensor is read; a sequence with
``key_lens[b] == 0`` gets zero rows, never NaN.

Grid: one program per (query tile, head), with no program spent on padding rows. Query tiles
of ``BLOCK_M`` rows never straddle two sequences; sequence ``b`` has ``cdiv(len_b, BLOCK_M)`` of
them. Each program needs its (sequence, tile) pair, in one of two ways:

* ``tiles=`` (the model's path): a table built on the host, where the lengths are known anyway
  (`attention_tile_table`, uploaded once per batch and shared by every layer): one 16-byte
  load per program, and a grid of exactly the real tiles. Compiled for sm_90, the lookup is 16
  instructions and no barrier.
* without it (only device ``cu_seqlens`` known): each program rebuilds the prefix sum of the
  per-sequence tile counts from ``cu_seqlens`` with one vectorised scan per 1024 sequences
  (~260 instructions and 13 barriers per program on sm_90). The host cannot know the exact tile
  count without a device->host sync, so the grid is the tightest bound it knows from the shapes
  and ``max_seqlen``: ``min((T + B * (BLOCK_M - 1)) // BLOCK_M, B * cdiv(max_seqlen, BLOCK_M))``.
  It is exact for batches of equal lengths (ColBERT queries: 32 rows, one tile each) and about
  B / 2 tiles too many for mixed documents; the surplus programs return right after the lookup.

Inside a program: the standard FlashAttention-2 forward (Triton tutorial 06), keys in tiles of
``BLOCK_N``, running max and sum in fp32, ``exp2`` with ``log2(e) / sqrt(head_dim)`` folded into
one scale. The tutorial asserts ``BLOCK_N <= HEAD_DIM``; that is a property of its configurations,
not of the algorithm: this kernel uses 64-key tiles at head_dim 32 (every configuration of
``attention_config`` compiles for sm_90 without register spills).

Precision: fp16/bf16 operands with fp32 accumulation; the probabilities are rounded to the
operand dtype for the P @ V product, as in every flash-attention kernel. fp32 operands use
``input_precision="ieee"`` so that fp32 matches torch's fp32 SDPA closely (TF32 would not).

Compilation: ``num_seqs`` (B) is a runtime integer marked ``do_not_specialize``; T only sets the
grid; hidden, head count, head_dim and block sizes are compile-time constants. The block
heuristic has two buckets of ``max_seqlen`` (short: queries; long: documents), so a model
compiles at most two variants per dtype, once each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._device import on_device

__all__ = ["AttentionTiles", "attention_config", "attention_tile_table", "query_tile_bound",
           "varlen_attention"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Sequences scanned per step when a program looks up its sequence; any B works (the scan loops).
_BLOCK_B = 1024


@triton.jit(do_not_specialize=["num_seqs"])
def _varlen_attention_kernel(
    qkv_ptr,  # [T, 3 * HIDDEN]: q | k | v, head-major within each third
    cu_seqlens_ptr,  # [B + 1] int32
    key_lens_ptr,  # [B] int32
    tiles_ptr,  # [num_tiles, 4] int32 (seq_start, seq_len, key_len, m_start), used with HAS_TABLE
    out_ptr,  # [T, HIDDEN]
    num_seqs,
    qk_scale,  # log2(e) / sqrt(HEAD_DIM): softmax runs in base 2
    qkv_row_stride,
    out_row_stride,
    HIDDEN: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_B: tl.constexpr,  # sequences scanned per step of the tile lookup
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands, "tf32" (unused) for 16-bit ones
    HAS_TABLE: tl.constexpr,  # tiles_ptr holds the host-built tile table
):
    # Heads vary fastest, so the programs of one query tile run side by side and share its
    # qkv rows in L2.
    pid = tl.program_id(0)
    head_idx = pid % NUM_HEADS
    tile_idx = pid // NUM_HEADS

    if HAS_TABLE:
        # Host-built table: one 16-byte entry per query tile, a single load round trip.
        entry = tiles_ptr + tile_idx * 4
        seq_start = tl.load(entry)
        seq_len = tl.load(entry + 1)
        key_len = tl.minimum(tl.maximum(tl.load(entry + 2), 0), seq_len)
        m_start = tl.load(entry + 3)
    else:
        # Query tile t belongs to the sequence b with first_tile[b] <= t < first_tile[b + 1], where
        # first_tile is the exclusive prefix sum of cdiv(len_b, BLOCK_M). Each program rebuilds that
        # prefix sum from cu_seqlens, BLOCK_B sequences per vectorised scan. first_tile never
        # decreases, so the owner is the last sequence whose first tile is <= t.
        owners = tl.zeros([BLOCK_B], dtype=tl.int32)  # per lane: sequences starting at or before t
        owner_first = tl.zeros([BLOCK_B], dtype=tl.int32)  # per lane: the latest such first tile
        tiles_before = tl.sum(owners, axis=0)  # a scalar 0, typed for the loop-carried sum
        for b_start in range(0, num_seqs, BLOCK_B):
            offs_b = b_start + tl.arange(0, BLOCK_B)
            b_mask = offs_b < num_seqs
            token_starts = tl.load(cu_seqlens_ptr + offs_b, mask=b_mask, other=0)
            token_ends = tl.load(cu_seqlens_ptr + offs_b + 1, mask=b_mask, other=0)
            tiles = (token_ends - token_starts + BLOCK_M - 1) // BLOCK_M
            first_tile = tiles_before + tl.cumsum(tiles, axis=0) - tiles
            owns = b_mask & (first_tile <= tile_idx)
            owners += owns.to(tl.int32)
            owner_first = tl.maximum(owner_first, tl.where(owns, first_tile, 0))
            tiles_before += tl.sum(tiles, axis=0)
        seq_idx = tl.sum(owners, axis=0) - 1

        seq_start = tl.load(cu_seqlens_ptr + seq_idx)
        seq_len = tl.load(cu_seqlens_ptr + seq_idx + 1) - seq_start
        # Clamped so that a bad key length can neither read past the sequence nor go negative.
        key_len = tl.minimum(tl.maximum(tl.load(key_lens_ptr + seq_idx), 0), seq_len)
        m_start = (tile_idx - tl.max(owner_first, axis=0)) * BLOCK_M
    if m_start >= seq_len:  # past the batch's last tile: the grid is an upper bound
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    offs_d = tl.arange(0, HEAD_DIM)
    # Row offsets in int64: T * 3 * HIDDEN passes 2**31 at about 1.9 M tokens.
    seq_row_offs = seq_start.to(tl.int64) * qkv_row_stride
    q_col = head_idx * HEAD_DIM
    k_col = HIDDEN + head_idx * HEAD_DIM
    v_col = 2 * HIDDEN + head_idx * HEAD_DIM

    q_ptrs = qkv_ptr + seq_row_offs + offs_m[:, None] * qkv_row_stride + q_col + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)

    # -inf start is safe: every key step below holds at least one valid key, so the running max
    # becomes finite at the first step and exp2(-inf - finite) = 0 rescales the empty sums.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for n_start in range(0, key_len, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < key_len
        # K is loaded as [HEAD_DIM, BLOCK_N] (a transposed view through strides) for q @ k^T.
        kt_ptrs = (qkv_ptr + seq_row_offs + offs_n[None, :] * qkv_row_stride + k_col
                   + offs_d[:, None])
        kt = tl.load(kt_ptrs, mask=n_mask[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_ptrs = (qkv_ptr + seq_row_offs + offs_n[:, None] * qkv_row_stride + v_col
                  + offs_d[None, :])
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # No keys (key_len 0) leaves l_i = 0 and acc = 0: divide by 1 and write zeros, not NaN.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]

    out_ptrs = (out_ptr + seq_start.to(tl.int64) * out_row_stride + offs_m[:, None] * out_row_stride
                + q_col + offs_d[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def attention_config(head_dim: int, max_seqlen: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch settings (a fixed heuristic; nothing is autotuned at run time).

    16-bit operands:
    - BLOCK_M (query rows per program): 64 when every sequence fits in 64 tokens (ColBERT
      queries are 32), else 128 (documents): short batches waste few rows, long ones reuse each
      K/V tile across more queries, as FA2's 128-row hdim32 kernels do. head_dim 128 stays at 64.
    - BLOCK_N (keys per step): 64. num_warps: 4 for 64-row tiles, 8 for 128-row tiles and for
      head_dim 128. num_stages 2 (K/V double buffering).
    fp32 operands (reference precision, not a fast path): 32 x 32 tiles.
    Every choice compiles for sm_90 without register spills (ptxas, Triton 3.6); none has been
    timed on hardware yet: the GPU session should sweep BLOCK_M/BLOCK_N/num_warps.
    """
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8 if head_dim >= 64 else 4, "num_stages": 2}
    if head_dim >= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    block_m = 64 if max_seqlen <= 64 else 128
    # 3 stages: the K/V copy of tile i+1 is issued a full iteration before it is waited for
    # (async_wait num=2); with 2 it is issued at the end of iteration i and waited at once.
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4 if block_m == 64 else 8, "num_stages": 3}


def query_tile_bound(num_tokens: int, num_seqs: int, max_seqlen: int, block_m: int) -> int:
    """An upper bound on ``sum_b cdiv(len_b, block_m)`` from host-known numbers only.

    ``sum_b cdiv(len_b, m) <= (T + B * (m - 1)) // m`` (each ceiling adds less than one tile) and
    ``<= B * cdiv(max_seqlen, m)``; the second is exact when all lengths are equal.
    """
    return min((num_tokens + num_seqs * (block_m - 1)) // block_m,
               num_seqs * triton.cdiv(max_seqlen, block_m))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"varlen_attention: {message}")


def _host_int(value, name: str) -> int:
    """A Python or numpy integer (never a bool, a float or a tensor) as an int."""
    _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool),
           f"{name} must be a host int, got {type(value).__name__}")
    return int(value)


def _check_lengths(cu_seqlens: torch.Tensor, num_tokens: int, max_seqlen: int) -> None:
    """Data checks of the packed layout: they read cu_seqlens (a sync on a GPU). key_lens need
    none: values outside [0, sequence length] are clamped in the kernel."""
    cu = cu_seqlens.to(torch.int64)
    seq_lens = cu[1:] - cu[:-1]
    first, last = cu[0].item(), cu[-1].item()
    _check(first == 0 and last == num_tokens,
           f"cu_seqlens must start at 0 and end at the {num_tokens} rows of qkv, got {first} ... {last}")
    if seq_lens.numel() == 0:
        return
    _check(bool((seq_lens >= 0).all()), "cu_seqlens must be non-decreasing")
    longest = int(seq_lens.max())
    _check(longest <= max_seqlen, f"max_seqlen is {max_seqlen} but a sequence has {longest} rows")


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_lens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    head_dim: int,
    *,
    out: torch.Tensor | None = None,
    tiles: AttentionTiles | None = None,
    check_lengths: bool | None = None,
) -> torch.Tensor:
    """Self-attention per sequence of a packed batch, keys limited to each sequence's key length.

    qkv: ``[T, 3 * hidden]`` (``hidden = num_heads * head_dim``), columns ``[q | k | v]`` in head
    order, fp16/bf16/fp32, unit column stride. cu_seqlens: ``[B + 1]`` int32, starting at 0 and
    ending at T. key_lens: ``[B]`` int32, ``0 <= key_lens[b] <= seq_len[b]`` (values outside are
    clamped in the kernel; they are not checked on the host, which would need a device sync).
    max_seqlen: the longest sequence length, from host data (never read back from the device); it
    picks the block sizes and bounds the grid, so it must not be smaller than the truth.
    tiles: optional `AttentionTiles` of this batch (`attention_tile_table` for the BLOCK_M that
    ``attention_config(head_dim, max_seqlen, dtype)`` picks): replaces the in-kernel lookup and
    sets the grid. Returns ``[T, hidden]`` in qkv's dtype (written into ``out`` when given).
    check_lengths: whether to check cu_seqlens (0 first, non-decreasing, T last) and max_seqlen
    against it: None (default) only when cu_seqlens is on the CPU, where it is free; True
    always (one device sync); False never. Unchecked, a max_seqlen below the longest sequence
    leaves that sequence's last rows unwritten.
    """
    _check(isinstance(qkv, torch.Tensor) and qkv.dim() == 2, "qkv must be a 2-D tensor [T, 3 * hidden]")
    _check(qkv.dtype in _DTYPES, f"qkv dtype {qkv.dtype} is not float16, bfloat16 or float32")
    head_dim = _host_int(head_dim, "head_dim")
    _check(head_dim in SUPPORTED_HEAD_DIMS, f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    num_heads = _host_int(num_heads, "num_heads")
    _check(num_heads >= 1, f"num_heads must be a positive int, got {num_heads!r}")
    hidden = num_heads * head_dim
    num_tokens = qkv.shape[0]
    _check(qkv.shape[1] == 3 * hidden,
           f"qkv has {qkv.shape[1]} columns, expected 3 * {num_heads} heads * {head_dim} = {3 * hidden}")
    _check(qkv.stride(1) == 1 or qkv.shape[1] == 1, "qkv needs unit stride along columns")
    for name, lens in (("cu_seqlens", cu_seqlens), ("key_lens", key_lens)):
        _check(isinstance(lens, torch.Tensor) and lens.dim() == 1 and lens.dtype == torch.int32,
               f"{name} must be a 1-D int32 tensor")
        _check(lens.device == qkv.device, f"{name} is on {lens.device}, qkv on {qkv.device}")
        _check(lens.is_contiguous(), f"{name} must be contiguous")
    num_seqs = key_lens.shape[0]
    _check(cu_seqlens.shape[0] == num_seqs + 1,
           f"cu_seqlens has {cu_seqlens.shape[0]} entries, expected len(key_lens) + 1 = {num_seqs + 1}")
    max_seqlen = _host_int(max_seqlen, "max_seqlen")  # it sizes blocks: never read from the device
    _check(max_seqlen >= 0, f"max_seqlen must be >= 0, got {max_seqlen}")
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=qkv.dtype, device=qkv.device)
    else:
        _check(isinstance(out, torch.Tensor) and tuple(out.shape) == (num_tokens, hidden),
               f"out must have shape {(num_tokens, hidden)}, got {tuple(getattr(out, 'shape', ()))}")
        _check(out.dtype == qkv.dtype, f"out dtype {out.dtype} differs from qkv dtype {qkv.dtype}")
        _check(out.device == qkv.device, f"out is on {out.device}, qkv on {qkv.device}")
        _check(out.stride(1) == 1, "out needs unit stride along columns")
    if num_tokens == 0:
        return out
    _check(num_seqs > 0, f"qkv has {num_tokens} rows but cu_seqlens describes no sequence")
    _check(max_seqlen >= 1, f"qkv has {num_tokens} rows but max_seqlen is {max_seqlen}: it must be "
                            f"at least the longest sequence's length")
    if check_lengths or (check_lengths is None and cu_seqlens.device.type == "cpu"):
        _check_lengths(cu_seqlens, num_tokens, max_seqlen)

    config = attention_config(head_dim, max_seqlen, qkv.dtype)
    if tiles is not None:
        _check(isinstance(tiles, AttentionTiles), "tiles must be an AttentionTiles")
        _check(tiles.block_m == config["BLOCK_M"],
               f"tiles were built for {tiles.block_m}-row tiles but this call uses "
               f"{config['BLOCK_M']} (attention_config of head_dim, max_seqlen and dtype)")
        table = tiles.table
        _check(isinstance(table, torch.Tensor), "tiles.table must be a torch.Tensor (wrap "
                                                "attention_tile_table's array with torch.from_numpy)")
        _check(table.dim() == 2 and table.shape[1] == 4 and table.dtype == torch.int32
               and table.is_contiguous(), "tiles.table must be a contiguous [num_tiles, 4] int32 tensor")
        _check(table.device == qkv.device, f"tiles.table is on {table.device}, qkv on {qkv.device}")
        num_tiles = table.shape[0]
    else:
        num_tiles = query_tile_bound(num_tokens, num_seqs, max_seqlen, config["BLOCK_M"])
    if num_tiles == 0:
        return out
    grid = (num_tiles * num_heads,)
    with on_device(qkv):
        _varlen_attention_kernel[grid](
            qkv, cu_seqlens, key_lens, tiles.table if tiles is not None else cu_seqlens, out,
            num_seqs,
            _LOG2E / math.sqrt(head_dim),
            qkv.stride(0), out.stride(0),
            HIDDEN=hidden, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_B=_BLOCK_B,
            DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
            HAS_TABLE=tiles is not None,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return out


class AttentionTiles(NamedTuple):
    """A host-built table of a batch's query tiles, for `varlen_attention(..., tiles=...)`."""

    table: torch.Tensor  # [num_tiles, 4] int32 on the device: seq_start, seq_len, key_len, m_start
    block_m: int  # the tile height it was built for (checked against the launch's)


def attention_tile_table(seq_lens, key_lens, block_m: int, num_tiles: int | None = None) -> np.ndarray:
    """The ``[num_tiles, 4]`` int32 table (seq_start, seq_len, key_len, m_start) of the query tiles
    of ``block_m`` rows, built on the host from lengths it already knows. Rows past the real
    tiles (``num_tiles`` larger than their count: a fixed-size buffer) have seq_len 0 and their
    programs return at once. Key lengths are clamped to [0, seq_len]."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    key_lens = np.asarray(key_lens, dtype=np.int64)
    tiles = -(-seq_lens // block_m)
    count = int(tiles.sum())
    if num_tiles is None:
        num_tiles = count
    if num_tiles < count:
        raise ValueError(f"attention_tile_table: {count} tiles do not fit in {num_tiles} rows")
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]]).astype(np.int64)
    seq = np.repeat(np.arange(len(seq_lens)), tiles)
    first = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(np.int64)
    table = np.zeros((num_tiles, 4), dtype=np.int32)
    table[:count, 0] = starts[seq]
    table[:count, 1] = seq_lens[seq]
    table[:count, 2] = np.clip(key_lens[seq], 0, seq_lens[seq])
    table[:count, 3] = (np.arange(count) - first[seq]) * block_m
    return table
