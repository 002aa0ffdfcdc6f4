"""BERT embeddings: gather + sum + LayerNorm in one pass over packed tokens.

Design
------
``embed_layernorm`` computes, for every token t of a packed batch,
``LayerNorm(word[input_ids[t]] + position[position_ids[t]] + token_type_row)``: the three rows are
gathered, summed in fp32, normalised with fp32 statistics (BERT's eps 1e-12 is far below fp16's
range, and a fp16 variance would lose the small-variance rows), scaled, shifted and written once.
ColBERT feeds token type 0 everywhere, so the token-type embedding is a single row the caller
selects (``token_type_embeddings.weight[0]``), not a per-token gather.

Grid: one program per ``BLOCK_T`` tokens; each program holds ``BLOCK_T x BLOCK_H`` values, with
``BLOCK_H`` the next power of two >= hidden (384 -> 512, the tail masked) so LayerNorm sees whole
rows. The kernel is a pure gather/reduce, memory-bound: about 3 row reads and 1 row write per token.

Out-of-range ids (word or position) cannot be checked on the host without a device sync; the
kernel does not read out of bounds for them and writes a NaN row instead, so a bad id is loud.

Compilation: the token count is a runtime integer (``do_not_specialize``); hidden and the block
sizes are compile-time constants, so the kernel compiles once per (hidden, dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_device

__all__ = ["embed_layernorm", "embedding_config"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit(do_not_specialize=["num_tokens"])
def _embed_layernorm_kernel(
    ids_ptr,  # [T] int64
    pos_ids_ptr,  # [T] int64
    word_ptr,  # [V, HIDDEN]
    position_ptr,  # [P, HIDDEN]
    token_type_ptr,  # [HIDDEN]
    ln_w_ptr,  # [HIDDEN]
    ln_b_ptr,  # [HIDDEN]
    out_ptr,  # [T, HIDDEN]
    num_tokens,
    vocab_size,
    num_positions,
    eps,
    word_row_stride,
    position_row_stride,
    out_row_stride,
    HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # next power of two >= HIDDEN
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    t_mask = offs_t < num_tokens
    h_mask = offs_h < HIDDEN

    ids = tl.load(ids_ptr + offs_t, mask=t_mask, other=0)
    pos = tl.load(pos_ids_ptr + offs_t, mask=t_mask, other=0)
    id_ok = (ids >= 0) & (ids < vocab_size) & (pos >= 0) & (pos < num_positions)
    # A bad id reads row 0 instead (never out of bounds) and is turned into NaN below.
    ids = tl.where(id_ok, ids, 0)
    pos = tl.where(id_ok, pos, 0)

    row_mask = t_mask[:, None] & h_mask[None, :]
    word = tl.load(word_ptr + ids[:, None] * word_row_stride + offs_h[None, :], mask=row_mask,
                   other=0.0)
    position = tl.load(position_ptr + pos[:, None] * position_row_stride + offs_h[None, :],
                       mask=row_mask, other=0.0)
    token_type = tl.load(token_type_ptr + offs_h, mask=h_mask, other=0.0)
    x = word.to(tl.float32) + position.to(tl.float32) + token_type.to(tl.float32)[None, :]

    mean = tl.sum(x, axis=1) / HIDDEN
    x = tl.where(h_mask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HIDDEN + eps)
    rstd = tl.where(id_ok, rstd, float("nan"))

    ln_w = tl.load(ln_w_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * out_row_stride + offs_h[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def embedding_config(hidden: int) -> dict:
    """BLOCK_H = next_pow2(hidden); BLOCK_T tokens so a program holds ~4096 values (384 -> 8)."""
    block_h = triton.next_power_of_2(hidden)
    return {"BLOCK_T": max(1, min(16, 4096 // block_h)), "BLOCK_H": block_h,
            "num_warps": 8 if block_h >= 2048 else 4}


def _fail(message: str):
    raise ValueError(f"embed_layernorm: {message}")


def _check_ids(name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
        _fail(f"{name} must be a 1-D int64 tensor")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def _check_table(name, t, hidden, dtype, device):
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        _fail(f"{name} must be a 2-D tensor [rows, hidden]")
    if t.shape[1] != hidden:
        _fail(f"{name} has {t.shape[1]} columns, the word table {hidden}")
    if t.dtype != dtype:
        _fail(f"{name} dtype {t.dtype} differs from the word table's {dtype}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, the word table on {device}")
    if t.stride(1) != 1 and hidden > 1:
        _fail(f"{name} needs unit stride along hidden (got strides {t.stride()})")


def _check_row(name, t, hidden, device):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != hidden:
        _fail(f"{name} must be a 1-D tensor of {hidden} values")
    if t.dtype not in _DTYPES:
        _fail(f"{name} dtype {t.dtype} is not float16, bfloat16 or float32")
    if t.device != device:
        _fail(f"{name} is on {t.device}, the word table on {device}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def embed_layernorm(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type_row: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(word[input_ids] + position[position_ids] + token_type_row)`` per packed token.

    input_ids, position_ids: ``[T]`` int64; word: ``[V, H]``; position: ``[P, H]`` (same dtype);
    token_type_row, ln_weight, ln_bias: ``[H]`` (any float dtype). Returns ``[T, H]`` in word's
    dtype (into ``out`` when given). Ids outside the tables give NaN rows (module docstring).
    """
    if not isinstance(word, torch.Tensor) or word.dim() != 2:
        _fail("word must be a 2-D tensor [vocab, hidden]")
    if word.dtype not in _DTYPES:
        _fail(f"word dtype {word.dtype} is not float16, bfloat16 or float32")
    vocab_size, hidden = word.shape
    device = word.device
    _check_table("word", word, hidden, word.dtype, device)
    _check_table("position", position, hidden, word.dtype, device)
    _check_ids("input_ids", input_ids)
    _check_ids("position_ids", position_ids)
    if input_ids.shape != position_ids.shape:
        _fail(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} differ")
    for name, ids in (("input_ids", input_ids), ("position_ids", position_ids)):
        if ids.device != device:
            _fail(f"{name} is on {ids.device}, the word table on {device}")
    for name, row in (("token_type_row", token_type_row), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_row(name, row, hidden, device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(f"eps must be a non-negative float, got {eps!r}")
    num_tokens = input_ids.shape[0]
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=word.dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (num_tokens, hidden):
            _fail(f"out must have shape {(num_tokens, hidden)}")
        if out.dtype != word.dtype or out.device != device:
            _fail(f"out must be {word.dtype} on {device}, got {out.dtype} on {out.device}")
        if out.stride(1) != 1 and hidden > 1:
            _fail("out needs unit stride along hidden")
    if num_tokens == 0 or hidden == 0:
        return out
    if vocab_size == 0 or position.shape[0] == 0:
        _fail("the word and position tables must have at least one row")

    config = embedding_config(hidden)
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]),)
    with on_device(out):
        _embed_layernorm_kernel[grid](
            input_ids, position_ids, word, position, token_type_row, ln_weight, ln_bias, out,
            num_tokens, vocab_size, position.shape[0], float(eps),
            word.stride(0), position.stride(0), out.stride(0),
            HIDDEN=hidden, BLOCK_T=config["BLOCK_T"], BLOCK_H=config["BLOCK_H"],
            num_warps=config["num_warps"],
        )
    return out
