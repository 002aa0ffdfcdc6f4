"""Drop-in replacements for PyLate's scoring functions (``pylate.scores`` and ``pylate.rank.rerank``).

Same signatures, same inputs (tensors, numpy arrays, lists), same results, PyLate's semantics
included: masks are *multiplied into* the similarities, so a masked or padded document slot
enters the max as 0.0 rather than being excluded, and a masked query row contributes 0.

    - from pylate import rank, scores
    + from colbert_triton import pylate as rank, pylate as scores

or, for PyLate's own callers too (its retriever, ``model.similarity``), ``patch_pylate()``
(which, where the backend is our kernels, also runs PyLate models' BERT trunk and token pooling
on them).

On CPU tensors these run PyLate's own PyTorch formula (chunked over documents so the
``[A, B, S, T]`` similarity block stays bounded). With ``backend="triton"`` (or on CUDA
tensors once the Triton scorer is the CUDA default) they run the MaxSim kernel: the masks are
folded into the rows (the similarity is linear in each row, so multiplying a row by its mask
equals multiplying its similarities), each document loops to its last unmasked slot only, and
``pad_floor`` adds the 0.0 that PyLate's trailing padded slots contribute.

``backend`` is resolved as PyLate resolves it: ``None`` reads ``PYLATE_SCORES_BACKEND``
(default ``"auto"``), any letter case; ``"auto"`` picks the Triton kernel on CUDA once it is
the CUDA default (see README, "Status"), ``"torch"`` PyLate's formula, and ``"triton"`` our
kernel. PyLate's ``"flash"`` and ``"lik"`` name its optional CUDA kernels (flash-maxsim,
late-interaction-kernels); here they select our kernel, with PyLate's results (its
zero-padding semantics included). The result has PyLate's dtype (that of the inputs and float
masks); the kernel accumulates in float32 before the cast (float64 inputs are scored in float32
on the kernel path). Inputs that need gradients take PyLate's formula whatever the backend.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import weakref
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from . import scoring
from .model.checkpoint import BertConfig, CheckpointError, encoder_tensors
from .model.encoder import EncoderWeights
from .packed import (
    EMBEDDING_DTYPES,
    PackedEmbeddings,
    load_embeddings,
    pick_device,
    save_embeddings,
)

# The rest of ``pylate.scores`` and ``pylate.rank``: training-side classes and the XTR scores,
# which this module does not reimplement; they resolve to PyLate's own (module __getattr__
# below), so code written against either module keeps working after the import is changed.
_PYLATE_ONLY = {
    **dict.fromkeys(("ColBERTScores", "SimilarityFunction", "XTRScores", "XTRKDScores", "xtr_scores",
                     "xtr_kd_scores"), "pylate.scores"),
    "score_xtr": "pylate.rank",
}


def __getattr__(name: str):
    if name in _PYLATE_ONLY:
        try:
            module = importlib.import_module(_PYLATE_ONLY[name])
        except ImportError:
            raise AttributeError(f"colbert_triton.pylate.{name} is PyLate's own (not reimplemented "
                                 f"here): install pylate to use it") from None
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RerankResult(TypedDict):
    id: int | str
    score: float


def convert_to_tensor(x) -> torch.Tensor:
    """PyLate's ``utils.convert_to_tensor``: tensors as is, arrays and lists stacked."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        if not x:
            return torch.tensor([], dtype=torch.float32)
        kinds = {type(item) for item in x}
        if len(kinds) > 1 and not kinds <= {float, int}:
            raise TypeError(f"cannot convert a list mixing {sorted(k.__name__ for k in kinds)} to a tensor")
        if isinstance(x[0], (np.ndarray, list, torch.Tensor)):
            shapes = {tuple(np.shape(item)) if not isinstance(item, torch.Tensor) else tuple(item.shape)
                      for item in x}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack embeddings of different shapes {sorted(shapes)}: pad them "
                                 f"to one length (with a mask), or score ragged lists with "
                                 f"colbert_scores_pairwise or colbert_triton.score")
        if isinstance(x[0], np.ndarray):
            return torch.from_numpy(np.array(x, dtype=np.float32))
        if isinstance(x[0], (list, float, int)):
            return torch.tensor(x, dtype=torch.float32)
        if isinstance(x[0], torch.Tensor):
            return torch.stack(list(x))
    raise TypeError(f"cannot convert {type(x).__name__} to a tensor")


_BACKENDS = {"auto": None, "torch": "torch", "triton": "triton", "flash": "triton", "lik": "triton"}


def _backend_key(backend) -> str | None:
    """A backend name, as PyLate reads it (None: ``PYLATE_SCORES_BACKEND``, any letter case), as
    this module's backend: None (auto), "torch" or "triton"."""
    if backend is None:
        backend = os.environ.get("PYLATE_SCORES_BACKEND", "auto")
    if not isinstance(backend, str) or backend.lower() not in _BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', 'flash', 'lik' (or None), "
                         f"got {backend!r}")
    return _BACKENDS[backend.lower()]


def _backend(backend: str | None, *tensors: torch.Tensor) -> str:
    backend = _backend_key(backend)
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"inputs are on different devices: {device} and {t.device}")
    resolved = scoring.resolve_backend(device, backend)
    if resolved == "triton" and scoring.needs_grad(*tensors):
        # The kernel has no backward pass; PyLate's every backend has one (its losses train
        # through these functions): its differentiable formula gives the same scores.
        return "torch"
    if resolved == "triton" and backend is None:
        from .kernels import maxsim as kernel

        # Embedding dims past the kernel's limits, or pairs of different dims (one launch takes
        # one d): PyLate's formula (dim 0 keeps its zeros path).
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        dims = {t.shape[-1] for t in tensors}
        dim = max(dims)
        if dim and dtype.is_floating_point and (len(dims) > 1 or not kernel.takes(dtype, dim, device)):
            return "torch"
    return resolved


def _check_embeddings(queries: torch.Tensor, documents: torch.Tensor, q_dims: int, d_dims: int) -> None:
    """Shapes and dtypes of one queries/documents pair (their values: `_check_values`)."""
    if queries.dim() != q_dims or documents.dim() != d_dims:
        raise ValueError(
            f"expected queries with {q_dims} dims and documents with {d_dims}, got shapes "
            f"{tuple(queries.shape)} and {tuple(documents.shape)}"
        )
    if queries.shape[-1] != documents.shape[-1]:
        raise ValueError(
            f"queries have dim {queries.shape[-1]} but documents have dim {documents.shape[-1]}"
        )
    for name, t in (("queries", queries), ("documents", documents)):
        if not t.is_floating_point():
            raise TypeError(f"{name} embeddings must be floating point, got {t.dtype}")
    if queries.dtype != documents.dtype:
        raise TypeError(f"queries are {queries.dtype} but documents are {documents.dtype}: cast one side")


def _check_has_slots(documents: torch.Tensor, what: str) -> None:
    """PyLate takes a max over each document's slots: with none (and a dim to score) it raises
    IndexError deep in torch; here the same input is a clear error, on every backend."""
    if documents.shape[-2] == 0 and documents.shape[-1] > 0:
        raise ValueError(f"{what} with no token slots (shape {tuple(documents.shape)}): the max over "
                         f"them is undefined (PyLate raises IndexError); give each document a row")


def _check_values(inputs: dict[str, torch.Tensor | list[torch.Tensor] | None],
                  documents_mask: torch.Tensor | None = None) -> bool:
    """NaN/inf in an embedding or a float mask is an error (PyLate would return NaN or inf
    scores). Every input is read once and the device waited for once: a list is read as one
    concatenation (a check per tensor costs a sync each, thousands for a large rerank).
    Returns whether ``documents_mask`` (read in the same wait) is a plain length mask: only 0
    and 1, each row's ones first."""
    flags = {}
    for what, value in inputs.items():
        if isinstance(value, list):
            value = torch.cat([v.reshape(-1) for v in value]) if value else None
        if value is not None and value.is_floating_point():
            flags[what] = scoring._finite_flag(value)
    if documents_mask is None:
        if flags:
            scoring._check_flags(flags)
        return False
    nonzero = documents_mask != 0
    ones_first = nonzero == (torch.arange(documents_mask.shape[-1], device=documents_mask.device)
                             < nonzero.sum(-1, keepdim=True))
    (plain,) = scoring._check_flags(flags, ((ones_first & ((documents_mask == 1) | ~nonzero)).all(),))
    return plain


def _mask(mask, shape, device, what: str):
    if mask is None:
        return None
    mask = convert_to_tensor(mask).to(device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.is_complex():
        raise TypeError(f"{what} must be real (bool, integer or float), got {mask.dtype}")
    return mask


def _kernel_documents(documents: torch.Tensor, mask: torch.Tensor | None, plain_mask: bool = False):
    """Padded documents [..., T, H] (+ mask [..., T]) as rows, lengths and the zero floor.

    Masked rows are zeroed (their similarity becomes exactly 0, as PyLate's product); each
    document's loop ends at its last unmasked slot; ``pad_floor`` marks documents that had
    slots past that point, which in PyLate enter the max as 0. A plain length mask (0 and 1,
    ones first: PyLate's usual attention mask) masks only slots past that point, which the loop
    never reads: the documents are then taken as they are, without a masked copy.
    """
    slots = documents.shape[-2]
    lead = documents.shape[:-2]
    starts = torch.arange(math.prod(lead), device=documents.device).view(lead) * slots
    if mask is None:
        return documents.reshape(-1, documents.shape[-1]), starts, torch.full_like(starts, slots), None
    rows = documents if plain_mask else documents * mask.to(documents.dtype).unsqueeze(-1)
    rows = rows.reshape(-1, documents.shape[-1])
    positions = torch.arange(1, slots + 1, device=documents.device)
    lengths = ((mask != 0) * positions).amax(-1) if slots else torch.zeros_like(starts)
    return rows, starts, lengths, lengths < slots


def _pylate_torch(queries, documents, queries_mask, documents_mask, equation: str, chunk: int):
    """PyLate's formula, chunked over the documents' second axis of the score."""
    parts = []
    for lo in range(0, max(documents.shape[-3], 1), chunk):
        docs = documents[..., lo : lo + chunk, :, :]
        s = torch.einsum(equation, queries, docs)
        if queries_mask is not None:
            s = s * queries_mask.unsqueeze(1).unsqueeze(3)
        if documents_mask is not None:
            dm = documents_mask[..., lo : lo + chunk, :]
            s = s * (dm.unsqueeze(0).unsqueeze(2) if equation == "ash,bth->abst" else dm.unsqueeze(2))
        parts.append(s.max(axis=-1).values.sum(axis=-1))
    return torch.cat(parts, 1)


def _chunk(queries: torch.Tensor, documents: torch.Tensor, budget: int = 1 << 26) -> int:
    per_doc = max(1, queries.shape[0] * queries.shape[1] * documents.shape[-2])
    return max(1, budget // per_doc)


def _masked_scores(q, d, queries_mask, documents_mask, equation: str, backend) -> torch.Tensor:
    """PyLate's masked MaxSim for padded documents [B, T, H] or per-query groups [A, N, T, H]."""
    qm = _mask(queries_mask, q.shape[:2], q.device, "queries_mask")
    dm = _mask(documents_mask, d.shape[:-1], d.device, "documents_mask")
    kernel = _backend(backend, q, d) != "torch" and q.shape[-1] != 0  # dim 0: PyLate's formula gives its zeros
    _check_has_slots(d, "documents")
    plain_mask = _check_values({"queries embeddings": q, "documents embeddings": d, "queries_mask values": qm,
                                "documents_mask values": dm}, documents_mask=dm if kernel else None)
    if not kernel:
        return _pylate_torch(q, d, qm, dm, equation, _chunk(q, d))
    # PyLate multiplies the masks into the similarities: they take part in the result's dtype
    # (fp16 embeddings with float32 masks give float32 scores; bool and integer masks do not).
    result_dtype = torch.result_type(q, d)
    for mask in (qm, dm):
        if mask is not None:
            result_dtype = torch.promote_types(result_dtype, mask.dtype)
    q, d = q.to(_kernel_dtype(q.dtype)), d.to(_kernel_dtype(d.dtype))
    if qm is not None:
        q = q * qm.to(q.dtype).unsqueeze(-1)
    rows, starts, lengths, floor = _kernel_documents(d, dm, plain_mask)
    return scoring.maxsim(q.contiguous(), rows, starts, lengths, pad_floor=floor,
                          backend="triton").to(result_dtype)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 (numpy's default) is scored in float32: the kernel takes 32- and 16-bit floats."""
    return torch.float32 if dtype == torch.float64 else dtype


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   backend: str | None = None) -> torch.Tensor:
    """Queries (A, S, H) x documents (B, T, H) -> (A, B), PyLate semantics."""
    q = convert_to_tensor(queries_embeddings)
    d = convert_to_tensor(documents_embeddings)
    _check_embeddings(q, d, 3, 3)
    return _masked_scores(q, d, queries_mask, documents_mask, "ash,bth->abst", backend)


def colbert_scores_pairwise(queries_embeddings, documents_embeddings, backend: str | None = None) -> torch.Tensor:
    """Score of query i against document i -> (N,); each pair may have its own lengths, no masks.

    Pairs may also differ in dim, as in PyLate: one kernel launch takes one dim, so such pairs
    take PyLate's formula unless ``backend="triton"`` is named, which refuses them. Unlike PyLate
    (which zips, dropping the extra ones), unequal counts are an error."""
    for name, x in (("queries_embeddings", queries_embeddings), ("documents_embeddings", documents_embeddings)):
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim != 3:
            raise ValueError(f"{name} must be a list of [S, H] embeddings or one [N, S, H] array, got "
                             f"shape {tuple(x.shape)}")
    queries = [convert_to_tensor(q) for q in queries_embeddings]
    documents = [convert_to_tensor(d) for d in documents_embeddings]
    if len(queries) != len(documents):
        raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
    if not queries:
        raise ValueError("no pairs to score")
    for q, d in zip(queries, documents):
        _check_embeddings(q, d, 2, 2)
    chosen = _backend(backend, *queries, *documents)
    for i, d in enumerate(documents):
        _check_has_slots(d, f"documents_embeddings[{i}]")
    _check_values({"queries embeddings": queries, "documents embeddings": documents})
    if chosen == "torch" or queries[0].shape[-1] == 0:  # dim 0: PyLate's formula gives its zeros
        return torch.stack([torch.einsum("sh,th->st", q, d).max(axis=-1).values.sum()
                            for q, d in zip(queries, documents)])
    # Pairs may differ in dtype (PyLate scores each in its own; the stacked result is promoted).
    result_dtype = functools.reduce(torch.promote_types, [t.dtype for t in queries + documents])
    common = _kernel_dtype(result_dtype)
    scores = scoring.score_pairwise([q.to(common) for q in queries], [d.to(common) for d in documents],
                                    backend="triton", check_inputs=False)
    return scores.to(result_dtype)


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      backend: str | None = None) -> torch.Tensor:
    """Queries (A, S, H) x their own documents (A, N, T, H) -> (A, N), PyLate semantics."""
    q = convert_to_tensor(queries_embeddings)
    d = convert_to_tensor(documents_embeddings)
    _check_embeddings(q, d, 3, 4)
    if d.shape[0] != q.shape[0]:
        raise ValueError(f"{q.shape[0]} queries but documents are grouped for {d.shape[0]}")
    return _masked_scores(q, d, queries_mask, documents_mask, "ash,abth->abst", backend)


def _as_query_list(queries) -> list[torch.Tensor]:
    if isinstance(queries, (torch.Tensor, np.ndarray)):
        queries = convert_to_tensor(queries)
        return list(queries.unsqueeze(0) if queries.dim() == 2 else queries)
    return [convert_to_tensor(q) for q in queries]


def rerank(documents_ids, queries_embeddings, documents_embeddings, device: str | None = None,
           backend: str | None = None):
    """PyLate's ``rank.rerank``: per query, its candidates sorted by score, best first.

    As in PyLate, each query's candidates are zero-padded to the longest of them and scored
    without a mask, so a shorter candidate's padded slots enter the max as 0. Ties keep the
    candidates' given order (a stable sort; PyLate's order for exact ties is unspecified).
    On the Triton backend every query and candidate goes into one kernel launch, each
    candidate gathered in place (no padded copy), its zero padding reproduced by ``pad_floor``.
    """
    queries = _as_query_list(queries_embeddings)
    if isinstance(documents_embeddings, (torch.Tensor, np.ndarray)):
        documents_embeddings = list(convert_to_tensor(documents_embeddings))
    # PyLate zips the three and drops what is left over; a count mismatch is a caller's bug.
    if not len(queries) == len(documents_ids) == len(documents_embeddings):
        raise ValueError(f"{len(queries)} queries but {len(documents_ids)} lists of document ids and "
                         f"{len(documents_embeddings)} lists of document embeddings")
    for query in queries:
        if query.dim() != 2:
            raise ValueError(f"each query must be [S, H], got shape {tuple(query.shape)}")
    groups = []
    for query, ids, candidates in zip(queries, documents_ids, documents_embeddings):
        docs = [convert_to_tensor(c) for c in candidates]
        if len(docs) != len(ids):
            raise ValueError(f"{len(ids)} document ids but {len(docs)} document embeddings")
        target = device if device is not None else query.device
        groups.append((query.to(target), list(ids), docs))  # the candidates: moved once joined
    if not groups:
        return []
    if _backend(backend, groups[0][0]) == "triton":
        scores = _rerank_scores_kernel(groups)
    else:
        scores = [colbert_scores(q.unsqueeze(0), _joined(_padded, docs, q.device), backend="torch")[0]
                  if docs else None for q, _, docs in groups]
    results = []
    for (_, ids, _), row in zip(groups, scores):
        if row is None:
            results.append([])
            continue
        order = torch.sort(row, descending=True, stable=True)
        results.append([RerankResult(id=ids[i], score=s)
                        for i, s in zip(order.indices.tolist(), order.values.cpu().tolist())])
    return results


def _padded(documents: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(documents, batch_first=True)


def _joined(join, documents: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``join(documents)`` on ``device``: joined where the documents are, then copied once (an
    index hands a retriever's candidates from host memory: one copy, not one per candidate, as
    PyLate pads them on the host and copies once); documents on several devices are moved one
    by one first."""
    if len({d.device for d in documents}) > 1:
        documents = [d.to(device) for d in documents]
    return join(documents).to(device)


def _rerank_scores_kernel(groups) -> list[torch.Tensor | None]:
    """Every query against its own candidates in one MaxSim launch (candidate mode)."""
    queries = [q for q, _, _ in groups]
    counts = [len(docs) for _, _, docs in groups]
    width = max(max(counts), 1)
    lengths = np.zeros((len(groups), width), dtype=np.int64)
    starts = np.zeros_like(lengths)
    floor = np.zeros(lengths.shape, dtype=bool)
    offset = 0
    for i, (q, _, docs) in enumerate(groups):
        if not docs:
            continue
        # One pass over a query's candidates (a retriever hands thousands): shapes and dtypes
        # compared as a set; a candidate that differs is named by the per-pair check.
        _check_embeddings(q, docs[0], 2, 2)
        if {(d.dim(), d.shape[-1:], d.dtype) for d in docs} != {(2, q.shape[-1:], q.dtype)}:
            for d in docs:
                _check_embeddings(q, d, 2, 2)
        n = np.array([d.shape[0] for d in docs], dtype=np.int64)
        _check_has_slots(docs[int(n.argmax())], "a query's candidate documents")  # padded to the longest
        lengths[i, : len(n)] = n
        starts[i, : len(n)] = offset + np.cumsum(n) - n
        floor[i, : len(n)] = n < n.max()  # PyLate pads each query's candidates to its longest
        offset += int(n.sum())
    device = queries[0].device
    values = _joined(torch.cat, [d for _, _, docs in groups for d in docs], device) if offset else queries[0][:0]
    batch = _padded(queries)
    _check_values({"queries embeddings": batch, "documents embeddings": values})  # the copies made anyway
    result_dtype = torch.result_type(batch, values)
    scores = scoring.maxsim(batch.to(_kernel_dtype(batch.dtype)).contiguous(),
                            values.to(_kernel_dtype(values.dtype)).contiguous(),
                            torch.from_numpy(starts).to(device), torch.from_numpy(lengths).to(device),
                            pad_floor=torch.from_numpy(floor).to(device),
                            backend="triton").to(result_dtype)
    return [scores[i, :n] if n else None for i, n in enumerate(counts)]


# Where PyLate's inference code finds the functions this module replaces. Each of its modules
# binds them by name when it is imported (`from ..scores import colbert_scores`), so replacing
# a function takes every binding: the public modules, `SimilarityFunction` (which hands
# `colbert_scores` to every model made afterwards: `model.similarity`), the retriever that reranks
# an index's candidates, and the triplet evaluator. A module imported after the patch binds ours
# from `pylate.scores` / `pylate.rank` itself. Left alone: training, whose losses score through
# `ColBERTScores` and a default `colbert_kd_scores` that need gradients (PyLate's formula on
# every backend here) and would only gain our input checks and their device syncs.
# Per name: the module that defines PyLate's function, and the modules whose binding is replaced.
_PYLATE_SITES = {
    "colbert_scores": ("pylate.scores.colbert", ("pylate.scores", "pylate.scores.similarity_functions")),
    "colbert_scores_pairwise": ("pylate.scores.colbert", ("pylate.scores", "pylate.scores.similarity_functions",
                                                          "pylate.evaluation.colbert_triplet")),
    "rerank": ("pylate.rank.rank", ("pylate.rank", "pylate.rank.rank", "pylate.retrieve.colbert")),
}
_pylate_originals: dict[str, object] = {}  # PyLate's functions, by name
_pylate_installed: dict[str, object] = {}  # what patch_pylate put in their place
_pylate_ever_installed: dict[str, list] = {}  # everything it ever put there, by name
# A model holds the functions `SimilarityFunction` handed it when it was made: PyLate's if made
# before the patch, ours if made while it held. These properties of PyLate's ColBERT class hand
# the functions of the moment in their place: ours while the patch holds, PyLate's otherwise
# (property -> the function it hands). Wrapped at the first patch, and left wrapped (unpatched,
# they hand what the inherited ones do, but PyLate's for ours).
_MODEL_PROPERTIES = {"similarity": "colbert_scores", "similarity_pairwise": "colbert_scores_pairwise"}
_wrapped_classes: list[type] = []  # the model classes whose properties are wrapped


def patch_pylate(backend: str | None = None, *, encoder: bool = True) -> None:
    """Make PyLate itself score with this module: ``pylate.scores.colbert_scores`` and
    ``colbert_scores_pairwise``, ``pylate.rank.rerank``, and the places PyLate's own code calls
    them from (``model.similarity`` and ``similarity_pairwise``, of models loaded before the
    call too, ``retrieve.ColBERT``'s reranking of an index's candidates, the triplet evaluator).
    Same results, PyLate's semantics. Where the backend resolves to the Triton kernels for the
    documents' device, PyLate models' token pooling (``encode(pool_factor=...)``) runs on the
    GPU too (`kernels.pooling`: the same clusters but where the distances' last bit decides a
    near tie, see the README), instead of SciPy on the host.

    encoder: where the backend resolves to the Triton kernels for the model's device, PyLate
    models (loaded before the call too) run their BERT trunk on our Triton encoder when they
    encode (`_triton_trunk`: the same hidden states as Hugging Face's BertModel up to rounding,
    every row of the padded batch, keys limited by the attention mask); PyLate's tokenization,
    Dense layers, masks, normalisation and pooling are its own. ``encoder=False`` keeps
    Hugging Face's trunk.

    backend: what PyLate's callers, which pass none, get: None resolves each call as the
    functions above do; ``"triton"`` names our kernel for every call (PyLate's own functions,
    training's among them, refuse that name in ``PYLATE_SCORES_BACKEND``). Calling it again
    replaces the backend; `unpatch_pylate` undoes it.

        from colbert_triton.pylate import patch_pylate
        patch_pylate()
        retriever = pylate.retrieve.ColBERT(index=index)  # reranks with colbert_triton
    """
    if backend is not None:
        _backend_key(backend)  # a bad name fails here, not at PyLate's first call
    try:
        for public in ("pylate.scores", "pylate.rank"):  # they import the defining modules
            importlib.import_module(public)
    except ImportError:
        raise ImportError("patch_pylate: pylate is not installed") from None
    for name, (home, _) in _PYLATE_SITES.items():
        if not hasattr(sys.modules.get(home), name):
            raise RuntimeError(f"patch_pylate: this PyLate has no {home}.{name} to replace")
        _pylate_originals.setdefault(name, getattr(sys.modules[home], name))
    installed = {name: globals()[name] if backend is None else functools.partial(globals()[name], backend=backend)
                 for name in _PYLATE_SITES}
    for name, module in _pylate_bindings():
        current = getattr(module, name)
        if current is _pylate_originals[name] or current is _pylate_installed.get(name):
            setattr(module, name, installed[name])
    _pylate_installed.update(installed)
    for name, function in installed.items():
        ever = _pylate_ever_installed.setdefault(name, [])
        if not any(function is f for f in ever):
            ever.append(function)
    _wrap_model_properties()
    _patch_model_class(backend, encoder)


def unpatch_pylate() -> None:
    """Give PyLate its own functions back wherever `patch_pylate` (or an import after it) put
    ours, models loaded while it held included."""
    for name, module in _pylate_bindings():
        if name in _pylate_installed and getattr(module, name) is _pylate_installed[name]:
            setattr(module, name, _pylate_originals[name])
    _pylate_installed.clear()
    model_class = _pylate_model_class()
    if model_class is not None and model_class.__dict__.get(_POOLING) is _pool_embeddings_hierarchical:
        setattr(model_class, _POOLING, _pylate_model_patch["pooling"])
    if model_class is not None and model_class.__dict__.get("forward") is _colbert_forward:
        delattr(model_class, "forward")  # sentence-transformers' again
    _trunk_cache.clear()  # the trunks' weights laid out for our encoder: not needed any more


# PyLate's ColBERT method that pools documents; while patched, PyLate's own ("pooling") and the
# backend of the patch ("backend": its pooling's and its trunk's).
_POOLING = "pool_embeddings_hierarchical"
_pylate_model_patch: dict[str, object] = {}


def _patch_model_class(backend: str | None, encoder: bool) -> None:
    try:  # its models (sentence-transformers): a PyLate used for scoring alone may lack them
        model_class = importlib.import_module("pylate.models.colbert").ColBERT
    except ImportError:
        return
    current = model_class.__dict__.get(_POOLING)
    if current is None:
        raise RuntimeError(f"patch_pylate: this PyLate's ColBERT has no {_POOLING} to replace")
    if current is not _pool_embeddings_hierarchical:
        _pylate_model_patch["pooling"] = current
    _pylate_model_patch["backend"] = backend
    setattr(model_class, _POOLING, _pool_embeddings_hierarchical)
    _trunk_cache.clear()  # laid out again if needed: a write PyTorch does not count is seen
    forward = model_class.__dict__.get("forward")
    if forward is _colbert_forward and not encoder:
        delattr(model_class, "forward")
    elif forward is None and encoder:
        # PyLate's ColBERT inherits sentence-transformers' forward, the chain of modules that
        # `_colbert_forward` runs; a forward of its own (another PyLate) is left alone.
        model_class.forward = _colbert_forward


def _patched_to_kernels(device: torch.device) -> bool:
    """Whether the patch's backend resolves to our kernels on ``device`` (PyLate models' pooling
    and trunk run on them then)."""
    return scoring.resolve_backend(device, _pylate_model_patch["backend"]) == "triton"


def _pool_embeddings_hierarchical(self, documents_embeddings, pool_factor: int = 1, protected_tokens: int = 1):
    """PyLate's ``ColBERT.pool_embeddings_hierarchical`` while `patch_pylate` holds: the
    documents pooled by `kernels.pooling` on their GPU where the patch's backend resolves to the
    Triton kernels there, by PyLate's own code otherwise (and for anything else than documents
    of one device and float dtype that the kernels hold). As PyLate's, each document's rows come
    back on the host, in their dtype."""
    from .kernels import pooling as pooling_kernels

    original = _pylate_model_patch["pooling"]
    documents = list(documents_embeddings)
    if (pool_factor <= 1 or not documents or not all(isinstance(d, torch.Tensor) and d.dim() == 2 for d in documents)
            or len({(d.device, d.dtype) for d in documents}) != 1
            or documents[0].dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or max(len(d) for d in documents) - protected_tokens > pooling_kernels.MAX_POOLED_ROWS
            or not _patched_to_kernels(documents[0].device)):
        return original(self, documents_embeddings, pool_factor, protected_tokens)
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    pooled, pooled_lengths = pooling_kernels.pool_documents(
        torch.cat(documents).contiguous(), lengths, int(pool_factor), int(protected_tokens)).result()
    return list(torch.split(pooled.cpu(), pooled_lengths.tolist()))


def _colbert_forward(self, input, **kwargs):
    """PyLate's ``ColBERT.forward`` (sentence-transformers' chain of modules) while `patch_pylate`
    patches the encoder: the first module's BERT trunk on our Triton encoder where
    `_triton_trunk` takes the batch, then the model's other modules (PyLate's Dense) as
    sentence-transformers runs them; PyLate's own forward for anything else."""
    hidden = None if kwargs else _triton_trunk(self, input)
    if hidden is None:
        return super(_pylate_model_class(), self).forward(input, **kwargs)
    input["token_embeddings"] = hidden
    for module in list(self.children())[1:]:
        input = module(input)  # sentence-transformers passes a module no keyword arguments when given none
    return input


def _triton_trunk(model, features) -> torch.Tensor | None:
    """The last hidden state ``[B, L, H]`` of ``model``'s BERT trunk for a padded batch of
    ``features``, from our Triton encoder, or None where Hugging Face's ``BertModel`` must run.

    Every row of the padded batch is computed, each attending to its sequence's first
    ``attention_mask.sum()`` tokens, as BertModel computes it: a query's [MASK] rows and a
    document's padding rows included, so what PyLate keeps or returns (``output_value=None``
    returns every row) is BertModel's up to rounding. Ours takes: inference (no gradients, the
    trunk in eval mode, no autocast, no keyword arguments, no hidden states or attentions asked
    for), a plain ``transformers.BertModel`` in sentence-transformers' ``Transformer`` module,
    that the encoder holds (`BertConfig`, head dims the attention takes),
    in float32/16 or bfloat16 on the batch's device where the patch's backend resolves to the
    Triton kernels there; masks of 0/1 with each row's ones first (right padding), at least
    one per row; token type 0 throughout; ids in the vocabulary; rows no longer than the
    position table. One copy of the batch to the host per call (to lay it out packed)."""
    from .model.encoder import encode_hidden
    from .model.ops import PackedBatch, get_ops

    transformers, sentence_transformers = sys.modules.get("transformers"), sys.modules.get("sentence_transformers")
    transformer = next(iter(model.children()), None)
    bert = getattr(transformer, "auto_model", None)
    if (transformers is None or sentence_transformers is None
            or type(transformer) is not sentence_transformers.models.Transformer
            or type(bert) is not transformers.BertModel or bert.training
            or torch.is_grad_enabled() or not isinstance(features, dict)):
        return None
    config = bert.config
    if config.output_hidden_states or config.output_attentions or config.is_decoder:
        return None
    input_ids, mask = features.get("input_ids"), features.get("attention_mask")
    types = features.get("token_type_ids")
    if types is None and isinstance(input_ids, torch.Tensor):
        types = torch.zeros_like(input_ids)
    passed = {key for key in features if key in getattr(transformer, "model_forward_params", ())}
    if (passed - {"input_ids", "attention_mask", "token_type_ids"}
            or not all(isinstance(t, torch.Tensor) for t in (input_ids, mask, types))
            or input_ids.dim() != 2 or input_ids.numel() == 0
            or not (input_ids.shape == mask.shape == types.shape)
            or len({input_ids.device, mask.device, types.device}) != 1
            or any(t.dtype.is_floating_point or t.dtype.is_complex for t in (input_ids, mask, types))
            or input_ids.shape[1] > config.max_position_embeddings
            or torch.is_autocast_enabled(input_ids.device.type)  # BertModel would compute in autocast's dtype
            or not _patched_to_kernels(input_ids.device)):
        return None
    weights = _trunk_weights(bert, input_ids.device)
    if weights is None:
        return None
    ids, masks, token_types = torch.stack([input_ids.long(), mask.long(), types.long()]).cpu().numpy()
    key_lens = masks.sum(axis=1)
    right_padded = np.arange(ids.shape[1])[None, :] < key_lens[:, None]
    if (np.any(key_lens < 1) or not np.array_equal(masks, right_padded) or np.any(token_types != 0)
            or ids.min() < 0 or ids.max() >= weights.word.shape[0]):
        return None
    batch = PackedBatch.from_sequences(list(ids), key_lens, input_ids.device)
    return encode_hidden(weights, batch, get_ops("triton")).view(*ids.shape, -1)


# A PyLate model's BERT trunk -> (what it was built from, its EncoderWeights or None).
_trunk_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trunk_weights(bert, device: torch.device) -> EncoderWeights | None:
    """``bert``'s weights laid out for our encoder (the query, key and value projections
    concatenated), built once and again whenever a parameter changes as PyTorch counts it (an
    optimizer step, ``load_state_dict``, ``.to()``; a write through ``.data`` only at the next
    `patch_pylate`). A float16 or bfloat16 trunk keeps a second copy of its weights on the device."""
    params = list(bert.parameters())
    dtype = params[0].dtype if params else None
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or any(
            p.device != device or p.dtype != dtype for p in params):
        return None
    try:
        versions = tuple(p._version for p in params)
    except RuntimeError:  # inference tensors count no versions, and cannot change outside inference mode
        versions = None
    key = (device, dtype, tuple(p.data_ptr() for p in params), versions)
    cached = _trunk_cache.get(bert)
    if cached is not None and cached[0] == key:
        return cached[1]
    from .kernels.attention import SUPPORTED_HEAD_DIMS

    try:
        config = BertConfig.from_json(bert.config.to_dict(), "PyLate's BertModel")
        weights = None
        if config.head_dim in SUPPORTED_HEAD_DIMS:
            weights = EncoderWeights.from_checkpoint(config, encoder_tensors(bert.state_dict()), None, None,
                                                     "PyLate's BertModel").to(device, dtype)
    except CheckpointError:  # a shape or setting our encoder does not hold
        weights = None
    _trunk_cache[bert] = (key, weights)
    return weights


def _pylate_model_class():
    """PyLate's ColBERT model class, if its module is imported (a model can exist only then:
    importing it here would pull in sentence-transformers for nothing)."""
    return getattr(sys.modules.get("pylate.models.colbert"), "ColBERT", None)


def _wrap_model_properties() -> None:
    model_class = _pylate_model_class()
    if model_class is None or model_class in _wrapped_classes:  # not imported, or wrapped already
        return
    for prop, name in _MODEL_PROPERTIES.items():
        inherited = getattr(model_class, prop)  # the property object (sentence-transformers')

        def hand_current(model, inherited=inherited, name=name):
            function = inherited.__get__(model, type(model))
            if function is _pylate_originals[name] or any(function is f for f in _pylate_ever_installed[name]):
                return _pylate_installed.get(name, _pylate_originals[name])
            return function  # a function the model was given by hand

        setattr(model_class, prop, property(hand_current, doc=inherited.__doc__))
    _wrapped_classes.append(model_class)


def _pylate_bindings():
    """(name, module) for every site of _PYLATE_SITES whose module is imported and binds the name."""
    for name, (_, sites) in _PYLATE_SITES.items():
        for site in sites:
            module = sys.modules.get(site)
            if module is not None and hasattr(module, name):
                yield name, module


class ExactIndex:
    """An exact index for PyLate's retriever: every query scored against every document (MaxSim
    over each document's own rows, as `colbert_triton.search`: the Triton kernel on CUDA), where
    PyLate's indexes (PLAID, Voyager, ScaNN) approximate. The ground truth to measure them
    against, and on a GPU a fast search of a corpus that fits in its memory.

        from pylate import retrieve
        from colbert_triton.pylate import ExactIndex
        index = ExactIndex().add_documents(documents_ids, documents_embeddings)
        results = retrieve.ColBERT(index=index).retrieve(queries_embeddings, k=10)

    PyLate's index interface, duck-typed (PyLate need not be installed): ``add_documents``,
    ``remove_documents``, ``__call__(queries_embeddings, k, subset)`` returning ranked results as
    PyLate's end-to-end indexes do (``[[{"id": ..., "score": ...}, ...], ...]``, best first, ties
    by the order documents were added), ``get_documents_embeddings``. Embeddings are checked
    for NaN/inf once, when added. ``device`` (default: CUDA if present) holds the corpus and
    scores; ``dtype`` (default: the first documents', float64 read as float32) is what they are
    kept in, queries cast to it. With ``index_folder`` the index is kept in
    ``index_folder/index_name/embeddings.safetensors``, rewritten by each change and loaded at
    start (``override=True`` starts empty); without, in memory only.
    """

    is_end_to_end_index = True

    def __init__(self, index_folder=None, index_name: str = "colbert", override: bool = False, *,
                 device=None, dtype: torch.dtype | None = None, backend: str | None = None):
        self.device = pick_device(device)
        if dtype is not None and (dtype not in EMBEDDING_DTYPES or dtype == torch.float64):
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        scoring.resolve_backend(self.device, backend)  # a bad name fails here, not at the first query
        self.dtype, self.backend = dtype, backend
        self._ids: list = []
        self._positions: dict = {}  # id -> position in the corpus
        # The corpus on self.device, in the order added: the parts added since it was last used
        # are joined when it is (a loop of small additions does not copy the corpus each time).
        self._parts: list[PackedEmbeddings] = []
        self.path = None if index_folder is None else Path(index_folder) / index_name / "embeddings.safetensors"
        if self.path is not None and self.path.exists():
            if override:
                self.path.unlink()
            else:
                saved = load_embeddings(self.path, device=self.device)
                self._set([saved.embeddings.to(dtype=dtype or saved.embeddings.values.dtype)], saved.ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add_documents(self, documents_ids, documents_embeddings, batch_size: int | None = None) -> ExactIndex:
        """Add documents (ids unique, never in the index already); returns the index.
        ``documents_embeddings``: one ``[tokens, dim]`` array or tensor per document (a list, or
        one ``[N, tokens, dim]`` array: all rows real), or one ``[tokens, dim]`` for a single id.
        ``batch_size``: PyLate's argument, unused (the documents are added at once)."""
        ids = [documents_ids] if isinstance(documents_ids, str) else list(documents_ids)
        if isinstance(documents_embeddings, (torch.Tensor, np.ndarray)):
            documents_embeddings = (documents_embeddings[None] if documents_embeddings.ndim == 2
                                    else documents_embeddings)
        tensors = [scoring._as_tensor(e, f"documents_embeddings[{i}]") for i, e in enumerate(documents_embeddings)]
        if len(tensors) != len(ids):
            raise ValueError(f"{len(ids)} document ids but {len(tensors)} document embeddings")
        if not ids:
            return self
        seen = set(self._positions)
        for i in ids:
            try:
                repeated = i in seen
            except TypeError:
                raise TypeError(f"document ids must be hashable (strings or numbers), got {type(i).__name__}") from None
            if repeated:
                where = "in the index already (remove_documents first to replace it)" if i in self._positions else "given twice"
                raise ValueError(f"document id {i!r} is {where}")
            seen.add(i)
        first = self._parts[0] if self._parts else None
        dtype = self.dtype or (first.values.dtype if first is not None else tensors[0].dtype)
        added = PackedEmbeddings.from_list([t.to(self.device, dtype) for t in tensors])
        if first is not None and added.dim != first.dim:
            raise ValueError(f"these documents have dim {added.dim}; the index holds dim {first.dim}")
        if not scoring.all_finite(added.values):
            raise ValueError("documents_embeddings contain NaN or infinite values")
        parts = [*self._parts, added]
        if self.path is not None:
            parts = self._save(parts, self._ids + ids)
        self._parts = parts
        self._positions.update((i, p) for p, i in enumerate(ids, start=len(self._ids)))
        self._ids.extend(ids)
        return self

    def remove_documents(self, documents_ids) -> ExactIndex:
        """Remove documents by id (each must be in the index); returns the index."""
        ids = [documents_ids] if isinstance(documents_ids, str) else list(documents_ids)
        removed = set(self._positions_of(ids, "remove_documents"))
        if not removed:
            return self
        kept = [p for p in range(len(self._ids)) if p not in removed]
        all_lengths = self._corpus.lengths_array
        starts = (np.cumsum(all_lengths) - all_lengths)[kept]
        lengths = all_lengths[kept]
        # Each kept row's place in the old values: its new place plus its document's shift.
        rows = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        values = self._corpus.values.index_select(0, torch.from_numpy(rows).to(self.device))
        parts, ids = ([PackedEmbeddings.from_lengths(values, lengths)] if kept else []), [self._ids[p] for p in kept]
        self._set(parts if self.path is None else self._save(parts, ids), ids)
        return self

    def __call__(self, queries_embeddings, k: int = 10, subset=None) -> list[list[RerankResult]]:
        """The ``k`` best documents for each query (one ``[tokens, dim]`` query, a list of them, or
        one ``[Q, tokens, dim]`` array), among ``subset`` if given: a list of ids for every query,
        or one list per query."""
        k = scoring.checked_int(k, "k")
        if self._corpus is None:
            raise ValueError("the index is empty: add documents before querying it")
        queries = _as_query_list(queries_embeddings)
        if not queries:
            return []
        batch = scoring.as_queries([q.to(self.device, self._corpus.values.dtype) for q in queries])
        if not scoring.all_finite(batch):
            raise ValueError("queries_embeddings contain NaN or infinite values")
        if subset is None:
            scores, indices = scoring.search(batch, self._corpus, k, backend=self.backend, check_inputs=False)
            return [[RerankResult(id=self._ids[i], score=s) for i, s in zip(row_i, row_s)]
                    for row_i, row_s in zip(indices.tolist(), scores.tolist())]
        per_query = self._subset_positions(subset, len(queries))
        width = max(1, max(map(len, per_query)))
        candidates = [positions + [-1] * (width - len(positions)) for positions in per_query]  # -1: no candidate
        scores = scoring.score_candidates(batch, self._corpus, candidates, backend=self.backend, check_inputs=False)
        # Candidates in corpus order and a stable sort: ties go to the document added first.
        ranked = torch.sort(scores, dim=1, descending=True, stable=True)
        return [[RerankResult(id=self._ids[positions[j]], score=s)
                 for j, s in zip(order[: min(k, len(positions))], row_scores)]
                for positions, order, row_scores in zip(per_query, ranked.indices.tolist(), ranked.values.tolist())]

    def _subset_positions(self, subset, num_queries: int) -> list[list[int]]:
        """Each query's candidates as sorted, distinct corpus positions."""
        subset = list(subset)
        if subset and all(isinstance(s, (list, tuple)) for s in subset):
            if len(subset) != num_queries:
                raise ValueError(f"subset holds {len(subset)} lists of ids for {num_queries} queries")
            lists = subset
        else:
            lists = [subset] * num_queries
        return [sorted(set(self._positions_of(ids, "subset"))) for ids in lists]

    def get_documents_embeddings(self, documents_ids) -> list[list[torch.Tensor]]:
        """The embeddings of each list of ids, as PyLate's indexes return them (on the index's device)."""
        return [[self._corpus[p] for p in self._positions_of(ids, "get_documents_embeddings")]
                for ids in documents_ids]

    def _positions_of(self, ids, what: str) -> list[int]:
        """The corpus positions of ``ids``, or an error naming the ones not in the index."""
        missing = [i for i in ids if i not in self._positions]
        if missing:
            raise ValueError(f"{what}: not in the index: {', '.join(map(repr, missing[:5]))}"
                             f"{', ...' if len(missing) > 5 else ''}")
        return [self._positions[i] for i in ids]

    @property
    def _corpus(self) -> PackedEmbeddings | None:
        """The whole corpus as one `PackedEmbeddings` (the parts joined now), or None while empty."""
        self._parts = _one_part(self._parts)
        return self._parts[0] if self._parts else None

    def _set(self, parts: list[PackedEmbeddings], ids: list) -> None:
        self._parts, self._ids = parts, list(ids)
        self._positions = {i: p for p, i in enumerate(self._ids)}

    def _save(self, parts: list[PackedEmbeddings], ids: list) -> list[PackedEmbeddings]:
        """Write the index's next state to its file (before it is taken, so a refused write leaves
        the index as it was); the parts, joined."""
        parts = _one_part(parts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if parts:
            save_embeddings(self.path, parts[0], ids=ids)
        else:
            self.path.unlink(missing_ok=True)
        return parts


def _one_part(parts: list[PackedEmbeddings]) -> list[PackedEmbeddings]:
    """``parts`` as at most one `PackedEmbeddings`, end to end."""
    if len(parts) <= 1:
        return parts
    return [PackedEmbeddings.from_lengths(torch.cat([p.values for p in parts]),
                                          [n for p in parts for n in p.lengths_host])]
