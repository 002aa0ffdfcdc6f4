"""CUDA-graph buckets: a small batch padded into a bucket gives the same rows as the eager forward.

Without a GPU the padded bucket runs eagerly on the Triton interpreter (no capture), which
checks the padding layout (empty sequence slots, the dummy sequence, the static row index); on
a GPU the captured graphs are replayed and compared with the eager path.
"""

import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE

from colbert_triton import ColBERT
from colbert_triton.model.encoder import encode_packed
from colbert_triton.model.graphs import GraphedEncoder
from colbert_triton.model.ops import PackedBatch, TorchOps, TritonOps

TEXTS = ["Hello World!", "Venus is often called Earth's twin.", "x"]


@pytest.fixture(scope="module")
def torch_model(stanford_dir):
    return ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, dtype=torch.float32, backend="torch")


def _rows(tokens):
    if tokens.keep is None:
        return None
    starts = np.concatenate([[0], np.cumsum([len(s) for s in tokens.sequences])[:-1]])
    return np.concatenate([s + k for s, k in zip(starts, tokens.keep)])


def _reference(model, tokens):
    batch = PackedBatch.from_sequences(tokens.sequences, tokens.key_lens, KERNEL_DEVICE)
    rows = _rows(tokens)
    rows = None if rows is None else torch.from_numpy(rows).to(KERNEL_DEVICE)
    with torch.inference_mode():
        return encode_packed(model.weights, batch, TorchOps(), rows=rows)


@pytest.mark.parametrize("kind", ["documents", "queries"])
def test_padded_bucket_matches_eager(torch_model, kind):
    tokens = getattr(torch_model.tokenizer, kind)(TEXTS[:2] if kind == "queries" else TEXTS)
    expected = _reference(torch_model, tokens)
    # A bucket with room to spare, and one the batch fills exactly (tokens and sequences: a
    # bucket holds up to and including its sizes).
    exact = (sum(len(s) for s in tokens.sequences), len(tokens.sequences))
    for bucket in ((96, 4), exact):
        graphed = GraphedEncoder(torch_model.weights, TritonOps(), torch.device(KERNEL_DEVICE),
                                 buckets=(bucket,), capture=False)
        with torch.inference_mode():
            got = graphed.run(tokens.sequences, tokens.key_lens, _rows(tokens))
        assert got is not None and got.shape == expected.shape, bucket
        cosine = torch.nn.functional.cosine_similarity(got.float(), expected.float(), dim=-1)
        assert float(cosine.min()) >= 0.9999
    graphed = GraphedEncoder(torch_model.weights, TritonOps(), torch.device(KERNEL_DEVICE),
                             buckets=((96, 4),), capture=False)
    assert graphed.run([np.zeros(97, dtype=np.int64)], np.array([97]), None) is None
    assert graphed.run([np.zeros(2, dtype=np.int64)] * 5, np.full(5, 2), None) is None


def test_bucket_buffers_are_16_byte_aligned(torch_model):
    """Triton specialises pointer arguments on 16-byte alignment: bucket views that were not
    aligned would compile kernel variants of their own at load."""
    graphed = GraphedEncoder(torch_model.weights, TritonOps(), torch.device(KERNEL_DEVICE),
                             buckets=((64, 2), (96, 4), (128, 5), (256, 8)), capture=False)
    for bucket in graphed.buckets:
        batch = bucket.batch
        for tensor in (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.key_lens,
                       bucket.rows):
            assert tensor.data_ptr() % 16 == 0, (bucket.num_tokens, bucket.num_seqs)


def test_buckets_need_the_triton_ops(torch_model):
    with pytest.raises(ValueError, match="Triton ops"):
        GraphedEncoder(torch_model.weights, TorchOps(), torch.device(KERNEL_DEVICE), buckets=((64, 2),),
                       capture=False)


def test_concurrent_calls_do_not_share_a_bucket(torch_model, monkeypatch):
    """Two threads on one model: each call holds the bucket from its fill to its output's copy
    (without that, thread A's forward read thread B's ids from the shared buffers)."""
    started = threading.Event()

    def slow_forward(bucket, weights, ops):  # a wide window between the fill and the copy-out
        started.set()
        threading.Event().wait(0.05)
        return bucket.dev_long[: bucket.num_tokens].clone().float()[:, None]

    monkeypatch.setattr("colbert_triton.model.graphs._Bucket.forward", slow_forward)
    graphed = GraphedEncoder(torch_model.weights, TritonOps(), torch.device("cpu"), buckets=((64, 2),),
                             capture=False)
    seen = {}

    def call(token):
        seen[token] = graphed.run([np.full(32, token)], np.array([32]), None)[:, 0].unique().tolist()

    first = threading.Thread(target=call, args=(1111,))
    first.start()
    started.wait()
    second = threading.Thread(target=call, args=(2222,))
    second.start()
    first.join()
    second.join()
    assert seen == {1111: [1111.0], 2222: [2222.0]}


def _count_replays(model, monkeypatch) -> list[int]:
    replays = [0]
    for bucket in model._graphs.buckets:
        graph = bucket.graph

        class Counted:
            def replay(self, graph=graph):
                replays[0] += 1
                graph.replay()

        monkeypatch.setattr(bucket, "graph", Counted())
    return replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_captured_graphs_match_eager(stanford_dir, torch_model, dtype, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that failed and fell back to eager
        graphed = ColBERT.from_pretrained(stanford_dir, device="cuda", dtype=dtype, backend="triton")
    eager = ColBERT.from_pretrained(stanford_dir, device="cuda", dtype=dtype, backend="triton",
                                    cuda_graphs=False)
    assert graphed._graphs is not None and eager._graphs is None
    replays = _count_replays(graphed, monkeypatch)
    # A bucket and the eager batch may take different attention tiles (chosen by the bucket's
    # size, or the batch's longest sequence), so their 16-bit roundings differ, by about the
    # dtype's epsilon: 2e-3 in float16, 8x that in bfloat16 (3 fewer mantissa bits). A stale
    # buffer or a wrong padding row moves embeddings by ~0.1.
    atol = 2e-3 * torch.finfo(dtype).eps / torch.finfo(torch.float16).eps
    rng = np.random.default_rng(0)
    words = "late interaction keeps one vector per token and sums the best matches".split()
    for n in (1, 2, 3, 7, 16, 40, 16, 3, 1):  # buckets refilled with smaller batches too
        texts = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(n)]
        for encode in ("encode_queries", "encode_documents"):
            a = getattr(graphed, encode)(texts)
            b = getattr(eager, encode)(texts)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert replays[0] >= 18, replays  # each of those batches fits a bucket
    # Back-to-back calls must not see each other's buffers.
    first = graphed.encode_queries(["first query"])[0]
    graphed.encode_queries(["a different second query"])
    torch.testing.assert_close(first, eager.encode_queries(["first query"])[0], atol=atol, rtol=0)
    # Nor calls made on other streams, unsynchronised: the model's stream orders them.
    texts = [["first query"], ["a different second query"], ["a third, longer query about late interaction"]]
    expected = [eager.encode_queries(t)[0] for t in texts]
    streams = [torch.cuda.Stream() for _ in texts]
    outputs = []
    for _ in range(3):
        for stream, t in zip(streams, texts):
            with torch.cuda.stream(stream):
                outputs.append(graphed.encode_queries(t)[0])
    torch.cuda.synchronize()
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, expected[i % len(texts)], atol=atol, rtol=0)


def test_the_smallest_fitting_bucket_is_chosen(torch_model):
    """Buckets are kept smallest first whatever order they are given in, and a batch takes the
    smallest bucket it fits (tokens and sequences both up to and including the bucket's sizes): a
    larger bucket gives the same rows but runs every kernel over all of its padding."""
    graphed = GraphedEncoder(torch_model.weights, TritonOps(), torch.device(KERNEL_DEVICE),
                             buckets=((256, 8), (64, 2), (128, 4)), capture=False)
    assert [(b.num_tokens, b.num_seqs) for b in graphed.buckets] == [(64, 2), (128, 4), (256, 8)]
    assert graphed.bucket_for(64, 2) is graphed.buckets[0]
    assert graphed.bucket_for(1, 1) is graphed.buckets[0]
    assert graphed.bucket_for(65, 1) is graphed.buckets[1]
    assert graphed.bucket_for(10, 3) is graphed.buckets[1]
    assert graphed.bucket_for(200, 8) is graphed.buckets[2]
    assert graphed.bucket_for(257, 1) is None and graphed.bucket_for(8, 9) is None


def test_float16_bucket_longer_than_64_tokens(torch_model):
    """A 16-bit bucket of more than 64 tokens runs attention in 128-row tiles (attention_config of
    the bucket's token count): its static tile table must be built for that tile height, or the
    launch refuses it."""
    tokens = torch_model.tokenizer.documents(TEXTS)
    graphed = GraphedEncoder(torch_model.weights.to(KERNEL_DEVICE, torch.float16), TritonOps(),
                             torch.device(KERNEL_DEVICE), buckets=((128, 4),), capture=False)
    with torch.inference_mode():
        got = graphed.run(tokens.sequences, tokens.key_lens, _rows(tokens))
    expected = _reference(torch_model, tokens)
    assert got is not None and got.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(got.float(), expected.float(), dim=-1)
    assert float(cosine.min()) >= 0.999
