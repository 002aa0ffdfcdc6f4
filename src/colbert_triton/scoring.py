"""Exact late-interaction (MaxSim) scoring: all pairs, per-query candidates, pairs, top-k search.

    score(q, d) = sum over query rows i of  max over the document's rows j of  <q_i, d_j>

Conventions (the same on every backend):
- a document's padded slots never take part in the max (unless ``pad_floor`` asks for
  PyLate's zero-padding semantics, where a padded slot enters the max as 0.0);
- a query row that is masked out (or zero padding of a shorter query) contributes 0;
- an empty document (no rows) scores 0.0: each query row's max over nothing is taken as 0,
  never -inf, so scores stay finite;
- scores are float32; the kernel and the CPU path accumulate in float32 whatever the input
  dtype (the PyTorch path on CUDA rounds each 16-bit similarity to its dtype first, as PyLate).

On CUDA tensors the Triton kernels in `colbert_triton.kernels.maxsim` do the work; elsewhere the
plain PyTorch implementation below (also the eager baseline of the benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import NamedTuple

import numpy as np
import torch

from .kernels._device import cuda_capability
from .packed import (
    EmbeddingsFile,
    PackedEmbeddings,
    check_embedding_dtype,
    check_embedding_list,
)

# The GPU architectures (compute capabilities) whose CUDA tensors get the Triton kernels when no
# backend is named: those where the test suite has passed natively (see README, "Status").
# Empty until a GPU session adds one; elsewhere the PyTorch path is the default. The kernels'
# tiles are sized for sm_90 (compiled for other GPUs they fit, never run: README). The Triton
# path is always available by name. NVIDIA's only: a ROCm build's AMD GPUs are "cuda" devices
# too, and an MI200 (gfx90a) reports capability (9, 0).
TRITON_DEFAULT_CAPABILITIES: frozenset[tuple[int, int]] = frozenset()


def resolve_backend(device: torch.device, backend: str | None) -> str:
    if backend is None:
        if device.type == "cuda" and torch.version.hip is None and TRITON_DEFAULT_CAPABILITIES:
            return "triton" if cuda_capability(device) in TRITON_DEFAULT_CAPABILITIES else "torch"
        return "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch', 'triton' or None, got {backend!r}")
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        if device.type == "cuda" and torch.version.hip is not None:
            # Compiled for gfx90a, every MaxSim launch and a third of the encoder's fail in Triton
            # (no "tf32" dot precision there); for gfx942 the fp32 MaxSim's "tf32x3" does.
            # Nothing has run on an AMD GPU.
            raise ValueError("the Triton backend is written and checked for NVIDIA GPUs only; on "
                             f"this ROCm build (HIP {torch.version.hip}) use backend='torch'")
    return backend


# ---------------------------------------------------------------------------------------------
# Input normalisation: lists, numpy arrays, padded tensors and packed embeddings.


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, np.ndarray):
        tensor = torch.from_numpy(x)
    else:
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    check_embedding_dtype(tensor.dtype, what)
    if tensor.dtype == torch.float64:
        # Scores are float32 on every backend; numpy's default float64 would otherwise work on
        # the CPU path and fail in the kernel.
        tensor = tensor.float()
    return tensor


# Elements the NaN/inf check reads at a time: its boolean temporary stays at 16 MB, not the size
# of the corpus (a 100 GB corpus in host memory would otherwise need another 50 GB).
_FINITE_CHUNK = 1 << 24


def _finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A bool scalar on the tensor's device, True when every value is finite; no sync. Read in
    blocks of at most _FINITE_CHUNK elements (whole rows, or flat when contiguous)."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    if tensor.is_contiguous() or tensor.dim() < 2:
        tensor = tensor.reshape(-1)
    rows = max(1, _FINITE_CHUNK // max(1, tensor.numel() // tensor.shape[0]))
    # A block's max and min are finite exactly when all its values are (NaN propagates through
    # both): two reductions, no boolean temporary (10x faster than isfinite on the CPU).
    extremes = [torch.stack([block.amax(), block.amin()]) for block in tensor.split(rows, 0)]
    return torch.isfinite(torch.cat(extremes)).all()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: read once in blocks, one device sync (none if empty)."""
    return tensor.numel() == 0 or bool(_finite_flag(tensor))


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not all_finite(tensor):
        raise ValueError(f"{what} contain NaN or infinite values")


def _check_flags(flags: dict[str, torch.Tensor], also: tuple[torch.Tensor, ...] = ()) -> list[bool]:
    """Raise for the first input whose `_finite_flag` is False: the flags (on one device) are
    read in one sync, with any other bool scalars the caller needs (``also``: their values
    are returned)."""
    read = torch.stack([*flags.values(), *also]).tolist()
    for what, finite in zip(flags, read):
        if not finite:
            raise ValueError(f"{what} contain NaN or infinite values")
    return read[len(flags):]


def _as_tensor_list(items, what: str) -> list[torch.Tensor]:
    """A non-empty list of [tokens, dim] tensors/arrays sharing dim, dtype and device."""
    if not items:
        raise ValueError(f"{what} is empty")
    tensors = [_as_tensor(x, f"{what}[{i}]") for i, x in enumerate(items)]
    check_embedding_list(tensors, what)
    return tensors


class DocRows(NamedTuple):
    """Documents as rows of one [R, dim] tensor: document i is values[starts[i] : starts[i] + lengths[i]]."""

    values: torch.Tensor
    starts: torch.Tensor  # [N] int64, on values' device
    lengths: torch.Tensor  # [N] int64, on values' device
    lengths_host: np.ndarray  # [N] int64, the same lengths on the host (never a device read)
    # Padded [N, L, dim] documents: L (document i's slots are rows i * L ... (i + 1) * L - 1,
    # its padding included); None for packed ones.
    padded_length: int | None = None

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


def as_documents(documents, mask=None) -> DocRows:
    """Any accepted document form as rows of one tensor (one copy at most, none if packed/padded).

    Accepted: PackedEmbeddings; a list of [L_i, dim] tensors/arrays; a padded [N, L, dim]
    tensor/array with an optional [N, L] mask whose ones come first in each row (lengths);
    a single [L, dim] document.
    """
    if isinstance(documents, EmbeddingsFile):  # as load_embeddings returns it
        documents = documents.embeddings
    if isinstance(documents, (list, tuple)):
        documents = PackedEmbeddings.from_list(_as_tensor_list(documents, "documents"))
    if isinstance(documents, PackedEmbeddings):
        if mask is not None:
            raise ValueError("a mask goes with padded [N, L, dim] documents, not with a list or packed ones")
        rows = DocRows(_as_tensor(documents.values, "documents"), documents.starts, documents.lengths,
                       documents.lengths_array)
    else:
        tensor = _as_tensor(documents, "documents")
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 3:
            raise ValueError(f"documents must be [N, L, dim] or [L, dim], got shape {tuple(tensor.shape)}")
        n, length, dim = tensor.shape
        # n == 0 is an empty corpus, as an empty PackedEmbeddings is: no scores, no results.
        starts = torch.arange(n, device=tensor.device) * length
        if mask is None:
            lengths = torch.full((n,), length, device=tensor.device)
            lengths_host = np.full(n, length, dtype=np.int64)
        else:
            lengths = _mask_lengths(mask, (n, length), "documents_mask")  # its check reads the mask anyway
            lengths_host = lengths.cpu().numpy()
            lengths = lengths.to(tensor.device)
        rows = DocRows(tensor.reshape(n * length, dim), starts, lengths, lengths_host, length)
    return rows


def _as_mask(mask, what: str, device=None) -> torch.Tensor:
    try:
        return torch.as_tensor(mask, device=device)
    except (TypeError, ValueError, RuntimeError) as bad:
        raise TypeError(f"{what} must be a tensor or array of 0/1 (or bools), got {type(mask).__name__}: "
                        f"{bad}") from None


def _mask_lengths(mask, shape, what: str) -> torch.Tensor:
    mask = _as_mask(mask, what)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    binary = mask.bool()
    lengths = binary.sum(-1)
    prefix = torch.arange(shape[-1], device=mask.device)[None, :] < lengths[:, None]
    if not bool((prefix == binary).all()) or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what} must be 0/1 with the ones first in each row (a length mask)")
    return lengths.long()


def as_queries(queries, mask=None) -> torch.Tensor:
    """Any accepted query form as a zero-padded [Q, Lq, dim] tensor (masked rows zeroed)."""
    if isinstance(queries, EmbeddingsFile):
        queries = queries.embeddings
    if isinstance(queries, PackedEmbeddings):
        queries = queries.to_list()
    if isinstance(queries, (list, tuple)):
        tensors = _as_tensor_list(queries, "queries")
        if mask is not None:
            raise ValueError("a mask goes with a padded [Q, Lq, dim] query tensor, not with a list")
        batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    else:
        batch = _as_tensor(queries, "queries")
        if batch.dim() == 2:
            batch = batch.unsqueeze(0)
        if batch.dim() != 3:
            raise ValueError(f"queries must be [Q, Lq, dim] or [Lq, dim], got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            raise ValueError("queries is empty")
        if mask is not None:
            mask = _as_mask(mask, "queries_mask", batch.device)
            if tuple(mask.shape) != tuple(batch.shape[:2]):
                raise ValueError(f"queries_mask has shape {tuple(mask.shape)}, expected {tuple(batch.shape[:2])}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("queries_mask must hold only 0 and 1 (or False and True)")
            # masked_fill, not a product: a masked row's NaN or inf times 0 is still NaN.
            batch = batch.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    return batch.contiguous()


def _streams_host_corpus(queries: torch.Tensor, docs: DocRows) -> bool:
    """CUDA queries and a corpus in host memory: `search` streams the corpus to the GPU."""
    return queries.device.type == "cuda" and docs.values.device.type == "cpu"


def _check_pair(queries: torch.Tensor, docs: DocRows, host_corpus_ok: bool = False) -> None:
    if queries.shape[-1] != docs.dim:
        raise ValueError(f"queries have dim {queries.shape[-1]} but documents have dim {docs.dim}")
    if docs.dim == 0:
        raise ValueError("embeddings have dim 0: there is nothing to score")
    if queries.dtype != docs.values.dtype:
        # Both sides are already converted: a float64 input reads as float32 here (_as_tensor).
        float64_note = (" (float64 inputs are scored as float32)"
                        if torch.float32 in (queries.dtype, docs.values.dtype) else "")
        raise TypeError(f"queries are {queries.dtype} but documents are {docs.values.dtype}"
                        f"{float64_note}: cast one side")
    if queries.device != docs.values.device:
        streams = _streams_host_corpus(queries, docs)
        if not (host_corpus_ok and streams):
            hint = " (only search() takes a corpus in host memory with CUDA queries)" if streams else ""
            raise ValueError(f"queries are on {queries.device} but documents are on "
                             f"{docs.values.device}{hint}")


def _prepare(queries, documents, *, check_inputs: bool, queries_mask=None, documents_mask=None,
             host_corpus_ok: bool = False):
    """Queries as [Q, Lq, dim] and documents as rows, checked against each other.

    ``check_inputs`` also rejects NaN/inf values: one pass over both inputs and one device sync,
    worth skipping (``check_inputs=False``) when scoring a trusted corpus in a hot loop.
    """
    q = as_queries(queries, queries_mask)
    docs = as_documents(documents, documents_mask)
    _check_pair(q, docs, host_corpus_ok)
    if check_inputs:
        flags = {"queries": _finite_flag(q)}
        if not (host_corpus_ok and _streams_host_corpus(q, docs)):  # search checks it on the GPU
            flags["documents"] = _finite_flag(docs.values)  # on the queries' device (_check_pair)
        _check_flags(flags)
    return q, docs


# ---------------------------------------------------------------------------------------------
# The MaxSim core, two implementations.


def maxsim_torch(queries, doc_values, doc_starts, doc_lengths, *, pad_floor=None,
                 budget_elements: int = 1 << 25, lengths_host: np.ndarray | None = None) -> torch.Tensor:
    """Plain PyTorch MaxSim with the kernel's signature (see `kernels.maxsim.maxsim`).

    Documents are gathered into padded blocks, padded slots filled with -inf before the max. A
    block holds at most ``budget_elements`` similarity values plus gathered document values. With
    shared documents the blocks take them in order of length, each padded to its own longest: a
    few long documents no longer pad every short one (0.1% of 300-row documents among 100k short
    ones made a search 25x slower). ``lengths_host``: the lengths as a host array, if the caller
    has them (otherwise read once from the device).
    """
    shared = doc_starts.dim() == 1
    num_q, len_q, dim = queries.shape
    compute = queries.dtype if queries.is_cuda else torch.float32
    q = queries.to(compute)
    starts, lengths = doc_starts.long(), doc_lengths.long()
    floor = None if pad_floor is None else pad_floor.bool()
    out_shape = (num_q, doc_starts.shape[0]) if shared else tuple(doc_starts.shape)
    out = torch.empty(out_shape, dtype=torch.float32, device=queries.device)
    if out.numel() == 0:
        return out
    if doc_values.shape[0] == 0:
        return out.zero_()  # every document empty: each row's max over nothing is 0
    host = np.asarray(lengths.cpu() if lengths_host is None else lengths_host, dtype=np.int64).reshape(-1)
    last_row = doc_values.shape[0] - 1
    if not shared:  # candidates: [Q, K] per query, blocks of whole queries padded to the longest
        max_len = max(int(host.max()), 1)
        num_k = doc_starts.shape[1]
        step = max(1, budget_elements // (num_k * max_len * (len_q + dim)))
        positions = torch.arange(max_len, device=queries.device)
        for lo in range(0, num_q, step):
            hi = min(num_q, lo + step)
            n = lengths[lo:hi]
            index = (starts[lo:hi, :, None] + positions).clamp(max=last_row)
            docs = doc_values[index].to(compute)  # [q, K, L, d]; only the gathered rows converted
            sim = torch.einsum("qid,qkjd->qkij", q[lo:hi], docs)
            sim.masked_fill_(~(positions < n[..., None])[:, :, None, :], float("-inf"))
            best = sim.amax(-1).float().masked_fill((n == 0)[:, :, None], 0.0)  # [q, K, Lq]
            if floor is not None:
                best = torch.where(floor[lo:hi, :, None], best.clamp(min=0.0), best)
            out[lo:hi] = best.sum(-1)
        return out
    order = np.argsort(host, kind="stable")
    by_length = np.maximum(host[order], 1)
    order_dev = torch.from_numpy(order).to(queries.device)
    # Per document slot: its similarity values and its gathered values.
    per_row = num_q * len_q + dim
    lo, total = 0, len(order)
    while lo < total:
        # Largest block from lo whose size x its longest (the last, lengths ascending) fits.
        window = by_length[lo : lo + max(1, budget_elements // per_row)]
        cost = np.arange(1, len(window) + 1) * window * per_row
        hi = lo + max(1, int(np.searchsorted(cost, budget_elements, side="right")))
        max_len = int(by_length[hi - 1])
        idx = order_dev[lo:hi]
        n = lengths[idx]
        positions = torch.arange(max_len, device=queries.device)
        docs = doc_values[(starts[idx, None] + positions).clamp(max=last_row)].to(compute)  # [n, L, d]
        # One matrix product [Q * Lq, d] x [d, n * L]; the mask and the max in place.
        sim = (q.reshape(num_q * len_q, dim) @ docs.reshape(-1, dim).T).view(num_q, len_q, hi - lo, max_len)
        sim.masked_fill_(~(positions < n[:, None]), float("-inf"))
        # Out of place: autograd keeps amax's output (PyLate's training calls take this path).
        best = sim.amax(-1).float().masked_fill(n == 0, 0.0)  # [Q, Lq, n]
        if floor is not None:
            best = torch.where(floor[idx], best.clamp(min=0.0), best)
        out[:, idx] = best.sum(1)
        lo = hi
    return out


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would track a result computed from these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def maxsim(queries, doc_values, doc_starts, doc_lengths, *, pad_floor=None, backend=None,
           lengths_host: np.ndarray | None = None) -> torch.Tensor:
    """Dispatch to the Triton kernel or the PyTorch implementation; arguments as the kernel's
    (``lengths_host``: the lengths as a host array if the caller has them, else None).

    The kernel has no backward pass: inputs that need gradients take the PyTorch path when no
    backend is named, and are an error with ``backend="triton"``. So do embedding dims past the
    kernel's limits (1024; 512 in float32)."""
    chosen = resolve_backend(queries.device, backend)
    if chosen == "triton" and needs_grad(queries, doc_values):
        if backend == "triton":
            raise ValueError("the Triton MaxSim kernel has no backward pass: score inputs that need "
                             "gradients with backend='torch' (or under torch.no_grad())")
        chosen = "torch"
    if chosen == "triton":
        from .kernels import maxsim as kernel

        if backend is not None or kernel.takes(queries.dtype, queries.shape[-1], queries.device):
            return kernel.maxsim(queries, doc_values, doc_starts, doc_lengths, pad_floor=pad_floor)
    return maxsim_torch(queries, doc_values, doc_starts, doc_lengths, pad_floor=pad_floor,
                        lengths_host=lengths_host)


# ---------------------------------------------------------------------------------------------
# Public scoring API.


def score(queries, documents, *, queries_mask=None, documents_mask=None, backend=None,
          check_inputs: bool = True) -> torch.Tensor:
    """All-pairs scores ``[Q, N]`` (float32)."""
    q, docs = _prepare(queries, documents, check_inputs=check_inputs, queries_mask=queries_mask,
                       documents_mask=documents_mask)
    return maxsim(q, docs.values, docs.starts, docs.lengths, backend=backend, lengths_host=docs.lengths_host)


def score_pairwise(queries, documents, *, queries_mask=None, documents_mask=None, backend=None,
                   check_inputs: bool = True) -> torch.Tensor:
    """Scores of query i against document i: ``[P]``."""
    q, docs = _prepare(queries, documents, check_inputs=check_inputs, queries_mask=queries_mask,
                       documents_mask=documents_mask)
    if q.shape[0] != len(docs):
        raise ValueError(f"{q.shape[0]} queries but {len(docs)} documents: pairs need equal counts")
    return maxsim(q, docs.values, docs.starts[:, None], docs.lengths[:, None], backend=backend,
                  lengths_host=docs.lengths_host)[:, 0]


def score_candidates(queries, corpus, candidates, *, queries_mask=None, documents_mask=None,
                     backend=None, check_inputs: bool = True) -> torch.Tensor:
    """Query i against its own candidates ``candidates[i]`` (indices into ``corpus``): ``[Q, K]``.

    An index of -1 marks an unused slot; its score is -inf. ``check_inputs`` reads the queries
    and the candidate documents (padded slots included) for NaN/inf, not the rest of the corpus.
    """
    q, docs = _prepare(queries, corpus, check_inputs=False, queries_mask=queries_mask,
                       documents_mask=documents_mask)
    try:
        cand = torch.as_tensor(candidates, device=q.device)
    except (ValueError, TypeError, RuntimeError) as bad:
        raise ValueError(f"candidates must be a [Q, K] array of indices (pad short rows with -1): {bad}") from None
    if cand.numel() == 0:  # [[]]: no candidates, whatever dtype an empty list got
        cand = cand.long()
    if cand.dim() == 1:
        cand = cand.unsqueeze(0)
    if cand.dim() != 2 or cand.shape[0] != q.shape[0]:
        raise ValueError(f"candidates must be [Q, K] with Q={q.shape[0]}, got shape {tuple(cand.shape)}")
    if cand.dtype.is_floating_point or cand.dtype == torch.bool:
        raise TypeError(f"candidates must be integer indices, got {cand.dtype}")
    cand = cand.long()
    if check_inputs:  # the distinct candidates, sorted: the check reads their rows
        distinct = torch.unique(cand).cpu().numpy()
        highest, lowest = (int(distinct[-1]), int(distinct[0])) if distinct.size else (-1, -1)
    else:
        highest, lowest = torch.stack([cand.max(), cand.min()]).tolist() if cand.numel() else (-1, -1)
    if highest >= len(docs) or lowest < -1:  # read in one sync
        raise ValueError(f"candidate indices must lie in [0, {len(docs)}) (or -1 for an empty slot)")
    if check_inputs:
        _check_flags({"queries": _finite_flag(q), "documents": _candidate_rows_finite_flag(docs, distinct)})
    unused = cand < 0
    if len(docs) == 0:  # every slot is -1 (checked above): nothing to gather
        return torch.full(cand.shape, float("-inf"), device=q.device)
    safe = cand.clamp(min=0)
    scores = maxsim(q, docs.values, docs.starts[safe], docs.lengths[safe], backend=backend)
    return scores.masked_fill(unused, float("-inf"))


def _candidate_rows_finite_flag(docs: DocRows, distinct: np.ndarray) -> torch.Tensor:
    """A bool scalar on the corpus's device, no sync: whether the rows of the documents
    ``distinct`` names (distinct host indices, checked; -1 for none) are finite, the padded
    slots of padded documents included (as `score` reads them). Each is read once, in blocks of
    at most _FINITE_CHUNK values; the rest of the corpus is not read (reranking a few hundred
    candidates of a large corpus read all of it)."""
    used = distinct[distinct >= 0]
    if docs.padded_length is None:
        lengths = docs.lengths_host[used]
    else:
        lengths = np.full(len(used), docs.padded_length, dtype=np.int64)
    used, lengths = used[lengths > 0], lengths[lengths > 0]
    device = docs.values.device
    flags = [torch.ones((), dtype=torch.bool, device=device)]
    ends = np.cumsum(lengths)
    rows_per_block = max(1, _FINITE_CHUNK // docs.dim)
    lo = 0
    while lo < len(used):
        # Whole documents up to rows_per_block rows (or one longer document alone).
        first_row = ends[lo] - lengths[lo]
        hi = max(lo + 1, int(np.searchsorted(ends, first_row + rows_per_block, side="right")))
        block_lengths = torch.from_numpy(lengths[lo:hi]).to(device)
        total = int(ends[hi - 1] - first_row)
        # Row r of the block belongs to document j: starts[j] + (r - rows before j in the block).
        shift = docs.starts[torch.from_numpy(used[lo:hi]).to(device)] - (torch.cumsum(block_lengths, 0) - block_lengths)
        rows = torch.repeat_interleave(shift, block_lengths, output_size=total) + torch.arange(total, device=device)
        flags.append(_finite_flag(docs.values[rows]))
        lo = hi
    return torch.stack(flags).all()


def merge_topk(best_scores, best_index, scores, first_index: int, k: int):
    """Merge a block of scores (documents first_index...) into a running top-k.

    A stable descending sort over [running | block] keeps ties in index order, because every
    running entry has a lower index than the block and the running list is already ordered.
    """
    index = torch.arange(first_index, first_index + scores.shape[1], device=scores.device)
    index = index.expand(scores.shape[0], -1)
    scores = torch.cat([best_scores, scores], 1)
    index = torch.cat([best_index, index], 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), index.gather(1, order)


def checked_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int of at least ``minimum`` (numpy integers accepted), or a clear error."""
    wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {wanted}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number


# A corpus in host memory goes to the GPU in copies of at most this many bytes (two in flight).
_STREAM_BYTES = 256 << 20
# A search chunk holds at most this many (query, document) pairs: its scores and the merge's
# concatenation and sort take ~28 bytes a pair (3.8 GB here), so 100k queries at once get
# chunks of 1342 documents, not the 92 GB that 32768 would take.
_SEARCH_PAIRS = 1 << 27


def _device_chunks(docs: DocRows, chunk_size: int):
    """(first index, rows, starts, lengths, host lengths) of each chunk of a corpus already on
    the device. The host lengths are the corpus's own: the PyTorch path blocks the documents by
    length, and reading them from the device chunk by chunk would wait on the GPU every chunk."""
    lengths_host = docs.lengths_host
    # Every chunk passes all the rows: a view with a column stride (X.T) is made row-major once
    # here, not copied whole by the kernel's launcher for every chunk.
    values = docs.values if docs.values.stride(1) == 1 else docs.values.contiguous()
    for lo in range(0, len(docs), chunk_size):
        hi = min(len(docs), lo + chunk_size)
        yield lo, values, docs.starts[lo:hi], docs.lengths[lo:hi], lengths_host[lo:hi]


def _chunk_bounds(begins: np.ndarray, ends: np.ndarray, chunk_size: int, max_rows: int):
    """[(lo, hi, row_begin, row_end)]: consecutive documents, at most ``chunk_size`` of them,
    whose rows lie in [row_begin, row_end), a span of at most ``max_rows`` rows unless a single
    document is longer. Packed and padded corpora have non-decreasing begins and ends."""
    bounds, lo, n = [], 0, len(begins)
    while lo < n:
        hi = min(n, lo + chunk_size)
        hi = min(hi, int(np.searchsorted(ends, begins[lo] + max_rows, side="right")))
        hi = max(hi, lo + 1)
        bounds.append((lo, hi, int(begins[lo]), int(ends[lo:hi].max())))
        lo = hi
    return bounds


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    """One block's copy to the device, on the current stream (tests wrap it to stall it)."""
    dst.copy_(src, non_blocking=non_blocking)


class _Synchronous:
    """Stands in for CUDA streams and events off a GPU, where every copy has finished on return."""

    def __init__(self, **options):  # takes an event's options (blocking=...) and ignores them
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


def _host_chunks(docs: DocRows, chunk_size: int, device: torch.device, check_finite: bool):
    """The chunks of a corpus in host memory, each copied to ``device`` as one block of rows:
    (first index, rows, starts, lengths, longest length).

    On CUDA the copies run on a stream of their own from pinned memory (the corpus itself if it
    is pinned, else a pinned staging buffer), two buffers deep: block i + 1 is copied while
    block i is scored. The caller enqueues its work on a block before asking for the next one.
    ``check_finite``: each block is checked for NaN/inf on ``device`` once copied, and a
    ValueError raised after the last one (one sync, not a pass over the corpus on the host).
    Off CUDA the same code runs with synchronous copies.
    """
    if len(docs) == 0:
        return
    # int64: a hand-built corpus may have int32 offsets, and begin + row limit must not wrap.
    starts = docs.starts.numpy().astype(np.int64)
    lengths = docs.lengths_host
    nonempty = lengths > 0
    # Row spans made non-decreasing (they already are for packed and padded corpora): ends as a
    # running max, begins as a suffix min; an empty document begins where the rows before end.
    ends = np.maximum.accumulate(np.where(nonempty, starts + lengths, 0))
    begins = np.where(nonempty, starts, np.concatenate([[0], ends[:-1]]))
    begins = np.minimum.accumulate(begins[::-1])[::-1]
    row_limit = max(1, _STREAM_BYTES // (docs.values.element_size() * docs.dim))
    bounds = _chunk_bounds(begins, ends, chunk_size, row_limit)
    # The blocks are stretched to tile all R rows (padding between and after documents
    # included), so the NaN/inf check reads what the on-device path reads, whatever the block
    # boundaries. Rows that would stretch a block past the row limit (a long run of empty padded
    # documents) are checked on the host instead, never copied.
    num_rows = docs.values.shape[0]
    stretched, unscored = [], []
    for j, (lo, hi, begin, end) in enumerate(bounds):
        first = 0 if j == 0 else begin
        last = num_rows if j == len(bounds) - 1 else max(end, bounds[j + 1][2])
        if last - first > max(row_limit, end - begin):
            unscored += [(first, begin), (end, last)]
            first, last = begin, end
        stretched.append((lo, hi, first, last))
    bounds = stretched
    if check_finite:
        for first, last in unscored:
            _check_finite(docs.values[first:last], "documents")
    chunk_of_doc = np.repeat(np.arange(len(bounds)), [hi - lo for lo, hi, _, _ in bounds])
    first_row = np.array([begin for _, _, begin, _ in bounds], dtype=np.int64)
    relative_starts = torch.from_numpy(np.where(nonempty, starts - first_row[chunk_of_doc], 0))
    # Index tensors move once, whole (16 bytes a document).
    relative_starts = relative_starts.to(device)
    lengths_dev = docs.lengths.to(device)
    max_rows = max(end - begin for _, _, begin, end in bounds)
    cuda = device.type == "cuda"
    depth = min(2, len(bounds))
    shape, dtype = (max_rows, docs.dim), docs.values.dtype
    on_device = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
    staging = None if cuda and docs.values.is_pinned() else [
        torch.empty(shape, dtype=dtype, pin_memory=cuda) for _ in range(depth)]
    if cuda:
        compute, copier = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        new_event, on_copier = torch.cuda.Event, functools.partial(torch.cuda.stream, copier)
    else:
        compute = copier = _Synchronous()
        new_event, on_copier = _Synchronous, contextlib.nullcontext
    # blocking: the host sleeps, not spins, while it waits for a staging buffer's copy.
    copied = [new_event(blocking=True) for _ in range(depth)]
    scored: list = [None] * depth
    flags = []
    # The buffers were allocated for the compute stream, whose earlier work may still read the
    # memory they reuse: the copies start after it.
    copier.wait_stream(compute)
    try:
        for i, (lo, hi, begin, end) in enumerate(bounds):
            slot, rows = i % depth, end - begin
            source = docs.values[begin:end]
            if staging is not None:
                if i >= depth:
                    copied[slot].synchronize()  # the staging buffer's previous copy has run
                source = staging[slot][:rows].copy_(source)
            with on_copier():
                if scored[slot] is not None:
                    copier.wait_event(scored[slot])  # block i - depth is scored: buffer free
                _copy_rows(on_device[slot][:rows], source, non_blocking=cuda)
                copied[slot].record(copier)
            compute.wait_event(copied[slot])
            block = on_device[slot][:rows]
            if check_finite:
                flags.append(_finite_flag(block))
            yield lo, block, relative_starts[lo:hi], lengths_dev[lo:hi], lengths[lo:hi]
            scored[slot] = new_event()
            scored[slot].record(compute)
    finally:
        # Also on an early stop or an error: the buffers go back to the compute stream only
        # after every copy into them, and a pinned corpus (the caller's memory) is not read
        # after this returns.
        compute.wait_stream(copier)
        for event in copied:
            event.synchronize()
    if flags and not bool(torch.stack(flags).all()):
        raise ValueError("documents contain NaN or infinite values")


def search(queries, corpus, k: int = 10, *, queries_mask=None, documents_mask=None,
           chunk_size: int = 32768, backend=None, check_inputs: bool = True):
    """Exact top-k documents of ``corpus`` per query: ``(scores [Q, k'], indices [Q, k'])`` with
    ``k' = min(k, N)``.

    The corpus is scored in chunks of ``chunk_size`` documents (fewer when Q x chunk_size
    passes 2^27 pairs) and merged into a running top-k, so no ``[Q, N]`` matrix is ever held.
    Results equal a full sort of the exact scores, ties broken by the lower index. ``k`` larger than the corpus returns the whole corpus, sorted.
    With CUDA queries the corpus may stay in host memory (larger than the GPU's): it is then
    streamed to the GPU once, in blocks of at most 256 MB, each copied while the previous one
    is scored and checked for NaN/inf there. A pinned corpus skips a staging copy per block,
    but ``corpus.pin_memory()`` makes a pinned copy, which PyTorch rounds up to a power of two
    bytes: for a corpus near the host's memory keep the default (staged) path.
    """
    k = checked_int(k, "k")
    chunk_size = checked_int(chunk_size, "chunk_size")
    q, docs = _prepare(queries, corpus, check_inputs=check_inputs, queries_mask=queries_mask,
                       documents_mask=documents_mask, host_corpus_ok=True)
    k = min(k, len(docs))
    chunk_size = min(chunk_size, max(1, _SEARCH_PAIRS // q.shape[0]))
    if _streams_host_corpus(q, docs):
        chunks = _host_chunks(docs, chunk_size, q.device, check_finite=check_inputs)
    else:
        chunks = _device_chunks(docs, chunk_size)
    # An empty corpus gives [Q, 0] results.
    best_scores = torch.empty(q.shape[0], 0, dtype=torch.float32, device=q.device)
    best_index = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
    with contextlib.closing(chunks):  # an error mid-way releases the stream's buffers at once
        for lo, values, starts, lengths, lengths_host in chunks:
            block = maxsim(q, values, starts, lengths, backend=backend, lengths_host=lengths_host)
            best_scores, best_index = merge_topk(best_scores, best_index, block, lo, k)
    return best_scores, best_index


def rerank(query, documents, k: int | None = None, *, query_mask=None, documents_mask=None,
           backend=None, check_inputs: bool = True) -> list[tuple[int, float]]:
    """Documents ranked for one query: ``[(index, score), ...]``, best first, ties by index;
    the best ``k`` only when ``k`` is given."""
    count = None if k is None else checked_int(k, "k")
    q, docs = _prepare(query, documents, check_inputs=check_inputs, queries_mask=query_mask,
                       documents_mask=documents_mask)
    if q.shape[0] != 1:
        raise ValueError(f"rerank takes one query, got {q.shape[0]}")
    scores = maxsim(q, docs.values, docs.starts, docs.lengths, backend=backend, lengths_host=docs.lengths_host)[0]
    ranked = torch.sort(scores, descending=True, stable=True)
    return list(zip(ranked.indices[:count].tolist(), ranked.values[:count].tolist()))
