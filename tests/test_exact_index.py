"""colbert_triton.pylate.ExactIndex: PyLate's index interface over the exact search, checked
against a float64 MaxSim over each document's own rows and against PyLate's own retriever."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE, require_reference

from colbert_triton.pylate import ExactIndex

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("colbert_triton.kernels.maxsim") else [])


def _unit(gen, *shape):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)


def _corpus(seed=0, lengths=(5, 1, 9, 3, 300, 2, 17, 0), dim=16):  # doc-7: no rows, scores 0
    gen = torch.Generator().manual_seed(seed)
    ids = [f"doc-{i}" for i in range(len(lengths))]
    return ids, [_unit(gen, n, dim) for n in lengths]


def _queries(seed=1, count=3, rows=(4, 32, 7), dim=16):
    gen = torch.Generator().manual_seed(seed)
    return [_unit(gen, rows[i % len(rows)], dim) for i in range(count)]


def _expected(queries, ids, docs, k, candidates=None):
    """Each query's best k as (id, score): float64 MaxSim over each document's own rows, ties by
    the order the documents were added."""
    results = []
    for qi, q in enumerate(queries):
        pool = range(len(ids)) if candidates is None else candidates[qi]
        scored = [(float((q.double() @ docs[p].double().T).max(1).values.sum()) if len(docs[p]) else 0.0, p)
                  for p in pool]
        scored.sort(key=lambda sp: (-sp[0], sp[1]))
        results.append([(ids[p], s) for s, p in scored[:k]])
    return results


def _assert_results(got, expected, atol=1e-4):
    assert [[r["id"] for r in row] for row in got] == [[i for i, _ in row] for row in expected]
    for row, want in zip(got, expected):
        np.testing.assert_allclose([r["score"] for r in row], [s for _, s in want], atol=atol, rtol=0)
        assert all(type(r["score"]) is float for r in row)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_results_are_the_exact_top_k(backend, dtype):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    ids, docs = _corpus()
    index = ExactIndex(device=device, dtype=dtype, backend=backend)
    assert index.add_documents(ids[:4], [d.numpy() for d in docs[:4]]) is index  # numpy, as PyLate encodes
    index.add_documents(ids[4:6], docs[4:6])  # later calls append: kept apart until the corpus is used,
    index.add_documents(ids[6:], docs[6:])  # so a loop of small additions does not copy it each time
    assert len(index._parts) == 3
    queries = _queries()
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    rounded = [d.to(dtype).float() for d in docs]  # what the index holds
    for k in (1, 3, len(ids), 50):  # k past the corpus: all of it, ranked
        _assert_results(index(queries, k=k), _expected([q.to(dtype).float() for q in queries], ids, rounded, k), atol)
    assert len(index._parts) == 1  # joined once, by the first query
    # One query alone, and a [Q, tokens, dim] array of them.
    _assert_results(index(queries[0], k=2), _expected(queries[:1], ids, rounded, 2), atol)
    stacked = np.stack([q.numpy() for q in _queries(rows=(6,))])
    _assert_results(index(stacked, k=2), _expected(list(torch.from_numpy(stacked)), ids, rounded, 2), atol)
    assert len(index) == len(ids)


def test_ties_go_to_the_document_added_first():
    _, docs = _corpus(lengths=(3, 4))
    index = ExactIndex(device="cpu").add_documents(["z", "y", "x"], [docs[1], docs[0], docs[1].clone()])
    query = _queries(count=1)
    ranked = [r["id"] for r in index(query, k=3)[0]]
    assert ranked.index("x") == ranked.index("z") + 1  # the same score: z, added first, first
    assert [r["id"] for r in index(query, k=3, subset=["x", "z"])[0]] == ["z", "x"]
    index.remove_documents(["y"])  # the others keep their order
    assert [r["id"] for r in index(query, k=3)[0]] == ["z", "x"]


def test_subset_restricts_each_query_to_its_documents():
    ids, docs = _corpus()
    index = ExactIndex(device="cpu").add_documents(ids, docs)
    queries = _queries()
    # One list for every query (repeats and order do not matter)...
    subset = ["doc-6", "doc-1", "doc-4", "doc-1"]
    _assert_results(index(queries, k=2, subset=subset), _expected(queries, ids, docs, 2, [[1, 4, 6]] * 3))
    # ... or one per query; an empty one gives no results.
    per_query = [["doc-0"], [], ids[::-1]]
    _assert_results(index(queries, k=4, subset=per_query),
                    _expected(queries, ids, docs, 4, [[0], [], list(range(len(ids)))]))
    with pytest.raises(ValueError, match="subset holds 2 lists of ids for 3 queries"):
        index(queries, subset=[["doc-0"], ["doc-1"]])
    with pytest.raises(ValueError, match="subset: not in the index: 'nope'"):
        index(queries, subset=["doc-0", "nope"])


def test_documents_are_added_and_removed_by_id():
    ids, docs = _corpus()
    index = ExactIndex(device="cpu").add_documents(ids, docs)
    queries = _queries()
    assert index.remove_documents(["doc-4", "doc-0"]) is index
    kept = [i for i in range(len(ids)) if i not in (0, 4)]
    _assert_results(index(queries, k=10), _expected(queries, [ids[i] for i in kept], [docs[i] for i in kept], 10))
    index.add_documents("doc-0", docs[0])  # a single id with its [tokens, dim] embeddings: added last
    order = kept + [0]
    _assert_results(index(queries, k=10), _expected(queries, [ids[i] for i in order], [docs[i] for i in order], 10))
    embeddings = index.get_documents_embeddings([["doc-0", "doc-6"], ["doc-1"]])
    assert [[tuple(e.shape) for e in row] for row in embeddings] == [[(5, 16), (17, 16)], [(1, 16)]]
    assert torch.equal(embeddings[0][1], docs[6])
    with pytest.raises(ValueError, match="document id 'doc-1' is in the index already"):
        index.add_documents(["doc-9", "doc-1"], docs[:2])
    with pytest.raises(ValueError, match="document id 'n' is given twice"):
        index.add_documents(["n", "n"], docs[:2])
    with pytest.raises(ValueError, match="remove_documents: not in the index: 'doc-4'"):
        index.remove_documents(["doc-1", "doc-4"])
    with pytest.raises(ValueError, match="get_documents_embeddings: not in the index: 'doc-4', 'x'"):
        index.get_documents_embeddings([["doc-1"], ["doc-4", "x"]])
    assert len(index) == len(order)  # nothing changed by the refused calls
    index.remove_documents([ids[i] for i in order])
    with pytest.raises(ValueError, match="the index is empty: add documents before querying it"):
        index(queries)
    assert index.remove_documents([]) is index and len(index) == 0  # nothing to remove, even empty


def test_bad_input_is_a_clear_error():
    ids, docs = _corpus()
    index = ExactIndex(device="cpu").add_documents(ids[:2], docs[:2])
    bad = docs[2].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="documents_embeddings contain NaN or infinite values"):
        index.add_documents(["x"], [bad])
    query = _queries(count=1)[0].clone()
    query[0, 0] = float("inf")
    with pytest.raises(ValueError, match="queries_embeddings contain NaN or infinite values"):
        index([query])
    with pytest.raises(ValueError, match="these documents have dim 8; the index holds dim 16"):
        index.add_documents(["x"], [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="2 document ids but 1 document embeddings"):
        index.add_documents(["x", "y"], [docs[2]])
    with pytest.raises(ValueError, match=r"embeddings\[1\] must be 2-D"):
        index.add_documents(["x", "y"], [docs[2], torch.randn(16)])
    with pytest.raises(TypeError, match="document ids must be hashable"):
        index.add_documents([["x"]], [docs[2]])
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        index(_queries(), k=0)
    with pytest.raises(ValueError, match="dtype must be torch.float16, torch.bfloat16 or torch.float32"):
        ExactIndex(device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="backend must be 'torch', 'triton' or None"):
        ExactIndex(device="cpu", backend="flash")
    assert len(index) == 2 and index([]) == []


def test_an_index_folder_keeps_the_index(tmp_path):
    ids, docs = _corpus()
    queries = _queries()
    index = ExactIndex(tmp_path, "mine", device="cpu").add_documents(ids, docs).remove_documents(["doc-2"])
    stored = tmp_path / "mine" / "embeddings.safetensors"
    assert stored.is_file()
    again = ExactIndex(tmp_path, "mine", device="cpu")  # loaded as it was left
    assert again(queries, k=10) == index(queries, k=10) and len(again) == len(ids) - 1
    half = ExactIndex(tmp_path, "mine", device="cpu", dtype=torch.float16)  # loaded in the dtype asked for
    assert half.get_documents_embeddings([["doc-0"]])[0][0].dtype == torch.float16
    with pytest.raises(TypeError):  # an id a file cannot keep: refused, the index unchanged
        again.add_documents([object()], [docs[0]])
    assert again(queries, k=10) == index(queries, k=10)
    fresh = ExactIndex(tmp_path, "mine", override=True, device="cpu")
    assert len(fresh) == 0 and not stored.exists()
    fresh.add_documents([1, 2], docs[:2]).remove_documents([1, 2])  # emptied: the file goes
    assert not stored.exists() and len(ExactIndex(tmp_path, "mine", device="cpu")) == 0


def test_pylates_retriever_ranks_with_it(tmp_path):
    """PyLate's own retriever over the index (end to end, as with PLAID), with PyLate's exact
    per-pair MaxSim (colbert_scores_pairwise: each document's own rows) as the reference."""
    retrieve = require_reference("pylate.retrieve")
    scores = require_reference("pylate.scores")
    ids, docs = _corpus(lengths=(5, 1, 9, 3, 300, 2, 17))  # PyLate's max over an empty document raises
    index = ExactIndex(device="cpu").add_documents(ids, [d.numpy() for d in docs])
    queries = [q.numpy() for q in _queries(rows=(32,))]
    retriever = retrieve.ColBERT(index=index)
    got = retriever.retrieve(queries, k=4)
    assert got == index(queries, k=4)
    for query, row in zip(queries, got):
        theirs = scores.colbert_scores_pairwise([torch.from_numpy(query)] * len(docs), docs)
        ranked = sorted(range(len(ids)), key=lambda p: (-float(theirs[p]), p))[:4]
        assert [r["id"] for r in row] == [ids[p] for p in ranked]
        np.testing.assert_allclose([r["score"] for r in row], theirs[ranked].numpy(), atol=1e-5)
    assert retriever.retrieve(queries, k=2, subset=["doc-3", "doc-5"]) == index(queries, k=2, subset=["doc-3", "doc-5"])
    json.dumps(got)  # plain ids and floats, as PyLate's results
