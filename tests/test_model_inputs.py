"""How the model treats bad or unusual text input."""

import threading
import time

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE
from texts import DOCUMENTS, LONG, QUERIES

from colbert_triton import ColBERT


def test_non_string_inputs_are_rejected(model):
    with pytest.raises(TypeError, match=r"documents\[1\] is NoneType"):
        model.encode_documents(["ok", None])
    with pytest.raises(TypeError, match=r"queries\[0\] is int"):
        model.encode_queries([3])
    with pytest.raises(TypeError, match="single string"):
        model.encode_queries("a bare string")
    with pytest.raises(TypeError, match="list of strings"):
        model.encode_documents(42)
    with pytest.raises(TypeError, match=r"documents\[1\] is int, expected str"):
        model.score(["a query"], ["a document", 3])  # texts with a stray non-text: that one named
    with pytest.raises(TypeError, match="got a dict"):
        model.encode_documents({"id1": "a text"})
    # A lone surrogate (e.g. from a badly decoded file) is named before anything is encoded.
    with pytest.raises(ValueError, match=r"documents\[1\] is not valid Unicode"):
        model.encode_documents(["fine", "broken \ud800 text"])


def test_empty_list_and_bad_batch_size(model):
    with pytest.raises(ValueError, match="empty"):
        model.encode_documents([])
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            model.encode_queries(["x"], batch_size=bad)
    assert len(model.encode_queries(["x", "y"], batch_size=np.int64(1))) == 2


def test_long_text_is_truncated_like_the_references(model):
    tokens = model.tokenizer.documents([LONG * 5])
    assert len(tokens.sequences[0]) == 300
    assert tokens.sequences[0][-1] == 102
    q = model.tokenizer.queries([LONG])
    assert len(q.sequences[0]) == 32 and q.key_lens[0] == 32 and q.sequences[0][-1] == 102


def test_query_rows_are_unit_vectors_and_mask_rows_computed(model):
    q = model.encode_queries(["short"])[0]
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(32))


def test_score_accepts_texts(model):
    direct = model.score(["a query"], ["first doc", "second doc"])
    embedded = model.score(model.encode_queries(["a query"]), model.encode_documents(["first doc", "second doc"]))
    torch.testing.assert_close(direct, embedded)
    ranked = model.rerank("a query", ["first doc", "second doc"])
    assert sorted(i for i, _ in ranked) == [0, 1]
    scores, index = model.search(["a query", "another"], ["x", "y", "z"], k=2)
    assert scores.shape == index.shape == (2, 2)
    torch.testing.assert_close(model.score(np.array(["a query"]), np.array(["first doc", "second doc"])),
                               direct)


def test_bad_k_is_rejected_before_encoding(model, monkeypatch):
    monkeypatch.setattr(model, "encode_documents", lambda *a, **k: pytest.fail("encoded before checking k"))
    for bad_k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.rerank("a query", ["doc"], k=bad_k)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.search(["a query"], ["doc"], k=bad_k)


def test_progress_bar_can_be_switched(model, capsys):
    model.encode_documents(["a"] * 20, batch_size=2, show_progress=True)
    assert "Encoding" in capsys.readouterr().err
    model.encode_documents(["a"] * 20, batch_size=2, show_progress=False)
    assert "Encoding" not in capsys.readouterr().err


def test_chunked_encoding_matches_texts_one_at_a_time(model):
    """Several tokenizer chunks (batch_size 2: chunks of 8 texts, tokenized ahead in a worker
    thread), sorted by characters across chunks and by tokens within one, come back in input order."""
    texts = [*DOCUMENTS, "", "!!!", LONG, "one", *DOCUMENTS[:3]]
    alone = [model.encode_documents([t])[0] for t in texts]
    listed = model.encode_documents(texts, batch_size=2)
    packed = model.encode_documents(texts, batch_size=2, packed=True)
    assert len(listed) == len(texts) and packed.offsets.tolist() == np.cumsum([0] + [len(a) for a in alone]).tolist()
    for i, expected in enumerate(alone):
        torch.testing.assert_close(listed[i], expected, atol=1e-5, rtol=0, msg=texts[i])
        torch.testing.assert_close(packed[i], expected, atol=1e-5, rtol=0, msg=texts[i])
    queries = model.encode_queries(QUERIES, batch_size=1)
    for text, q in zip(QUERIES, queries):
        torch.testing.assert_close(q, model.encode_queries([text])[0], atol=1e-5, rtol=0, msg=text)


def test_an_error_mid_corpus_stops_the_tokenizer_thread(model, monkeypatch):
    calls = []
    tokenize = model.tokenizer.documents

    def slow_tokenize(texts, **options):
        calls.append(len(texts))
        time.sleep(0.02)
        return tokenize(texts, **options)

    def failing_batch(part):
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(model.tokenizer, "documents", slow_tokenize)
    monkeypatch.setattr(model, "_encode_batch", failing_batch)
    with pytest.raises(RuntimeError, match="encoder failed") as failure:
        model.encode_documents(["a text"] * 200, batch_size=1, show_progress=True)  # 50 chunks of 4
    assert len(calls) <= 2  # the failing chunk and the one tokenized ahead of it
    assert not [t for t in threading.enumerate() if t.name.startswith("colbert-tokenize")]
    from tqdm import tqdm

    # The bar was closed, not left to the garbage collector (the traceback still holds it).
    assert failure.tb is not None and not [bar for bar in tqdm._instances if bar.desc == "Encoding"]


def test_tokenization_runs_one_chunk_ahead_of_the_encoder(model, monkeypatch):
    """The worker tokenizes the next chunk while a chunk is encoded, never the whole corpus
    ahead (it would sit in host memory)."""
    started, seen_at_batch = [], []
    tokenize = model.tokenizer.documents
    encode_batch = model._encode_batch

    def counting_tokenize(texts, **options):
        started.append(len(texts))
        return tokenize(texts, **options)

    def slow_batch(part):
        time.sleep(0.005)  # the encoder's time: the worker could run far ahead meanwhile
        seen_at_batch.append(len(started))
        return encode_batch(part)

    monkeypatch.setattr(model.tokenizer, "documents", counting_tokenize)
    monkeypatch.setattr(model, "_encode_batch", slow_batch)
    model.encode_documents([f"text {i}" for i in range(40)], batch_size=1)  # 10 chunks of 4
    assert len(started) == 10
    for batch, chunks_started in enumerate(seen_at_batch):
        assert chunks_started <= batch // 4 + 2, seen_at_batch  # this chunk and the next


def test_one_chunk_is_tokenized_without_a_thread(model, monkeypatch):
    import colbert_triton.model.colbert as colbert_module

    def no_threads(*args, **kwargs):
        raise AssertionError("a thread for a single chunk")

    monkeypatch.setattr(colbert_module, "ThreadPoolExecutor", no_threads)
    assert len(model.encode_documents(["first", "second", "third"])) == 3
    assert len(model.encode_queries(["a query"])) == 1


def test_progress_bar_shows_by_default_past_eight_batches(model, capsys):
    """show_progress=None: a bar for more than 8 batches, none for 8."""
    model.encode_documents(["a"] * 16, batch_size=2)  # 8 batches
    assert "Encoding" not in capsys.readouterr().err
    model.encode_documents(["a"] * 17, batch_size=2)  # 9 batches
    assert "Encoding" in capsys.readouterr().err


def test_a_triton_model_scores_with_triton(stanford_dir, monkeypatch):
    """backend="triton" is the ops for encoding and scoring (README, --backend): score, rerank and
    search pass it on. (backend=None would take the PyTorch path for CUDA inputs.)"""
    from colbert_triton import scoring

    model = ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, backend="triton", cuda_graphs=False)
    seen = []
    for name in ("score", "rerank", "search"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, real=real, **k: seen.append(k["backend"]) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    q = [torch.nn.functional.normalize(torch.randn(4, 96, generator=gen), dim=-1).to(model.device, model.dtype)]
    d = [torch.nn.functional.normalize(torch.randn(n, 96, generator=gen), dim=-1).to(model.device, model.dtype)
         for n in (3, 5)]
    model.score(q, d), model.rerank(q, d), model.search(q, d, k=1)
    assert seen == ["triton"] * 3


@pytest.mark.parametrize("pool_factor", [1, 2])
def test_output_device_keeps_the_encoded_corpus_on_the_host(stanford_dir, pool_factor):
    """Each batch moved to the host as it is encoded: the same values (to the bit) as encoding
    on the model's device, in its dtype; on a GPU, the device never holds the whole corpus."""
    dtype = torch.float16 if KERNEL_DEVICE == "cuda" else torch.float32  # float16 is slow on the CPU
    model = ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, dtype=dtype)
    texts = [" ".join(["late interaction keeps one vector per token"] * (1 + i % 9)) for i in range(48)]
    kwargs = {"batch_size": 8, "pool_factor": pool_factor} if pool_factor > 1 else {"batch_size": 8}
    if KERNEL_DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    on_device = model.encode_documents(texts, packed=True, **kwargs)
    if KERNEL_DEVICE == "cuda":
        device_peak = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() + on_device.values.nbytes
        torch.cuda.reset_peak_memory_stats()
    on_host = model.encode_documents(texts, packed=True, output_device="cpu", **kwargs)
    listed = model.encode_documents(texts, output_device="cpu", **kwargs)
    queries = model.encode_queries(texts[:9], batch_size=4, packed=True, output_device="cpu")
    assert on_host.values.device.type == "cpu" and on_host.values.dtype == dtype
    assert on_host.lengths_host == on_device.lengths_host
    assert torch.equal(on_host.values, on_device.values.cpu())
    assert all(item.device.type == "cpu" for item in listed)
    assert torch.equal(torch.cat(listed), on_host.values)
    assert queries.values.device.type == "cpu"
    assert torch.equal(queries.values, model.encode_queries(texts[:9], batch_size=4, packed=True).values.cpu())
    if KERNEL_DEVICE == "cuda":  # the host run's peak leaves out most of the corpus
        host_peak = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        assert host_peak < device_peak - on_device.values.nbytes // 2, (host_peak, device_peak)
        assert not on_host.values.is_pinned()  # copied out of the pinned staging memory


def test_output_device_must_be_the_models_or_the_host(model):
    assert model.encode_documents(["a text"], output_device=model.device)[0].device == model.device
    with pytest.raises(ValueError, match="device must be like 'cpu', 'cuda' or 'cuda:1', got 'gpu'"):
        model.encode_documents(["a text"], output_device="gpu")
    with pytest.raises(ValueError, match="device must be a CPU or a CUDA device, got meta"):
        model.encode_queries(["a text"], output_device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            model.encode_documents(["a text"], output_device="cuda")
