"""End-to-end encoder throughput and latency: ours (Triton ops, PyTorch ops) vs HF BertModel and PyLate.

The model has answerai-colbert-small-v1's shape (12 layers, hidden 384, 12 heads of 32, FFN 1536,
384->96 head), built from the real MiniLM weights (layers reused cyclically), in float16.
Workloads: realistic mixed-length documents (20-300 tokens), full 512-token batches, query
batches (32 rows, [MASK] rows not attended), and the latency of one query and one document.
The floor is the tensor-core time of the FLOPs (42.5 MFLOP/token for the GEMMs + 4*S*H per
token per layer for attention).

Every implementation gets what PyLate gives HF: length-sorted batches of 64 sequences (padded to
the batch's longest for HF, packed for ours). Throughput is timed with CUDA events; latency and
end to end (tokenization included) by the wall clock with the GPU synchronised around each call.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from common import floor_ms  # noqa: E402

SUITE = "encoder"
PAD_BATCH = 64
# Module constants so tests/test_bench_smoke.py can dry-run the cases on the CPU.
DEVICE, DTYPE = "cuda", torch.float16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from checkpoints import build_stanford

    return build_stanford(tmp_path_factory.mktemp("bench") / "answerai-shape", num_layers=12, dim=96)


@pytest.fixture(scope="module")
def models(checkpoint):
    return load_models(checkpoint)


def load_models(checkpoint) -> dict:
    from colbert_triton import ColBERT

    models = {name: ColBERT.from_pretrained(checkpoint, device=DEVICE, dtype=DTYPE, backend=name)
              for name in ("triton", "torch")}
    # The float32 PyTorch path: the reference both 16-bit paths are checked against.
    models["reference"] = ColBERT.from_pretrained(checkpoint, device=DEVICE, dtype=torch.float32, backend="torch")
    return models


def check_against_reference(models, batch, got: torch.Tensor, impl: str) -> None:
    """Our 16-bit output must be as close to the float32 PyTorch path as the 16-bit PyTorch path
    is (within twice its worst-token error), or within cosine 0.999 of it.

    Two 16-bit runs of this 12-layer stack (MiniLM's 6 layers twice, on random token ids) drift
    apart by ~2e-3 in cosine on their worst tokens (predicted on the CPU, bench/NOTES.md "16-bit
    accuracy"), so a fixed bound against the 16-bit PyTorch path would fail on rounding alone;
    a wrong kernel is off by ~0.1 or more."""
    from colbert_triton.model.encoder import encode_packed

    with torch.inference_mode():
        reference = encode_packed(models["reference"].weights, batch, models["reference"].ops).float()
        eager = encode_packed(models["torch"].weights, batch, models["torch"].ops).float()

    def worst_error(x):
        return 1.0 - float(torch.nn.functional.cosine_similarity(x.float(), reference, dim=-1).min())

    error, eager_error = worst_error(got), worst_error(eager)
    assert error <= max(1e-3, 2.0 * eager_error), (
        f"{impl}: worst-token cosine error {error:.2e} vs the float32 path; the 16-bit PyTorch path's is {eager_error:.2e}")


def _flops(seq_lens, key_lens, cfg) -> float:
    """GEMMs per token, plus QK^T and PV over each sequence's rows x its attended keys."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    gemm = 2 * layers * (4 * h * h + 2 * h * inter)
    tokens = float(np.sum(seq_lens))
    pairs = float(np.sum(np.asarray(seq_lens, dtype=np.float64) * np.asarray(key_lens, dtype=np.float64)))
    return gemm * tokens + layers * 4 * h * pairs


def sorted_batches(sequences) -> list[np.ndarray]:
    """Indices of length-sorted batches of PAD_BATCH sequences, longest first, as PyLate (and
    our encode_*) batch texts: every implementation of a workload runs the same batches."""
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    return [order[lo : lo + PAD_BATCH] for lo in range(0, len(order), PAD_BATCH)]


def make_workloads(num_docs=1024, doc_lens=(20, 300), num_full=64, full_len=512, num_queries=1024):
    rng = np.random.default_rng(0)
    vocab = np.arange(1999, 29000)
    docs = [np.concatenate([[101, 2], rng.choice(vocab, n - 3), [102]])
            for n in rng.integers(doc_lens[0], doc_lens[1] + 1, num_docs)]
    full = [np.concatenate([[101, 2], rng.choice(vocab, full_len - 3), [102]]) for _ in range(num_full)]
    q_keys = rng.integers(5, 33, num_queries)
    queries = [np.concatenate([[101, 1], rng.choice(vocab, k - 3), [102], [103] * (32 - k)]) for k in q_keys]
    return {
        f"docs {num_docs} x {doc_lens[0]}-{doc_lens[1]} tok": (docs, [len(s) for s in docs]),
        f"docs {num_full} x {full_len} tok": (full, [full_len] * num_full),
        f"queries {num_queries} x 32 tok": (queries, list(q_keys)),
    }


WORKLOADS = make_workloads()
E2E_TEXTS, E2E_WORDS = 1024, (15, 290)  # test_documents_end_to_end's texts and their lengths
# test_pooled_documents_end_to_end: fewer texts (pooling takes ~1.4 ms a document on one core).
POOLED_TEXTS, POOL_FACTOR, POOLING_PROCESSES = 256, 2, 8
POOLED_BATCH_DOCS, POOLED_BATCH_ROWS = PAD_BATCH, (20, 300)  # test_pooled_batch_alone's batch


def e2e_texts(count: int) -> list[str]:
    """``count`` documents of E2E_WORDS words (the same texts for every implementation)."""
    rng = np.random.default_rng(1)
    words = ["retrieval", "late", "interaction", "token", "vector", "document", "query", "paris",
             "model", "index", "score", "kernel", "memory", "bandwidth", "fast", "exact"]
    return [" ".join(rng.choice(words, n)) for n in rng.integers(*E2E_WORDS, count)]


def _hf_runner(checkpoint, attn: str):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(checkpoint), attn_implementation=attn,
                                                dtype=DTYPE).to(DEVICE).eval()

    def prepare(sequences, key_lens):
        batches = []
        for idx in sorted_batches(sequences):
            ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(sequences[i]) for i in idx], batch_first=True)
            mask = (torch.arange(ids.shape[1])[None] < torch.tensor([key_lens[i] for i in idx])[:, None]).long()
            batches.append((ids.to(DEVICE), mask.to(DEVICE)))

        def run():
            with torch.inference_mode():
                for ids, mask in batches:
                    hf(input_ids=ids, attention_mask=mask)

        return run

    return prepare


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("impl", ["ours-triton", "ours-torch", "hf-sdpa", "hf-eager", "ours-triton-one-batch"])
def test_encoder_throughput(measure, models, checkpoint, workload, impl):
    """Every implementation encodes the same length-sorted batches of 64 sequences (token ids
    prepared outside the timing: padded for HF, packed for ours). ``ours-triton-one-batch``, the
    whole workload as one packed batch, is a variant: what packing allows beyond 64 sequences."""
    from colbert_triton.model.encoder import encode_packed
    from colbert_triton.model.ops import PackedBatch

    sequences, key_lens = WORKLOADS[workload]
    model = models["triton"]
    seq_lens = [len(s) for s in sequences]
    tokens = int(np.sum(seq_lens))
    floor, kind = floor_ms(flops=_flops(seq_lens, key_lens, model.weights.config))
    if impl.startswith("ours"):
        m = models[impl.split("-")[1]]
        groups = [np.arange(len(sequences))] if impl.endswith("one-batch") else sorted_batches(sequences)
        batches = [PackedBatch.from_sequences([sequences[i] for i in idx], [key_lens[i] for i in idx], DEVICE)
                   for idx in groups]
        for batch in batches:
            with torch.inference_mode():
                got = encode_packed(m.weights, batch, m.ops)
            check_against_reference(models, batch, got, impl)

        def run():
            with torch.inference_mode():
                for batch in batches:
                    encode_packed(m.weights, batch, m.ops)
    else:
        run = _hf_runner(checkpoint, impl.split("-")[1])(sequences, key_lens)
    measure(run, suite=SUITE, shape=workload, impl=impl, floor_ms=floor, floor_kind=kind,
            ours=impl == "ours-triton", variant=impl.endswith("one-batch"), tokens=tokens)


def pylate_model(checkpoint, dtype=DTYPE):
    pylate_models = pytest.importorskip("pylate.models")
    return pylate_models.ColBERT(model_name_or_path=str(checkpoint), device=DEVICE, model_kwargs={"dtype": dtype})


PYLATE_IMPLS = ("pylate", "ours-pylate-patched")  # PyLate's encode: as it is, and under patch_pylate


@contextlib.contextmanager
def patched_pylate(impl: str, checkpoint=None, texts=None):
    """For ``ours-pylate-patched`` (a variant), PyLate's own encode under
    ``patch_pylate(backend="triton")``: its BERT trunk on our Triton encoder (its pooling on our
    kernels); PyLate's tokenization, Dense, masks and batching as they are. Given ``texts``,
    their rows are checked first as ours are (`check_against_reference`'s rule, against
    PyLate's float32 rows, beside PyLate's own 16-bit rows)."""
    if impl != "ours-pylate-patched":
        yield
        return
    from colbert_triton.pylate import patch_pylate, unpatch_pylate

    def rows(model):
        return torch.cat([torch.as_tensor(r).float().cpu() for r in model.encode(
            texts, is_query=False, batch_size=PAD_BATCH, show_progress_bar=False)])

    if texts is not None:
        model = pylate_model(checkpoint)  # its rows before the patch, then under it
        reference, own = rows(pylate_model(checkpoint, torch.float32)), rows(model)
    patch_pylate(backend="triton")
    try:
        if texts is not None:
            def worst_error(x):
                return 1.0 - float(torch.nn.functional.cosine_similarity(x, reference, dim=-1).min())

            error, own_error = worst_error(rows(model)), worst_error(own)
            assert error <= max(1e-3, 2.0 * own_error), (
                f"{impl}: worst-token cosine error {error:.2e} vs PyLate in float32; PyLate's own is {own_error:.2e}")
        yield
    finally:
        unpatch_pylate()


LATENCY_TEXTS = {
    "1 query": ("what is the capital of france?", True),
    "1 document ~200 tok": (" ".join(["late interaction retrieval keeps one vector per token"] * 25), False),
}


@pytest.mark.parametrize("case", list(LATENCY_TEXTS))
@pytest.mark.parametrize("impl", ["ours-triton", "ours-torch", *PYLATE_IMPLS])
def test_latency_end_to_end(measure, models, checkpoint, case, impl):
    """Tokenize + encode one text, as a user calls it."""
    text, is_query = LATENCY_TEXTS[case]
    if impl in PYLATE_IMPLS:
        pm = pylate_model(checkpoint)

        def run():
            pm.encode([text], is_query=is_query, show_progress_bar=False, convert_to_tensor=True)
    else:
        m = models[impl.split("-")[1]]
        encode = m.encode_queries if is_query else m.encode_documents

        def run():
            encode([text], show_progress=False)
    # By the wall clock, the GPU synchronised around each call: the caller waits for the result.
    with patched_pylate(impl):
        measure(run, suite=SUITE + "-latency", shape=case, impl=impl, ours=impl == "ours-triton",
                variant=impl == "ours-pylate-patched", wall=True)


@pytest.mark.parametrize("impl", ["ours-triton", "ours-torch", "pylate", "ours-triton-to-host", "ours-pylate-patched"])
def test_documents_end_to_end(measure, models, checkpoint, impl):
    """encode_documents on 1024 texts of mixed length, tokenization included. ``-to-host`` (a
    variant) moves each batch to host memory as it is encoded (``output_device="cpu"``, as the
    CLI's ``encode`` does): what a corpus larger than the GPU costs. ``ours-pylate-patched`` (a
    variant): PyLate's encode with its trunk on our encoder (`patched_pylate`)."""
    texts = e2e_texts(E2E_TEXTS)
    if impl in PYLATE_IMPLS:
        pm = pylate_model(checkpoint)

        def run():
            pm.encode(texts, is_query=False, batch_size=PAD_BATCH, show_progress_bar=False,
                      convert_to_tensor=True)  # left on the GPU, as ours
    else:
        m = models[impl.split("-")[1]]
        output_device = "cpu" if impl.endswith("to-host") else None

        def run():
            m.encode_documents(texts, batch_size=PAD_BATCH, packed=True, show_progress=False,
                               output_device=output_device)
    tokens = sum(len(s) for s in models["triton"].tokenizer.documents(texts).sequences)  # encoder input
    with patched_pylate(impl, checkpoint, texts[:PAD_BATCH]):
        measure(run, suite=SUITE + "-e2e", shape=f"{E2E_TEXTS} texts {E2E_WORDS[0]}-{E2E_WORDS[1]} words",
                impl=impl, ours=impl == "ours-triton", variant=impl.endswith(("to-host", "patched")), wall=True,
                tokens=tokens)


@pytest.fixture(scope="module")
def pooling_processes():
    """Started once for the suite, as a user keeps them across calls (starting takes ~1.5 s)."""
    from colbert_triton.model.pooling import PoolingProcesses

    with PoolingProcesses(POOLING_PROCESSES) as workers:
        yield workers


def _pooled_batch(dim=96, seed=0):
    """One encoder batch as the pooling sees it: POOLED_BATCH_DOCS documents of POOLED_BATCH_ROWS
    rows (the e2e texts' range), unit rows drawn around a few centres each (as a text's tokens
    cluster)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(POOLED_BATCH_ROWS[0], POOLED_BATCH_ROWS[1] + 1, size=POOLED_BATCH_DOCS)
    documents = []
    for n in lengths:
        centres = rng.standard_normal((max(1, n // 8), dim))
        documents.append(centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim)))
    values = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(documents)).float(), dim=1)
    return values, lengths


@pytest.mark.parametrize("impl", ["ours-triton", "ours-host", "ours-host-processes", "pylate"])
def test_pooled_batch_alone(measure, pooling_processes, impl):
    """Token pooling of one batch of 64 documents (pool factor 2), nothing else: the kernels
    (`kernels.pooling.pool_documents`, float16 rows on the GPU, until the lengths are read),
    the host's SciPy pooling in this process or POOLING_PROCESSES worker processes, and PyLate's
    `pool_embeddings_hierarchical` (float32 rows on the GPU, as its encode hands them)."""
    from colbert_triton.kernels import pooling as pooling_kernels
    from colbert_triton.model import pooling as host_pooling

    values, lengths = _pooled_batch()
    if impl == "ours-triton":
        rows = values.to(DEVICE, torch.float16)
        # Checked against the host's pooling of the same rows: the same lengths, and the same
        # means but for a rare document whose last-bit distances tie differently (README).
        pooled, pooled_lengths = pooling_kernels.pool_documents(rows, lengths, POOL_FACTOR, 1).result()
        expected, expected_lengths = host_pooling.pool_documents(rows.cpu().float(), lengths, POOL_FACTOR, 1)
        assert pooled_lengths.tolist() == expected_lengths.tolist()
        same = [torch.allclose(a.float(), b, atol=1e-3, rtol=0) for a, b in
                zip(torch.split(pooled.cpu(), pooled_lengths.tolist()), torch.split(expected, expected_lengths.tolist()))]
        assert sum(same) >= 0.9 * len(same), f"{len(same) - sum(same)} of {len(same)} documents pooled otherwise"

        def run():
            pooling_kernels.pool_documents(rows, lengths, POOL_FACTOR, 1).result()
    elif impl.startswith("ours-host"):
        processes = pooling_processes if impl.endswith("processes") else None

        def run():
            host_pooling.pool_documents(values, lengths, POOL_FACTOR, 1, processes)
    else:
        from pylate.models import ColBERT as PyLateColBERT

        documents = list(torch.split(values.to(DEVICE), lengths.tolist()))

        def run():
            PyLateColBERT.pool_embeddings_hierarchical(None, documents, pool_factor=POOL_FACTOR, protected_tokens=1)
    shape = (f"one batch: {POOLED_BATCH_DOCS} documents of {POOLED_BATCH_ROWS[0]}-{POOLED_BATCH_ROWS[1]} rows, "
             f"pool factor {POOL_FACTOR}")
    measure(run, suite=SUITE + "-pooled", shape=shape, impl=impl, ours=impl == "ours-triton", variant=impl.startswith("ours-host"),
            wall=True, tokens=int(lengths.sum()))


@pytest.mark.parametrize("impl", ["ours-triton", "ours-triton-host", "ours-triton-processes", "ours-triton-then-pool",
                                  *PYLATE_IMPLS])
def test_pooled_documents_end_to_end(measure, models, checkpoint, pooling_processes, monkeypatch, impl):
    """encode_documents with PyLate's token pooling (pool_factor 2), tokenization included: ours
    pools each batch on the GPU right behind the encoder (the Triton backend's pooling kernels);
    the variants pool on the host while the GPU encodes the next batch (``-host``: in this
    process, ``-processes``: in POOLING_PROCESSES worker processes), or encode everything first
    and pool it after (``-then-pool``: what the overlap saves); PyLate pools each batch on the
    host before encoding the next (``ours-pylate-patched``: on our encoder and kernels)."""
    from colbert_triton.model.pooling import pool_documents

    texts = e2e_texts(POOLED_TEXTS)
    if impl in PYLATE_IMPLS:
        pm = pylate_model(checkpoint)

        def run():
            pm.encode(texts, is_query=False, batch_size=PAD_BATCH, show_progress_bar=False, pool_factor=POOL_FACTOR)
    else:
        m = models["triton"]
        if impl != "ours-triton":  # the host's SciPy pooling behind the Triton encoder
            monkeypatch.setattr(m, "_pools_on_device", lambda protected_tokens: False)
        encode = functools.partial(m.encode_documents, texts, batch_size=PAD_BATCH, packed=True, show_progress=False)
        if impl == "ours-triton-then-pool":
            def run():
                corpus = encode()
                pool_documents(corpus.values, corpus.lengths_array, POOL_FACTOR, 1)
        else:
            processes = pooling_processes if impl.endswith("processes") else 0

            def run():
                encode(pool_factor=POOL_FACTOR, pooling_processes=processes)
    tokens = sum(len(s) for s in models["triton"].tokenizer.documents(texts).sequences)  # encoder input
    with patched_pylate(impl):
        measure(run, suite=SUITE + "-pooled", shape=f"{POOLED_TEXTS} texts {E2E_WORDS[0]}-{E2E_WORDS[1]} words, pool "
                f"factor {POOL_FACTOR}", impl=impl, ours=impl == "ours-triton",
                variant=impl not in ("pylate", "ours-triton"), wall=True, tokens=tokens)
