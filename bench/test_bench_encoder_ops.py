"""Per-op GPU benchmarks of the encoder kernels at the model's real sizes.

Each op of one BERT layer of answerai-colbert-small-v1 (hidden 384, 12 heads of 32, FFN 1536,
384 -> 96 head) on a packed batch of about 16k tokens (documents of 20-300 tokens, as the
encoder sees them) and on a batch of 512 ColBERT queries (32 rows each, 5-32 of them keys):

- ours: the Triton launchers in ``colbert_triton.kernels`` (``GEMM_BACKEND="triton"``: fused
  Triton GEMMs), and ``cublas+triton-epilogue`` (``backend="torch"``: cuBLAS GEMM through torch,
  then the Triton bias/GELU or bias/residual/LayerNorm epilogue), the alternative the module
  switch selects;
- ``TorchOps``: the eager PyTorch path of ``colbert_triton.model.ops`` (what the CPU path runs);
- attention also against torch SDPA on already padded ``[B, heads, S, 32]`` tensors with a key
  mask (the padding itself not timed: the best case for a padded pipeline).

Floors: GEMMs count 2*T*N*K FLOPs against the measured tensor-core rate, and their operand and
result bytes against the measured copy bandwidth; attention counts 4 * sum_b(S_b * K_b) * hidden
FLOPs (QK^T and PV) and the qkv read plus context write; embeddings, LayerNorm and the head are
bytes only. Timings are fp16 unless the test id says bf16.

Skipped without CUDA (bench/conftest.py); it still imports and collects on a CPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import floor_ms

from colbert_triton.kernels import attention as attention_mod
from colbert_triton.kernels import embedding as embedding_mod
from colbert_triton.kernels import head as head_mod
from colbert_triton.kernels import linear as linear_mod
from colbert_triton.model.ops import PackedBatch, TorchOps

SUITE = "encoder-ops"
HIDDEN, HEADS, HEAD_DIM, FFN, DIM, VOCAB, POSITIONS = 384, 12, 32, 1536, 96, 30522, 512
EPS = 1e-12
TARGET_TOKENS = 16384
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
DEVICE = "cuda"  # a module constant so tests/test_bench_smoke.py can dry-run the cases on the CPU
# Other configurations of our own kernels, candidates for the defaults: reported beside ours,
# never as the best other implementation.
VARIANTS = ("cublas+triton-epilogue", "triton-rational-erf")


def _doc_lengths() -> list[int]:
    rng = np.random.default_rng(0)
    lengths, total = [], 0
    while total < TARGET_TOKENS:
        n = int(rng.integers(20, 301))
        lengths.append(n)
        total += n
    return lengths


def _query_lengths() -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1)
    return [32] * 512, rng.integers(5, 33, size=512).tolist()


def _make_batch(seq_lens, key_lens) -> PackedBatch:
    rng = np.random.default_rng(2)
    sequences = [rng.integers(1000, VOCAB, size=n) for n in seq_lens]
    return PackedBatch.from_sequences(sequences, key_lens, DEVICE)


def make_batches() -> dict[str, PackedBatch]:
    docs = _doc_lengths()
    query_lens, query_keys = _query_lengths()
    return {
        f"docs T={sum(docs)} ({len(docs)} x 20-300)": _make_batch(docs, docs),
        f"queries T={sum(query_lens)} ({len(query_lens)} x 32, 5-32 keys)": _make_batch(query_lens, query_keys),
    }


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def _randn(*shape, scale=1.0, shift=0.0, dtype=torch.float16):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _doc_batch(batches) -> tuple[str, PackedBatch]:
    return next((k, v) for k, v in batches.items() if k.startswith("docs"))


def _gemm_floor(t, n, k, itemsize=2, extra_bytes=0):
    return floor_ms(flops=2.0 * t * n * k, bytes_moved=itemsize * (t * k + n * k + t * n) + extra_bytes)


def _measure_all(measure, impls: dict, *, shape: str, floor, ours: str, **extra):
    """Run each implementation once and check it against the TorchOps output wherever the layout
    is the same (a benchmark never times a wrong answer), then time it."""
    floor_value, floor_kind = floor
    outputs = {name: fn().float().clone() for name, fn in impls.items()}  # out= buffers are reused
    torch.cuda.synchronize()
    reference = next(out for name, out in outputs.items() if name.startswith("TorchOps"))
    for name, got in outputs.items():
        if got.shape == reference.shape:  # SDPA on padded tensors has its own layout
            # Worst row's relative error: a few wrong rows (a mask, a sequence boundary) give ~1,
            # 16-bit rounding ~1e-2; a norm over the whole batch would hide the former.
            error = float(((got - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).max())
            assert error < 0.1, f"{shape}: {name} is off TorchOps by {error:.2e} (worst row, relative)"
    for name, fn in impls.items():
        measure(fn, suite=SUITE, shape=shape, impl=name, floor_ms=floor_value,
                floor_kind=floor_kind, ours=name == ours, variant=name in VARIANTS, **extra)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bench_embed_layernorm(measure, batches, dtype):
    label, batch = _doc_batch(batches)
    word, position = _randn(VOCAB, HIDDEN, scale=0.05, dtype=dtype), _randn(POSITIONS, HIDDEN, scale=0.02, dtype=dtype)
    token_type = _randn(HIDDEN, scale=0.02, dtype=dtype)
    ln_w, ln_b = _randn(HIDDEN, scale=0.1, shift=1.0, dtype=dtype), _randn(HIDDEN, scale=0.05, dtype=dtype)
    out = torch.empty(batch.num_tokens, HIDDEN, device=DEVICE, dtype=dtype)
    t = batch.num_tokens
    _measure_all(
        measure,
        {
            "triton": lambda: embedding_mod.embed_layernorm(batch.input_ids, batch.position_ids, word, position,
                                                            token_type, ln_w, ln_b, EPS, out=out),
            "TorchOps": lambda: TorchOps().embed(batch, word, position, token_type, ln_w, ln_b, EPS),
        },
        shape=f"embed {label} {_name(dtype)}",
        floor=floor_ms(bytes_moved=t * HIDDEN * 2 * 3 + t * 16),
        ours="triton", tokens=t,
    )


LINEAR_CASES = {
    # name: (N, K, activation)
    "qkv 384->1152": (3 * HIDDEN, HIDDEN, None),
    "ffn1 384->1536 +gelu": (FFN, HIDDEN, "gelu"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_bench_linear(measure, batches, case, dtype):
    n, k, activation = LINEAR_CASES[case]
    label, batch = _doc_batch(batches)
    t = batch.num_tokens
    x = _randn(t, k, dtype=dtype)
    weight, bias = _randn(n, k, scale=0.04, dtype=dtype), _randn(n, scale=0.02, dtype=dtype)
    out = torch.empty(t, n, device=DEVICE, dtype=dtype)
    impls = {
        "triton": lambda: linear_mod.linear(x, weight, bias, activation, out=out, backend="triton"),
        "cublas+triton-epilogue": lambda: linear_mod.linear(x, weight, bias, activation, out=out,
                                                            backend="torch"),
        "TorchOps": lambda: TorchOps().linear(x, weight, bias, activation),
    }
    if activation == "gelu":
        # The same fused GEMM with GELU's erf as a rational approximation (linear.GELU_ERF):
        # decides whether the exact-erf epilogue limits FFN-up (bench/NOTES.md).
        impls["triton-rational-erf"] = _with_gelu_erf("rational", impls["triton"])
    _measure_all(
        measure,
        impls,
        shape=f"{case} {label} {_name(dtype)}",
        floor=_gemm_floor(t, n, k),
        ours="triton", tokens=t,
    )


def _with_gelu_erf(erf: str, fn):
    def run():
        saved, linear_mod.GELU_ERF = linear_mod.GELU_ERF, erf
        try:
            return fn()
        finally:
            linear_mod.GELU_ERF = saved

    return run


LN_CASES = {
    "attn-out 384->384 +res+LN": (HIDDEN, HIDDEN),
    "ffn2 1536->384 +res+LN": (HIDDEN, FFN),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LN_CASES))
def test_bench_linear_residual_layernorm(measure, batches, case, dtype):
    n, k = LN_CASES[case]
    label, batch = _doc_batch(batches)
    t = batch.num_tokens
    x = _randn(t, k, dtype=dtype)
    weight, bias = _randn(n, k, scale=0.04, dtype=dtype), _randn(n, scale=0.02, dtype=dtype)
    residual = _randn(t, n, dtype=dtype)
    ln_w, ln_b = _randn(n, scale=0.1, shift=1.0, dtype=dtype), _randn(n, scale=0.05, dtype=dtype)
    out = torch.empty(t, n, device=DEVICE, dtype=dtype)
    args = (x, weight, bias, residual, ln_w, ln_b, EPS)
    _measure_all(
        measure,
        {
            "triton": lambda: linear_mod.linear_residual_layernorm(*args, out=out, backend="triton"),
            "cublas+triton-epilogue": lambda: linear_mod.linear_residual_layernorm(*args, out=out,
                                                                                   backend="torch"),
            "TorchOps": lambda: TorchOps().linear_residual_layernorm(*args),
        },
        shape=f"{case} {label} {_name(dtype)}",
        floor=_gemm_floor(t, n, k, extra_bytes=2 * t * n),
        ours="triton", tokens=t,
    )


def _padded_qkv(qkv, batch):
    """q, k, v as [B, heads, S, d] and the key mask [B, 1, 1, S], built once, outside the timing."""
    index = batch.padded_index()
    b, s = batch.num_seqs, batch.max_seqlen
    padded = qkv.new_zeros(b * s, 3 * HIDDEN).index_copy_(0, index, qkv)
    q, k, v = padded.view(b, s, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    keys = torch.arange(s, device=DEVICE)[None, :] < batch.key_lens[:, None]
    return q, k, v, keys[:, None, None, :]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["docs", "queries"])
def test_bench_varlen_attention(measure, batches, which, dtype):
    label, batch = next((k, v) for k, v in batches.items() if k.startswith(which))
    t = batch.num_tokens
    qkv = _randn(t, 3 * HIDDEN, scale=1.5, dtype=dtype)
    out = torch.empty(t, HIDDEN, device=DEVICE, dtype=dtype)
    q, k, v, key_mask = _padded_qkv(qkv, batch)
    pairs = float(np.sum(batch.seq_lens_host * batch.key_lens_host))
    impls = {
        "triton": lambda: attention_mod.varlen_attention(qkv, batch.cu_seqlens, batch.key_lens,
                                                         batch.max_seqlen, HEADS, HEAD_DIM, out=out),
        "TorchOps (pad+SDPA+unpad)": lambda: TorchOps().attention(qkv, batch, HEADS, HEAD_DIM),
        "SDPA on padded tensors": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask),
    }
    _measure_all(
        measure, impls,
        shape=f"attention {label} {_name(dtype)}",
        floor=floor_ms(flops=4.0 * pairs * HIDDEN, bytes_moved=2 * t * 4 * HIDDEN),
        ours="triton", tokens=t, max_seqlen=batch.max_seqlen,
        config=attention_mod.attention_config(HEAD_DIM, batch.max_seqlen, dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bench_project_normalize(measure, batches, dtype):
    label, batch = _doc_batch(batches)
    t = batch.num_tokens
    x = _randn(t, HIDDEN, dtype=dtype)
    weight = _randn(DIM, HIDDEN, scale=0.05, dtype=dtype)
    # Punctuation filter: keep about 88% of the rows.
    keep = torch.rand(t, device=DEVICE, generator=None) < 0.88
    rows = keep.nonzero().squeeze(1)
    r = rows.shape[0]
    out = torch.empty(r, DIM, device=DEVICE, dtype=dtype)
    _measure_all(
        measure,
        {
            "triton": lambda: head_mod.project_normalize(x, weight, None, rows, out=out),
            "TorchOps": lambda: TorchOps().project_normalize(x, weight, None, rows),
        },
        shape=f"head gather+384->96+L2 {label} {_name(dtype)}",
        floor=floor_ms(flops=2.0 * r * DIM * HIDDEN, bytes_moved=2 * (r * HIDDEN + r * DIM) + 8 * r),
        ours="triton", tokens=t, rows=r,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bench_encoder_layer(measure, batches, dtype):
    """One whole layer (5 ops) as the encoder runs it: TritonOps vs TorchOps."""
    from colbert_triton.model.ops import TritonOps

    label, batch = _doc_batch(batches)
    t = batch.num_tokens
    h = _randn(t, HIDDEN, dtype=dtype)

    def lin(n, k):
        return _randn(n, k, scale=0.04, dtype=dtype), _randn(n, scale=0.02, dtype=dtype)

    def ln():
        return _randn(HIDDEN, scale=0.1, shift=1.0, dtype=dtype), _randn(HIDDEN, scale=0.05, dtype=dtype)

    w_qkv, w_o, w_1, w_2, ln1, ln2 = lin(3 * HIDDEN, HIDDEN), lin(HIDDEN, HIDDEN), lin(FFN, HIDDEN), lin(HIDDEN, FFN), ln(), ln()

    def layer(ops):
        qkv = ops.linear(h, *w_qkv)
        ctx = ops.attention(qkv, batch, HEADS, HEAD_DIM)
        h1 = ops.linear_residual_layernorm(ctx, *w_o, h, *ln1, EPS)
        f = ops.linear(h1, *w_1, activation="gelu")
        return ops.linear_residual_layernorm(f, *w_2, h1, *ln2, EPS)

    pairs = float(np.sum(batch.seq_lens_host * batch.key_lens_host))
    flops = 2.0 * t * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 4.0 * pairs * HIDDEN
    bytes_moved = 2.0 * t * (HIDDEN + 3 * HIDDEN + 3 * HIDDEN + HIDDEN + 2 * HIDDEN + HIDDEN + FFN + FFN + 2 * HIDDEN)
    _measure_all(
        measure,
        {"TritonOps": lambda: layer(TritonOps()), "TorchOps": lambda: layer(TorchOps())},
        shape=f"layer {label} {_name(dtype)}",
        floor=floor_ms(flops=flops, bytes_moved=bytes_moved),
        ours="TritonOps", tokens=t,
    )
