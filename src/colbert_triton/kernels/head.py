"""The ColBERT head: optional row gather, linear projection and L2 normalisation in one kernel.

Design
------
``project_normalize`` maps the encoder's last hidden states ``[T, H]`` to one unit vector per
kept token: ``normalize(x[rows] @ W^T + b)``. ``rows`` is the punctuation filter of documents
(the packed indices of the tokens to keep); the gather happens in the kernel's row loads, so the
dropped rows are never copied. A program owns ``BLOCK_M`` output rows and all D output columns
(``BLOCK_D`` = next power of two >= D, the tail masked: 96 -> 128), so the squared norm is a
row reduction over the fp32 accumulator and each vector is written exactly once, already
normalised. The normalisation matches ``F.normalize(y, p=2, eps=1e-12)``:
``y / max(||y||_2, 1e-12)``, with the norm taken in fp32 from the fp32 product (torch's
TorchOps rounds the product to the activation dtype first; this kernel does not).

Grid: ``cdiv(R, BLOCK_M)`` programs. The projection is tiny (384 x 96), so the kernel is bound
by reading x; ``BLOCK_M`` is as large as the accumulator allows.

Out-of-range row indices cannot be checked on the host without a device sync; the kernel never
reads out of bounds for them and writes a NaN row instead.

Precision: fp16/bf16 operands with fp32 accumulation; fp32 with ``input_precision="ieee"``.
Compilation: R (and T) are runtime integers (``do_not_specialize``); H, D and the block sizes are
compile-time constants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_device
from .linear import accumulate_matmul

__all__ = ["project_normalize", "head_config"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NORM_EPS = 1e-12
_MAX_D = 1024


@triton.jit(do_not_specialize=["num_rows", "num_src_rows"])
def _project_normalize_kernel(
    x_ptr,  # [num_src_rows, K]
    rows_ptr,  # [num_rows] int64, unused without HAS_ROWS
    w_ptr,  # [D, K]
    bias_ptr,  # [D], unused without HAS_BIAS
    out_ptr,  # [num_rows, D]
    num_rows,
    num_src_rows,
    x_row_stride,
    w_row_stride,
    out_row_stride,
    D: tl.constexpr,
    K: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM_EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D: the program owns whole output rows
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_rows
    if HAS_ROWS:
        src_rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    else:
        src_rows = offs_m.to(tl.int64)
    row_ok = (src_rows >= 0) & (src_rows < num_src_rows)
    # Masked-off and bad rows read row 0 (never out of bounds); bad ones become NaN below.
    src_rows = tl.where(row_ok & m_mask, src_rows, 0)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src_rows[:, None] * x_row_stride + offs_k[None, :]
    # Columns past D are wrapped onto valid weight rows; their products are masked out below.
    w_ptrs = w_ptr + (offs_d % D)[None, :] * w_row_stride + offs_k[:, None]  # [BLOCK_K, BLOCK_D]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc = accumulate_matmul(acc, x_ptrs, w_ptrs, K, BLOCK_K, EVEN_K, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(d_mask[None, :], acc, 0.0)
    norm = tl.sqrt(tl.sum(acc * acc, axis=1))
    inv_norm = 1.0 / tl.maximum(norm, NORM_EPS)
    inv_norm = tl.where(row_ok, inv_norm, float("nan"))
    y = acc * inv_norm[:, None]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_d[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def head_config(d: int, k: int, dtype: torch.dtype) -> dict:
    """Block sizes of ``project_normalize``.

    BLOCK_D = next_pow2(D), at least 16 for tl.dot (96 -> 128); BLOCK_M keeps the fp32
    accumulator at BLOCK_M x BLOCK_D <= 8192 (96 -> 64 rows) and >= 16. K steps of 64 for 16-bit
    operands (32 for fp32) with 3 pipeline stages (2 for fp32): 72 KiB of shared memory at D 96.
    Wide heads (BLOCK_D > 256) halve the K step and use 2 stages so the weight tiles stay within
    sm_90's 227 KiB of shared memory. 4 warps up to 128 columns, else 8.
    """
    block_d = max(16, triton.next_power_of_2(d))
    block_m = max(16, min(64, 8192 // block_d))
    block_k = 32 if dtype == torch.float32 else 64
    stages = 2 if dtype == torch.float32 else 3
    if block_d > 256:
        block_k, stages = block_k // 2, 2
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "BLOCK_K": block_k,
            "num_warps": 4 if block_d <= 128 else 8, "num_stages": stages}


def _fail(message: str):
    raise ValueError(f"project_normalize: {message}")


def project_normalize(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.normalize(x[rows] @ weight^T + bias, dim=-1, eps=1e-12)`` in one kernel.

    x: ``[T, H]``; weight: ``[D, H]`` (x's dtype and device; unit stride along H); bias: ``[D]``
    or None; rows: ``[R]`` int64 indices into x's rows, or None for all T rows. Returns
    ``[R or T, D]`` in x's dtype (into ``out`` when given). D up to 1024.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        _fail("x must be a 2-D tensor [T, hidden]")
    if x.dtype not in _DTYPES:
        _fail(f"x dtype {x.dtype} is not float16, bfloat16 or float32")
    if x.stride(1) != 1 and x.shape[1] > 1:
        _fail(f"x needs unit stride along hidden (got strides {x.stride()})")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        _fail(f"weight must be a 2-D tensor [D, {x.shape[1]}], got {_describe(weight)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        _fail(f"weight must be {x.dtype} on {x.device}, got {weight.dtype} on {weight.device}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        _fail(f"weight needs unit stride along hidden (got strides {weight.stride()})")
    d, k = weight.shape
    if not 1 <= d <= _MAX_D:
        _fail(f"output dim {d} is outside [1, {_MAX_D}]")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != d:
            _fail(f"bias must be a 1-D tensor of {d} values, got {_describe(bias)}")
        if bias.dtype not in _DTYPES or bias.device != x.device or not bias.is_contiguous():
            _fail(f"bias must be a contiguous float tensor on {x.device}")
    if rows is not None:
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
            _fail(f"rows must be a 1-D int64 tensor, got {_describe(rows)}")
        if rows.device != x.device:
            _fail(f"rows is on {rows.device}, x on {x.device}")
        if not rows.is_contiguous():
            _fail("rows must be contiguous")
    num_rows = x.shape[0] if rows is None else rows.shape[0]
    if out is None:
        out = torch.empty((num_rows, d), dtype=x.dtype, device=x.device)
    else:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (num_rows, d):
            _fail(f"out must have shape {(num_rows, d)}, got {_describe(out)}")
        if out.dtype != x.dtype or out.device != x.device:
            _fail(f"out must be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
        if out.stride(1) != 1 and d > 1:
            _fail("out needs unit stride along its last dimension")
    if num_rows == 0:
        return out
    if x.shape[0] == 0:
        _fail(f"rows selects {num_rows} rows of an empty x")

    config = head_config(d, k, x.dtype)
    grid = (triton.cdiv(num_rows, config["BLOCK_M"]),)
    with on_device(x):
        _project_normalize_kernel[grid](
            x, rows if rows is not None else x, weight, bias if bias is not None else x, out,
            num_rows, x.shape[0], x.stride(0), weight.stride(0), out.stride(0),
            D=d, K=k, HAS_ROWS=rows is not None, HAS_BIAS=bias is not None, NORM_EPS=_NORM_EPS,
            BLOCK_M=config["BLOCK_M"], BLOCK_D=config["BLOCK_D"], BLOCK_K=config["BLOCK_K"],
            EVEN_K=k % config["BLOCK_K"] == 0,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return out


def _describe(t) -> str:
    return f"tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
