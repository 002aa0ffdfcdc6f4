"""The public scoring API (all pairs, candidates, pairs, search, rerank) against an fp64 reference."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import KERNEL_DEVICE

from colbert_triton import PackedEmbeddings, rerank, score, score_candidates, score_pairwise, search
from colbert_triton.scoring import maxsim_torch

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("colbert_triton.kernels.maxsim") else [])


def reference(queries, documents):
    """Σ_i max_j <q_i, d_j> in float64; an empty document scores 0."""
    out = torch.zeros(len(queries), len(documents), dtype=torch.float64)
    for a, q in enumerate(queries):
        for b, d in enumerate(documents):
            if len(d):
                out[a, b] = (q.double().cpu() @ d.double().cpu().T).max(1).values.sum()
    return out


def random_docs(generator, lengths, dim, dtype=torch.float32, device="cpu"):
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device, dtype)
            for n in lengths]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    """The Triton backend runs on the GPU when there is one, else in the interpreter on the CPU."""
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def close(actual, expected, **kwargs):
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=1e-4, rtol=1e-5, **kwargs)


@pytest.mark.parametrize("dim", [32, 96, 128])
def test_all_pairs_forms_agree_with_reference(gen, backend, device, dim):
    queries = random_docs(gen, [32, 32, 32, 32, 32], dim, device=device)
    docs = random_docs(gen, [1, 7, 0, 33, 20, 64, 5], dim, device=device)
    expected = reference(queries, docs).float()
    q = torch.stack(queries)
    as_list = score(q, docs, backend=backend)
    close(as_list, expected)
    packed = score(q, PackedEmbeddings.from_list(docs), backend=backend)
    close(packed, expected)
    padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True, padding_value=7.0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(d), device=device) for d in docs], batch_first=True)
    close(score(q, padded, documents_mask=mask, backend=backend), expected)
    assert as_list.dtype == torch.float32 and as_list.shape == (5, 7)


def test_single_arrays_and_embeddings_files_are_accepted_forms(gen, backend, device, tmp_path):
    """One [L, dim] document or query is a corpus or batch of one; an EmbeddingsFile (what
    load_embeddings returns) of queries or documents is scored as its embeddings."""
    from colbert_triton import load_embeddings, save_embeddings

    queries = random_docs(gen, [5, 32, 2], 96, device=device)
    docs = random_docs(gen, [4, 1, 9], 96, device=device)
    expected = reference(queries, docs).float()
    close(score(queries, docs[2], backend=backend), expected[:, 2:])
    close(score(queries[1], docs, backend=backend), expected[1:2])
    save_embeddings(tmp_path / "q.safetensors", PackedEmbeddings.from_list([q.cpu() for q in queries]))
    save_embeddings(tmp_path / "d.safetensors", PackedEmbeddings.from_list([d.cpu() for d in docs]))
    saved_queries, saved_docs = (load_embeddings(tmp_path / f"{name}.safetensors", device=device)
                                 for name in "qd")
    close(score(saved_queries, saved_docs, backend=backend), expected)


def test_query_masks_and_ragged_queries(gen, backend, device):
    docs = random_docs(gen, [4, 9], 96, device=device)
    queries = random_docs(gen, [3, 32, 1], 96, device=device)
    expected = reference(queries, docs).float()
    close(score(queries, docs, backend=backend), expected)
    padded = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True, padding_value=5.0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(q), device=device) for q in queries], batch_first=True)
    close(score(padded, docs, queries_mask=mask, backend=backend), expected)


def test_negative_similarities_are_not_clamped(gen, backend, device):
    q = torch.tensor([[[1.0, 0.0]]], device=device)
    docs = [torch.tensor([[-1.0, 0.0], [-0.5, 0.0]], device=device), torch.tensor([[-1.0, 0.0]], device=device)]
    out = score(q, docs, backend=backend)
    close(out, torch.tensor([[-0.5, -1.0]]))


def test_unchecked_nan_shows_in_exactly_its_scores(gen, backend, device):
    """check_inputs=False skips the NaN check, but a NaN is never hidden: the scores it enters
    are NaN on both backends, the others exact, and an empty document still scores 0."""
    docs = random_docs(gen, [5, 9, 0, 3], 32, device=device)
    queries = random_docs(gen, [8, 8], 32, device=device)
    docs[1][4, 7] = float("nan")
    queries[1][2, 0] = float("nan")
    out = score(queries, docs, backend=backend, check_inputs=False).cpu()
    nan = torch.tensor([[False, True, False, False], [True, True, False, True]])
    assert torch.equal(out.isnan(), nan), out
    clean = reference([queries[0]], [docs[0], docs[2], docs[3]])
    close(out[0, [0, 2, 3]], clean[0].float())


def test_candidates_and_pairwise(gen, backend, device):
    corpus = random_docs(gen, [5, 0, 12, 3, 8, 1], 64, device=device)
    queries = random_docs(gen, [32, 32, 32], 64, device=device)
    full = reference(queries, corpus).float()
    cand = torch.tensor([[0, 2, 5], [4, 4, 1], [3, -1, 0]])
    got = score_candidates(queries, PackedEmbeddings.from_list(corpus), cand.to(device), backend=backend)
    expected = full.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    close(got, expected)
    pairs = score_pairwise(queries, corpus[:3], backend=backend)
    close(pairs, full[[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_search_equals_full_sort_with_ties(gen, backend, device, chunk_size):
    base = random_docs(gen, [3, 6, 2, 9, 4], 32, device=device)
    corpus = base + [base[1].clone(), base[3].clone(), base[1].clone(), torch.zeros(0, 32, device=device)]
    queries = random_docs(gen, [8, 8], 32, device=device)
    exact = reference(queries, corpus)
    for k in (1, 3, 9, 50):
        scores, index = search(queries, PackedEmbeddings.from_list(corpus), k, chunk_size=chunk_size,
                               backend=backend)
        kk = min(k, len(corpus))
        for qi in range(len(queries)):
            # Full sort: score descending, ties by lower index.
            order = sorted(range(len(corpus)), key=lambda j: (-round(exact[qi, j].item(), 4), j))[:kk]
            assert index[qi].tolist() == order
            close(scores[qi], exact[qi, order].float())


@pytest.mark.parametrize("chunk_size", [64, 1000])
def test_hundreds_of_ties_keep_index_order(gen, backend, device, chunk_size):
    """300 copies of one document: search and rerank list them by index. A handful of ties (the
    test above) does not show an unstable sort: torch's keeps so few in order on the CPU."""
    doc = random_docs(gen, [4], 16, device=device)[0]
    corpus = [doc.clone() for _ in range(300)]
    query = random_docs(gen, [3], 16, device=device)[0]
    _, index = search([query], PackedEmbeddings.from_list(corpus), k=300, chunk_size=chunk_size,
                      backend=backend)
    assert index[0].tolist() == list(range(300))
    assert [i for i, _ in rerank(query, corpus, backend=backend)] == list(range(300))


def test_torch_path_floors_only_the_flagged_candidates(gen):
    """Candidate mode ([Q, K] starts) of the PyTorch path: pad_floor lifts a negative row max to
    0 for the flagged candidates only (every similarity here is negative)."""
    queries = torch.stack(random_docs(gen, [6] * 3, 16)).abs()
    docs = [-d.abs() for d in random_docs(gen, [5, 9, 2, 7], 16)]
    packed = PackedEmbeddings.from_list(docs)
    pick = torch.tensor([[0, 1, 3], [2, 2, 1], [3, 0, 1]])
    floor = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    got = maxsim_torch(queries, packed.values, packed.starts[pick], packed.lengths[pick], pad_floor=floor)
    expected = torch.stack([
        torch.stack([(q @ docs[j].T).max(1).values.clamp(min=0.0 if f else -float("inf")).sum()
                     for j, f in zip(row, flags)]) for q, row, flags in zip(queries, pick.tolist(), floor)])
    assert (expected < 0).any()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_many_queries_search_in_smaller_chunks(gen, backend, device, monkeypatch):
    """Q x chunk_size is capped (the merge holds ~28 bytes a pair): 3 queries under a cap of 7
    pairs score two documents at a time, with the same results."""
    from colbert_triton import scoring

    corpus = random_docs(gen, [3, 1, 4, 2, 5], 16, device=device)
    queries = random_docs(gen, [4, 4, 4], 16, device=device)
    widths, merge = [], scoring.merge_topk
    monkeypatch.setattr(scoring, "merge_topk", lambda b, i, block, lo, k: (
        widths.append(block.shape[1]), merge(b, i, block, lo, k))[1])
    monkeypatch.setattr(scoring, "_SEARCH_PAIRS", 7)
    scores, index = search(queries, PackedEmbeddings.from_list(corpus), 5, backend=backend)
    assert widths == [2, 2, 1]
    exact = reference(queries, corpus)
    for qi in range(len(queries)):
        order = sorted(range(len(corpus)), key=lambda j: (-round(exact[qi, j].item(), 4), j))
        assert index[qi].tolist() == order
        close(scores[qi], exact[qi, order].float())


def test_rerank_orders_best_first(gen, backend, device):
    docs = random_docs(gen, [4, 4, 10, 2], 96, device=device)
    query = random_docs(gen, [32], 96, device=device)[0]
    ranked = rerank(query, docs + [docs[0].clone()], backend=backend)
    exact = reference([query], docs + [docs[0]])[0]
    assert [i for i, _ in ranked] == sorted(range(5), key=lambda j: (-round(exact[j].item(), 4), j))
    assert rerank(query, docs, k=2, backend=backend) == ranked[:2]


def test_numpy_inputs(gen):
    docs = [d.numpy() for d in random_docs(gen, [3, 5], 16)]
    queries = np.stack([q.numpy() for q in random_docs(gen, [4, 4], 16)])
    out = score(queries, docs)
    torch.testing.assert_close(out, reference(torch.from_numpy(queries), [torch.from_numpy(d) for d in docs]).float())


def test_bad_inputs_get_clear_errors(gen, monkeypatch):
    docs = random_docs(gen, [3, 4], 16)
    q = random_docs(gen, [4], 16)
    with pytest.raises(ValueError, match="dim"):
        score(random_docs(gen, [4], 8), docs)
    with pytest.raises(TypeError, match="cast one side"):
        score([q[0].half()], docs)
    with pytest.raises(TypeError, match=r"torch.float32 but documents are torch.float16 \(float64 inputs"):
        score([q[0].double()], [d.half() for d in docs])
    with pytest.raises(TypeError, match="documents\\[1\\] is torch.float16"):
        score(q, [docs[0], docs[1].half()])
    with pytest.raises(ValueError, match="NaN"):
        score(q, [docs[0], torch.full((2, 16), float("nan"))])
    with pytest.raises(ValueError, match="NaN"):
        score([torch.full((2, 16), float("inf"))], docs)
    with pytest.raises(ValueError, match="empty"):
        score(q, [])
    with pytest.raises(TypeError, match="floating point"):
        score(q, [torch.ones(2, 16, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"queries\[0\] must be floating point .*got torch.float8_e4m3fn"):
        score([x.to(torch.float8_e4m3fn) for x in q], docs)  # not a NaN check's internal error
    with pytest.raises(ValueError, match="candidates must be a .Q, K. array"):
        score_candidates(q, docs, None)
    assert score_candidates(q, docs, [[]]).shape == (1, 0)  # an empty list has no integer dtype
    with pytest.raises(TypeError, match="documents_mask must be a tensor or array of 0/1"):
        score(q, torch.stack([docs[1], docs[1]]), documents_mask="1111")
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        score(q, ["text"])
    with pytest.raises(ValueError, match="k must be"):
        search(q, docs, 0)
    with pytest.raises(ValueError, match="candidate indices"):
        score_candidates(q, docs, [[0, 2]])
    with pytest.raises(ValueError, match="length mask"):
        score(q, torch.stack([docs[1], docs[1]]), documents_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="pairs need equal counts"):
        score_pairwise(q, docs)
    with pytest.raises(ValueError, match="backend must be"):
        score(q, docs, backend="cuda")
    with pytest.raises(ValueError, match="queries_mask must hold only 0 and 1"):
        score(torch.stack(q), docs, queries_mask=torch.full((1, 4), 2.0))
    for bad_k in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            rerank(q, docs, k=bad_k)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            search(q, docs, bad_k)
    with monkeypatch.context() as patched:  # CPU tensors without the interpreter
        patched.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="Triton backend needs CUDA"):
            score(q, docs, backend="triton")


def test_every_document_empty_scores_zero(backend, device):
    """No rows at all in the corpus (every document empty): 0.0, on every entry point."""
    q = torch.randn(2, 5, 16, device=device)
    empty = [torch.zeros(0, 16, device=device), torch.zeros(0, 16, device=device)]
    assert torch.equal(score(q, empty, backend=backend).cpu(), torch.zeros(2, 2))
    assert torch.equal(score(q, torch.zeros(2, 0, 16, device=device), backend=backend).cpu(), torch.zeros(2, 2))
    scores, index = search(q, PackedEmbeddings.from_list(empty), 5, backend=backend)
    assert torch.equal(scores.cpu(), torch.zeros(2, 2)) and index.tolist() == [[0, 1], [0, 1]]
    assert rerank(q[:1], empty, backend=backend) == [(0, 0.0), (1, 0.0)]
    assert torch.equal(score_pairwise(q, empty, backend=backend).cpu(), torch.zeros(2))
    assert torch.equal(score_candidates(q, empty, [[1], [0]], backend=backend).cpu(), torch.zeros(2, 1))


def test_padded_documents_with_masks_on_every_entry_point(gen, backend, device):
    """Every scoring function takes padded documents with a length mask (padding excluded)."""
    docs = random_docs(gen, [5, 2, 7], 32, device=device)
    queries = random_docs(gen, [6, 6, 6], 32, device=device)
    padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True, padding_value=3.0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(d), device=device) for d in docs], batch_first=True)
    exact = reference(queries, docs).float()
    q = torch.stack(queries)
    scores, _ = search(q, padded, 3, documents_mask=mask, backend=backend)
    close(scores, exact.sort(dim=1, descending=True, stable=True).values)
    ranked = rerank(q[:1], padded, documents_mask=mask, backend=backend)
    close(torch.tensor([s for _, s in ranked]), exact[0].sort(descending=True, stable=True).values)
    close(score_pairwise(q, padded, documents_mask=mask, backend=backend), exact.diagonal())
    got = score_candidates(q, padded, [[2, 0], [1, 1], [0, 2]], documents_mask=mask, backend=backend)
    close(got, exact.gather(1, torch.tensor([[2, 0], [1, 1], [0, 2]])))


def test_float64_and_numpy_integer_k(gen, backend, device):
    """numpy's default float64 is scored in float32 on every backend; numpy integers are ks."""
    docs = [d.double() for d in random_docs(gen, [3, 8], 16, device=device)]
    queries = [q.double() for q in random_docs(gen, [4], 16, device=device)]
    out = score(queries, docs, backend=backend)
    assert out.dtype == torch.float32
    close(out, reference(queries, docs).float())
    _, index = search(queries, docs, np.int64(1), backend=backend)
    assert index.shape == (1, 1)
    assert len(rerank(queries, docs, k=np.int32(1), backend=backend)) == 1


def test_torch_maxsim_chunks_do_not_change_results(gen):
    queries = torch.stack(random_docs(gen, [8] * 3, 16))
    docs = random_docs(gen, [5, 9, 0, 2, 7, 3], 16)
    packed = PackedEmbeddings.from_list(docs)
    whole = maxsim_torch(queries, packed.values, packed.starts, packed.lengths)
    tiny = maxsim_torch(queries, packed.values, packed.starts, packed.lengths, budget_elements=1)
    torch.testing.assert_close(whole, tiny)
    floor = torch.tensor([True, False, True, False, True, False])
    floored = maxsim_torch(queries, packed.values, packed.starts, packed.lengths, pad_floor=floor)
    expected = torch.stack([
        torch.stack([(q @ d.T).max(1).values.clamp(min=0 if f else -9).sum() if len(d) else torch.tensor(0.0)
                     for d, f in zip(docs, floor)]) for q in queries])
    torch.testing.assert_close(floored, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["packed", "padded"])
def test_an_empty_corpus_gives_empty_results(backend, device, form):
    """An empty corpus in a form that knows its dim (packed, padded) scores to nothing; an
    empty list, which does not, is an error (test_api_errors.py)."""
    if form == "packed":
        empty = PackedEmbeddings.from_lengths(torch.zeros(0, 16, device=device), [])
    else:
        empty = torch.zeros(0, 7, 16, device=device)
    queries = torch.randn(3, 4, 16).to(device)
    scores, index = search(queries, empty, 5, backend=backend)
    assert scores.shape == index.shape == (3, 0)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    assert score(queries, empty, backend=backend).shape == (3, 0)
    assert rerank(queries[0], empty, backend=backend) == []
    # Candidates into an empty corpus can only be unused slots (-1): they score -inf.
    unused = score_candidates(queries, empty, torch.full((3, 2), -1, device=device), backend=backend)
    assert unused.shape == (3, 2) and bool((unused == float("-inf")).all())
    with pytest.raises(ValueError, match="candidate indices must lie in"):
        score_candidates(queries, empty, torch.zeros(3, 1, dtype=torch.int64, device=device), backend=backend)


@pytest.mark.parametrize("lengths, chunk_size, max_rows", [
    ([3, 0, 5, 1, 0, 7, 2], 3, 8),
    ([3, 0, 5, 1, 0, 7, 2], 100, 4),  # a document longer than max_rows gets a chunk of its own
    ([0, 0, 4], 1, 1),
    ([9], 5, 100),
])
def test_chunk_bounds_cover_every_document_within_the_row_budget(lengths, chunk_size, max_rows):
    from colbert_triton.scoring import _chunk_bounds

    ends = np.cumsum(lengths)
    begins = ends - np.array(lengths)
    bounds = _chunk_bounds(begins, ends, chunk_size, max_rows)
    assert [lo for lo, *_ in bounds] == [0] + [hi for _, hi, *_ in bounds[:-1]]
    assert bounds[-1][1] == len(lengths)
    for lo, hi, begin, end in bounds:
        assert 1 <= hi - lo <= chunk_size
        assert begin <= begins[lo:hi].min() and end >= ends[lo:hi].max()
        assert end - begin <= max_rows or hi - lo == 1


@pytest.fixture
def streamed(monkeypatch, device):
    """Search streams a corpus in host memory in 64-byte blocks (two 8-d fp32 rows). With CUDA
    queries that is the real path (streams, events, pinned staging); with CPU queries the same
    code runs with synchronous copies, routed there by hand."""
    from colbert_triton import scoring

    if device == "cpu":
        monkeypatch.setattr(scoring, "_streams_host_corpus", lambda q, docs: True)
    monkeypatch.setattr(scoring, "_STREAM_BYTES", 64)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_search_streaming_a_corpus_in_row_blocks_equals_full_sort(gen, backend, device, streamed, chunk_size):
    corpus = random_docs(gen, [3, 0, 1, 5, 2, 0, 4, 1], 8)  # in host memory
    queries = random_docs(gen, [4, 4, 4], 8, device=device)
    exact = reference(queries, corpus)
    scores, index = search(queries, PackedEmbeddings.from_list(corpus), 8, chunk_size=chunk_size,
                           backend=backend)
    for qi in range(len(queries)):
        order = sorted(range(len(corpus)), key=lambda j: (-round(exact[qi, j].item(), 4), j))
        assert index[qi].tolist() == order
        close(scores[qi], exact[qi, order].float())
    # A padded corpus with a mask: rows of padding lie between documents.
    padded = torch.nn.utils.rnn.pad_sequence(corpus, batch_first=True)
    mask = torch.arange(padded.shape[1])[None, :] < torch.tensor([len(d) for d in corpus])[:, None]
    scores_padded, index_padded = search(queries, padded, 8, documents_mask=mask,
                                         chunk_size=chunk_size, backend=backend)
    assert torch.equal(index_padded.cpu(), index.cpu())
    close(scores_padded, scores)


def test_search_streaming_checks_each_block_for_nan(gen, backend, device, streamed):
    corpus = random_docs(gen, [3, 2, 5, 1], 8)
    corpus[2][4, 1] = float("nan")  # in the last block of its document's rows
    queries = random_docs(gen, [4, 4], 8, device=device)
    with pytest.raises(ValueError, match="documents contain NaN"):
        search(queries, PackedEmbeddings.from_list(corpus), 2, backend=backend)
    scores, _ = search(queries, PackedEmbeddings.from_list(corpus), 4, backend=backend,
                           check_inputs=False)
    # Unchecked, the NaN shows in exactly the scores it enters (document 2, for every query).
    assert bool(scores.isnan().any(1).all()) and int(scores.isnan().sum()) == len(queries)


@pytest.mark.parametrize("chunk_size", [1, 2, 100])
@pytest.mark.parametrize("nan_in", ["first", "last"])
def test_streamed_nan_check_reads_padding_as_the_on_device_one_does(gen, backend, device, streamed,
                                                                      chunk_size, nan_in):
    """Masked padding with a NaN is refused by the on-device check; streamed blocks tile every
    row, so it is refused whatever the block boundaries (the padding after a block's last
    document, and after the corpus's last, included)."""
    corpus = random_docs(gen, [3, 1, 4, 2], 8)
    padded = torch.nn.utils.rnn.pad_sequence(corpus, batch_first=True)
    mask = torch.arange(4)[None, :] < torch.tensor([3, 1, 4, 2])[:, None]
    padded[0 if nan_in == "first" else 3, 3, 0] = float("nan")  # a masked slot
    queries = random_docs(gen, [4], 8, device=device)
    with pytest.raises(ValueError, match="documents contain NaN"):
        search(queries, padded, 2, documents_mask=mask, chunk_size=chunk_size, backend=backend)


def test_a_run_of_empty_padded_documents_does_not_grow_a_block(gen, backend, device, streamed):
    """A padded corpus whose middle documents are all masked (a partly filled buffer): their
    padding is checked for NaN on the host, not copied inside a block past the row limit."""
    from colbert_triton import scoring

    lengths = [2, 0, 0, 0, 0, 0, 0, 1, 2]
    corpus = random_docs(gen, lengths, 8)
    padded = torch.nn.utils.rnn.pad_sequence(corpus, batch_first=True)  # [9, 2, 8]: 18 rows
    mask = torch.arange(2)[None, :] < torch.tensor(lengths)[:, None]
    rows = scoring.as_documents(padded, mask)
    blocks = [block.shape[0] for _, block, *_ in
              scoring._host_chunks(rows, 100, torch.device("cpu"), check_finite=True)]
    assert max(blocks) == 2 and sum(blocks) < 18  # two 8-d fp32 rows a block; the gap not copied
    queries = random_docs(gen, [3, 3], 8, device=device)
    exact = reference(queries, corpus)
    scores, index = search(queries, padded, 9, documents_mask=mask, backend=backend)
    for qi in range(len(queries)):
        order = sorted(range(len(corpus)), key=lambda j: (-round(exact[qi, j].item(), 4), j))
        assert index[qi].tolist() == order
        close(scores[qi], exact[qi, order].float())
    padded[4, 1, 3] = float("nan")  # in the gap
    with pytest.raises(ValueError, match="documents contain NaN"):
        search(queries, padded, 2, documents_mask=mask, backend=backend)


def test_stopping_a_stream_early_releases_it(gen, device, monkeypatch):
    """An error mid-search closes the block generator (its buffers freed, its copies waited
    for) instead of leaving it suspended in the traceback."""
    from colbert_triton import scoring

    monkeypatch.setattr(scoring, "_STREAM_BYTES", 64)
    if device == "cpu":
        monkeypatch.setattr(scoring, "_streams_host_corpus", lambda q, docs: True)
    closed = []
    host_chunks = scoring._host_chunks

    def tracked(*args, **kwargs):
        try:
            yield from host_chunks(*args, **kwargs)
        finally:
            closed.append(True)

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")
        return scoring.maxsim_torch(*args[:4])

    monkeypatch.setattr(scoring, "_host_chunks", tracked)
    monkeypatch.setattr(scoring, "maxsim", failing)
    corpus = PackedEmbeddings.from_list(random_docs(gen, [3, 2, 5, 1], 8))
    with pytest.raises(RuntimeError, match="out of memory"):
        search(random_docs(gen, [4], 8, device=device), corpus, 2, chunk_size=1)
    assert closed == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pin", [False, True])
def test_search_streams_a_host_corpus_to_the_gpu(gen, backend, monkeypatch, pin):
    """Many blocks of a realistic corpus. Every scoring call first stalls the compute stream
    (~1 ms), so a copy that overwrote a buffer still being read changes results; every copy
    first stalls the copy stream, so a read before its copy has landed changes them too."""
    from colbert_triton import scoring

    monkeypatch.setattr(scoring, "_STREAM_BYTES", 96 * 2 * 700)  # ~700 rows a block: many blocks
    corpus = random_docs(gen, torch.randint(0, 300, (400,), generator=gen).tolist(), 96,
                         dtype=torch.float16)
    queries = torch.stack(random_docs(gen, [32] * 5, 96, dtype=torch.float16)).cuda()
    host = PackedEmbeddings.from_list(corpus)
    if pin:
        host = host.pin_memory()
    on_gpu = host.to("cuda")
    want = search(queries, on_gpu, 20, chunk_size=64, backend=backend)
    maxsim = scoring.maxsim

    def stalled(*args, **kwargs):
        torch.cuda._sleep(2_000_000)
        return maxsim(*args, **kwargs)

    copy_rows = scoring._copy_rows

    def stalled_copy(*args, **kwargs):
        torch.cuda._sleep(2_000_000)  # on the current stream: the copy stream
        return copy_rows(*args, **kwargs)

    monkeypatch.setattr(scoring, "maxsim", stalled)
    got = search(queries, host, 20, chunk_size=64, backend=backend)
    monkeypatch.setattr(scoring, "maxsim", maxsim)
    monkeypatch.setattr(scoring, "_copy_rows", stalled_copy)
    got_late_copies = search(queries, host, 20, chunk_size=64, backend=backend)
    assert torch.equal(got_late_copies[0], got[0]) and torch.equal(got_late_copies[1], got[1])
    if backend == "triton":  # each document's score is computed the same way whatever the blocks
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    else:  # the blocks change the einsum batching, so rounding (and near-tie order) may differ
        torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="only search"):
        score(queries, host, backend=backend)


def test_finite_check_reads_every_block(monkeypatch):
    """The NaN/inf check runs in blocks (no input-sized temporary): a bad value in any block,
    first, middle or last, contiguous or not, is found."""
    from colbert_triton import scoring

    monkeypatch.setattr(scoring, "_FINITE_CHUNK", 24)  # 200 x 8 values: 67 blocks
    values = torch.zeros(200, 8)
    assert scoring.all_finite(values) and scoring.all_finite(values.t())
    for where in (0, 24 * 33 + 5, 200 * 8 - 1):
        bad = values.clone()
        bad.view(-1)[where] = float("inf")
        assert not scoring.all_finite(bad)
        assert not scoring.all_finite(bad.t())  # not contiguous: blocks of whole rows
    assert scoring.all_finite(torch.zeros(0, 8)) and scoring.all_finite(torch.tensor(1.0))


@pytest.mark.parametrize("chunk", [24, 1 << 24], ids=["small-blocks", "one-block"])
def test_candidates_check_exactly_their_own_rows(gen, backend, device, monkeypatch, chunk):
    """score_candidates checks the rows of the documents it scores, every one of them whatever
    the block boundaries, and not the rest of the corpus (it read all of it for a few
    candidates). A padded document's padding is read with it, as `score` reads it (one rule:
    whatever the entry point, a NaN in the padding of a document it reads is an error)."""
    from colbert_triton import scoring

    monkeypatch.setattr(scoring, "_FINITE_CHUNK", chunk)  # 24: three 8-d rows a block
    lengths = [3, 5, 0, 1, 6, 2, 4]
    queries = random_docs(gen, [2, 3], 8, device=device)
    candidates = [[4, 1, -1], [6, 4, 0]]  # documents 0, 1, 4 and 6
    for doc in range(len(lengths)):
        for row in range(lengths[doc]):
            docs = random_docs(gen, lengths, 8, device=device)
            docs[doc][row, row % 8] = float("nan") if row % 2 else float("-inf")
            corpus = PackedEmbeddings.from_list(docs)
            if doc in (0, 1, 4, 6):
                with pytest.raises(ValueError, match="documents contain NaN or infinite"):
                    score_candidates(queries, corpus, candidates, backend=backend)
            else:
                score_candidates(queries, corpus, candidates, backend=backend)  # not read: no error
    docs = random_docs(gen, lengths, 8, device=device)
    padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    padded[5, 4] = float("nan")  # past document 5's two rows: not a candidate, not read
    got = score_candidates(queries, padded, candidates, documents_mask=mask, backend=backend)
    exact = reference(queries, docs)
    expected = torch.tensor([[exact[0, 4], exact[0, 1], float("-inf")], [exact[1, 6], exact[1, 4], exact[1, 0]]])
    close(got, expected.float())
    for where in ([6, 5], [0, 3]):  # past the four rows of candidate 6, the three of candidate 0
        bad = padded.clone()
        bad[where[0], where[1]] = float("inf")
        with pytest.raises(ValueError, match="documents contain NaN or infinite"):
            score_candidates(queries, bad, candidates, documents_mask=mask, backend=backend)
        with pytest.raises(ValueError, match="documents contain NaN or infinite"):
            score(queries, bad, documents_mask=mask, backend=backend)  # the same rule
    with pytest.raises(ValueError, match="queries contain NaN"):
        score_candidates([torch.full((2, 8), float("nan"), device=device)] * 2, padded, candidates,
                         documents_mask=mask, backend=backend)


def test_inputs_that_need_gradients_never_reach_the_kernel(gen, monkeypatch):
    """The Triton kernel has no backward pass: named, it refuses such inputs; chosen by default
    (as on CUDA once it is the default), they take the PyTorch path and gradients flow."""
    from colbert_triton import scoring

    queries = random_docs(gen, [4, 4], 16)[0].unsqueeze(0).requires_grad_()
    corpus = random_docs(gen, [3, 5], 16)
    if "triton" in BACKENDS:  # on the kernel's device: the GPU, or the interpreter's CPU
        on_kernel_device = queries.detach().to(KERNEL_DEVICE).requires_grad_()
        with pytest.raises(ValueError, match="no backward pass"):
            score(on_kernel_device, [d.to(KERNEL_DEVICE) for d in corpus], backend="triton")
    monkeypatch.setattr(scoring, "resolve_backend", lambda device, backend: "triton")
    scores = score(queries, corpus)
    scores.sum().backward()
    assert queries.grad is not None and bool(queries.grad.abs().sum() > 0)
    with torch.no_grad():  # no gradients wanted: the kernel may run
        assert not scoring.needs_grad(queries)


def test_the_default_backend_is_the_kernel_only_on_verified_gpus(monkeypatch):
    """No backend named: the kernels on an NVIDIA GPU whose compute capability is listed (passed
    natively), PyTorch on any other GPU (an AMD one under ROCm too) and on the CPU; a named
    backend is taken as named, but for the kernels on an AMD GPU (a clear error: they fail to
    compile there)."""
    from colbert_triton import scoring
    from colbert_triton.kernels import _device

    def unread(index):
        raise AssertionError("no capability to read while none is listed")

    monkeypatch.setattr(_device, "_capability", unread)
    monkeypatch.setattr(scoring, "TRITON_DEFAULT_CAPABILITIES", frozenset())
    assert scoring.resolve_backend(torch.device("cuda", 0), None) == "torch"
    monkeypatch.setattr(scoring, "TRITON_DEFAULT_CAPABILITIES", frozenset({(9, 0)}))
    monkeypatch.setattr(_device, "_capability", {0: (9, 0), 1: (8, 9), 2: (9, 1)}.__getitem__)
    assert scoring.resolve_backend(torch.device("cuda", 0), None) == "triton"
    assert scoring.resolve_backend(torch.device("cuda", 1), None) == "torch"
    assert scoring.resolve_backend(torch.device("cuda", 2), None) == "torch"
    assert scoring.resolve_backend(torch.device("cpu"), None) == "torch"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert scoring.resolve_backend(torch.device("cuda"), None) == "torch"
    assert scoring.resolve_backend(torch.device("cuda", 1), "triton") == "triton"
    assert scoring.resolve_backend(torch.device("cuda", 0), "torch") == "torch"
    # A ROCm build: its GPUs are "cuda" devices, and an MI200 reports (9, 0); never verified.
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert scoring.resolve_backend(torch.device("cuda", 0), None) == "torch"
    assert scoring.resolve_backend(torch.device("cuda", 0), "torch") == "torch"
    with pytest.raises(ValueError, match="NVIDIA GPUs only; on this ROCm build .* use backend='torch'"):
        scoring.resolve_backend(torch.device("cuda", 0), "triton")


def test_the_kernels_dim_limits_match_its_checks():
    """`takes` (the default backend's test) agrees with the launcher's own checks at each limit."""
    from colbert_triton.kernels import maxsim as kernel

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for dim in (1, 96, 512, 513, 1024, 1025):
            checked = torch.float32 if dtype == torch.float64 else dtype
            queries = torch.zeros(1, 1, dim, dtype=checked, device=KERNEL_DEVICE)
            index = torch.zeros(1, dtype=torch.int64, device=KERNEL_DEVICE)
            try:
                kernel._validate(queries, queries[0], index, index, None, None)
                accepted = True
            except ValueError as error:
                assert "dim" in str(error), error
                accepted = False
            assert kernel.takes(dtype, dim) == accepted == (dim <= (512 if checked == torch.float32 else 1024))
    assert not kernel.takes(torch.float16, 0)
    assert not kernel.takes(torch.int32, 96)


def test_a_gpu_with_little_shared_memory_takes_dims_up_to_256(monkeypatch):
    """On a T4 (64 KiB of shared memory a block, the small tiles) the kernel takes d <= 256 and
    `takes` says so for that device, so the default dispatch never sends it a dim it refuses;
    with no device, or one with more shared memory, the limits stay 512/1024."""
    from colbert_triton.kernels import maxsim as kernel

    device = torch.device(KERNEL_DEVICE)
    limits = {torch.device("cuda", 0): 65536, torch.device("cuda", 1): 101376}
    monkeypatch.setattr(kernel, "shared_memory_limit", lambda where: limits.get(where, 65536))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert kernel.takes(dtype, 256, device) and not kernel.takes(dtype, 257, device)
        assert kernel.takes(dtype, 257, torch.device("cuda", 1)) and kernel.takes(dtype, 257)
        assert not kernel.takes(dtype, 257, torch.device("cuda", 0))
    for dim in (256, 257):
        queries = torch.zeros(1, 1, dim, dtype=torch.float16, device=KERNEL_DEVICE)
        index = torch.zeros(1, dtype=torch.int64, device=KERNEL_DEVICE)
        try:
            kernel.maxsim(queries, queries[0], index, index + 1)
            accepted = True
        except ValueError as error:
            assert "dims up to 256" in str(error), error
            accepted = False
        assert accepted == kernel.takes(torch.float16, dim, device) == (dim == 256)


def test_dims_past_the_kernels_limits_take_the_pytorch_path_by_default(gen, monkeypatch, triton_by_default):
    """The kernel takes d <= 1024 (512 in float32): named, it refuses larger ones; chosen by
    default (as on CUDA once it is the default), they are scored by PyTorch, with its results;
    dims it takes still reach it."""
    from colbert_triton.kernels import maxsim as kernel

    launched = []
    launch = kernel.maxsim
    monkeypatch.setattr(kernel, "maxsim", lambda *args, **kwargs: launched.append(args[0].shape) or
                        launch(*args, **kwargs))
    for dtype, too_wide in ((torch.float32, 513), (torch.float16, 1025)):
        queries = random_docs(gen, [3, 2], too_wide, dtype)
        corpus = random_docs(gen, [4, 1, 2], too_wide, dtype)
        expected = score(queries, corpus, backend="torch")
        torch.testing.assert_close(score(queries, corpus), expected, atol=0, rtol=0)
        torch.testing.assert_close(search(queries, corpus, k=2)[0], expected.topk(2).values, atol=0, rtol=0)
        assert launched == []
        if "triton" in BACKENDS:
            with pytest.raises(ValueError, match="dim"):
                score([q.to(KERNEL_DEVICE) for q in queries], [d.to(KERNEL_DEVICE) for d in corpus],
                      backend="triton")
            launched.clear()
    if "triton" in BACKENDS:
        for dtype, widest in ((torch.float32, 512), (torch.float16, 1024)):
            queries = random_docs(gen, [2], widest, dtype, device=KERNEL_DEVICE)
            corpus = random_docs(gen, [3, 1], widest, dtype, device=KERNEL_DEVICE)
            got = score(queries, corpus)
            assert launched == [torch.Size([1, 2, widest])]
            launched.clear()
            exact = reference([q.double() for q in queries], [d.double() for d in corpus]).float()
            tolerance = 2e-3 if dtype == torch.float16 else 1e-4
            torch.testing.assert_close(got.cpu(), exact, atol=tolerance, rtol=tolerance)

    # A T4's 64 KiB of shared memory: the kernel takes d <= 256 there, wider dims go to PyTorch.
    monkeypatch.setattr(kernel, "shared_memory_limit", lambda device: 65536)
    queries = random_docs(gen, [3, 2], 288, torch.float16, device=KERNEL_DEVICE)
    corpus = random_docs(gen, [4, 1, 2], 288, torch.float16, device=KERNEL_DEVICE)
    torch.testing.assert_close(score(queries, corpus), score(queries, corpus, backend="torch"), atol=0, rtol=0)
    assert launched == []


def test_masked_query_rows_never_reach_the_scores():
    """A masked query row holding NaN or inf contributes nothing (zeroed, not multiplied by 0),
    and the input check looks only at the rows that count."""
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(2, 4, 8, generator=gen)
    documents = [torch.randn(n, 8, generator=gen) for n in (3, 5)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = score([queries[0, :3], queries[1, :2]], documents, backend="torch")
    poisoned = queries.clone()
    poisoned[0, 3], poisoned[1, 2:] = float("nan"), float("inf")
    for check in (True, False):
        got = score(poisoned, documents, queries_mask=mask, backend="torch", check_inputs=check)
        torch.testing.assert_close(got, expected)


def test_float64_corpus_scores_in_any_form():
    """numpy's default float64 is taken (as float32) whether the corpus is a list, a padded
    tensor or packed; integer values are refused by name in every form."""
    gen = torch.Generator().manual_seed(4)
    queries = [torch.randn(3, 8, dtype=torch.float64, generator=gen)]
    documents = [torch.randn(n, 8, dtype=torch.float64, generator=gen) for n in (2, 4)]
    expected = score(queries, documents, backend="torch")
    packed = PackedEmbeddings.from_list(documents)
    torch.testing.assert_close(score(queries, packed, backend="torch"), expected)
    scores, _ = search(queries, packed, k=2, backend="torch")
    torch.testing.assert_close(scores, expected.sort(descending=True).values)
    with pytest.raises(TypeError, match=r"documents must be floating point \(float16, bfloat16, float32 or float64\), got torch.int64"):
        score(queries, PackedEmbeddings.from_lengths(torch.zeros(6, 8, dtype=torch.int64), [2, 4]))


def test_torch_path_converts_only_the_rows_it_gathers():
    """`search` hands maxsim_torch the whole corpus every chunk: a 16-bit corpus on the CPU must
    not be converted whole (here a 10^9-row view, 384 GB as float32)."""
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(1, 96, generator=gen).half()
    corpus = row.expand(10**9, 96)
    queries = torch.randn(2, 4, 96, generator=gen).half()
    got = maxsim_torch(queries, corpus, torch.tensor([0, 5 * 10**8]), torch.tensor([3, 4]))
    expected = (queries.float() @ row.float().T).sum((1, 2))
    torch.testing.assert_close(got, expected[:, None].expand(2, 2))


def test_device_chunks_read_the_lengths_once_and_the_rows_row_major(monkeypatch):
    """`search` on a corpus already on the device: each chunk passes its longest length (the
    PyTorch path would otherwise read it from the GPU, a sync per chunk), and a column-strided
    corpus is made row-major once (the kernel's launcher would copy it whole every chunk)."""
    from colbert_triton import scoring

    gen = torch.Generator().manual_seed(6)
    lengths = [3, 7, 1, 0, 5, 2, 9]
    values = torch.randn(8, sum(lengths), generator=gen).T  # a column-strided [R, 8] view
    corpus = PackedEmbeddings.from_lengths(values, lengths)
    queries = torch.randn(2, 4, 8, generator=gen)
    seen = []
    real_maxsim = scoring.maxsim

    def recording_maxsim(q, doc_values, starts, doc_lengths, **kwargs):
        lengths_host = kwargs.get("lengths_host")
        seen.append((doc_values, None if lengths_host is None else int(lengths_host.max())))
        return real_maxsim(q, doc_values, starts, doc_lengths, **kwargs)

    monkeypatch.setattr(scoring, "maxsim", recording_maxsim)
    expected = score(queries, corpus.to_list(), backend="torch")
    seen.clear()
    scores, _ = search(queries, corpus, k=7, chunk_size=3, backend="torch")
    assert [m for _, m in seen] == [7, 5, 9]
    assert all(v is seen[0][0] for v, _ in seen) and seen[0][0].stride() == (8, 1)
    torch.testing.assert_close(scores, expected.sort(dim=1, descending=True, stable=True).values)


@pytest.mark.parametrize("form", ["packed", "list", "padded", "padded-masked"])
def test_the_public_calls_pass_the_host_lengths(monkeypatch, form):
    """score, score_pairwise, search and rerank hand the PyTorch path the documents' lengths
    as a host array it need not read from the device (one sync per call on a GPU), equal to the
    lengths it scores with."""
    from colbert_triton import scoring

    gen = torch.Generator().manual_seed(11)
    lengths = [3, 1, 0, 4]
    docs = random_docs(gen, lengths, 8)
    mask = None
    if form == "packed":
        corpus = PackedEmbeddings.from_list(docs)
    elif form == "list":
        corpus = docs
    else:
        corpus = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
        mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None] if form == "padded-masked" else None
    expected = lengths if form != "padded" else [4] * 4
    seen = []
    real_maxsim = scoring.maxsim

    def recording_maxsim(q, doc_values, starts, doc_lengths, **kwargs):
        seen.append((doc_lengths.reshape(-1).tolist(), kwargs.get("lengths_host")))
        return real_maxsim(q, doc_values, starts, doc_lengths, **kwargs)

    monkeypatch.setattr(scoring, "maxsim", recording_maxsim)
    queries = random_docs(gen, [2] * 4, 8)
    score(queries, corpus, documents_mask=mask)
    score_pairwise(queries, corpus, documents_mask=mask)
    search(queries, corpus, 2, documents_mask=mask)
    rerank(queries[0], corpus, documents_mask=mask)
    assert len(seen) == 4
    for on_device, on_host in seen:
        assert on_host is not None and on_host.reshape(-1).tolist() == on_device == expected


def test_packed_lengths_array_is_read_only():
    packed = PackedEmbeddings.from_lengths(torch.zeros(5, 2), [2, 0, 3])
    assert packed.lengths_array.tolist() == [2, 0, 3] and packed.lengths_array.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        packed.lengths_array[0] = 7


def test_streamed_corpus_row_spans_are_int64(monkeypatch):
    """A hand-built corpus with int32 offsets: its row spans plus the block size must not wrap
    (past 2^31 rows every document became a block of its own)."""
    from colbert_triton import scoring

    corpus = PackedEmbeddings(torch.zeros(6, 4), torch.tensor([0, 2, 6], dtype=torch.int32), (2, 4))
    seen = []
    real_bounds = scoring._chunk_bounds
    monkeypatch.setattr(scoring, "_chunk_bounds",
                        lambda begins, ends, *args: seen.append((begins.dtype, ends.dtype)) or real_bounds(begins, ends, *args))
    rows = scoring.as_documents(corpus)
    assert [lo for lo, *_ in scoring._host_chunks(rows, 1, torch.device("cpu"), check_finite=True)] == [0, 1]
    assert seen == [(np.int64, np.int64)]


@pytest.mark.parametrize("budget", [1, 700, 5_000, 1 << 25])
def test_torch_maxsim_length_blocks_any_budget(gen, budget):
    """The PyTorch path scores shared documents in blocks by length (each padded to its own
    longest): at any block budget, with lengths out of order, empty documents and a floor on
    some, every score lands at its document's column and equals the fp64 reference."""
    lengths = [40, 1, 0, 3, 300, 2, 0, 17, 1, 5, 64, 2, 9, 1]
    queries = torch.stack(random_docs(gen, [6] * 3, 16))
    docs = random_docs(gen, lengths, 16)
    packed = PackedEmbeddings.from_list(docs)
    got = maxsim_torch(queries, packed.values, packed.starts, packed.lengths, budget_elements=budget)
    torch.testing.assert_close(got.double(), reference(list(queries), docs), atol=1e-5, rtol=1e-5)
    floor = torch.arange(len(docs)) % 3 == 0
    floored = maxsim_torch(queries, packed.values, packed.starts, packed.lengths, pad_floor=floor,
                           budget_elements=budget, lengths_host=np.array(lengths))
    expected = torch.stack([
        torch.stack([(q.double() @ d.double().T).max(1).values.clamp(min=0 if f else -9).sum() if len(d)
                     else torch.tensor(0.0, dtype=torch.float64) for d, f in zip(docs, floor)]) for q in queries])
    torch.testing.assert_close(floored.double(), expected, atol=1e-5, rtol=1e-5)


def test_torch_maxsim_pads_each_block_to_its_own_longest(gen, monkeypatch):
    """One long document among many short ones pads only its own block (it padded all of them:
    0.1% of long documents made a CPU search 25x slower)."""
    lengths = [3] * 200 + [300]
    queries = torch.stack(random_docs(gen, [4], 8))
    packed = PackedEmbeddings.from_list(random_docs(gen, lengths, 8))
    padded_slots = []
    real_arange = torch.arange

    def counting_arange(*args, **kwargs):  # the padded length of each block
        result = real_arange(*args, **kwargs)
        padded_slots.append(result.numel())
        return result

    monkeypatch.setattr(torch, "arange", counting_arange)
    maxsim_torch(queries, packed.values, packed.starts, packed.lengths, budget_elements=40 * 1000)
    monkeypatch.undo()
    assert max(padded_slots) == 300 and sorted(padded_slots)[-2] == 3, padded_slots


def test_more_queries_than_the_pair_budget_score_one_document_a_chunk(monkeypatch):
    """Q past the pair cap still gets chunks of one document, never of zero."""
    from colbert_triton import scoring

    gen = torch.Generator().manual_seed(0)
    corpus = [torch.randn(n, 16, generator=gen) for n in (3, 1, 4)]
    queries = [torch.randn(4, 16, generator=gen) for _ in range(3)]
    monkeypatch.setattr(scoring, "_SEARCH_PAIRS", 2)
    scores, index = scoring.search(queries, PackedEmbeddings.from_list(corpus), 3, backend="torch")
    full = scoring.score(queries, corpus, backend="torch")
    expected = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(scores, expected.values)


def test_chunk_bounds_fill_a_block_exactly():
    """Documents whose rows fill the row budget exactly go in one block."""
    from colbert_triton.scoring import _chunk_bounds

    ends = np.cumsum([4, 4, 3, 5])
    begins = ends - np.array([4, 4, 3, 5])
    assert _chunk_bounds(begins, ends, 100, 8) == [(0, 2, 0, 8), (2, 4, 8, 16)]
