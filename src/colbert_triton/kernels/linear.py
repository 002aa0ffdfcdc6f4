"""Linear layers of the BERT encoder: GEMMs with fused epilogues, and a standalone LayerNorm.

Design
------
Every linear layer of a BERT block ends in an elementwise or row-wise epilogue, and each is fused
into the GEMM that feeds it, so the ``[T, N]`` product never makes a round trip through memory:

- ``linear``: ``y = x @ W^T + b``, optionally followed by exact (erf) GELU (see ``GELU_ERF``).
  Used for the QKV projection (N = 3 * hidden) and the FFN up-projection (N = 4 * hidden,
  GELU). A tiled GEMM in the style of Triton tutorial 03: ``BLOCK_M x BLOCK_N`` output tiles,
  a K loop of ``BLOCK_K`` steps, fp32 accumulation, tiles launched in groups of ``GROUP_M``
  row blocks so that consecutive programs share weight tiles in L2.
- ``linear_residual_layernorm``: ``LayerNorm(x @ W^T + b + residual)``, the attention output
  projection and the FFN down-projection of a post-LN block. LayerNorm needs whole rows, so a
  program owns ``BLOCK_M`` full rows: the N columns are split into at most four chunks of
  ``BLOCK_N`` (hidden 384 = 3 x 128), each with its own fp32 accumulator, all fed by the same
  ``x`` tile at each K step. The epilogue adds bias and residual, takes mean and variance in fp32
  from the registers (two passes over registers, no cancellation; eps 1e-12 is far below fp16's
  range, so the statistics must be fp32), normalises and stores once. A non-multiple N is handled
  with masks on the last chunk. Rows wider than 4 x 256 are not fused: they fall back to
  ``linear`` plus ``bias_residual_layernorm``.
- ``bias_residual_layernorm`` / ``layernorm``: the same epilogue as a standalone kernel over rows
  of an existing ``[T, N]`` matrix.

GEMM backend switch
-------------------
``GEMM_BACKEND`` (module attribute, default ``"triton"``, initial value from the environment
variable ``COLBERT_TRITON_GEMM_BACKEND``), or the ``backend=`` argument of each call:

- ``"triton"``: the fully fused Triton GEMMs above.
- ``"torch"``: the GEMM runs in cuBLAS through torch (``addmm``/``mm``) and only the epilogue runs
  in Triton: bias + GELU in place, or ``bias_residual_layernorm``. This exists so that the GPU
  session can measure the fused Triton GEMM against cuBLAS + a fused epilogue and keep the faster.

Precision
---------
fp16/bf16 operands, fp32 accumulation, fp32 epilogue math, output rounded once to the activation
dtype. fp32 operands are multiplied with ``input_precision="ieee"`` (true fp32, not TF32), so
fp32 results match torch's fp32 ``F.linear`` to rounding; this is the reference-precision path,
not a fast one. Bias and LayerNorm parameters may be fp16, bf16 or fp32 whatever the activation
dtype (they are read into fp32).

Compilation
-----------
The token count T is a runtime integer marked ``do_not_specialize`` (no recompiles when it
changes, including T = 1); N, K and the block sizes are compile-time constants, so each weight
shape compiles once per dtype. Block sizes come from the documented heuristics below
(``linear_config``, ``fused_layernorm_config``, ``layernorm_config``); nothing is autotuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import SM90_SHARED_MEMORY, on_device, shared_memory_limit

__all__ = [
    "GEMM_BACKEND",
    "GELU_ERF",
    "linear",
    "linear_residual_layernorm",
    "bias_residual_layernorm",
    "layernorm",
    "linear_config",
    "fused_layernorm_config",
    "layernorm_config",
]

GEMM_BACKEND = os.environ.get("COLBERT_TRITON_GEMM_BACKEND", "triton")
# How GELU's erf is evaluated: "libdevice" (tl.erf) or "rational" (Abramowitz & Stegun 7.1.26,
# within 4.2e-7 of exact GELU in fp32 over [-12, 12], about as close as the libdevice form; a
# third of its instructions). Kept at "libdevice" until a GPU has timed both (bench/NOTES.md).
# Read at every launch; set it before loading a model, whose CUDA graphs keep the value they
# were captured with.
GELU_ERF = "libdevice"
_GELU_ERFS = ("libdevice", "rational")
_BACKENDS = ("triton", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The fused residual+LayerNorm GEMM keeps a row in at most this many accumulators.
_MAX_CHUNKS = 4
_MAX_CHUNK_WIDTH = 256


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def accumulate_matmul(acc, x_ptrs, w_ptrs, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """``acc += X @ W`` over K in BLOCK_K steps: x_ptrs [BLOCK_M, BLOCK_K] and w_ptrs
    [BLOCK_K, BLOCK_N] point at column/row 0 of K; only a ragged K (not EVEN_K) masks loads."""
    offs_k = tl.arange(0, BLOCK_K)
    for k_start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k_start
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _gelu(y, ERF: tl.constexpr):
    # Exact GELU, as BERT's "gelu" and torch's F.gelu default: 0.5 * y * (1 + erf(y / sqrt(2))).
    if ERF == "rational":
        # Abramowitz & Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + ... a5 t)) exp(-z^2), t = 1/(1 + p z)
        # for z >= 0, |error| <= 1.5e-7 (absolute: in the far negative tail, where GELU < 1e-3,
        # its relative error grows, as libdevice's 1 + erf cancels); ~16 instructions an
        # element against libdevice erff's ~50.
        z = tl.abs(y) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                                + t * 1.061405429))))
        erfc_z = poly * tl.exp2(-(z * z) * 1.4426950408889634)
        return 0.5 * y * tl.where(y >= 0, 2.0 - erfc_z, erfc_z)
    else:
        return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))


@triton.jit(do_not_specialize=["num_rows"])
def _linear_kernel(
    x_ptr,  # [num_rows, K]
    w_ptr,  # [N, K] (torch Linear layout; read as W^T through strides)
    bias_ptr,  # [N], unused without HAS_BIAS
    out_ptr,  # [num_rows, N]
    num_rows,
    x_row_stride,
    w_row_stride,
    out_row_stride,
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "" or "gelu"
    ERF: tl.constexpr,  # GELU_ERF
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks per launch group (L2 reuse of weight tiles)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the K loop needs no mask
    DOT_PRECISION: tl.constexpr,
):
    # Grouped ordering (tutorial 03): GROUP_M row blocks sweep all column blocks before moving on.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns are wrapped onto valid ones so the K loop loads without
    # masks; the results of wrapped lanes are discarded by the masked store.
    load_m = (offs_m % num_rows).to(tl.int64)
    load_n = offs_n % N
    x_ptrs = x_ptr + load_m[:, None] * x_row_stride + offs_k[None, :]
    w_ptrs = w_ptr + load_n[None, :] * w_row_stride + offs_k[:, None]  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = accumulate_matmul(acc, x_ptrs, w_ptrs, K, BLOCK_K, EVEN_K, DOT_PRECISION)

    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = _gelu(acc, ERF)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    out_mask = (offs_m < num_rows)[:, None] & n_mask[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _chunk_dot(acc, x, w_ptr, w_row_stride, offs_k, k_start,
               CHUNK: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One column chunk of the row-owning GEMM: acc[BLOCK_M, BLOCK_N] += x @ W[chunk]^T.
    # Columns past N (last chunk only) are wrapped onto valid rows of W and masked later.
    offs_n = (CHUNK * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    w_ptrs = w_ptr + offs_n[None, :] * w_row_stride + (k_start + offs_k)[:, None]
    if EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=(offs_k < K - k_start)[:, None], other=0.0)
    return tl.dot(x, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _chunk_residual(offs_m, m_mask, residual_ptr, res_row_stride,
                    CHUNK: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr):
    # The residual of one chunk, loaded before the K loop so its latency hides behind the GEMM.
    offs_n = CHUNK * BLOCK_N + tl.arange(0, BLOCK_N)
    res_ptrs = residual_ptr + offs_m.to(tl.int64)[:, None] * res_row_stride + offs_n[None, :]
    return tl.load(res_ptrs, mask=m_mask[:, None] & (offs_n < N)[None, :], other=0.0)


@triton.jit
def _residual_chunks(offs_m, m_mask, residual_ptr, res_row_stride, N: tl.constexpr,
                     BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """The residual rows as NUM_CHUNKS column chunks (unused slots repeat chunk 0)."""
    res0 = _chunk_residual(offs_m, m_mask, residual_ptr, res_row_stride, 0, N, BLOCK_N)
    res1 = res0
    res2 = res0
    res3 = res0
    if NUM_CHUNKS > 1:
        res1 = _chunk_residual(offs_m, m_mask, residual_ptr, res_row_stride, 1, N, BLOCK_N)
    if NUM_CHUNKS > 2:
        res2 = _chunk_residual(offs_m, m_mask, residual_ptr, res_row_stride, 2, N, BLOCK_N)
    if NUM_CHUNKS > 3:
        res3 = _chunk_residual(offs_m, m_mask, residual_ptr, res_row_stride, 3, N, BLOCK_N)
    return res0, res1, res2, res3


@triton.jit
def _chunk_pre_norm(acc, res, bias_ptr, CHUNK: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr):
    # acc + bias + residual for one chunk in fp32; columns past N become 0 (out of the sums).
    offs_n = CHUNK * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return tl.where(n_mask[None, :], acc + bias[None, :] + res.to(tl.float32), 0.0)


@triton.jit
def _chunk_centered(y, mean, CHUNK: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = CHUNK * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.where((offs_n < N)[None, :], y - mean[:, None], 0.0)


@triton.jit
def _chunk_store(y_centered, rstd, offs_m, m_mask, ln_w_ptr, ln_b_ptr, out_ptr, out_row_stride,
                 CHUNK: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = CHUNK * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ln_w = tl.load(ln_w_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = y_centered * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def _linear_residual_layernorm_kernel(
    x_ptr,  # [num_rows, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]
    residual_ptr,  # [num_rows, N]
    ln_w_ptr,  # [N]
    ln_b_ptr,  # [N]
    out_ptr,  # [num_rows, N]
    num_rows,
    eps,
    x_row_stride,
    w_row_stride,
    res_row_stride,
    out_row_stride,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program; the program owns them entirely
    BLOCK_N: tl.constexpr,  # chunk width; NUM_CHUNKS * BLOCK_N >= N
    BLOCK_K: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # 1 to 4 accumulators (384 = 3 x 128)
    PREFETCH_RESIDUAL: tl.constexpr,  # load the residual before the K loop (register headroom)
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % num_rows).to(tl.int64)[:, None] * x_row_stride + offs_k[None, :]

    # Unused accumulators (NUM_CHUNKS < 4) are never updated and are compiled away.
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH_RESIDUAL:  # issued before the K loop: its latency hides behind the GEMM
        res0, res1, res2, res3 = _residual_chunks(offs_m, m_mask, residual_ptr, res_row_stride,
                                                  N, BLOCK_N, NUM_CHUNKS)
    for k_start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(offs_k < K - k_start)[None, :], other=0.0)
        # One x tile feeds every chunk of the row.
        acc0 = _chunk_dot(acc0, x, w_ptr, w_row_stride, offs_k, k_start, 0, N, K, BLOCK_N,
                          EVEN_K, DOT_PRECISION)
        if NUM_CHUNKS > 1:
            acc1 = _chunk_dot(acc1, x, w_ptr, w_row_stride, offs_k, k_start, 1, N, K, BLOCK_N,
                              EVEN_K, DOT_PRECISION)
        if NUM_CHUNKS > 2:
            acc2 = _chunk_dot(acc2, x, w_ptr, w_row_stride, offs_k, k_start, 2, N, K, BLOCK_N,
                              EVEN_K, DOT_PRECISION)
        if NUM_CHUNKS > 3:
            acc3 = _chunk_dot(acc3, x, w_ptr, w_row_stride, offs_k, k_start, 3, N, K, BLOCK_N,
                              EVEN_K, DOT_PRECISION)
        x_ptrs += BLOCK_K

    if not PREFETCH_RESIDUAL:
        res0, res1, res2, res3 = _residual_chunks(offs_m, m_mask, residual_ptr, res_row_stride,
                                                  N, BLOCK_N, NUM_CHUNKS)
    # Epilogue, all in fp32 registers: pre-norm values, then mean, then centred variance. The
    # chunks are added elementwise first (same layout, no data movement) so that each statistic
    # is one cross-warp row reduction, not NUM_CHUNKS of them.
    y0 = _chunk_pre_norm(acc0, res0, bias_ptr, 0, N, BLOCK_N)
    y_sum = y0
    if NUM_CHUNKS > 1:
        y1 = _chunk_pre_norm(acc1, res1, bias_ptr, 1, N, BLOCK_N)
        y_sum += y1
    if NUM_CHUNKS > 2:
        y2 = _chunk_pre_norm(acc2, res2, bias_ptr, 2, N, BLOCK_N)
        y_sum += y2
    if NUM_CHUNKS > 3:
        y3 = _chunk_pre_norm(acc3, res3, bias_ptr, 3, N, BLOCK_N)
        y_sum += y3
    mean = tl.sum(y_sum, axis=1) / N

    y0 = _chunk_centered(y0, mean, 0, N, BLOCK_N)
    sq_sum = y0 * y0
    if NUM_CHUNKS > 1:
        y1 = _chunk_centered(y1, mean, 1, N, BLOCK_N)
        sq_sum += y1 * y1
    if NUM_CHUNKS > 2:
        y2 = _chunk_centered(y2, mean, 2, N, BLOCK_N)
        sq_sum += y2 * y2
    if NUM_CHUNKS > 3:
        y3 = _chunk_centered(y3, mean, 3, N, BLOCK_N)
        sq_sum += y3 * y3
    rstd = 1.0 / tl.sqrt(tl.sum(sq_sum, axis=1) / N + eps)

    _chunk_store(y0, rstd, offs_m, m_mask, ln_w_ptr, ln_b_ptr, out_ptr, out_row_stride, 0, N, BLOCK_N)
    if NUM_CHUNKS > 1:
        _chunk_store(y1, rstd, offs_m, m_mask, ln_w_ptr, ln_b_ptr, out_ptr, out_row_stride, 1, N, BLOCK_N)
    if NUM_CHUNKS > 2:
        _chunk_store(y2, rstd, offs_m, m_mask, ln_w_ptr, ln_b_ptr, out_ptr, out_row_stride, 2, N, BLOCK_N)
    if NUM_CHUNKS > 3:
        _chunk_store(y3, rstd, offs_m, m_mask, ln_w_ptr, ln_b_ptr, out_ptr, out_row_stride, 3, N, BLOCK_N)


@triton.jit(do_not_specialize=["num_rows"])
def _bias_residual_layernorm_kernel(
    x_ptr,  # [num_rows, N]
    bias_ptr,  # [N], unused without HAS_BIAS
    residual_ptr,  # [num_rows, N], unused without HAS_RESIDUAL
    ln_w_ptr,
    ln_b_ptr,
    out_ptr,  # [num_rows, N]
    num_rows,
    eps,
    x_row_stride,
    res_row_stride,
    out_row_stride,
    N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N; the tail is masked
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    t_mask = offs_t < num_rows
    n_mask = offs_n < N
    mask = t_mask[:, None] & n_mask[None, :]
    rows = offs_t.to(tl.int64)[:, None]

    y = tl.load(x_ptr + rows * x_row_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + rows * res_row_stride + offs_n[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    y = tl.where(n_mask[None, :], y, 0.0)
    mean = tl.sum(y, axis=1) / N
    y = tl.where(n_mask[None, :], y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / N + eps)

    ln_w = tl.load(ln_w_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = y * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    tl.store(out_ptr + rows * out_row_stride + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _bias_activation_kernel(
    y_ptr,  # [num_rows, N], updated in place
    bias_ptr,  # [N], unused without HAS_BIAS
    num_rows,
    y_row_stride,
    N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ERF: tl.constexpr,  # GELU_ERF
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The epilogue of the "torch" GEMM backend: cuBLAS has no exact-erf GELU epilogue.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_t < num_rows)[:, None] & n_mask[None, :]
    ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * y_row_stride + offs_n[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        y = _gelu(y, ERF)
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Block-size heuristics (fixed; documented; no autotuning on the request path)
# --------------------------------------------------------------------------------------------


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def linear_config(n: int, k: int, dtype: torch.dtype) -> dict:
    """Tiles of ``linear``.

    16-bit: 128 x 128 output tiles, K steps of 64, 8 warps, 3 pipeline stages (96 KiB of shared
    memory): the classic Hopper/Ampere tile for T in the thousands; N below 128 shrinks BLOCK_N.
    fp32 (ieee, reference path): 64 x 64 x 32, 4 warps, 2 stages. tl.dot needs every tile dim
    >= 16, hence the floors. GROUP_M 8 as in tutorial 03.
    """
    if dtype == torch.float32:
        block_m, block_n, block_k, warps, stages = 64, min(64, _pow2_at_least(n)), 32, 4, 2
    else:
        block_m, block_n, block_k, warps, stages = 128, min(128, _pow2_at_least(n)), 64, 8, 3
    block_k = min(block_k, _pow2_at_least(k))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
            "num_warps": warps, "num_stages": stages}


def fused_layernorm_config(n: int, k: int, dtype: torch.dtype,
                           max_shared: int = SM90_SHARED_MEMORY) -> dict | None:
    """Tiles of the row-owning ``linear_residual_layernorm`` GEMM, or None if they do not fit.

    A row is split into NUM_CHUNKS <= 4 chunks of BLOCK_N <= 128 columns (384 -> 3 x 128);
    wider rows use chunks up to 256 (768 -> 3 x 256); beyond 4 x 256 columns nothing is fused.
    BLOCK_M keeps the fp32 accumulators at <= 64 x 512 (128 registers a thread at 8 warps):
    64 rows up to 512 columns, else 32 (16-bit), with 8 warps and 3 stages (hidden 384: 168 KiB
    of shared memory, ~180 registers, no spills on sm_90). fp32: 32 rows up to 384 columns, else
    16, with 8 warps and 2 stages (at 32 rows, 4 warps spill on sm_90 under Triton 3.7-3.9: 255
    registers + 736 bytes; 8 warps take 190-232 under 3.6-3.9). K steps of 64 (16-bit) or 32
    (fp32); rows wider than 512 take K steps of 32 in 16-bit too, since each stage holds a
    whole [N, BLOCK_K] slice of W (hidden 1024 with K steps of 64 needs 264 KiB, over sm_90's
    227 KiB; with 32, 132 KiB).
    ``max_shared`` is the device's budget (bytes a block may use): while ``num_stages`` copies of
    the A and W slices (an upper bound of what Triton's pipeliner keeps: stages - 1 of them
    on sm_80-sm_89) would pass it, the K step halves, down to 16: sm_86/sm_89 (99 KiB) take hidden
    384 16-bit in K steps of 32 (Triton allocates 56 KiB there, 112 KiB with steps of 64), hidden
    768 and 1024 in steps of 16. None if even that does not fit (the unfused path).
    """
    block_n = min(128, _pow2_at_least(n))
    if triton.cdiv(n, block_n) > _MAX_CHUNKS:
        block_n = _pow2_at_least(triton.cdiv(n, _MAX_CHUNKS))
    if block_n > _MAX_CHUNK_WIDTH:
        return None
    num_chunks = triton.cdiv(n, block_n)
    wide = num_chunks * block_n > 512
    if dtype == torch.float32:
        wide = num_chunks * block_n > 384
        block_m, block_k, warps, stages = (16 if wide else 32), 32, 8, 2
    else:
        block_m, block_k, warps, stages = (32 if wide else 64), (32 if wide else 64), 8, 3
    block_k = min(block_k, _pow2_at_least(k))
    stage_bytes = (block_m + num_chunks * block_n) * dtype.itemsize
    while stages * stage_bytes * block_k > max_shared:
        if block_k <= 16:
            return None
        block_k //= 2
    # Residual prefetch only where it fits without spills (hidden 384, 16-bit: 178 -> 234 regs).
    prefetch = dtype != torch.float32 and not wide and num_chunks * block_n <= 384
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "NUM_CHUNKS": num_chunks,
            "PREFETCH_RESIDUAL": prefetch, "num_warps": warps, "num_stages": stages}


def layernorm_config(n: int) -> dict:
    """Standalone LayerNorm: whole rows of next_pow2(N) lanes, ~4096 elements a program."""
    block_n = triton.next_power_of_2(n)
    return {"BLOCK_T": max(1, min(16, 4096 // block_n)), "BLOCK_N": block_n,
            "num_warps": 8 if block_n >= 2048 else 4}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _fail(fn: str, message: str):
    raise ValueError(f"{fn}: {message}")


def _check_matrix(fn, name, t, *, cols=None, dtype=None, device=None):
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        _fail(fn, f"{name} must be a 2-D tensor, got {_describe(t)}")
    if t.dtype not in _DTYPES:
        _fail(fn, f"{name} dtype {t.dtype} is not float16, bfloat16 or float32")
    if dtype is not None and t.dtype != dtype:
        _fail(fn, f"{name} dtype {t.dtype} differs from the activations' {dtype}")
    if device is not None and t.device != device:
        _fail(fn, f"{name} is on {t.device}, the activations on {device}")
    if cols is not None and t.shape[1] != cols:
        _fail(fn, f"{name} has {t.shape[1]} columns, expected {cols}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        _fail(fn, f"{name} needs unit stride along its last dimension (got strides {t.stride()})")


def _check_vector(fn, name, t, length, device):
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        _fail(fn, f"{name} must be a 1-D tensor, got {_describe(t)}")
    if t.dtype not in _DTYPES:
        _fail(fn, f"{name} dtype {t.dtype} is not float16, bfloat16 or float32")
    if t.shape[0] != length:
        _fail(fn, f"{name} has {t.shape[0]} entries, expected {length}")
    if t.device != device:
        _fail(fn, f"{name} is on {t.device}, the activations on {device}")
    if not t.is_contiguous():
        _fail(fn, f"{name} must be contiguous")


def _check_rows(fn, name, t, num_rows):
    if t.shape[0] != num_rows:
        _fail(fn, f"{name} has {t.shape[0]} rows, expected {num_rows}")


def _check_eps(fn, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(fn, f"eps must be a non-negative float, got {eps!r}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _prepare_out(fn, out, num_rows, n, like):
    if out is None:
        return torch.empty((num_rows, n), dtype=like.dtype, device=like.device)
    _check_matrix(fn, "out", out, cols=n, dtype=like.dtype, device=like.device)
    _check_rows(fn, "out", out, num_rows)
    return out


def _resolve_backend(fn, backend):
    backend = GEMM_BACKEND if backend is None else backend
    if backend not in _BACKENDS:
        _fail(fn, f"unknown GEMM backend {backend!r}: expected one of {_BACKENDS}")
    return backend


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ weight^T + bias``, then exact GELU if ``activation == "gelu"``.

    x: ``[T, K]``; weight: ``[N, K]`` (same dtype and device as x); bias: ``[N]`` or None.
    Both matrices need unit stride along K (row strides are free). Returns ``[T, N]`` in x's
    dtype, written into ``out`` when given. ``backend``: see the module docstring.
    """
    fn = "linear"
    _check_matrix(fn, "x", x)
    _check_matrix(fn, "weight", weight, cols=x.shape[1], dtype=x.dtype, device=x.device)
    n, k = weight.shape
    if bias is not None:
        _check_vector(fn, "bias", bias, n, x.device)
    if activation not in (None, "gelu"):
        _fail(fn, f"unsupported activation {activation!r}: expected None or 'gelu'")
    if GELU_ERF not in _GELU_ERFS:
        _fail(fn, f"unknown GELU_ERF {GELU_ERF!r}: expected one of {_GELU_ERFS}")
    backend = _resolve_backend(fn, backend)
    num_rows = x.shape[0]
    out = _prepare_out(fn, out, num_rows, n, x)
    if num_rows == 0:
        return out

    if backend == "torch":
        if activation is None and bias is not None:
            torch.addmm(bias.to(x.dtype), x, weight.t(), out=out)  # cuBLASLt fuses the bias
            return out
        torch.mm(x, weight.t(), out=out)
        if bias is None and activation is None:
            return out
        return _bias_activation_(out, bias, activation)

    config = linear_config(n, k, x.dtype)
    grid = (triton.cdiv(num_rows, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    with on_device(x):
        _linear_kernel[grid](
            x, weight, bias if bias is not None else x, out,
            num_rows, x.stride(0), weight.stride(0), out.stride(0),
            N=n, K=k, HAS_BIAS=bias is not None, ACTIVATION=activation or "", ERF=GELU_ERF,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            GROUP_M=config["GROUP_M"], EVEN_K=k % config["BLOCK_K"] == 0,
            DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return out


def linear_residual_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` over the last dimension, statistics in fp32.

    x: ``[T, K]``; weight: ``[N, K]``; bias, ln_weight, ln_bias: ``[N]``; residual: ``[T, N]``
    (same dtype as x). Returns ``[T, N]`` in x's dtype. ``out`` must not overlap x or residual.
    """
    fn = "linear_residual_layernorm"
    _check_matrix(fn, "x", x)
    _check_matrix(fn, "weight", weight, cols=x.shape[1], dtype=x.dtype, device=x.device)
    n, k = weight.shape
    _check_vector(fn, "bias", bias, n, x.device)
    _check_matrix(fn, "residual", residual, cols=n, dtype=x.dtype, device=x.device)
    _check_rows(fn, "residual", residual, x.shape[0])
    _check_vector(fn, "ln_weight", ln_weight, n, x.device)
    _check_vector(fn, "ln_bias", ln_bias, n, x.device)
    _check_eps(fn, eps)
    backend = _resolve_backend(fn, backend)
    num_rows = x.shape[0]
    out = _prepare_out(fn, out, num_rows, n, x)
    if num_rows == 0:
        return out

    config = fused_layernorm_config(n, k, x.dtype, shared_memory_limit(x.device))
    if backend == "torch" or config is None:
        # cuBLAS (or the unfused Triton GEMM for rows too wide to own) + the fused epilogue.
        if backend == "torch":
            product = torch.mm(x, weight.t())
        else:
            product = linear(x, weight, None, backend="triton")
        return bias_residual_layernorm(product, bias, residual, ln_weight, ln_bias, eps, out=out)

    grid = (triton.cdiv(num_rows, config["BLOCK_M"]),)
    with on_device(x):
        _linear_residual_layernorm_kernel[grid](
            x, weight, bias, residual, ln_weight, ln_bias, out,
            num_rows, float(eps),
            x.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
            N=n, K=k,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
            NUM_CHUNKS=config["NUM_CHUNKS"], PREFETCH_RESIDUAL=config["PREFETCH_RESIDUAL"],
            EVEN_K=k % config["BLOCK_K"] == 0,
            DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    return out


def bias_residual_layernorm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)`` row by row (bias and residual optional), fp32 statistics.

    x, residual: ``[T, N]`` of one dtype; bias, ln_weight, ln_bias: ``[N]``. Returns ``[T, N]`` in
    x's dtype. ``out`` may be x itself (each program reads its rows before writing them).
    """
    fn = "bias_residual_layernorm"
    _check_matrix(fn, "x", x)
    num_rows, n = x.shape
    if bias is not None:
        _check_vector(fn, "bias", bias, n, x.device)
    if residual is not None:
        _check_matrix(fn, "residual", residual, cols=n, dtype=x.dtype, device=x.device)
        _check_rows(fn, "residual", residual, num_rows)
    _check_vector(fn, "ln_weight", ln_weight, n, x.device)
    _check_vector(fn, "ln_bias", ln_bias, n, x.device)
    _check_eps(fn, eps)
    out = _prepare_out(fn, out, num_rows, n, x)
    if num_rows == 0 or n == 0:
        return out

    config = layernorm_config(n)
    grid = (triton.cdiv(num_rows, config["BLOCK_T"]),)
    with on_device(x):
        _bias_residual_layernorm_kernel[grid](
            x, bias if bias is not None else x, residual if residual is not None else x,
            ln_weight, ln_bias, out,
            num_rows, float(eps),
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            N=n, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            BLOCK_T=config["BLOCK_T"], BLOCK_N=config["BLOCK_N"], num_warps=config["num_warps"],
        )
    return out


def layernorm(x, ln_weight, ln_bias, eps, *, out=None):
    """``LayerNorm(x)`` over the last dimension of ``[T, N]`` with fp32 statistics."""
    return bias_residual_layernorm(x, None, None, ln_weight, ln_bias, eps, out=out)


def _bias_activation_(y: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """In place: ``y += bias``, then the activation (the "torch" backend's Triton epilogue)."""
    num_rows, n = y.shape
    block_t, block_n = 32, min(128, _pow2_at_least(n))
    grid = (triton.cdiv(num_rows, block_t), triton.cdiv(n, block_n))
    with on_device(y):
        _bias_activation_kernel[grid](
            y, bias if bias is not None else y, num_rows, y.stride(0),
            N=n, HAS_BIAS=bias is not None, ACTIVATION=activation or "", ERF=GELU_ERF,
            BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4,
        )
    return y

