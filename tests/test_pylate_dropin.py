"""colbert_triton.pylate against pylate.scores / pylate.rank, PyLate's zero-padding semantics included."""

import functools
import importlib.util
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import INTERPRETED, KERNEL_DEVICE, KERNEL_DTYPES, require_reference
from texts import DOCUMENTS, QUERIES

from colbert_triton import pylate as dropin
from colbert_triton import scoring

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("colbert_triton.kernels.maxsim") else [])


def on(backend):
    """Where a backend's inputs live: the GPU for Triton when there is one (else the interpreter)."""
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def moved(backend, *tensors):
    return [None if t is None else t.to(on(backend)) for t in tensors]


def close(actual, expected):
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=1e-5)


def same_ranking(got, expected, **tolerance):
    """One query's rerank results: the same ids in the same order, the same scores."""
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected],
                               **(tolerance or {"atol": 1e-5}))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The queries' shape of every call that reaches the MaxSim kernel through scoring.maxsim."""
    calls = []
    maxsim = scoring.maxsim
    monkeypatch.setattr(scoring, "maxsim", lambda *args, **kwargs: calls.append(args[0].shape) or
                        maxsim(*args, **kwargs))
    return calls


@pytest.fixture(scope="module")
def ref():
    return require_reference("pylate.scores")


def _data(seed=0, a=3, b=5, s=6, t=7, h=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(a, s, h, generator=g)
    d = torch.randn(b, t, h, generator=g)  # unnormalised, many negative similarities
    return q, d, g


def _masks(g, a, s, b, t, kind):
    if kind == "none":
        return None, None
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    dmask = (torch.arange(t)[None] < lengths[:, None]).float()
    qmask = torch.ones(a, s)
    qmask[0, -2:] = 0
    if kind == "interior":
        dmask[1, 0] = 0
        dmask[2, ::2] = 0
    if kind == "float":
        dmask = dmask * torch.rand(b, t, generator=g)
        qmask = qmask * 0.5
    if kind == "bool":
        return qmask.bool(), dmask.bool()
    return qmask, dmask


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
@pytest.mark.parametrize("kind", ["suffix", "bool", "empty-row", "interior", "float", "two"])
def test_kernel_reads_plainly_masked_documents_in_place(ref, monkeypatch, kind):
    """A 0/1 documents mask with each row's ones first (an attention mask) masks only slots the
    kernel's loop never reaches: the documents go to it as they are, no masked copy. Any other
    mask (an interior zero, weights, a 2) is multiplied in. PyLate's scores either way."""
    q, d, g = _data()
    qm, dm = _masks(g, 3, 6, 5, 7, "interior" if kind == "interior" else "float" if kind == "float" else
                    "bool" if kind == "bool" else "suffix")
    if kind == "empty-row":
        dm[3] = 0
    if kind == "two":
        dm = dm * 2
    expected = ref.colbert_scores(q, d, qm, dm, backend="torch")
    rows = []
    maxsim = scoring.maxsim
    monkeypatch.setattr(scoring, "maxsim", lambda *args, **kwargs: rows.append(args[1]) or maxsim(*args, **kwargs))
    q, d, qm, dm = moved("triton", q, d, qm, dm)
    close(dropin.colbert_scores(q, d, qm, dm, backend="triton"), expected)
    assert (rows[0].data_ptr() == d.data_ptr()) == (kind in ("suffix", "bool", "empty-row"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "suffix", "interior", "float", "bool"])
def test_colbert_scores(ref, backend, kind):
    q, d, g = _data()
    qmask, dmask = _masks(g, 3, 6, 5, 7, kind)
    expected = ref.colbert_scores(q, d, qmask, dmask, backend="torch")
    got = dropin.colbert_scores(*moved(backend, q, d, qmask, dmask), backend=backend)
    assert got.shape == expected.shape
    close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_colbert_scores_numpy_and_lists(ref, backend):
    if backend == "triton" and not INTERPRETED:
        pytest.skip("numpy inputs are CPU tensors; the GPU kernel takes CUDA tensors")
    q, d, _ = _data(1)
    expected = ref.colbert_scores(q, d, backend="torch")
    torch.testing.assert_close(dropin.colbert_scores(q.numpy(), list(d), backend=backend), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropin.colbert_scores(list(q.numpy()), d.numpy(), backend=backend),
                               expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "suffix", "interior", "float"])
def test_colbert_kd_scores(ref, backend, kind):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, 8, generator=g)
    d = torch.randn(3, 4, 6, 8, generator=g)
    qmask, dmask2 = _masks(g, 3, 5, 12, 6, kind)
    dmask = None if dmask2 is None else dmask2.view(3, 4, 6)
    expected = ref.colbert_kd_scores(q, d, qmask, dmask, backend="torch")
    close(dropin.colbert_kd_scores(*moved(backend, q, d, qmask, dmask), backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_colbert_scores_pairwise(ref, backend):
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, 8, generator=g) for n in (4, 1, 6)]
    ds = [torch.randn(n, 8, generator=g) for n in (3, 9, 1)]
    expected = ref.colbert_scores_pairwise(qs, ds, backend="torch")
    close(dropin.colbert_scores_pairwise(moved(backend, *qs), moved(backend, *ds), backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank(backend):
    rank = require_reference("pylate.rank")
    g = torch.Generator().manual_seed(4)
    queries = [torch.randn(5, 8, generator=g) for _ in range(3)]
    docs = [[torch.randn(n, 8, generator=g) for n in lengths]
            for lengths in ([3, 7, 1], [2], [4, 4, 9, 2], [])]
    queries.append(torch.randn(5, 8, generator=g))
    ids = [["a", "b", "c"], [10], ["w", "x", "y", "z"], []]
    expected = rank.rerank(ids[:-1], queries[:-1], docs[:-1])  # PyLate fails on an empty candidate list
    got = dropin.rerank(ids, moved(backend, *queries), [moved(backend, *group) for group in docs],
                        backend=backend)
    assert got[-1] == []
    for exp, mine in zip(expected, got):
        same_ranking(mine, exp)


def test_errors():
    q, d, _ = _data()
    with pytest.raises(ValueError, match="dim"):
        dropin.colbert_scores(q, d[..., :8])
    with pytest.raises(ValueError, match="documents_mask has shape"):
        dropin.colbert_scores(q, d, documents_mask=torch.ones(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        dropin.colbert_scores(q, d.masked_fill(d > 2, float("nan")))
    with pytest.raises(ValueError, match="backend must be"):
        dropin.colbert_scores(q, d, backend="cuda")
    with pytest.raises(TypeError, match="cast one side"):
        dropin.colbert_scores(q.half(), d)
    with pytest.raises(ValueError, match="different shapes"):
        dropin.colbert_scores(q, [d[0], d[1][:3]])
    with pytest.raises(ValueError, match="a list of \\[S, H\\] embeddings"):
        dropin.colbert_scores_pairwise(q[0], d[0])
    with pytest.raises(ValueError, match="document ids"):
        dropin.rerank([["a"]], [q[0]], [[d[0], d[1]]])
    # PyLate: einsum's "number of subscripts" error; integer embeddings it scores in integer
    # arithmetic (README).
    with pytest.raises(ValueError, match=r"expected queries with 3 dims and documents with 3, got shapes \(6, 16\)"):
        dropin.colbert_scores(q[0], d)
    with pytest.raises(TypeError, match="queries embeddings must be floating point, got torch.int64"):
        dropin.colbert_scores(q.long(), d.long())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank_takes_candidates_as_one_array_and_no_queries_as_pylate_does(backend):
    rank = require_reference("pylate.rank")
    g = torch.Generator().manual_seed(9)
    queries, candidates = torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    ids = [["a", "b", "c"], [7, 8, 9]]
    expected = rank.rerank(ids, queries, candidates)
    got = dropin.rerank(ids, *moved(backend, queries, candidates), backend=backend)
    for exp, mine in zip(expected, got, strict=True):
        same_ranking(mine, exp)
    assert dropin.rerank([], [], [], backend=backend) == rank.rerank([], [], []) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_keep_pylates_dtype(ref, backend):
    """numpy's default float64: PyLate returns float64 scores; the kernel path scores in float32."""
    q, d, g = _data(seed=5)
    qm, dm = _masks(g, 3, 6, 5, 7, "suffix")
    q, d = q.double(), d.double()
    expected = ref.colbert_scores(q, d, qm, dm, backend="torch")
    got = dropin.colbert_scores(*moved(backend, q, d, qm, dm), backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)
    pairs = dropin.colbert_scores_pairwise(list(moved(backend, *q)), list(moved(backend, *d[:3])),
                                           backend=backend)
    assert pairs.dtype == torch.float64
    torch.testing.assert_close(pairs.cpu(), ref.colbert_scores_pairwise(list(q), list(d[:3])),
                               atol=1e-4, rtol=1e-5)
    ranked = dropin.rerank([[0, 1]], moved(backend, q[0]), [moved(backend, d[0], d[1][:3])], backend=backend)
    np.testing.assert_allclose([r["score"] for r in ranked[0]],
                               sorted(ref.colbert_scores(q[:1], torch.stack([d[0], torch.cat(
                                   [d[1][:3], torch.zeros(4, 16, dtype=torch.float64)])]))[0].tolist(),
                                      reverse=True), atol=1e-4)


def test_backend_names_resolve_as_in_pylate(ref, monkeypatch):
    """Any letter case; PyLate's "flash" and "lik" pick our kernel; None reads
    PYLATE_SCORES_BACKEND (default "auto")."""
    q, d, g = _data(seed=6)
    qm, dm = _masks(g, 3, 6, 5, 7, "suffix")
    expected = ref.colbert_scores(q, d, qm, dm, backend="torch")
    torch_path = []
    original = dropin._pylate_torch
    monkeypatch.setattr(dropin, "_pylate_torch", lambda *a: torch_path.append(1) or original(*a))
    auto_is_torch = scoring.resolve_backend(torch.device(KERNEL_DEVICE), None) == "torch"
    for name, uses_torch in [("Torch", True), ("AUTO", auto_is_torch), ("flash", False), ("lik", False),
                             ("triton", False)]:
        device = "cpu" if name == "Torch" else KERNEL_DEVICE
        torch_path.clear()
        close(dropin.colbert_scores(*[t.to(device) for t in (q, d, qm, dm)], backend=name), expected)
        assert bool(torch_path) == uses_torch, name
    monkeypatch.setenv("PYLATE_SCORES_BACKEND", "torch")
    torch_path.clear()
    close(dropin.colbert_scores(*[t.to(KERNEL_DEVICE) for t in (q, d, qm, dm)]), expected)
    assert torch_path
    monkeypatch.setenv("PYLATE_SCORES_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        dropin.colbert_scores(q, d)


def test_dims_past_the_kernels_limits_score_as_pylate_by_default(ref, kernel_calls, triton_by_default,
                                                                 monkeypatch):
    """With the kernel as the default (CUDA, once it is), embedding dims it does not take (over
    1024; over 512 in float32, pairs of mixed 16-bit dtypes included; over 256 on a T4) get
    PyLate's formula and results, not an error; dims it takes still reach it."""
    rank = require_reference("pylate.rank")
    q, d, g = _data(seed=9, h=513)
    qm, dm = _masks(g, 3, 6, 5, 7, "suffix")
    close(dropin.colbert_scores(q, d, qm, dm), ref.colbert_scores(q, d, qm, dm, backend="torch"))
    close(dropin.colbert_kd_scores(q, d.unsqueeze(0).expand(3, -1, -1, -1)),
          ref.colbert_kd_scores(q, d.unsqueeze(0).expand(3, -1, -1, -1), backend="torch"))
    qs, ds = [q[0].bfloat16(), q[1].half()], [d[0].bfloat16(), d[1].half()]  # scored together in float32
    expected = ref.colbert_scores_pairwise(qs, ds, backend="torch")
    got = dropin.colbert_scores_pairwise(qs, ds)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    expected = rank.rerank([["a", "b"]], [q[0]], [[d[0], d[1][:3]]])
    assert dropin.rerank([["a", "b"]], [q[0]], [[d[0], d[1][:3]]]) == expected
    assert kernel_calls == []
    if "triton" in BACKENDS:
        q, d, _ = _data(seed=10, a=1, b=2, s=2, t=3, h=600)
        q, d = q.half().to(KERNEL_DEVICE), d.half().to(KERNEL_DEVICE)
        torch.testing.assert_close(dropin.colbert_scores(q, d).cpu().float(),
                                   ref.colbert_scores(q.cpu().float(), d.cpu().float()), atol=2e-2, rtol=2e-3)
        assert kernel_calls == [torch.Size([1, 2, 600])]
    from colbert_triton.kernels import maxsim as kernel

    monkeypatch.setattr(kernel, "shared_memory_limit", lambda device: 65536)  # a T4's
    kernel_calls.clear()
    q, d, g = _data(seed=11, h=300)
    qm, dm = _masks(g, 3, 6, 5, 7, "suffix")
    q, d, qm, dm = (t.to(KERNEL_DEVICE) for t in (q.half(), d.half(), qm, dm))
    close(dropin.colbert_scores(q, d, qm, dm), ref.colbert_scores(q, d, qm, dm, backend="torch"))
    assert kernel_calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_masks_take_part_in_the_result_dtype(ref, backend):
    """PyLate multiplies the masks in: float16 embeddings with float32 masks give float32 scores,
    with bool masks float16."""
    q, d, g = _data(seed=7)
    qm, dm = _masks(g, 3, 6, 5, 7, "suffix")
    q, d = q.half(), d.half()
    for masks in ((qm, dm), (qm.bool(), dm.bool()), (None, dm), (qm, None)):
        expected = ref.colbert_scores(q.float(), d.float(), *masks, backend="torch")
        expected_dtype = ref.colbert_scores(q, d, *masks, backend="torch").dtype  # PyLate in fp16
        got = dropin.colbert_scores(*moved(backend, q, d, *masks), backend=backend)
        assert got.dtype == expected_dtype
        torch.testing.assert_close(got.cpu().float(), expected, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_as_in_pylate(ref, backend):
    """PyLate trains through these functions; the kernel has no backward pass, so inputs that
    need gradients take PyLate's formula on every backend name: same scores, same gradients."""
    q, d, g = _data(seed=8)
    qm, dm = _masks(g, 3, 6, 5, 7, "interior")
    q_ref, d_ref = q.clone().requires_grad_(), d.clone().requires_grad_()
    ref.colbert_scores(q_ref, d_ref, qm, dm, backend="torch").sum().backward()
    q_ours, d_ours, qm, dm = moved(backend, q, d, qm, dm)
    q_ours.requires_grad_()
    d_ours.requires_grad_()
    dropin.colbert_scores(q_ours, d_ours, qm, dm, backend=backend).sum().backward()
    torch.testing.assert_close(q_ours.grad.cpu(), q_ref.grad)
    torch.testing.assert_close(d_ours.grad.cpu(), d_ref.grad)
    pair = dropin.colbert_scores_pairwise([q_ours[0]], [d_ours[0]], backend=backend)
    assert pair.requires_grad


def test_the_rest_of_pylate_scores_and_rank_resolves_to_pylate(ref):
    """Code that changed `from pylate import rank, scores` to this module keeps every other name
    of both: each public name of either is ours or PyLate's own object."""
    rank = require_reference("pylate.rank")
    for module in (ref, rank):
        public = [name for name in vars(module) if not name.startswith("_") and name != "annotations"
                  and not inspect.ismodule(getattr(module, name))]
        assert public
        for name in public:
            ours = getattr(dropin, name)
            if name in ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores", "rerank", "RerankResult"):
                assert ours.__module__ == dropin.__name__, name
            else:
                assert ours is getattr(module, name), name
    with pytest.raises(AttributeError, match="has no attribute 'colbert_scorez'"):
        dropin.colbert_scorez  # noqa: B018


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_axes_as_in_pylate(ref, backend):
    """A document axis with no slots: PyLate's max raises IndexError deep in torch; here a clear
    error on every backend. Dim 0 (nothing to multiply) and queries with no rows: PyLate's zeros."""
    rank = require_reference("pylate.rank")
    q, d, _ = _data()
    with pytest.raises(IndexError):
        ref.colbert_scores(q, d[:, :0], backend="torch")
    no_slots = [
        lambda: dropin.colbert_scores(*moved(backend, q, d[:, :0]), backend=backend),
        lambda: dropin.colbert_kd_scores(*moved(backend, q, torch.zeros(3, 2, 0, 16)), backend=backend),
        lambda: dropin.colbert_scores_pairwise(moved(backend, q[0], q[1]), moved(backend, d[0], d[0, :0]),
                                               backend=backend),
        # A query whose candidates all have no rows (PyLate pads them to the longest: none).
        lambda: dropin.rerank([["a"], ["b"]], moved(backend, q[0], q[1]), [moved(backend, d[0]), moved(backend, d[1, :0])],
                              backend=backend),
    ]
    for call in no_slots:
        with pytest.raises(ValueError, match="no token slots .*PyLate raises IndexError"):
            call()
    close(dropin.colbert_scores(*moved(backend, q[..., :0], d[..., :0]), backend=backend),
          ref.colbert_scores(q[..., :0], d[..., :0], backend="torch"))
    close(dropin.colbert_scores_pairwise(moved(backend, q[0, :, :0]), moved(backend, d[0, :, :0]), backend=backend),
          ref.colbert_scores_pairwise([q[0, :, :0]], [d[0, :, :0]], backend="torch"))
    close(dropin.colbert_scores(*moved(backend, q[:, :0], d), backend=backend),
          ref.colbert_scores(q[:, :0], d, backend="torch"))
    # A candidate with no rows beside longer ones: padded with zeros, it scores 0.0 in PyLate.
    ids, docs = [["empty", "x"]], [[d[0, :0], d[1]]]
    expected = rank.rerank(ids, [q[0]], docs)
    got = dropin.rerank(ids, moved(backend, q[0]), [moved(backend, *docs[0])], backend=backend)
    same_ranking(got[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_of_different_dtypes_as_in_pylate(ref, backend):
    """PyLate scores each pair in its own dtype and stacks (promoting) the scores."""
    q, d, _ = _data(h=8)
    qs, ds = [q[0], q[1].half()], [d[0], d[1].half()]
    got = dropin.colbert_scores_pairwise(moved(backend, *qs), moved(backend, *ds), backend=backend)
    expected = ref.colbert_scores_pairwise(qs, ds, backend="torch")
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.cpu(), expected, atol=1e-2, rtol=1e-3)  # the fp16 pair: fp16 sums in PyLate


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_are_checked_like_the_embeddings(backend):
    q, d, _ = _data()
    nan_mask, inf_mask = torch.ones(5, 7), torch.ones(3, 6)
    nan_mask[0, 4:] = float("nan")
    inf_mask[:, 5] = float("inf")
    with pytest.raises(ValueError, match="documents_mask values contain NaN or infinite"):
        dropin.colbert_scores(*moved(backend, q, d, None, nan_mask), backend=backend)
    with pytest.raises(ValueError, match="queries_mask values contain NaN or infinite"):
        dropin.colbert_scores(*moved(backend, q, d, inf_mask), backend=backend)
    with pytest.raises(TypeError, match="queries_mask must be real"):
        dropin.colbert_scores(*moved(backend, q, d, torch.ones(3, 6, dtype=torch.complex64)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank_and_pairs_refuse_nan_in_any_candidate(backend):
    q, d, _ = _data()
    bad = d[2].clone()
    bad[-1, 0] = float("nan")
    with pytest.raises(ValueError, match="documents embeddings contain NaN or infinite"):
        dropin.rerank([["a", "b", "c"]], moved(backend, q[0]), [moved(backend, d[0], d[1], bad)], backend=backend)
    with pytest.raises(ValueError, match="queries embeddings contain NaN or infinite"):
        dropin.colbert_scores_pairwise(moved(backend, q[0], bad), moved(backend, d[0], d[1]), backend=backend)


# Tests a fifth mutation round asked for (input conversion, the chunked PyTorch path, edge
# shapes, rerank's arguments).


def _negative(seed=0, a=2, s=4, b=3, t=5, h=8):
    """Queries along +e0 and documents along -e0: every similarity is negative, so whether a
    slot enters the max as 0.0, as its own similarity or with its sign flipped shows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(a, s, h, generator=g) * 0.1
    q[..., 0] = 1.0 + torch.rand(a, s, generator=g)
    d = torch.randn(b, t, h, generator=g) * 0.1
    d[..., 0] = -1.0 - torch.rand(b, t, generator=g)
    return q, d


@pytest.mark.parametrize("kind", ["scores", "kd"])
def test_torch_path_chunked_over_documents_matches_pylate(ref, monkeypatch, kind):
    """PyLate's formula runs in chunks of documents (the [A, B, S, T] block kept bounded); two
    documents a chunk here, with masks that differ per document, give PyLate's unchunked scores.
    (Kills: a chunk's mask not offset by its first document; a chunk slice one short.)"""
    monkeypatch.setattr(dropin, "_chunk", lambda queries, documents: 2)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(3, 4, 8, generator=g)
    qm = torch.ones(3, 4)
    qm[1, -1] = 0
    if kind == "scores":
        d = torch.randn(5, 6, 8, generator=g)
        dm = (torch.arange(6)[None] < torch.tensor([6, 2, 5, 1, 3])[:, None]).float()
        call, expected_fn = dropin.colbert_scores, ref.colbert_scores
    else:
        d = torch.randn(3, 5, 6, 8, generator=g)
        dm = (torch.arange(6) < torch.randint(1, 7, (3, 5, 1), generator=g)).float()
        call, expected_fn = dropin.colbert_kd_scores, ref.colbert_kd_scores
    expected = expected_fn(q, d, qm, dm, backend="torch")
    got = call(q, d, qm, dm, backend="torch")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_documents_give_an_empty_score_matrix_as_in_pylate(ref, backend):
    """B = 0 documents: PyLate returns an [A, 0] matrix (no error)."""
    q, d = _negative()
    expected = ref.colbert_scores(q, d[:0], backend="torch")
    got = dropin.colbert_scores(*moved(backend, q, d[:0]), backend=backend)
    assert got.shape == expected.shape == (2, 0) and got.dtype == expected.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_mask_values_are_multiplied_in_as_in_pylate(ref, backend):
    """PyLate multiplies any real mask into the similarities; a negative value at a document's
    last slot is not padding (it flips that similarity's sign, which then wins the max)."""
    q, d = _negative(seed=1)
    dm = torch.ones(3, 5)
    dm[0, -1] = -1.0
    dm[1, 3:] = torch.tensor([0.0, -0.5])
    expected = ref.colbert_scores(q, d, None, dm, backend="torch")
    got = dropin.colbert_scores(*moved(backend, q, d, None, dm), backend=backend)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_numpy", [False, True], ids=["tensor", "ndarray"])
def test_rerank_takes_one_query_as_a_2d_array_as_pylate_does(backend, as_numpy):
    """pylate.rank.rerank reshapes a single [S, H] query (tensor or array) to a batch of one."""
    rank = require_reference("pylate.rank")
    g = torch.Generator().manual_seed(5)
    query = torch.randn(4, 8, generator=g)
    docs = [torch.randn(n, 8, generator=g) for n in (3, 6)]
    expected = rank.rerank([["a", "b"]], query.numpy() if as_numpy else query, [docs])
    if backend == "triton" and as_numpy and KERNEL_DEVICE != "cpu":
        pytest.skip("numpy inputs are CPU tensors; the GPU kernel takes CUDA tensors")
    q = query.numpy() if as_numpy else query.to(on(backend))
    got = dropin.rerank([["a", "b"]], q, [moved(backend, *docs)], backend=backend)
    same_ranking(got[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank_exact_ties_keep_the_given_order(backend):
    """The drop-in's documented tie rule (a stable sort): 40 identical candidates come back in
    the order given (an unstable CPU sort reorders ties from 17 elements on)."""
    g = torch.Generator().manual_seed(6)
    query, doc = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    ids = [f"d{i}" for i in range(40)]
    got = dropin.rerank([ids], moved(backend, query), [moved(backend, *[doc] * 40)], backend=backend)
    assert [r["id"] for r in got[0]] == ids


def test_rerank_moves_everything_to_the_device_asked_for(monkeypatch):
    """rerank(device=...) scores on that device (PyLate moves query and candidates there): the
    scoring call sees the requested device, not the queries' own."""
    seen = []

    def recording_scores(queries, documents, *args, **kwargs):
        seen.append((queries.device.type, documents.device.type))
        return torch.zeros(1, documents.shape[0])  # on the CPU: meta tensors hold no values

    monkeypatch.setattr(dropin, "colbert_scores", recording_scores)
    g = torch.Generator().manual_seed(7)
    query, docs = torch.randn(3, 8, generator=g), [torch.randn(n, 8, generator=g) for n in (2, 4)]
    dropin.rerank([["a", "b"]], [query], [docs], device="meta", backend="torch")
    assert seen == [("meta", "meta")]


@pytest.fixture
def device_copies(monkeypatch):
    """The shape of every tensor copied to another device through Tensor.to."""
    copies = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if out.device != self.device:
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    return copies


def test_rerank_copies_host_candidates_to_the_device_once(monkeypatch, device_copies):
    """A retriever's candidates come from an index in host memory: joined there and copied once
    (as PyLate pads them on the host and copies once), not one copy per candidate; on both
    backends' joins (padded for PyLate's formula, concatenated for the kernel)."""
    monkeypatch.setattr(dropin, "colbert_scores", lambda q, d, *args, **kwargs: torch.zeros(1, d.shape[0]))
    docs = [torch.randn(n, 8) for n in (2, 4, 3)]
    dropin.rerank([["a", "b", "c"]], [torch.randn(3, 8)], [docs], device="meta", backend="torch")
    assert device_copies == [(3, 8), (3, 4, 8)]  # the query, then all its candidates padded
    device_copies.clear()
    joined = dropin._joined(torch.cat, docs, torch.device("meta"))
    assert joined.shape == (9, 8) and device_copies == [(9, 8)]
    mixed = [docs[0].to("meta"), *docs[1:]]
    device_copies.clear()
    joined = dropin._joined(torch.cat, mixed, torch.device("meta"))
    assert joined.shape == (9, 8) and device_copies == [(4, 8), (3, 8)]  # on two devices: one by one


def test_lists_of_float64_arrays_become_float32_as_in_pylate(ref):
    """PyLate's convert_to_tensor stacks a list of arrays as float32 (numpy's float64 included),
    so such inputs score in float32; a float64 ndarray given whole stays float64."""
    utils = require_reference("pylate.utils")
    g = torch.Generator().manual_seed(8)
    q = [a.numpy() for a in torch.randn(2, 3, 8, generator=g).double()]
    d = [a.numpy() for a in torch.randn(4, 5, 8, generator=g).double()]
    assert dropin.convert_to_tensor(q).dtype == utils.convert_to_tensor(q).dtype == torch.float32
    expected = ref.colbert_scores(q, d, backend="torch")
    got = dropin.colbert_scores(q, d, backend="torch")
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_nested_lists_of_ints_become_float32_as_in_pylate(ref):
    """PyLate turns nested Python lists into float32 whatever their numbers (ints included)."""
    queries = [[[1, 0], [0, 2]], [[0, 0], [3, 1]]]
    documents = [[[10, 0], [0, 1], [1, 1]], [[0, 100], [1, 0], [2, 2]]]
    masks = [[1, 1, 0], [1, 0, 1]]
    expected = ref.colbert_scores(queries, documents, None, masks, backend="torch")
    got = dropin.colbert_scores(queries, documents, None, masks, backend="torch")
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_a_flat_list_mixing_ints_and_floats_is_one_float32_tensor():
    """Numbers of both kinds in one list are one float32 vector (only a mix with other kinds of
    item is refused); PyLate's own convert_to_tensor returns None for such a list."""
    got = dropin.convert_to_tensor([1, 2.5, 0])
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 2.5, 0.0]


def test_rerank_with_torch_named_never_reaches_the_kernel(monkeypatch, kernel_calls, triton_by_default):
    """backend="torch" holds for the whole call: PYLATE_SCORES_BACKEND=triton does not send the
    scoring inside rerank to the kernel (which would refuse a dim past its limit)."""
    rank = require_reference("pylate.rank")
    g = torch.Generator().manual_seed(12)
    query, docs = torch.randn(3, 1100, generator=g), [torch.randn(n, 1100, generator=g) for n in (2, 4)]
    expected = rank.rerank([["a", "b"]], [query], [docs])  # before the variable PyLate reads too
    monkeypatch.setenv("PYLATE_SCORES_BACKEND", "triton")
    got = dropin.rerank([["a", "b"]], [query], [docs], backend="torch")
    same_ranking(got[0], expected[0], rtol=1e-5)
    assert kernel_calls == []


def test_pairs_of_different_dims_score_as_pylate_by_default(ref, triton_by_default):
    """PyLate scores each pair on its own, so pairs may differ in dim; one kernel launch takes
    one dim, so by default such pairs take PyLate's formula, and naming the kernel is refused."""
    g = torch.Generator().manual_seed(13)
    qs = [torch.randn(3, 8, generator=g), torch.randn(2, 16, generator=g)]
    ds = [torch.randn(4, 8, generator=g), torch.randn(5, 16, generator=g)]
    close(dropin.colbert_scores_pairwise(qs, ds), ref.colbert_scores_pairwise(qs, ds, backend="torch"))
    if "triton" in BACKENDS:
        with pytest.raises(ValueError, match="dim"):
            dropin.colbert_scores_pairwise(moved("triton", *qs), moved("triton", *ds), backend="triton")


# patch_pylate: PyLate's own code scoring with the drop-in

_SITES = {
    "colbert_scores": ("pylate.scores", "pylate.scores.similarity_functions"),
    "colbert_scores_pairwise": ("pylate.scores", "pylate.scores.similarity_functions",
                                "pylate.evaluation.colbert_triplet"),
    "rerank": ("pylate.rank", "pylate.rank.rank", "pylate.retrieve.colbert"),
}


@pytest.fixture
def pylate_modules(ref):
    """Every module that binds a patched function, imported; PyLate's own again after the test."""
    modules = {name: require_reference(name) for names in _SITES.values() for name in names}
    originals = {(name, home): getattr(modules[home], name) for name, homes in _SITES.items() for home in homes}
    yield modules
    dropin.unpatch_pylate()
    for (name, home), original in originals.items():
        setattr(modules[home], name, original)


def test_patch_pylate_replaces_every_binding_and_unpatch_restores_it(pylate_modules):
    originals = {(name, home): getattr(pylate_modules[home], name)
                 for name, homes in _SITES.items() for home in homes}
    assert all(f.__module__.startswith("pylate.") for f in originals.values())
    for _ in range(2):  # a second call changes nothing
        dropin.patch_pylate()
        for (name, home) in originals:
            assert getattr(pylate_modules[home], name) is getattr(dropin, name), f"{home}.{name}"
    similarity = pylate_modules["pylate.scores.similarity_functions"].SimilarityFunction
    assert similarity.to_similarity_fn("MaxSim") is dropin.colbert_scores  # what a new model takes
    assert similarity.to_similarity_pairwise_fn("MaxSim") is dropin.colbert_scores_pairwise
    dropin.patch_pylate(backend="Triton")  # another backend replaces ours, PyLate's name case
    for (name, home) in originals:
        installed = getattr(pylate_modules[home], name)
        assert installed.func is getattr(dropin, name) and installed.keywords == {"backend": "Triton"}
    dropin.unpatch_pylate()
    for (name, home), original in originals.items():
        assert getattr(pylate_modules[home], name) is original, f"{home}.{name}"
    dropin.unpatch_pylate()  # unpatched: nothing to undo
    assert all(getattr(pylate_modules[home], name) is f for (name, home), f in originals.items())
    # A binding the user replaced with something of their own is theirs, patched or not, the
    # public module's included.
    def own(*args, **kwargs):
        pass

    pylate_modules["pylate.retrieve.colbert"].rerank = own
    pylate_modules["pylate.scores"].colbert_scores = own
    dropin.patch_pylate()
    assert pylate_modules["pylate.retrieve.colbert"].rerank is own
    assert pylate_modules["pylate.scores"].colbert_scores is own
    assert pylate_modules["pylate.rank"].rerank is dropin.rerank
    assert pylate_modules["pylate.scores.similarity_functions"].colbert_scores is dropin.colbert_scores
    dropin.unpatch_pylate()
    assert pylate_modules["pylate.retrieve.colbert"].rerank is own
    assert pylate_modules["pylate.scores"].colbert_scores is own


def test_models_score_with_ours_while_the_patch_holds_and_with_pylates_after(pylate_modules, pylate_dir):
    """Models loaded before the patch, while it holds (under another backend), and after."""
    models = require_reference("pylate.models")
    pylate_colbert = require_reference("pylate.scores.colbert")
    model = models.ColBERT(model_name_or_path=str(pylate_dir), device="cpu")
    assert model.similarity is pylate_colbert.colbert_scores
    assert model.similarity_pairwise is pylate_colbert.colbert_scores_pairwise
    for backend in (None, "torch"):  # another backend replaces ours
        dropin.patch_pylate(backend=backend)
        for prop, name in (("similarity", "colbert_scores"), ("similarity_pairwise", "colbert_scores_pairwise")):
            got = getattr(model, prop)
            assert (got if backend is None else got.func) is getattr(dropin, name)
            assert backend is None or got.keywords == {"backend": backend}
    queries = [torch.as_tensor(q) for q in model.encode(QUERIES[:2], is_query=True)]
    documents = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(d) for d in model.encode(DOCUMENTS[:3], is_query=False)],
                                                batch_first=True)
    torch.testing.assert_close(model.similarity(queries, documents),
                               pylate_colbert.colbert_scores(queries, documents), atol=1e-6, rtol=0)
    own = pylate_colbert.colbert_scores  # a model given a function of its own keeps it
    other = models.ColBERT(model_name_or_path=str(pylate_dir), device="cpu")  # made under backend "torch"
    assert other.similarity_fn_name == "MaxSim"  # set now, so the line below is not overwritten
    other._similarity = mine = functools.partial(own)
    assert other.similarity is mine
    assert other.similarity_pairwise.func is dropin.colbert_scores_pairwise
    assert other.similarity_pairwise.keywords == {"backend": "torch"}
    dropin.patch_pylate()  # the patch of the moment, not the one the model was made under
    assert other.similarity_pairwise is dropin.colbert_scores_pairwise and other.similarity is mine
    dropin.unpatch_pylate()
    for loaded in (model, other):  # PyLate's again, whenever the model was loaded
        assert loaded.similarity_pairwise is pylate_colbert.colbert_scores_pairwise
    assert model.similarity is pylate_colbert.colbert_scores and other.similarity is mine
    after = models.ColBERT(model_name_or_path=str(pylate_dir), device="cpu")
    assert after.similarity is pylate_colbert.colbert_scores
    assert after.similarity_pairwise is pylate_colbert.colbert_scores_pairwise
    # Unpatched, the class's properties hand what sentence-transformers' own would.
    for prop in ("similarity", "similarity_pairwise"):
        assert getattr(after, prop) is getattr(models.ColBERT.__mro__[1], prop).__get__(after)


class _TokenIndex:
    """A token-level index as PyLate's retriever sees one (Voyager's interface): per query token,
    the ids of its nearest documents; then the candidates' embeddings."""

    is_end_to_end_index = False

    def __init__(self, documents: dict[str, torch.Tensor]):
        self.documents = documents

    def __call__(self, queries_embeddings, k):
        ids = sorted(self.documents)
        # Each query token's "nearest" documents: three, spread over the corpus.
        return {"documents_ids": [[[ids[(3 * i + j) % len(ids)] for j in range(3)] for i in range(len(q))]
                                  for q in queries_embeddings]}

    def get_documents_embeddings(self, documents_ids):
        return [[self.documents[i] for i in ids] for ids in documents_ids]


@pytest.mark.parametrize("backend", [None, "triton"])
def test_patched_pylate_retriever_reranks_with_the_dropin(pylate_modules, kernel_calls, backend):
    """PyLate's retriever over a token index, patched: the same ranking as PyLate's own. Patched
    with backend="triton", every call PyLate makes reaches the kernel, while PyLate's own
    functions (training's) keep working: the name is not put in PYLATE_SCORES_BACKEND, which
    they refuse."""
    g = torch.Generator().manual_seed(17)
    documents = {f"doc-{i}": torch.nn.functional.normalize(torch.randn(int(n), 16, generator=g), dim=-1)
                 for i, n in enumerate(torch.randint(1, 9, (12,), generator=g))}
    queries = [torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1) for _ in range(3)]
    retriever = pylate_modules["pylate.retrieve.colbert"].ColBERT(index=_TokenIndex(documents))
    expected = retriever.retrieve(queries, k=4, device="cpu")
    dropin.patch_pylate(backend=backend)
    ours = retriever.retrieve(queries, k=4, device=KERNEL_DEVICE)
    # on the CPU the default is PyLate's formula; the named kernel takes the three queries'
    # candidates in one launch
    assert len(kernel_calls) == (1 if backend else 0)
    assert [[r["id"] for r in row] for row in ours] == [[r["id"] for r in row] for row in expected]
    for ours_row, expected_row in zip(ours, expected):
        np.testing.assert_allclose([r["score"] for r in ours_row], [r["score"] for r in expected_row],
                                   rtol=1e-5, atol=1e-5)
    similarity = pylate_modules["pylate.scores.similarity_functions"].SimilarityFunction.to_similarity_fn("MaxSim")
    padded = torch.nn.utils.rnn.pad_sequence(list(documents.values()), batch_first=True)
    pylate_own = require_reference("pylate.scores.colbert").colbert_scores  # what training's ColBERTScores calls
    torch.testing.assert_close(similarity(torch.stack(queries), padded), pylate_own(torch.stack(queries), padded))


def test_patch_pylate_refuses_what_it_cannot_do(pylate_modules, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        dropin.patch_pylate(backend="cuda")
    monkeypatch.delattr(pylate_modules["pylate.rank.rank"], "rerank")
    with pytest.raises(RuntimeError, match="this PyLate has no pylate.rank.rank.rerank to replace"):
        dropin.patch_pylate()
    monkeypatch.setitem(sys.modules, "pylate.scores", None)  # `import pylate.scores` raises ImportError
    with pytest.raises(ImportError, match="patch_pylate: pylate is not installed"):
        dropin.patch_pylate()
    assert pylate_modules["pylate.scores.similarity_functions"].colbert_scores.__module__ == "pylate.scores.colbert"


def test_pylate_imported_after_the_patch_binds_ours_but_training_keeps_its_own():
    """A module imported after patch_pylate binds ours through `pylate.scores`/`pylate.rank`;
    unpatch_pylate gives it PyLate's back. The distillation loss's default score stays PyLate's."""
    require_reference("pylate.scores")
    script = """
import inspect
from colbert_triton import pylate as dropin
dropin.patch_pylate()
import pylate.retrieve.colbert as retriever, pylate.evaluation.colbert_triplet as triplet
import pylate.losses.distillation as distillation, pylate.scores.colbert as pylate_colbert
assert retriever.rerank is dropin.rerank and triplet.colbert_scores_pairwise is dropin.colbert_scores_pairwise
default = inspect.signature(distillation.Distillation.__init__).parameters["score_metric"].default
assert default is pylate_colbert.colbert_kd_scores
dropin.unpatch_pylate()
assert retriever.rerank.__module__ == "pylate.rank.rank"
assert triplet.colbert_scores_pairwise is pylate_colbert.colbert_scores_pairwise
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_patched_pylate_pools_documents_with_the_kernels(pylate_modules, pylate_dir, monkeypatch):
    """patch_pylate(backend="triton"): a PyLate model's encode(pool_factor=...) pools with our
    kernels (here in the interpreter): PyLate's own unpooled rows, pooled by `kernels.pooling`,
    each document's rows on the host. Under a backend that resolves to torch there, and once
    unpatched, PyLate's own pooling."""
    models = require_reference("pylate.models")
    from colbert_triton.kernels import pooling

    own_pooling = models.ColBERT.pool_embeddings_hierarchical
    model = models.ColBERT(model_name_or_path=str(pylate_dir), device="cpu")
    docs = DOCUMENTS[:4]

    def encode(**settings):
        return [torch.as_tensor(d) for d in model.encode(docs, is_query=False, **settings)]

    plain, pylates = encode(), encode(pool_factor=2)
    calls = []
    launch = pooling.pool_documents
    monkeypatch.setattr(pooling, "pool_documents", lambda *args: calls.append(args[1:]) or launch(*args))
    dropin.patch_pylate(backend="triton", encoder=False)  # PyLate's trunk: the same rows to pool
    ours = encode(pool_factor=2)
    assert len(calls) == 1 and calls[0][1:] == (2, 1)
    expected, lengths = launch(torch.cat(plain), [len(p) for p in plain], 2, 1).result()
    assert [len(o) for o in ours] == lengths.tolist() == [len(p) for p in pylates]
    assert torch.equal(torch.cat(ours), expected)
    for backend in (None, "torch"):  # None: the PyTorch path on the CPU, as PyLate's
        dropin.patch_pylate(backend=backend)
        again = encode(pool_factor=2)
        assert all(torch.equal(a, p) for a, p in zip(again, pylates)) and len(calls) == 1
    dropin.unpatch_pylate()
    assert models.ColBERT.pool_embeddings_hierarchical is own_pooling


def _trunk_outputs(model) -> list[torch.Tensor]:
    """A PyLate model's rows for two queries (without, then with attention to their [MASK] rows)
    and three documents (their kept rows, then every padded row: ``output_value=None``)."""
    rows = []
    for attend in (False, True):
        model.attend_to_expansion_tokens = attend
        rows += model.encode(QUERIES[:2], is_query=True, convert_to_tensor=True)
    model.attend_to_expansion_tokens = False
    rows += model.encode(DOCUMENTS[:3], is_query=False, convert_to_tensor=True)
    rows += model.encode(DOCUMENTS[:3], is_query=False, output_value=None)["token_embeddings"]
    return [torch.as_tensor(r).float().cpu() for r in rows]


@pytest.fixture
def trunk_calls(monkeypatch):
    """The number of sequences of every batch that reaches our encoder's trunk."""
    from colbert_triton.model import encoder

    calls = []
    encode_hidden = encoder.encode_hidden
    monkeypatch.setattr(encoder, "encode_hidden", lambda weights, batch, ops: calls.append(batch.num_seqs) or
                        encode_hidden(weights, batch, ops))
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_patched_pylate_encodes_on_the_triton_trunk(pylate_modules, pylate_dir, trunk_calls, dtype):
    """patch_pylate(backend="triton"): a PyLate model loaded before the patch encodes on our
    Triton encoder's trunk (PyLate's Dense, masks and normalisation after it): the rows of
    PyLate's own in float32 (within 2e-5), in 16 bits as close to them as PyLate's own 16-bit
    rows are (per-token cosine), every padded row included. Under the torch backend, with
    ``encoder=False`` and once unpatched, Hugging Face's trunk again: PyLate's rows to the bit."""
    models = require_reference("pylate.models")
    model = models.ColBERT(model_name_or_path=str(pylate_dir), device=KERNEL_DEVICE, model_kwargs={"dtype": dtype})
    own = _trunk_outputs(model)
    reference = own if dtype == torch.float32 else _trunk_outputs(
        models.ColBERT(model_name_or_path=str(pylate_dir), device=KERNEL_DEVICE))
    assert not trunk_calls
    dropin.patch_pylate(backend="triton")
    ours = _trunk_outputs(model)
    assert trunk_calls == [2, 2, 3, 3]
    assert [o.shape for o in ours] == [o.shape for o in own]
    assert any(len(full) > len(kept) for full, kept in zip(own[7:], own[4:7]))  # padded rows compared too
    if dtype == torch.float32:
        for got, expected in zip(ours, own):
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    else:
        for got, pylates, exact in zip(ours, own, reference):
            cosine = torch.nn.functional.cosine_similarity
            keep = exact.norm(dim=-1) > 0  # a zero row (none expected) has no direction
            assert (cosine(got, exact)[keep] >= torch.clamp(cosine(pylates, exact)[keep].min() - 1e-3, max=0.999)).all()
    for settings in ({"backend": "torch"}, {"backend": "triton", "encoder": False}):
        dropin.patch_pylate(**settings)
        assert all(torch.equal(a, b) for a, b in zip(_trunk_outputs(model), own)) and len(trunk_calls) == 4
    assert ("forward" in models.ColBERT.__dict__) is False  # encoder=False took the patch back
    dropin.patch_pylate(backend="triton")
    dropin.unpatch_pylate()
    assert "forward" not in models.ColBERT.__dict__
    assert all(torch.equal(a, b) for a, b in zip(_trunk_outputs(model), own)) and len(trunk_calls) == 4


def test_the_triton_trunk_takes_only_batches_it_computes_as_bertmodel(pylate_modules, pylate_dir, trunk_calls):
    """`_triton_trunk` on features as PyLate's tokenizer makes them: BertModel's hidden states
    (every row); None (Hugging Face's trunk runs) for what it does not compute the same way:
    gradients, training mode, autocast, keyword arguments, hidden states or attentions asked
    for, a decoder, a module other than sentence-transformers' Transformer, token types other
    than 0, left padding or a hole in the mask, a row with no key, float masks, ids past the
    vocabulary, an input BertModel takes that ours does not, rows past the position table,
    another backend. The weights are laid out once, again after a change PyTorch counts or at
    the next patch, and dropped when unpatched."""
    models = require_reference("pylate.models")
    model = models.ColBERT(model_name_or_path=str(pylate_dir), device=KERNEL_DEVICE)
    bert = model[0].auto_model
    dropin.patch_pylate(backend="triton")
    features = model.tokenize(["late interaction", "a longer document about retrieval"], is_query=False)
    features = {k: v.to(KERNEL_DEVICE) for k, v in features.items()}
    assert features["attention_mask"][0].tolist().count(0) > 0  # right padding to compare rows past it
    with torch.no_grad():
        expected = bert(**features).last_hidden_state
        got = dropin._triton_trunk(model, dict(features))
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=2e-5, rtol=0)
    weights = dropin._trunk_weights(bert, bert.device)
    assert dropin._trunk_weights(bert, bert.device) is weights  # laid out once

    def changed(**updates):
        return {**features, **{k: v.to(KERNEL_DEVICE) for k, v in updates.items()}}

    mask = features["attention_mask"]
    left = torch.flip(mask, dims=[1])
    hole = mask.clone()
    hole[1, 1] = 0
    empty = mask.clone()
    empty[0] = 0
    past = features["input_ids"].clone()
    past[0, 1] = bert.config.vocab_size
    types = torch.zeros_like(mask)
    types[1, 2] = 1
    refused = [changed(token_type_ids=types), changed(attention_mask=left), changed(attention_mask=hole),
               changed(attention_mask=empty), changed(attention_mask=mask.float()), changed(input_ids=past),
               changed(position_ids=torch.zeros_like(mask))]
    long = torch.ones(1, bert.config.max_position_embeddings + 1, dtype=torch.long, device=KERNEL_DEVICE)
    refused.append({"input_ids": long, "attention_mask": long, "token_type_ids": 0 * long})
    with torch.no_grad():
        for case in refused:
            assert dropin._triton_trunk(model, case) is None
        model.train()
        assert dropin._triton_trunk(model, dict(features)) is None
        model.eval()
        transformer_class = type(model[0])
        model[0].__class__ = type("OwnTransformer", (transformer_class,), {})  # a forward of its own, maybe
        assert dropin._triton_trunk(model, dict(features)) is None
        model[0].__class__ = transformer_class
        with torch.autocast(torch.device(KERNEL_DEVICE).type, dtype=torch.bfloat16):
            assert dropin._triton_trunk(model, dict(features)) is None
        implementation = bert.config._attn_implementation
        bert.config._attn_implementation = "eager"  # transformers takes output_attentions there only
        for flag in ("output_hidden_states", "output_attentions", "is_decoder"):
            setattr(bert.config, flag, True)
            assert dropin._triton_trunk(model, dict(features)) is None, flag
            setattr(bert.config, flag, False)
        bert.config._attn_implementation = implementation
        dropin.patch_pylate(backend="torch")
        assert dropin._triton_trunk(model, dict(features)) is None
        dropin.patch_pylate(backend="triton")
        assert model.forward(dict(features), output_attentions=False)["token_embeddings"] is not None
    assert dropin._triton_trunk(model, dict(features)) is None  # gradients on
    assert len(trunk_calls) == 1
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.mul_(1.0)  # an in-place write: PyTorch counts it
    again = dropin._trunk_weights(bert, bert.device)
    assert again is not weights and dropin._trunk_weights(bert, bert.device) is again
    bert.load_state_dict(bert.state_dict())
    loaded = dropin._trunk_weights(bert, bert.device)
    assert loaded is not again
    bert.embeddings.word_embeddings.weight.data.mul_(1.0)  # not counted: seen at the next patch
    assert dropin._trunk_weights(bert, bert.device) is loaded
    dropin.patch_pylate(backend="triton")
    assert dropin._trunk_weights(bert, bert.device) is not loaded
    dropin.unpatch_pylate()
    assert len(dropin._trunk_cache) == 0  # no copy of the weights left behind


def test_patch_pylate_leaves_a_forward_of_pylates_own_alone(pylate_modules, monkeypatch):
    """The trunk patch replaces the forward PyLate's ColBERT inherits from sentence-transformers
    (the chain of modules it runs); a PyLate whose ColBERT defines its own keeps it, patched or not."""
    models = require_reference("pylate.models")

    def own_forward(self, input, **kwargs):
        return input

    monkeypatch.setattr(models.ColBERT, "forward", own_forward, raising=False)
    for encoder in (True, False):
        dropin.patch_pylate(backend="torch", encoder=encoder)
        assert models.ColBERT.__dict__["forward"] is own_forward
    dropin.unpatch_pylate()
    assert models.ColBERT.__dict__["forward"] is own_forward
