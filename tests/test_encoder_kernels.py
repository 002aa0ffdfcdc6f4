"""The encoder's Triton kernels against the PyTorch reference semantics (`TorchOps`) and fp64.

Every launcher in `colbert_triton.kernels.{embedding,linear,attention,head}` is checked on random
inputs at odd sizes with realistic scales (LayerNorm'd activations ~N(0, 1), weights ~0.02-0.05),
packed batches of mixed lengths (1 up to 512 tokens for attention) with key lengths below the
sequence lengths (a ColBERT query's [MASK] rows), NaN-poisoned ``out=`` buffers, and bad inputs
that must raise a clear ``ValueError`` before any kernel runs. Then a tiny two-layer BERT runs
end to end through `TorchOps` and `TritonOps`.

Without CUDA the kernels run on Triton's CPU interpreter (tests/conftest.py): shapes stay small
and bf16 is left out (the interpreter multiplies bf16 dot operands as raw bits). Tests marked
``gpu`` need CUDA (real sizes, bf16 end to end, no-recompile checks) and are skipped elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from aot_compile import OTHER_GPUS, SHARED_MEMORY, compile_case
from conftest import INTERPRETED, KERNEL_DEVICE, KERNEL_DTYPES, poisoned, randn

from colbert_triton.kernels import attention as attention_mod
from colbert_triton.kernels import head as head_mod
from colbert_triton.kernels import linear as linear_mod
from colbert_triton.kernels.attention import varlen_attention
from colbert_triton.kernels.embedding import embed_layernorm
from colbert_triton.kernels.head import project_normalize
from colbert_triton.kernels.linear import (
    bias_residual_layernorm,
    layernorm,
    linear,
    linear_residual_layernorm,
)
from colbert_triton.model.ops import PackedBatch, TorchOps, TritonOps

DEVICE = KERNEL_DEVICE
EPS = 1e-12
HAS_CUDA = torch.cuda.is_available()
# Native GPU runs only: the interpreter (even forced on a GPU machine) has no compile cache.
gpu_only = pytest.mark.skipif(INTERPRETED or not HAS_CUDA, reason="needs CUDA without the interpreter")

# Max-abs error allowed between two implementations (ours and the PyTorch path, each rounding
# its own intermediates), per activation dtype, for O(1) outputs.
ATOL = {torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 8e-2}
# Against an fp64 reference a kernel that computes in fp32 and rounds once must be within half an
# output ulp, plus this much for the fp32 arithmetic (a few ulp of fp32 at O(1) values).
FP32_SLACK = 2e-5


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


dtypes = pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dtype_id)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _poisoned(shape, dtype):
    return poisoned(shape, dtype, DEVICE)


def _batch(seq_lens, key_lens, seed=0, vocab=100) -> PackedBatch:
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, vocab, size=n) for n in seq_lens]
    return PackedBatch.from_sequences(sequences, key_lens, DEVICE)


def _assert_close(actual, expected, atol, what=""):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of ``values`` (fp64): eps * 2^floor(log2|v|), and the
    subnormal spacing below the smallest normal."""
    info = torch.finfo(dtype)
    magnitude = values.abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def _assert_rounded(actual, expected, what="", extra=0.0):
    """Each element within half an ulp of the fp64 reference (rounded once), plus the fp32
    arithmetic's slack and ``extra`` for a known intermediate rounding."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    expected = expected.double().cpu()
    err = (actual.double().cpu() - expected).abs()
    bound = 0.5 * _ulp(expected, actual.dtype) + FP32_SLACK + extra
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"at value {expected.flatten()[worst].item():.4g}")


def _intermediate_rounding(ref, dtype) -> float:
    """One output-dtype rounding of an O(|ref|) intermediate (a GEMM stored before its epilogue)."""
    return torch.finfo(dtype).eps * ref.abs().max().item()


def _ln_params(gen, n, dtype):
    return randn(gen, n, scale=0.1, shift=1.0, dtype=dtype), randn(gen, n, scale=0.05, dtype=dtype)


def _f64(*tensors):
    return [t.double().cpu() if t is not None else None for t in tensors]


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


@dtypes
@pytest.mark.parametrize(
    "seq_lens, hidden",
    [([1], 384), ([7], 384), ([3, 1, 120, 64, 40, 90], 384), ([5, 9], 72)],
    ids=["T1", "T7", "T318", "hidden72"],
)
def test_embed_layernorm(dtype, seq_lens, hidden):
    gen = _gen(1)
    batch = _batch(seq_lens, seq_lens, vocab=100)
    word = randn(gen, 100, hidden, scale=0.05, dtype=dtype)
    position = randn(gen, 128, hidden, scale=0.02, dtype=dtype)
    token_type = randn(gen, hidden, scale=0.02, dtype=dtype)
    ln_w, ln_b = _ln_params(gen, hidden, dtype)
    out = _poisoned((batch.num_tokens, hidden), dtype)

    got = embed_layernorm(batch.input_ids, batch.position_ids, word, position, token_type, ln_w, ln_b,
                          EPS, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype

    w64, p64, t64, lw64, lb64 = _f64(word, position, token_type, ln_w, ln_b)
    x = w64[batch.input_ids.cpu()] + p64[batch.position_ids.cpu()] + t64
    ref = F.layer_norm(x, (hidden,), lw64, lb64, EPS)
    _assert_rounded(got, ref, "vs fp64")
    torch_ops = TorchOps().embed(batch, word, position, token_type, ln_w, ln_b, EPS)
    _assert_close(got, torch_ops, 2 * ATOL[dtype], "vs TorchOps")


def test_embed_layernorm_bad_ids_give_nan_rows():
    gen = _gen(2)
    word = randn(gen, 10, 48, scale=0.05)
    position = randn(gen, 16, 48, scale=0.02)
    ln_w, ln_b = _ln_params(gen, 48, torch.float32)
    ids = torch.tensor([1, 10, 3, -1, 2], device=DEVICE)
    pos = torch.tensor([0, 1, 16, 3, 4], device=DEVICE)
    out = embed_layernorm(ids, pos, word, position, torch.zeros(48, device=DEVICE), ln_w, ln_b, EPS)
    finite = torch.isfinite(out).all(dim=1).cpu().tolist()
    assert finite == [True, False, False, False, True]


def test_embed_layernorm_zero_variance_row_is_finite():
    # Every row identical: variance 0, so only eps keeps rstd finite (1e-12 in fp32 statistics).
    word = torch.full((4, 32), 0.5, device=DEVICE, dtype=torch.float16)
    position = torch.zeros(8, 32, device=DEVICE, dtype=torch.float16)
    ones, zeros = torch.ones(32, device=DEVICE), torch.zeros(32, device=DEVICE)
    ids = torch.tensor([0, 3], device=DEVICE)
    out = embed_layernorm(ids, ids, word, position, zeros.half(), ones, zeros, EPS)
    assert torch.isfinite(out).all() and out.abs().max().item() == 0.0


# --------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------

BACKENDS = ["triton", "torch"]


@dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_rows, k, n, activation, has_bias",
    [
        (1, 384, 1152, None, True),  # QKV projection, one token
        (7, 384, 1536, "gelu", True),  # FFN up-projection
        (300, 96, 100, None, False),  # odd N, no bias
        (33, 40, 24, "gelu", True),  # K not a multiple of the K step
    ],
    ids=["qkv-T1", "ffn1-T7", "T300-oddN-nobias", "oddK"],
)
def test_linear(dtype, backend, num_rows, k, n, activation, has_bias):
    gen = _gen(3)
    x = randn(gen, num_rows, k, dtype=dtype)
    weight = randn(gen, n, k, scale=0.04, dtype=dtype)
    bias = randn(gen, n, scale=0.02, dtype=dtype) if has_bias else None
    out = _poisoned((num_rows, n), dtype)

    got = linear(x, weight, bias, activation, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()

    x64, w64, b64 = _f64(x, weight, bias)
    ref = F.linear(x64, w64, b64)
    if activation == "gelu":
        ref = F.gelu(ref)
    # The torch backend's GEMM stores its output before the epilogue: one more rounding.
    _assert_rounded(got, ref, "vs fp64", 0.0 if backend == "triton" else _intermediate_rounding(ref, dtype))
    _assert_close(got, TorchOps().linear(x, weight, bias, activation), 2 * ATOL[dtype],
                  "vs TorchOps")


def _residual_layernorm_inputs(seed, num_rows, k, n, dtype):
    """x [T, K], weight [N, K], bias, residual [T, N], ln_w, ln_b; and the fp64 reference."""
    gen = _gen(seed)
    x = randn(gen, num_rows, k, dtype=dtype)
    weight = randn(gen, n, k, scale=0.04, dtype=dtype)
    bias = randn(gen, n, scale=0.02, dtype=dtype)
    residual = randn(gen, num_rows, n, dtype=dtype)
    ln_w, ln_b = _ln_params(gen, n, dtype)
    x64, w64, b64, r64, lw64, lb64 = _f64(x, weight, bias, residual, ln_w, ln_b)
    ref = F.layer_norm(F.linear(x64, w64, b64) + r64, (n,), lw64, lb64, EPS)
    return (x, weight, bias, residual, ln_w, ln_b), ref


@dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_rows, k, n",
    [
        (1, 384, 384),  # attention output projection: 3 x 128 chunks
        (70, 1536, 384),  # FFN down-projection
        (9, 40, 100),  # one masked chunk, ragged K
        (5, 64, 768),  # 3 x 256 chunks (bert-base width)
        (3, 32, 1100),  # too wide to fuse: GEMM + standalone LayerNorm
    ],
    ids=["oproj-T1", "ffn2-T70", "N100", "N768", "N1100-unfused"],
)
def test_linear_residual_layernorm(dtype, backend, num_rows, k, n):
    inputs, ref = _residual_layernorm_inputs(4, num_rows, k, n, dtype)
    out = _poisoned((num_rows, n), dtype)

    got = linear_residual_layernorm(*inputs, EPS, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr()

    fused = backend == "triton" and linear_mod.fused_layernorm_config(n, k, dtype) is not None
    _assert_rounded(got, ref, "vs fp64", 0.0 if fused else _intermediate_rounding(ref, dtype))
    torch_ops = TorchOps().linear_residual_layernorm(*inputs, EPS)
    _assert_close(got, torch_ops, 3 * ATOL[dtype], "vs TorchOps")


@dtypes
@pytest.mark.parametrize("budget", [101376, 65536], ids=["sm86-99KiB", "sm75-64KiB"])
@pytest.mark.parametrize("num_rows, k, n", [(70, 1536, 384), (5, 64, 768), (3, 96, 1024)],
                         ids=["ffn2-T70", "N768", "N1024"])
def test_linear_residual_layernorm_on_smaller_shared_memory(dtype, budget, num_rows, k, n, monkeypatch):
    """The tiles chosen for a GPU with less shared memory than sm_90 (shorter K steps, or the
    unfused path) compute the same LayerNorm(x @ W^T + b + residual)."""
    monkeypatch.setattr(linear_mod, "shared_memory_limit", lambda device: budget)
    config = linear_mod.fused_layernorm_config(n, k, dtype, budget)
    sm90 = linear_mod.fused_layernorm_config(n, k, dtype)
    assert config is None or (config["BLOCK_K"] < sm90["BLOCK_K"] and config["BLOCK_K"] >= 16)
    inputs, ref = _residual_layernorm_inputs(41, num_rows, k, n, dtype)
    got = linear_residual_layernorm(*inputs, EPS, out=_poisoned((num_rows, n), dtype), backend="triton")
    _assert_rounded(got, ref, "vs fp64", 0.0 if config is not None else _intermediate_rounding(ref, dtype))


def test_fused_layernorm_config_chunks():
    config = linear_mod.fused_layernorm_config(384, 1536, torch.float16)
    assert (config["NUM_CHUNKS"], config["BLOCK_N"]) == (3, 128)
    assert linear_mod.fused_layernorm_config(768, 3072, torch.float16)["NUM_CHUNKS"] == 3
    assert linear_mod.fused_layernorm_config(1100, 384, torch.float16) is None


@dtypes
@pytest.mark.parametrize("has_bias, has_residual", [(True, True), (False, True), (False, False)])
def test_bias_residual_layernorm(dtype, has_bias, has_residual):
    gen = _gen(5)
    num_rows, n = 37, 384
    x = randn(gen, num_rows, n, scale=3.0, shift=0.5, dtype=dtype)
    bias = randn(gen, n, scale=0.1, dtype=dtype) if has_bias else None
    residual = randn(gen, num_rows, n, dtype=dtype) if has_residual else None
    ln_w, ln_b = _ln_params(gen, n, dtype)
    out = _poisoned((num_rows, n), dtype)
    if has_bias or has_residual:
        got = bias_residual_layernorm(x, bias, residual, ln_w, ln_b, EPS, out=out)
    else:
        got = layernorm(x, ln_w, ln_b, EPS, out=out)
    x64, b64, r64, lw64, lb64 = _f64(x, bias, residual, ln_w, ln_b)
    y = x64 + (b64 if b64 is not None else 0) + (r64 if r64 is not None else 0)
    _assert_rounded(got, F.layer_norm(y, (n,), lw64, lb64, EPS), "vs fp64")


def test_layernorm_in_place_and_odd_width():
    gen = _gen(6)
    x = randn(gen, 11, 100, scale=2.0)
    ln_w, ln_b = _ln_params(gen, 100, torch.float32)
    ref = F.layer_norm(x.double(), (100,), ln_w.double(), ln_b.double(), EPS)
    got = layernorm(x, ln_w, ln_b, EPS, out=x)
    assert got.data_ptr() == x.data_ptr()
    _assert_close(got, ref, ATOL[torch.float32])


@pytest.mark.parametrize("erf", ["libdevice", "rational"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_over_its_whole_range(monkeypatch, backend, erf):
    """GELU of pre-activations from -12 to 12 (both tails, the kink at 0), in fp32 against fp64:
    both erf forms within 5e-7 (1 + |y|)."""
    monkeypatch.setattr(linear_mod, "GELU_ERF", erf)
    y = torch.linspace(-12, 12, 16 * 257).view(16, 257)
    x = torch.cat([y, torch.ones(16, 1)], 1).to(DEVICE)  # x @ [I | 0]^T + 0 = y
    weight = torch.cat([torch.eye(257), torch.zeros(257, 1)], 1).to(DEVICE)
    got = linear(x, weight, None, "gelu", out=_poisoned((16, 257), torch.float32), backend=backend)
    ref = F.gelu(y.double())
    err = (got.double().cpu() - ref).abs()
    assert bool((err <= 5e-7 * (1 + ref.abs())).all()), err.max().item()
    assert abs(got[0, 0].item()) < 1e-30  # GELU(-12) ~ -2e-32: 0 or a denormal-free tiny value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_gelu_rational_erf_rounds_like_the_exact_one(monkeypatch, dtype):
    monkeypatch.setattr(linear_mod, "GELU_ERF", "rational")
    gen = _gen(13)
    x = randn(gen, 9, 384, dtype=dtype)
    weight = randn(gen, 1536, 384, scale=0.08, dtype=dtype)
    bias = randn(gen, 1536, scale=0.02, dtype=dtype)
    got = linear(x, weight, bias, "gelu", out=_poisoned((9, 1536), dtype), backend="triton")
    x64, w64, b64 = _f64(x, weight, bias)
    _assert_rounded(got, F.gelu(F.linear(x64, w64, b64)), "vs fp64")


def test_gelu_erf_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setattr(linear_mod, "GELU_ERF", "tanh")
    with pytest.raises(ValueError, match="unknown GELU_ERF 'tanh'"):
        linear(torch.ones(2, 16, device=DEVICE), torch.ones(16, 16, device=DEVICE), None, "gelu")


def test_gemm_backend_module_switch(monkeypatch):
    gen = _gen(7)
    x, weight = randn(gen, 5, 64), randn(gen, 48, 64, scale=0.05)
    bias = randn(gen, 48, scale=0.02)
    ref = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    monkeypatch.setattr(linear_mod, "GEMM_BACKEND", "torch")
    _assert_close(linear(x, weight, bias, "gelu"), ref, ATOL[torch.float32])
    monkeypatch.setattr(linear_mod, "GEMM_BACKEND", "cublas")
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        linear(x, weight, bias)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def _attention_reference(qkv, cu_seqlens, key_lens, num_heads, head_dim):
    """fp64 softmax attention per sequence; a sequence without keys gets zero rows."""
    qkv = qkv.double().cpu()
    hidden = num_heads * head_dim
    out = torch.zeros(qkv.shape[0], hidden, dtype=torch.float64)
    cu, kl = cu_seqlens.cpu().tolist(), key_lens.cpu().tolist()
    for b in range(len(kl)):
        start, end, n_keys = cu[b], cu[b + 1], kl[b]
        if n_keys == 0 or end == start:
            continue
        rows = qkv[start:end].view(end - start, 3, num_heads, head_dim)
        q, k, v = rows[:, 0].transpose(0, 1), rows[:n_keys, 1].transpose(0, 1), rows[:n_keys, 2].transpose(0, 1)
        p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        out[start:end] = (p @ v).transpose(0, 1).reshape(end - start, hidden)
    return out


ATTENTION_CASES = {
    # name: (sequence lengths, key lengths, num_heads, head_dim)
    "queries-d32": ([32, 32, 32, 1, 7], [9, 32, 20, 1, 3], 2, 32),
    "mixed-d32": ([1, 7, 64, 65, 130, 3], [1, 5, 64, 40, 130, 3], 3, 32),
    "mixed-d64": ([20, 129, 2, 70], [11, 129, 2, 50], 2, 64),
    "long512-d32": ([512, 1, 37], [512, 1, 30], 2, 32),
    "d16": ([9, 40], [9, 17], 2, 16),
    "d128": ([9, 40], [4, 40], 1, 128),
}


def _probability_rounding(qkv, hidden) -> float:
    """P is rounded to V's dtype for the P @ V dot: each probability within half an ulp
    (relative), and the probabilities sum to 1, so the output moves by at most that times max|v|."""
    return 0.5 * torch.finfo(qkv.dtype).eps * qkv[:, 2 * hidden :].abs().max().item()


@dtypes
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_varlen_attention(dtype, case):
    seq_lens, key_lens, num_heads, head_dim = ATTENTION_CASES[case]
    batch = _batch(seq_lens, key_lens)
    gen = _gen(8)
    hidden = num_heads * head_dim
    # Realistic logits: q.k / sqrt(d) of a few units.
    qkv = randn(gen, batch.num_tokens, 3 * hidden, scale=1.5, dtype=dtype)
    out = _poisoned((batch.num_tokens, hidden), dtype)

    got = varlen_attention(qkv, batch.cu_seqlens, batch.key_lens, batch.max_seqlen, num_heads,
                           head_dim, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = _attention_reference(qkv, batch.cu_seqlens, batch.key_lens, num_heads, head_dim)
    _assert_rounded(got, ref, "vs fp64", _probability_rounding(qkv, hidden))
    torch_ops = TorchOps().attention(qkv, batch, num_heads, head_dim)
    _assert_close(got, torch_ops, 2 * ATOL[dtype], "vs TorchOps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_varlen_attention_zero_key_lengths_give_zeros(dtype):
    # PackedBatch forbids key length 0; the kernel must still write zeros, never NaN.
    seq_lens, key_lens = [3, 5, 1, 4], [0, 2, 0, 9]  # 9 > 4 is clamped to the sequence length
    cu = torch.tensor(np.concatenate([[0], np.cumsum(seq_lens)]), dtype=torch.int32, device=DEVICE)
    kl = torch.tensor(key_lens, dtype=torch.int32, device=DEVICE)
    gen = _gen(9)
    qkv = randn(gen, sum(seq_lens), 3 * 64, dtype=dtype)
    got = varlen_attention(qkv, cu, kl, max(seq_lens), 2, 32, out=_poisoned((sum(seq_lens), 64), dtype))
    assert torch.isfinite(got).all()
    assert got[0:3].abs().max().item() == 0.0 and got[8:9].abs().max().item() == 0.0
    ref = _attention_reference(qkv, cu, torch.tensor([0, 2, 0, 4], dtype=torch.int32), 2, 32)
    _assert_rounded(got, ref, extra=_probability_rounding(qkv, 64))


def test_varlen_attention_reads_strided_qkv():
    # qkv as a column slice of a wider matrix: only the row stride differs.
    batch = _batch([5, 12], [5, 7])
    gen = _gen(10)
    wide = randn(gen, batch.num_tokens, 3 * 64 + 16)
    qkv = wide[:, 16:]
    got = varlen_attention(qkv, batch.cu_seqlens, batch.key_lens, batch.max_seqlen, 2, 32,
                           out=_poisoned((batch.num_tokens, 64), torch.float32))
    ref = _attention_reference(qkv, batch.cu_seqlens, batch.key_lens, 2, 32)
    _assert_close(got, ref, ATOL[torch.float32])


def test_query_tile_bound():
    # The grid must cover every sequence's cdiv(len, BLOCK_M) query tiles; it is exact for equal
    # lengths (query batches) and at most B tiles too many otherwise.
    rng = np.random.default_rng(11)
    for block_m in (32, 64, 128):
        for _ in range(300):
            lens = rng.integers(0, 600, size=rng.integers(1, 40))
            tiles = int(np.sum(-(-lens // block_m)))
            bound = attention_mod.query_tile_bound(int(lens.sum()), len(lens), int(lens.max()), block_m)
            assert tiles <= bound <= tiles + len(lens)
        assert attention_mod.query_tile_bound(32 * 100, 100, 32, block_m) == 100


def test_varlen_attention_empty_sequences_and_generous_max_seqlen():
    # Zero-length sequences (their tiles count 0) anywhere in the batch, max_seqlen above the truth.
    seq_lens, key_lens = [0, 70, 0, 0, 3, 0], [0, 50, 0, 0, 3, 0]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(seq_lens)]), dtype=torch.int32, device=DEVICE)
    kl = torch.tensor(key_lens, dtype=torch.int32, device=DEVICE)
    qkv = randn(_gen(19), sum(seq_lens), 3 * 64)
    for max_seqlen in (70, 200):
        got = varlen_attention(qkv, cu, kl, max_seqlen, 2, 32, out=_poisoned((73, 64), torch.float32))
        _assert_close(got, _attention_reference(qkv, cu, kl, 2, 32), ATOL[torch.float32])


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


@dtypes
@pytest.mark.parametrize(
    "num_rows, hidden, dim, has_bias, rows",
    [
        (1, 384, 96, False, None),
        (7, 384, 96, True, [6, 0, 0, 3]),  # gather with a repeat, out of order
        (150, 64, 37, True, None),  # odd D
        (40, 384, 128, False, list(range(0, 40, 3))),
        (5, 48, 96, False, []),  # every row dropped
    ],
    ids=["T1-D96", "gather", "oddD", "D128-gather", "no-rows"],
)
def test_project_normalize(dtype, num_rows, hidden, dim, has_bias, rows):
    gen = _gen(12)
    x = randn(gen, num_rows, hidden, dtype=dtype)
    weight = randn(gen, dim, hidden, scale=0.05, dtype=dtype)
    bias = randn(gen, dim, scale=0.02, dtype=dtype) if has_bias else None
    rows_t = torch.tensor(rows, dtype=torch.int64, device=DEVICE) if rows is not None else None
    num_out = num_rows if rows is None else len(rows)
    out = _poisoned((num_out, dim), dtype)

    got = project_normalize(x, weight, bias, rows_t, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype

    x64, w64, b64 = _f64(x, weight, bias)
    if rows_t is not None:
        x64 = x64[rows_t.cpu()]
    ref = F.normalize(F.linear(x64, w64, b64), p=2, dim=-1, eps=1e-12)
    _assert_rounded(got, ref, "vs fp64")
    _assert_close(got, TorchOps().project_normalize(x, weight, bias, rows_t), ATOL[dtype] / 2,
                  "vs TorchOps")


def test_project_normalize_zero_vector_and_bad_rows():
    x = torch.zeros(3, 32, device=DEVICE)
    weight = torch.randn(16, 32, generator=_gen(13)).to(DEVICE)
    got = project_normalize(x, weight, None)  # ||y|| = 0 -> y / eps = 0, as F.normalize
    assert torch.isfinite(got).all() and got.abs().max().item() == 0.0
    rows = torch.tensor([2, 3, -1, 0], device=DEVICE)
    got = project_normalize(x, weight, None, rows)
    assert torch.isfinite(got).all(dim=1).cpu().tolist() == [True, False, False, True]


# --------------------------------------------------------------------------------------------
# Input validation: clear errors before any kernel runs
# --------------------------------------------------------------------------------------------


def test_validation_errors():
    f16 = torch.float16
    x = torch.zeros(4, 32, device=DEVICE)
    w = torch.zeros(16, 32, device=DEVICE)
    b = torch.zeros(16, device=DEVICE)
    meta = torch.zeros(4, 32, device="meta")

    with pytest.raises(ValueError, match="weight has 31 columns"):
        linear(x, w[:, :31], b)
    with pytest.raises(ValueError, match="differs from the activations"):
        linear(x, w.to(f16), b)
    with pytest.raises(ValueError, match="bias has 15 entries"):
        linear(x, w, b[:15])
    with pytest.raises(ValueError, match="unsupported activation"):
        linear(x, w, b, "relu")
    with pytest.raises(ValueError, match="unit stride"):
        linear(x.t().contiguous().t(), w, b)
    with pytest.raises(ValueError, match="is on meta"):
        linear(x, w, b, out=torch.empty(4, 16, device="meta"))
    with pytest.raises(ValueError, match="not float16, bfloat16 or float32"):
        linear(x.double(), w.double(), b.double())
    with pytest.raises(ValueError, match="out has 3 rows"):
        linear(x, w, b, out=torch.empty(3, 16, device=DEVICE))

    residual = torch.zeros(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="residual has 5 rows"):
        linear_residual_layernorm(x, w, b, torch.zeros(5, 16, device=DEVICE), b, b, EPS)
    with pytest.raises(ValueError, match="ln_weight has 8 entries"):
        linear_residual_layernorm(x, w, b, residual, b[:8], b, EPS)
    with pytest.raises(ValueError, match="eps"):
        linear_residual_layernorm(x, w, b, residual, b, b, -1.0)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        bias_residual_layernorm(x[0], None, None, b, b, EPS)

    qkv = torch.zeros(10, 3 * 64, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    kl = torch.tensor([4, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="expected 3 \\* 2 heads"):
        varlen_attention(qkv[:, :100], cu, kl, 6, 2, 32)
    with pytest.raises(ValueError, match="head_dim 24"):
        varlen_attention(torch.zeros(10, 3 * 48, device=DEVICE), cu, kl, 6, 2, 24)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        varlen_attention(qkv, cu.long(), kl, 6, 2, 32)
    with pytest.raises(ValueError, match="expected len\\(key_lens\\) \\+ 1"):
        varlen_attention(qkv, cu[:2], kl, 6, 2, 32)
    with pytest.raises(ValueError, match="max_seqlen must be a host int"):
        varlen_attention(qkv, cu, kl, torch.tensor(6), 2, 32)
    with pytest.raises(ValueError, match="out dtype"):
        varlen_attention(qkv, cu, kl, 6, 2, 32, out=torch.empty(10, 64, dtype=f16, device=DEVICE))
    with pytest.raises(ValueError, match="describes no sequence"):
        varlen_attention(qkv, cu[:1], kl[:0], 0, 2, 32)

    ids = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    table = torch.zeros(10, 32, device=DEVICE)
    row = torch.zeros(32, device=DEVICE)
    with pytest.raises(ValueError, match="input_ids must be a 1-D int64"):
        embed_layernorm(ids.int(), ids, table, table, row, row, row, EPS)
    with pytest.raises(ValueError, match="position has 16 columns"):
        embed_layernorm(ids, ids, table, torch.zeros(10, 16, device=DEVICE), row, row, row, EPS)
    with pytest.raises(ValueError, match="ln_bias must be a 1-D tensor of 32"):
        embed_layernorm(ids, ids, table, table, row, row, row[:5], EPS)
    with pytest.raises(ValueError, match="input_ids is on meta"):
        embed_layernorm(torch.zeros(4, dtype=torch.int64, device="meta"), ids, table, table, row,
                        row, row, EPS)

    with pytest.raises(ValueError, match="rows must be a 1-D int64"):
        project_normalize(x, w, None, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        project_normalize(x, w[:, :8], None)
    with pytest.raises(ValueError, match="out must have shape"):
        project_normalize(x, w, None, out=torch.empty(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        project_normalize(meta[0], w, None)


# --------------------------------------------------------------------------------------------
# A tiny BERT end to end: TorchOps vs TritonOps
# --------------------------------------------------------------------------------------------


def _tiny_bert(gen, dtype, *, hidden=64, heads=2, ffn=128, layers=2, vocab=120, positions=64,
               dim=24):
    def lin(n, k):
        return randn(gen, n, k, scale=0.05, dtype=dtype), randn(gen, n, scale=0.02, dtype=dtype)

    params = {
        "word": randn(gen, vocab, hidden, scale=0.05, dtype=dtype),
        "position": randn(gen, positions, hidden, scale=0.02, dtype=dtype),
        "token_type": randn(gen, hidden, scale=0.02, dtype=dtype),
        "emb_ln": _ln_params(gen, hidden, dtype),
        "heads": heads,
        "head_dim": hidden // heads,
        "proj": randn(gen, dim, hidden, scale=0.05, dtype=dtype),
        "layers": [],
    }
    for _ in range(layers):
        params["layers"].append({
            "qkv": lin(3 * hidden, hidden), "o": lin(hidden, hidden), "ln1": _ln_params(gen, hidden, dtype),
            "ffn1": lin(ffn, hidden), "ffn2": lin(hidden, ffn), "ln2": _ln_params(gen, hidden, dtype),
        })
    return params


def _encode(ops, params, batch, rows):
    h = ops.embed(batch, params["word"], params["position"], params["token_type"], *params["emb_ln"], EPS)
    for layer in params["layers"]:
        qkv = ops.linear(h, *layer["qkv"])
        ctx = ops.attention(qkv, batch, params["heads"], params["head_dim"])
        h = ops.linear_residual_layernorm(ctx, *layer["o"], h, *layer["ln1"], EPS)
        f = ops.linear(h, *layer["ffn1"], activation="gelu")
        h = ops.linear_residual_layernorm(f, *layer["ffn2"], h, *layer["ln2"], EPS)
    return ops.project_normalize(h, params["proj"], None, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_tiny_bert_end_to_end(dtype):
    gen = _gen(14)
    params = _tiny_bert(gen, dtype)
    # Two ColBERT-style queries (32 rows, [MASK] rows not attended) and three documents.
    batch = _batch([32, 32, 1, 45, 60], [12, 20, 1, 45, 60], seed=15, vocab=120)
    rows = torch.tensor([i for i in range(batch.num_tokens) if i % 5 != 4], device=DEVICE)
    reference = _encode(TorchOps(), params if dtype == torch.float32 else _tiny_bert_as(params, torch.float32),
                        batch, rows)
    got = _encode(TritonOps(), params, batch, rows)
    assert got.shape == reference.shape and got.dtype == dtype
    cosine = F.cosine_similarity(got.double(), reference.double(), dim=-1)
    assert cosine.min().item() >= 0.9999, cosine.min().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)  # see test_triton_encoder


def _tiny_bert_as(params, dtype):
    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v) for v in value)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    return cast(params)


# --------------------------------------------------------------------------------------------
# GPU validity without a GPU: compile every launch of the model's shapes for sm_90 and other GPUs
# --------------------------------------------------------------------------------------------

def test_every_launch_compiles_for_sm90():
    """The interpreter enforces no GPU limit: compile what the launchers would launch, for sm_90."""
    launches = compile_case("encoder")
    assert len(launches) == 43, launches
    for launch in launches:
        assert launch["shared"] <= 227 * 1024, launch  # sm_90's per-block shared memory
        assert launch["spill_bytes"] in (0, None), launch


@pytest.mark.parametrize("arch", OTHER_GPUS)
def test_every_launch_fits_other_gpus(arch):
    """The same launches compiled for a T4 (sm_75, 64 KiB of shared memory a block), an A100
    (163 KiB), an RTX 30/A10 (sm_86, 99 KiB; sm_89's budget is the same), a B200 (sm_100, 227
    KiB) and an RTX 50 (sm_120, 99 KiB) each fit: a launch past the GPU's shared memory fails.
    Spills are a matter of speed and of the Triton release there (sm_75 spills up to 8 KB a
    thread; the others 0-8 bytes in a few launches: bench/NOTES.md, session 19), so only sm_90,
    the GPU the tiles are tuned for, is held to none (test_every_launch_compiles_for_sm90)."""
    launches = compile_case("encoder", arch)
    assert len(launches) >= 43, launches
    for launch in launches:
        assert launch["shared"] <= SHARED_MEMORY[arch], launch


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY))
def test_fused_layernorm_tiles_fit_each_gpus_shared_memory(arch):
    """The LayerNorm-fused GEMM keeps a whole [N, BLOCK_K] slice of W per stage: its tiles are
    sized to the device's shared memory (sm_90's 227 KiB; the 99 KiB of sm_86/sm_89 took 112
    KiB with sm_90's tiles), and each launch, compiled for that GPU, fits it."""
    launches = compile_case("fused-layernorm", arch)
    fused = [launch for launch in launches if launch["kernel"] == "_linear_residual_layernorm_kernel"]
    assert len(launches) >= 12 and fused, launches
    for launch in launches:
        assert launch["shared"] <= SHARED_MEMORY[arch], launch
    if arch == 90:  # sm_90's own tiles, as tuned: K steps of 64 at hidden 384 in 16-bit
        assert {launch["config"]["BLOCK_K"] for launch in fused
                if launch["dtype"] != "torch.float32" and launch["config"]["BLOCK_N"] == 128} == {64}


# --------------------------------------------------------------------------------------------
# GPU only: real sizes, bf16 end to end, no recompilation across shapes
# --------------------------------------------------------------------------------------------


def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@gpu_only
@pytest.mark.gpu
def test_no_recompile_when_batch_changes():
    """T, B and the lengths are runtime values: after one short (query) and one long batch have
    compiled the two attention buckets, no new batch compiles anything."""
    gen = _gen(16)
    hidden, heads = 384, 12
    w_qkv = randn(gen, 3 * hidden, hidden, scale=0.04, dtype=torch.float16)
    b_qkv = randn(gen, 3 * hidden, scale=0.02, dtype=torch.float16)
    w_head = randn(gen, 96, hidden, scale=0.05, dtype=torch.float16)

    def run(seq_lens, key_lens):
        batch = _batch(seq_lens, key_lens)
        x = randn(gen, batch.num_tokens, hidden, dtype=torch.float16)
        qkv = linear(x, w_qkv, b_qkv)
        ctx = varlen_attention(qkv, batch.cu_seqlens, batch.key_lens, batch.max_seqlen, heads, 32)
        rows = torch.arange(0, batch.num_tokens, 2, device=DEVICE)
        project_normalize(ctx, w_head, None, rows)
        return tuple(_compiled_variants(k) for k in (linear_mod._linear_kernel,
                                                     attention_mod._varlen_attention_kernel,
                                                     head_mod._project_normalize_kernel))

    run([32, 32], [10, 32])
    warm = run([300, 41, 120], [300, 41, 120])
    for seq_lens, key_lens in [([77], [77]), ([90] * 16, [60] * 16), ([1], [1]), ([32] * 33, [7] * 33),
                               ([200, 512, 3, 7, 65], [200, 500, 3, 7, 65])]:
        assert run(seq_lens, key_lens) == warm, (seq_lens, warm)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_real_size_layer(dtype):
    """One encoder layer at the model's shapes (H 384, 12 x 32 heads, FFN 1536), ~4k tokens."""
    gen = _gen(17)
    rng = np.random.default_rng(18)
    seq_lens = rng.integers(20, 301, size=24).tolist() + [512, 32, 32, 1]
    key_lens = seq_lens[:-3] + [20, 11, 1]
    batch = _batch(seq_lens, key_lens, vocab=30522)
    params = _tiny_bert(gen, dtype, hidden=384, heads=12, ffn=1536, layers=1, vocab=30522,
                        positions=512, dim=96)
    reference = _encode(TorchOps(), _tiny_bert_as(params, torch.float32), batch, None)
    got = _encode(TritonOps(), params, batch, None)
    cosine = F.cosine_similarity(got.double(), reference.double(), dim=-1)
    assert cosine.min().item() >= (0.999 if dtype == torch.float16 else 0.995), cosine.min().item()


def test_launch_device_guard():
    """Triton launches on the current GPU: launchers make the tensors' GPU current first."""
    import contextlib

    from colbert_triton.kernels._device import on_device

    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        assert isinstance(on_device(torch.zeros(1, device=f"cuda:{current}")), contextlib.nullcontext)
        if torch.cuda.device_count() > 1:
            other = (current + 1) % torch.cuda.device_count()
            with on_device(torch.device(f"cuda:{other}")):
                assert torch.cuda.current_device() == other
            assert torch.cuda.current_device() == current


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("extra_len", [0, 40], ids=["exact", "generous-max-seqlen"])
def test_attention_tile_table_equals_in_kernel_lookup(dtype, extra_len):
    """The host-built tile table (the model's path) and the in-kernel scan give bit-identical
    outputs: zero-length sequences, zero key lengths, tile-size edges, and a padded table (a
    static CUDA-graph buffer) whose unused rows must write nothing."""
    from colbert_triton.kernels.attention import AttentionTiles, attention_tile_table

    gen = _gen(31)
    lens = np.array([1, 33, 64, 65, 0, 130, 7, 300, 128], dtype=np.int64)
    keys = np.minimum(lens, [1, 20, 64, 3, 0, 130, 0, 250, 128])
    num_tokens, heads = int(lens.sum()), 2
    qkv = randn(gen, num_tokens, 3 * heads * 32, dtype=dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=DEVICE)
    key_lens = torch.tensor(keys, dtype=torch.int32, device=DEVICE)
    max_seqlen = int(lens.max()) + extra_len
    expected = varlen_attention(qkv, cu, key_lens, max_seqlen, heads, 32,
                                out=_poisoned((num_tokens, heads * 32), dtype))
    block_m = attention_mod.attention_config(32, max_seqlen, dtype)["BLOCK_M"]
    for rows in (None, int(np.sum(-(-lens // block_m))) + 3):
        table = torch.from_numpy(attention_tile_table(lens, keys, block_m, num_tiles=rows))
        got = varlen_attention(qkv, cu, key_lens, max_seqlen, heads, 32,
                               out=_poisoned((num_tokens, heads * 32), dtype),
                               tiles=AttentionTiles(table.to(DEVICE), block_m))
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="built for"):
        varlen_attention(qkv, cu, key_lens, max_seqlen, heads, 32,
                         tiles=AttentionTiles(table.to(DEVICE), block_m // 2))
    with pytest.raises(ValueError, match="do not fit"):
        attention_tile_table(lens, keys, block_m, num_tiles=1)



# ----------------------------------------------------------------------------------------------
# Paths the model's sizes do not reach on the CPU (from a mutation audit: each test below fails
# on a plausible bug that every other test let through)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1.0])
def test_layernorm_kernels_use_eps(eps):
    """Every other test uses BERT's 1e-12, which a hard-coded epsilon would also pass."""
    gen = _gen(40)
    x = randn(gen, 9, 100, scale=0.5)
    weight, bias = randn(gen, 100, scale=0.1, shift=1.0), randn(gen, 100, scale=0.1)
    want = F.layer_norm(x.double(), (100,), weight.double(), bias.double(), eps)
    got = bias_residual_layernorm(x, None, None, weight, bias, eps)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    w, inputs = randn(gen, 100, 24, scale=0.05), randn(gen, 9, 24)
    want = F.layer_norm(F.linear(inputs.double(), w.double()) + x.double(), (100,), weight.double(),
                        bias.double(), eps)
    got = linear_residual_layernorm(inputs, w, torch.zeros(100, device=DEVICE), x, weight, bias, eps)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    word, position = randn(gen, 10, 100, scale=0.05), randn(gen, 16, 100, scale=0.02)
    ids, pos = torch.tensor([1, 4, 9, 0], device=DEVICE), torch.tensor([0, 3, 15, 7], device=DEVICE)
    want = F.layer_norm((word[ids] + position[pos]).double(), (100,), weight.double(), bias.double(), eps)
    got = embed_layernorm(ids, pos, word, position, torch.zeros(100, device=DEVICE), weight, bias, eps)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_project_normalize_makes_tiny_rows_unit_vectors():
    """1e-12 < ||y|| < 1e-6: F.normalize(eps=1e-12) gives a unit vector; a larger epsilon would
    shrink it (every other row is near 1 or exactly 0, where any epsilon passes)."""
    gen = _gen(45)
    x = randn(gen, 4, 32, scale=1e-9)
    weight = randn(gen, 16, 32, scale=32**-0.5)
    want = F.normalize(F.linear(x.double(), weight.double()), p=2, dim=-1, eps=1e-12)
    got = project_normalize(x, weight, None, out=_poisoned((4, 16), torch.float32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_linear_residual_layernorm_never_reads_weight_columns_past_k():
    """Weights may have any row stride: a column slice of a wider buffer whose slack holds inf.
    With K = 40 (not a multiple of the K step) a mask one column too wide reads inf there,
    and inf times x's masked 0 is NaN (a contiguous W hides it: its column K is the next
    row's finite column 0)."""
    gen = _gen(46)
    n, k = 64, 40
    x, weight = randn(gen, 5, k), randn(gen, n, k, scale=k**-0.5)
    wide = torch.full((n, k + 24), float("inf"), device=DEVICE)
    wide[:, :k] = weight
    residual = randn(gen, 5, n)
    ones, zeros = torch.ones(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    got = linear_residual_layernorm(x, wide[:, :k], zeros, residual, ones, zeros, EPS,
                                    out=_poisoned((5, n), torch.float32))
    want = F.layer_norm(F.linear(x.double(), weight.double()) + residual.double(), (n,), eps=EPS)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_layernorm_of_constant_rows_is_the_bias():
    """Zero variance: (x - mean) is exactly 0, so the output is the LayerNorm bias, not NaN."""
    ones, ln_bias = torch.ones(64, device=DEVICE), torch.linspace(-1, 1, 64, device=DEVICE)
    x = torch.full((5, 64), 3.0, device=DEVICE)
    assert torch.equal(bias_residual_layernorm(x, None, None, ones, ln_bias, EPS), ln_bias.expand(5, 64))
    got = linear_residual_layernorm(torch.ones(5, 16, device=DEVICE), torch.zeros(64, 16, device=DEVICE),
                                    torch.zeros(64, device=DEVICE), x, ones, ln_bias, EPS)
    assert torch.equal(got, ln_bias.expand(5, 64))


def test_fp16_linear_within_one_ulp():
    """fp32 accumulation: an fp16 GEMM is within one fp16 ulp of the fp64 product (an fp16
    partial sum would not be)."""
    gen = _gen(41)
    x = randn(gen, 40, 1536, dtype=torch.float16)
    w = randn(gen, 384, 1536, scale=0.04, dtype=torch.float16)
    got = linear(x, w, None, out=_poisoned((40, 384), torch.float16))
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double()), rtol=2**-10, atol=1e-4)


def test_linear_over_several_launch_groups():
    """More row blocks than one GROUP_M group (real document batches have thousands of rows)."""
    gen = _gen(43)
    x = randn(gen, 64 * 8 + 37, 16)
    w = randn(gen, 24, 16, scale=0.1)
    got = linear(x, w, None, out=_poisoned((x.shape[0], 24), torch.float32))
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double()), atol=2e-5, rtol=0)


def test_attention_sequence_lookup_over_several_scan_blocks(monkeypatch):
    """The in-kernel lookup scans cu_seqlens in blocks of _BLOCK_B sequences (1024): more
    sequences than one block must carry the tile count across blocks."""
    monkeypatch.setattr(attention_mod, "_BLOCK_B", 8)
    lengths = np.random.default_rng(5).integers(1, 40, size=27).tolist()
    batch = _batch(lengths, [max(1, n - 3) for n in lengths])
    qkv = randn(_gen(42), batch.num_tokens, 3 * 16)
    got = varlen_attention(qkv, batch.cu_seqlens, batch.key_lens, batch.max_seqlen, 1, 16,
                           out=_poisoned((batch.num_tokens, 16), torch.float32))
    want = _attention_reference(qkv, batch.cu_seqlens, batch.key_lens, 1, 16)
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=0)


def test_embedding_reaches_the_last_position():
    gen = _gen(44)
    positions, hidden = 512, 48
    ids = torch.arange(positions, device=DEVICE) % 10
    pos = torch.arange(positions, device=DEVICE)
    word, position = randn(gen, 10, hidden, scale=0.05), randn(gen, positions, hidden, scale=0.02)
    ones, zeros = torch.ones(hidden, device=DEVICE), torch.zeros(hidden, device=DEVICE)
    got = embed_layernorm(ids, pos, word, position, zeros, ones, zeros, EPS)
    want = F.layer_norm((word[ids] + position[pos]).double(), (hidden,), eps=EPS)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_packed_batch_rejects_bad_lengths():
    sequences = [np.arange(3), np.arange(5)]
    with pytest.raises(ValueError, match="key lengths"):
        PackedBatch.from_sequences(sequences, [0, 5], "cpu")
    with pytest.raises(ValueError, match="key lengths"):
        PackedBatch.from_sequences(sequences, [3, 6], "cpu")
    with pytest.raises(ValueError, match="at least one token"):
        PackedBatch.from_sequences([np.arange(0)], [0], "cpu")


def test_attention_checks_lengths_it_can_read_for_free():
    """Lengths on the CPU are checked by default (a short max_seqlen would leave rows unwritten);
    on a GPU only when asked (check_lengths=True: one sync)."""
    batch = _batch([5, 12], [5, 7])
    qkv = randn(_gen(11), batch.num_tokens, 3 * 64)
    cu, key_lens = batch.cu_seqlens, batch.key_lens
    with pytest.raises(ValueError, match="max_seqlen is 11 but a sequence has 12 rows"):
        varlen_attention(qkv, cu, key_lens, 11, 2, 32, check_lengths=True)
    with pytest.raises(ValueError, match="must start at 0 and end at the 17 rows"):
        varlen_attention(qkv, cu - 1, key_lens, 12, 2, 32, check_lengths=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(qkv, torch.tensor([0, 18, 17], dtype=torch.int32, device=DEVICE), key_lens, 18, 2, 32,
                         check_lengths=True)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="max_seqlen is 11"):
            varlen_attention(qkv, cu, key_lens, 11, 2, 32)


def test_batches_share_compiled_variants():
    """The CPU twin of test_no_recompile_when_batch_changes: batches of other T, B and lengths
    get the same specialisation per kernel; attention has its two tile buckets."""
    keys = {}
    for launch in compile_case("encoder-batches"):
        keys.setdefault(launch["kernel"], set()).add(launch["key"])
    counts = {kernel: len(variants) for kernel, variants in keys.items()}
    assert counts == {"_linear_kernel": 1, "_varlen_attention_kernel": 2, "_project_normalize_kernel": 1}


def test_attention_tiles_are_64_rows_up_to_64_tokens():
    """16-bit batches whose longest sequence has at most 64 tokens (queries, up to and including 64)
    take 64-row query tiles; longer ones 128."""
    from colbert_triton.kernels.attention import attention_config

    for dtype in (torch.float16, torch.bfloat16):
        assert attention_config(32, 32, dtype)["BLOCK_M"] == 64
        assert attention_config(32, 64, dtype)["BLOCK_M"] == 64
        assert attention_config(32, 65, dtype)["BLOCK_M"] == 128
        assert attention_config(128, 300, dtype)["BLOCK_M"] == 64


def test_attention_tile_table_clamps_key_lengths():
    """The table's key lengths are clamped to [0, sequence length], as its docstring says (the
    kernel clamps again, so only the table shows it)."""
    from colbert_triton.kernels.attention import attention_tile_table

    table = attention_tile_table([40, 10, 5], [50, -3, 5], 32)
    assert table.tolist() == [[0, 40, 40, 0], [0, 40, 40, 32], [40, 10, 0, 0], [50, 5, 5, 0]]


# With eps 0 the interpreter's masked padding rows (variance 0, never stored) divide by zero.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_layernorm_kernels_accept_eps_zero():
    """eps is documented as a non-negative float: 0 is accepted by every LayerNorm launcher (and
    matches F.layer_norm with eps 0), not refused."""
    gen = torch.Generator().manual_seed(40)
    x = randn(gen, 9, 100, scale=0.5)
    weight, bias = randn(gen, 100, scale=0.1, shift=1.0), randn(gen, 100, scale=0.1)
    want = F.layer_norm(x.double(), (100,), weight.double(), bias.double(), 0.0)
    got = bias_residual_layernorm(x, None, None, weight, bias, 0.0)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    w, inputs = randn(gen, 100, 24, scale=0.05), randn(gen, 9, 24)
    want = F.layer_norm(F.linear(inputs.double(), w.double()) + x.double(), (100,), weight.double(),
                        bias.double(), 0.0)
    got = linear_residual_layernorm(inputs, w, torch.zeros(100, device=KERNEL_DEVICE), x, weight, bias, 0)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    word, position = randn(gen, 10, 100, scale=0.05), randn(gen, 16, 100, scale=0.02)
    ids = torch.tensor([1, 4, 9, 0], device=KERNEL_DEVICE)
    pos = torch.tensor([0, 3, 15, 7], device=KERNEL_DEVICE)
    want = F.layer_norm((word[ids] + position[pos]).double(), (100,), weight.double(), bias.double(), 0.0)
    got = embed_layernorm(ids, pos, word, position, torch.zeros(100, device=KERNEL_DEVICE), weight, bias, 0.0)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_torch_head_makes_tiny_rows_unit_vectors():
    """The PyTorch path's head normalises with F.normalize's eps 1e-12 as the Triton head does
    (1e-12 < ||y|| < 1e-6 still gives a unit vector; a larger epsilon shrinks it): both backends
    give the same embeddings for such rows."""
    gen = torch.Generator().manual_seed(45)
    x = (torch.randn(4, 32, generator=gen) * 1e-9).to(KERNEL_DEVICE)
    weight = (torch.randn(16, 32, generator=gen) * 32**-0.5).to(KERNEL_DEVICE)
    got = TorchOps().project_normalize(x, weight, None)
    want = F.normalize(F.linear(x.double(), weight.double()), p=2, dim=-1, eps=1e-12)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4, device=KERNEL_DEVICE), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ops", [TorchOps(), TritonOps()], ids=["torch", "triton"])
def test_ops_refuse_an_unknown_activation(ops):
    """Both op sets refuse an activation other than None or "gelu" (the Triton launcher does; the
    PyTorch ops must not silently skip it)."""
    x = torch.ones(3, 8, device=KERNEL_DEVICE)
    weight = torch.ones(4, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="activation 'relu'"):
        ops.linear(x, weight, None, activation="relu")
    assert ops.linear(x, weight, None, activation="gelu").shape == (3, 4)
