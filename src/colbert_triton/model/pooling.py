"""Hierarchical token pooling of documents: PyLate's ``pool_factor``, computed as PyLate computes it.

Each document's token rows (after its first ``protected_tokens``, kept as they are) are clustered
into ``max(rows // pool_factor, 1)`` groups by Ward linkage on cosine distance, and each group is
replaced by its mean: an index ``pool_factor`` times smaller, for a small loss of retrieval quality
(Clavié et al., "Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance Impact
via Token Pooling", 2024). The means are not normalised again, and come after the protected rows in
SciPy's cluster order, as in PyLate 1.6 (``ColBERT.pool_embeddings_hierarchical``). The clustering
runs on the CPU with SciPy, which is needed only for this (``pip install scipy``), in this
process or, since SciPy's linkage holds the GIL (threads would not help), in worker processes
(`PoolingProcesses`). `BatchPipeline` runs it one batch behind the encoder, with the move of each
batch to host memory when the output is asked for there.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext

import numpy as np
import torch

from .. import scoring


def check_pooling(pool_factor, protected_tokens, processes=0) -> tuple[int, int, int | PoolingProcesses]:
    """The settings as Python ints (``processes`` may also be running `PoolingProcesses`), or a
    clear error: called before anything is encoded, so a corpus is not encoded only to fail
    here. Whether SciPy is needed depends on where the model pools (`ColBERT.encode_documents`
    asks for it then)."""
    pool_factor = scoring.checked_int(pool_factor, "pool_factor")
    protected_tokens = scoring.checked_int(protected_tokens, "protected_tokens", minimum=0)
    if isinstance(processes, PoolingProcesses):
        if processes.closed:
            raise ValueError("pooling_processes: these pooling processes are stopped (closed, or their "
                             "`with` block has ended)")
    else:
        processes = scoring.checked_int(processes, "pooling_processes", minimum=0)
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
    """``count`` worker processes that pool documents side by side. Give them to
    ``encode_documents(..., pooling_processes=workers)`` to keep them across calls (an integer
    there starts processes for the call alone, ~1.5 s). A context manager: leaving it, or
    `close`, stops them. They are started with ``spawn`` (safe beside CUDA and threads), so a
    script that starts them must do its work under ``if __name__ == "__main__":``, as with any
    spawned process. Each runs one torch thread.

        with PoolingProcesses(8) as workers:
            for texts in corpus_parts:
                part = model.encode_documents(texts, pool_factor=2, pooling_processes=workers)
    """

    def __init__(self, count: int):
        self.count = scoring.checked_int(count, "the number of pooling processes")
        self.closed = False
        self._executor = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)

    def __enter__(self):
        return self

    def __exit__(self, *error) -> None:
        self.close()

    def close(self) -> None:
        """Stop the processes (work not yet started is dropped)."""
        self.closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, documents: list[torch.Tensor], pool_factor: int, protected_tokens: int) -> _PoolingInProcesses:
        """Start pooling ``documents`` (float32, on the host); the result: ``.result()``."""
        if self.closed:
            raise ValueError("these pooling processes are stopped (closed, or their `with` block has ended)")
        # Round robin over a batch sorted longest first: each process gets as many long
        # documents as short ones (the linkage costs rows squared).
        groups = [range(g, len(documents), self.count) for g in range(min(self.count, len(documents)))]
        try:
            futures = [self._executor.submit(_pool_in_worker, torch.cat([documents[i] for i in group]).numpy(),
                                             [len(documents[i]) for i in group], pool_factor, protected_tokens)
                       for group in groups]
        except BrokenProcessPool as error:
            raise _stopped(error) from None
        return _PoolingInProcesses(len(documents), groups, futures)


class _PoolingInProcesses:
    """A batch's documents being pooled by `PoolingProcesses`."""

    def __init__(self, count: int, groups: list[range], futures: list):
        self.count, self.groups, self.futures = count, groups, futures

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()

    def result(self) -> list[torch.Tensor]:
        try:
            results = [future.result() for future in self.futures]
        except BrokenProcessPool as error:
            raise _stopped(error) from None
        pooled = [None] * self.count
        for group, (values, lengths) in zip(self.groups, results):
            for i, rows in zip(group, torch.split(torch.from_numpy(values), lengths, 0)):
                pooled[i] = rows
        return pooled


def _stopped(error: BaseException) -> RuntimeError:
    return RuntimeError(f"the pooling processes stopped ({error}): one was killed, ran out of memory, or could "
                        f'not start (a script that starts them needs its work under `if __name__ == "__main__":`)')


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
    with BatchPipeline(pool_factor, protected_tokens, processes) as pipeline:
        ((pooled, pooled_lengths, _),) = pipeline.put(values, lengths) + pipeline.finish()
    return pooled, pooled_lengths


class BatchPipeline:
    """What follows the encoder, one batch behind it, in order: pooling (``pool_factor`` > 1) and
    the move of each batch to ``output_device`` (default: where the encoder made it). `put`
    takes each batch as the encoder makes it and hands back the batches done so far, `finish`
    the rest, as ``(values, lengths, tag)``.

    A batch on a GPU that is pooled or moved is copied to the host without blocking (its kernels
    are queued asynchronously), and waited for only once the next batch is queued, so the GPU
    encodes the next batch while the host (or ``processes``) pools this one, and a corpus moved
    to the host never has to fit in the GPU's memory. With processes, up to
    ``batches_in_flight`` batches are handed to them before the oldest is waited for, so they
    do not idle while this process collects. Pooled results are those of `pool_documents`,
    batch by batch. With ``on_device``, each batch is pooled by the Triton kernels
    (`kernels.pooling`) where it was encoded, queued behind the encoder; only how many clusters
    each document got (fewer than asked for on tied heights) is waited for, one batch behind. A
    context manager: an error inside it drops the work not yet started."""

    def __init__(self, pool_factor: int, protected_tokens: int, processes: PoolingProcesses | None = None,
                 batches_in_flight: int = 2, output_device: torch.device | None = None, on_device: bool = False):
        self.pool_factor, self.protected_tokens = pool_factor, protected_tokens
        self.processes, self.batches_in_flight = processes, batches_in_flight
        self.output_device, self.on_device = output_device, on_device
        self._stream = None  # the pooling kernels' CUDA stream, made on the first batch pooled there
        # The newest batch: (values, lengths, tag, pooled on the device or None, host copy, its
        # clusters' count on the host, the copies' event).
        self._copying = None
        self._waiting = deque()  # older batches, oldest first: (values, lengths, tag, host, pooled or in processes)

    def __enter__(self):
        return self

    def __exit__(self, *error) -> None:
        for *_, pooled in self._waiting:
            if isinstance(pooled, _PoolingInProcesses):
                pooled.cancel()
        self._waiting.clear()

    def put(self, values: torch.Tensor, lengths: np.ndarray, tag=None) -> list[tuple[torch.Tensor, np.ndarray, object]]:
        """Take a batch (``tag`` comes back with it); the batches done by now, oldest first."""
        on_device = None
        if self.pool_factor > 1 and self.on_device:
            on_device = self._pool_on_device(values, lengths)
            values, lengths = on_device.values, on_device.bound_lengths
        elif self.pool_factor == 1 and self._target(values) == values.device:
            return [(values, lengths, tag)]
        # To the host when the output goes there, or to be pooled there; on a GPU, queued after
        # the pooling, on its stream.
        to_host = self._target(values) != values.device or (self.pool_factor > 1 and on_device is None)
        pooled_on_gpu = on_device is not None and values.device.type == "cuda"
        with torch.cuda.stream(self._stream) if pooled_on_gpu else nullcontext():
            copies = _host_copy(values if to_host else None, None if on_device is None else on_device.found)
        copied, self._copying = self._copying, (values, lengths, tag, on_device, *copies)
        if copied is not None:
            self._start(*copied)
        return self._collect(self.batches_in_flight)

    def finish(self) -> list[tuple[torch.Tensor, np.ndarray, object]]:
        """The batches not handed back yet, oldest first."""
        if self._copying is not None:
            self._start(*self._copying)
            self._copying = None
        return self._collect(0)

    def _pool_on_device(self, values: torch.Tensor, lengths: np.ndarray):
        """The batch's pooling kernels, queued on a stream of the pipeline's own behind the
        encoder's work so far: the encoder goes on with the next batch meanwhile (the pooling
        programs, one per document, leave most of the GPU to it)."""
        from ..kernels import pooling as pooling_kernels

        if values.device.type != "cuda":
            return pooling_kernels.pool_documents(values, lengths, self.pool_factor, self.protected_tokens)
        encoder = torch.cuda.current_stream(values.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(values.device)
        self._stream.wait_stream(encoder)  # the batch is encoded
        with torch.cuda.stream(self._stream):
            pooled = pooling_kernels.pool_documents(values, lengths, self.pool_factor, self.protected_tokens)
        values.record_stream(self._stream)  # read there: its memory is not reused until then
        return pooled

    def _target(self, values: torch.Tensor) -> torch.device:
        return values.device if self.output_device is None else self.output_device

    def _start(self, values, lengths, tag, on_device, host, found, copied) -> None:
        if copied is not None:
            copied.synchronize()  # this batch's copy only: the GPU goes on with the next batch
        pooled = None  # moved only, or pooled on the device
        if on_device is not None:
            # The bound layout (each document's cluster budget) less the clusters not made.
            lengths, rows = on_device.lengths_and_rows(found.numpy())
            if values.device.type == "cuda":  # made on the pooling stream, used on the caller's
                values.record_stream(torch.cuda.current_stream(values.device))
            if rows is not None:
                values = values[torch.from_numpy(rows).to(values.device)]
                host = None if host is None else host[torch.from_numpy(rows)]
        elif self.pool_factor > 1:
            # float32 whatever the model's dtype: PyLate clusters in the model's dtype, which for
            # float16 rounds every distance to 11 bits; on a float32 model the two are the same.
            documents = torch.split(host.float(), lengths.tolist(), 0)
            if self.processes is None:
                pooled = _pool_each(documents, self.pool_factor, self.protected_tokens)
            else:
                pooled = self.processes.submit(documents, self.pool_factor, self.protected_tokens)
        self._waiting.append((values, lengths, tag, host, pooled))

    def _collect(self, keep: int) -> list[tuple[torch.Tensor, np.ndarray, object]]:
        """Batches from the oldest, while more than ``keep`` are left or the oldest is done."""
        finished = []
        while self._waiting and (len(self._waiting) > keep or _is_done(self._waiting[0][-1])):
            values, lengths, tag, host, pooled = self._waiting.popleft()
            if isinstance(pooled, _PoolingInProcesses):
                pooled = pooled.result()
            finished.append((*self._output(values, lengths, host, pooled), tag))
        return finished

    def _output(self, values, lengths, host, pooled) -> tuple[torch.Tensor, np.ndarray]:
        """A batch's rows on the output device, in the encoder's dtype, and their lengths."""
        target = self._target(values)
        pooled_lengths = lengths if pooled is None else np.array([len(p) for p in pooled], dtype=np.int64)
        if np.array_equal(pooled_lengths, lengths):  # not pooled, or no document long enough to pool
            if target == values.device:
                return values, lengths
            # Out of the pinned copy into plain memory: pinned memory stays at a few batches,
            # whatever the corpus's size (pinning is scarce, and slow to allocate).
            return (host.clone() if host.is_pinned() else host), lengths
        return torch.cat(pooled, 0).to(target, values.dtype), pooled_lengths


def _is_done(pooled) -> bool:
    return not isinstance(pooled, _PoolingInProcesses) or pooled.done()


def _host_copy(values: torch.Tensor | None, found: torch.Tensor | None) -> tuple:
    """``values`` and ``found`` (a device-pooled batch's cluster counts) on the host, each if
    given, in their dtype, and, for copies from a GPU (still under way), the event that marks
    their end."""
    tensors = [None if t is None else t.detach() for t in (values, found)]
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if device.type != "cuda":
        return *(None if t is None else t.cpu() for t in tensors), None
    # Into pinned memory, queued after the encoder and the pooling.
    hosts = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))  # the copies' stream, whatever the current device
    return *hosts, copied


def _pool_each(documents, pool_factor: int, protected_tokens: int) -> list[torch.Tensor]:
    hierarchy, squareform = _scipy()
    return [_pool_one(document, pool_factor, protected_tokens, hierarchy, squareform, i)
            for i, document in enumerate(documents)]


def non_finite_error(document: int) -> ValueError:
    """The error for a document whose rows to pool hold a NaN or an infinity (both backends)."""
    return ValueError(f"token pooling: document {document} of the batch has a NaN or infinite value "
                      "in the rows it pools; its cosine distances cannot be clustered (SciPy's Ward "
                      "linkage, which PyLate runs, refuses them too)")


def _pool_one(document: torch.Tensor, pool_factor: int, protected_tokens: int, hierarchy, squareform,
              index: int) -> torch.Tensor:
    """One document's pooled rows (``index``: its place in the batch, for an error): PyLate's
    steps one by one, so that on the same float32 rows the clusters and the means are the same
    to the bit."""
    protected, to_pool = document[:protected_tokens], document[protected_tokens:]
    rows = to_pool.shape[0]
    clusters = max(rows // pool_factor, 1)
    if clusters >= rows:  # nothing to merge
        return document
    if not bool(torch.isfinite(to_pool).all()):
        raise non_finite_error(index)
    labels = ward_labels(1 - torch.mm(to_pool, to_pool.t()).numpy(), clusters, hierarchy, squareform)
    return torch.cat([protected, cluster_means(to_pool, labels, clusters)], 0)


def ward_labels(distances: np.ndarray, clusters: int, hierarchy, squareform) -> np.ndarray:
    """Each row's cluster (1-based) when the Ward tree over the square ``distances`` is cut into
    at most ``clusters`` clusters: SciPy's ``linkage`` and ``fcluster``, as PyLate calls them."""
    # The upper triangle, row by row (PyLate's distances[np.triu_indices(rows, k=1)], 40x faster).
    condensed = squareform(distances, checks=False)
    # Two rows equal to rounding can be at distance -1e-7, and SciPy refuses the linkage that
    # makes ("contains negative distances"), as PyLate then fails. At 0 they merge first.
    np.maximum(condensed, 0, out=condensed)
    return hierarchy.fcluster(hierarchy.linkage(condensed, method="ward"), t=clusters, criterion="maxclust")


def cluster_means(to_pool: torch.Tensor, labels: np.ndarray, clusters: int) -> torch.Tensor:
    """The mean of each cluster's rows, in label order (PyLate's scatter_add_ and division)."""
    labels = torch.from_numpy(labels.astype(np.int64)) - 1
    rows = to_pool.shape[0]
    sums = torch.zeros(clusters, to_pool.shape[1], dtype=to_pool.dtype)
    sums.scatter_add_(0, labels.unsqueeze(1).expand_as(to_pool), to_pool)
    counts = torch.zeros(clusters, dtype=torch.long).scatter_add_(0, labels, torch.ones(rows, dtype=torch.long))
    filled = counts > 0  # maxclust may make fewer clusters than asked for (tied distances)
    return sums[filled] / counts[filled].unsqueeze(1)
