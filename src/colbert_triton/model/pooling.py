"""Hierarchical token pooling of documents: PyLate's ``pool_factor``, computed as PyLate computes it.

Each document's token rows (after its first ``protected_tokens``, kept as they are) are clustered
into ``max(rows // pool_factor, 1)`` groups by Ward linkage on cosine distance, and each group is
replaced by its mean: an index ``pool_factor`` times smaller, for a small loss of retrieval quality
(Clavié et al., "Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance Impact
via Token Pooling", 2024). The means are not normalised again, and come after the protected rows in
SciPy's cluster order, as in PyLate 1.6 (``ColBERT.pool_embeddings_hierarchical``). The clustering
runs on the CPU with SciPy, which is needed only for this (``pip install scipy``), in this
process or, since SciPy's linkage holds the GIL (threads would not help), in worker processes
(`PoolingProcesses`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from .. import scoring


def check_pooling(pool_factor, protected_tokens, processes=0) -> tuple[int, int, int]:
    """The settings as Python ints, with SciPy importable when pooling is asked for, or a clear
    error: called before anything is encoded, so a corpus is not encoded only to fail here."""
    pool_factor = scoring.checked_int(pool_factor, "pool_factor")
    protected_tokens = scoring.checked_int(protected_tokens, "protected_tokens", minimum=0)
    processes = scoring.checked_int(processes, "pooling_processes", minimum=0)
    if pool_factor > 1:
        _scipy()
    return pool_factor, protected_tokens, processes


def _scipy():
    """SciPy's linkage functions and its condensed-matrix form."""
    try:
        from scipy.cluster import hierarchy
        from scipy.spatial.distance import squareform
    except ImportError:
        raise ImportError("pool_factor > 1 clusters each document's rows with SciPy, which is not "
                          "installed: pip install scipy") from None
    return hierarchy, squareform


class PoolingProcesses:
    """``count`` worker processes that pool documents side by side, for `pool_documents`; a
    context manager (leaving it stops them). They are started with ``spawn`` (safe beside CUDA
    and threads), so a script that starts them must do its work under
    ``if __name__ == "__main__":``, as with any spawned process. Each runs one torch thread."""

    def __init__(self, count: int):  # count: checked by check_pooling, with the other settings
        self.count = count
        self._executor = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)

    def __enter__(self):
        return self

    def __exit__(self, *error) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def pool(self, documents: list[torch.Tensor], pool_factor: int, protected_tokens: int) -> list[torch.Tensor]:
        # Round robin over a batch sorted longest first: each process gets as many long
        # documents as short ones (the linkage costs rows squared).
        groups = [range(g, len(documents), self.count) for g in range(min(self.count, len(documents)))]
        try:
            futures = [self._executor.submit(_pool_in_worker, torch.cat([documents[i] for i in group]).numpy(),
                                             [len(documents[i]) for i in group], pool_factor, protected_tokens)
                       for group in groups]
            results = [future.result() for future in futures]
        except BrokenProcessPool as error:
            raise RuntimeError(f"the pooling processes stopped ({error}): one was killed, ran out of memory, "
                               f"or could not start (a script that starts them needs its work under "
                               f'`if __name__ == "__main__":`)') from None
        pooled = [None] * len(documents)
        for group, (values, lengths) in zip(groups, results):
            for i, rows in zip(group, torch.split(torch.from_numpy(values), lengths, 0)):
                pooled[i] = rows
        return pooled


def _start_worker() -> None:
    torch.set_num_threads(1)  # one process a core: threads within each would only contend
    _scipy()  # imported once, before the first batch


def _pool_in_worker(values: np.ndarray, lengths: list[int], pool_factor: int,
                    protected_tokens: int) -> tuple[np.ndarray, list[int]]:
    pooled = _pool_each(torch.split(torch.from_numpy(values), lengths, 0), pool_factor, protected_tokens)
    return torch.cat(pooled, 0).numpy(), [len(p) for p in pooled]


def pool_documents(values: torch.Tensor, lengths: np.ndarray, pool_factor: int, protected_tokens: int,
                   processes: PoolingProcesses | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The documents packed in ``values [T, dim]`` (``lengths`` rows each, in order), pooled:
    their rows packed in the same order, on ``values``' device and in its dtype, and their
    lengths. One copy to the host and one back for the whole batch, not one per document; the
    documents shared among ``processes`` if given (the same bits)."""
    if pool_factor == 1:
        return values, lengths
    # float32 whatever the model's dtype: PyLate clusters in the model's dtype, which for
    # float16 rounds every distance to 11 bits; on a float32 model the two are the same.
    host = values.detach().to("cpu", torch.float32)
    documents = torch.split(host, lengths.tolist(), 0)
    if processes is None:
        pooled = _pool_each(documents, pool_factor, protected_tokens)
    else:
        pooled = processes.pool(documents, pool_factor, protected_tokens)
    pooled_lengths = np.array([len(p) for p in pooled], dtype=np.int64)
    if np.array_equal(pooled_lengths, lengths):  # no document was long enough to pool
        return values, lengths
    return torch.cat(pooled, 0).to(values.device, values.dtype), pooled_lengths


def _pool_each(documents, pool_factor: int, protected_tokens: int) -> list[torch.Tensor]:
    hierarchy, squareform = _scipy()
    return [_pool_one(document, pool_factor, protected_tokens, hierarchy, squareform) for document in documents]


def _pool_one(document: torch.Tensor, pool_factor: int, protected_tokens: int, hierarchy, squareform) -> torch.Tensor:
    """One document's pooled rows: PyLate's steps one by one, so that on the same float32 rows
    the clusters and the means are the same to the bit."""
    protected, to_pool = document[:protected_tokens], document[protected_tokens:]
    rows = to_pool.shape[0]
    clusters = max(rows // pool_factor, 1)
    if clusters >= rows:  # nothing to merge
        return document
    distances = 1 - torch.mm(to_pool, to_pool.t()).numpy()
    # The upper triangle, row by row (PyLate's distances[np.triu_indices(rows, k=1)], 40x faster).
    condensed = squareform(distances, checks=False)
    # Two rows equal to rounding can be at distance -1e-7, and SciPy refuses the linkage that
    # makes ("contains negative distances"), as PyLate then fails. At 0 they merge first.
    np.maximum(condensed, 0, out=condensed)
    labels = hierarchy.fcluster(hierarchy.linkage(condensed, method="ward"), t=clusters, criterion="maxclust")
    labels = torch.from_numpy(labels.astype(np.int64)) - 1
    sums = torch.zeros(clusters, to_pool.shape[1], dtype=to_pool.dtype)
    sums.scatter_add_(0, labels.unsqueeze(1).expand_as(to_pool), to_pool)
    counts = torch.zeros(clusters, dtype=torch.long).scatter_add_(0, labels, torch.ones(rows, dtype=torch.long))
    filled = counts > 0  # maxclust may make fewer clusters than asked for (tied distances)
    return torch.cat([protected, sums[filled] / counts[filled].unsqueeze(1)], 0)
