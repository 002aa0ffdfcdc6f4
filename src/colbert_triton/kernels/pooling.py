"""Token pooling on the GPU: PyLate's hierarchical pooling, with SciPy's clustering step for step.

Design
------
``pool_documents`` pools each document of a packed batch as PyLate's
``pool_embeddings_hierarchical`` does (after its first ``protected`` rows, kept as they are, the
rows are clustered by Ward linkage on cosine distance, the tree is cut into at most
``max(rows // pool_factor, 1)`` clusters, and each cluster is replaced by its mean), in three
kernels and without a device sync:

1. ``_cosine_distance_kernel``: ``1 - x_i . x_j`` for every pair of a document's pooled rows, a
   float32 similarity subtracted from 1 in float32 and clamped at 0 (PyLate's steps, and our CPU
   path's clamp), written as float64 into the document's own ``n x n`` block of a scratch
   buffer. The dot products are summed in float64 from the float32 rows (each product exact)
   and rounded once to float32: the correctly rounded similarity (but for a sum within ~1e-14
   of a float32 rounding tie, where the float64 summation order decides), so the same on every
   GPU and in the interpreter. PyLate's BLAS (``torch.mm`` on the CPU) rounds its own way, so
   a distance can differ from PyLate's in the last bit, and a clustering where that bit
   decides a near tie (see the README). Grid: (documents, row tiles, column tiles); tiles past
   a document's size do nothing.
2. ``_ward_clusters_kernel``, one program per document: SciPy's ``linkage(method="ward")``
   (its nearest-neighbour chain, ``scipy/cluster/_hierarchy.pyx: nn_chain``, with the float64
   Lance-Williams update written in the same order of operations, and launched without FMA
   contraction, so the merge heights are SciPy's to the bit), the stable sort of the merges by
   height and their relabelling (``label``), then ``fcluster(criterion="maxclust")``: the same
   threshold search and the same depth-first numbering of the clusters. Given the same
   distances, the labels are SciPy's. Only the distance matrix lives in memory (updated in
   place); the chain, the cluster sizes, the merges and the tree live in registers, one slot
   per row (``BLOCK_N``: the next power of two >= the batch's longest pooled document), and a
   scalar is read out of them by a masked sum (`_pick`).
3. ``_cluster_means_kernel``, one program per document: the protected rows, then the clusters'
   means in label order: rows added in row order in float32 and divided by the count, as
   torch's CPU ``scatter_add_`` and division do in PyLate. A document too short to pool is
   copied.

The output has ``protected + max_clusters`` rows per pooled document, known on the host before
anything runs; Ward's tree cut with tied heights can make fewer clusters, which ``found`` says
(read once the kernels are done) and `PooledBatch.result` drops.

Compilation: the batch's sizes are runtime integers; D, BLOCK_N and the tiles are constexpr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._device import host_to_device, on_device

__all__ = ["PooledBatch", "pool_documents"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The longest pooled document a program holds in registers (BERT's 512 positions).
MAX_POOLED_ROWS = 512
_DISTANCE_TILE = 16  # rows and columns of one distance tile
_DISTANCE_K = 16  # embedding columns per step: a 16 x 16 x 16 float64 product in registers
# Float64 scratch for the distance matrices of one launch (rows squared, 8 bytes each): a
# batch needing more is pooled in several launches.
_SCRATCH_BYTES = 256 << 20


@triton.jit
def _cosine_distance_kernel(
    x_ptr,  # [T, D] the batch's rows, any float dtype
    first_row_ptr,  # [B] int64: a document's first pooled row in x (after its protected rows)
    num_rows_ptr,  # [B] int64: its pooled rows n (0 for a document not pooled)
    dist_offset_ptr,  # [B] int64: where its n x n block starts in dist, plus dist_base
    dist_ptr,  # float64 scratch
    dist_base,  # the first document's offset: dist holds a group of documents at a time
    x_row_stride,
    D: tl.constexpr,
    BLOCK: tl.constexpr,  # rows and columns of the tile
    BLOCK_K: tl.constexpr,  # embedding columns summed per step
):
    doc = tl.program_id(0)
    n = tl.load(num_rows_ptr + doc).to(tl.int32)
    tile_m = tl.program_id(1) * BLOCK
    tile_n = tl.program_id(2) * BLOCK
    if (tile_m < n) & (tile_n < n):  # the grid covers the longest document of the batch
        offs_m = tile_m + tl.arange(0, BLOCK)
        offs_n = tile_n + tl.arange(0, BLOCK)
        m_mask = offs_m < n
        n_mask = offs_n < n
        first = tl.load(first_row_ptr + doc)
        a_rows = x_ptr + (first + offs_m)[:, None] * x_row_stride
        b_rows = x_ptr + (first + offs_n)[:, None] * x_row_stride
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float64)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            a = a.to(tl.float32).to(tl.float64)
            b = b.to(tl.float32).to(tl.float64)
            # Products of float32 values are exact in float64: the sum is rounded only at the end.
            acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        similarity = acc.to(tl.float32)
        distance = tl.maximum(1.0 - similarity, 0.0)
        dist = dist_ptr + (tl.load(dist_offset_ptr + doc) - dist_base)
        tl.store(dist + offs_m[:, None] * n + offs_n[None, :], distance.to(tl.float64),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _pick(values, offs, index):
    """``values[index]`` of a register array (0 where ``index`` is out of range)."""
    return tl.sum(tl.where(offs == index, values, 0), axis=0)


@triton.jit
def _ward_clusters_kernel(
    dist_ptr,  # float64 scratch: each document's n x n distances, updated in place
    dist_offset_ptr,  # [B] int64
    dist_base,
    num_rows_ptr,  # [B] int64: pooled rows n
    max_clusters_ptr,  # [B] int64: the cut's cluster budget (fcluster's t); >= n: not pooled
    labels_ptr,  # [sum n] int32 out: each pooled row's cluster, 1-based (fcluster's T)
    label_offset_ptr,  # [B] int64
    found_ptr,  # [B] int32 out: the clusters made (<= max_clusters: fewer on tied heights)
    linkage_ptr,  # [sum n, 3] float64 out with WRITE_LINKAGE: SciPy's linkage matrix, first 3 columns
    BLOCK_N: tl.constexpr,  # one register slot per row: next power of two >= the longest n
    WRITE_LINKAGE: tl.constexpr,  # for the tests: the tree itself, not only the labels
):
    doc = tl.program_id(0)
    n = tl.load(num_rows_ptr + doc).to(tl.int32)
    max_clusters = tl.load(max_clusters_ptr + doc).to(tl.int32)
    if max_clusters < n:
        dist = dist_ptr + (tl.load(dist_offset_ptr + doc) - dist_base)
        offs = tl.arange(0, BLOCK_N)
        in_doc = offs < n
        inf = float("inf")

        # --- linkage: SciPy's nearest-neighbour chain, merge by merge ---------------------------
        size = in_doc.to(tl.int32)  # a slot's cluster size; 0 once merged into another slot
        chain = tl.zeros([BLOCK_N], dtype=tl.int32)
        chain_len = n * 0
        x = n * 0
        y = n * 0
        current_min = tl.full([], inf, tl.float64)
        merged_low = tl.zeros([BLOCK_N], dtype=tl.int32)  # merge k joined slots low < high
        merged_high = tl.zeros([BLOCK_N], dtype=tl.int32)
        height = tl.zeros([BLOCK_N], dtype=tl.float64)
        for k in range(n - 1):
            restart = chain_len == 0  # an empty chain starts at the first live slot
            first_live = tl.min(tl.where(size > 0, offs, BLOCK_N), axis=0)
            chain = tl.where(restart & (offs == 0), first_live, chain)
            chain_len = tl.where(restart, 1, chain_len)
            searching = n * 0 + 1
            while searching == 1:
                # The nearest live neighbour of the chain's top x: the first slot at the
                # smallest distance, taken only if strictly closer than the previous chain
                # element (SciPy's scan with `dist < current_min`); NaN is never closer.
                x = _pick(chain, offs, chain_len - 1)
                row = tl.load(dist + x * n + offs, mask=in_doc, other=inf)
                candidate = (size > 0) & (offs != x) & (row == row)  # noqa: PLR0124 (not NaN)
                nearest = tl.min(tl.where(candidate, row, inf), axis=0)
                first_nearest = tl.min(tl.where(candidate & (row == nearest), offs, BLOCK_N), axis=0)
                has_previous = chain_len > 1
                previous = _pick(chain, offs, chain_len - 2)
                start = tl.where(has_previous, _pick(row, offs, previous), inf)
                closer = nearest < start
                y = tl.where(closer, first_nearest, tl.where(has_previous, previous, y))
                current_min = tl.where(closer, nearest, start)
                mutual = has_previous & (y == previous)
                chain = tl.where((offs == chain_len) & (mutual == 0), y, chain)
                chain_len = tl.where(mutual, chain_len, chain_len + 1)
                searching = tl.where(mutual, 0, 1)
            chain_len -= 2
            low = tl.minimum(x, y)
            high = tl.maximum(x, y)
            size_low = _pick(size, offs, low)
            size_high = _pick(size, offs, high)
            merged_low = tl.where(offs == k, low, merged_low)
            merged_high = tl.where(offs == k, high, merged_high)
            height = tl.where(offs == k, current_min, height)
            size = tl.where(offs == low, 0, tl.where(offs == high, size_low + size_high, size))
            # Ward's Lance-Williams update of the new cluster's distances, as SciPy's `_ward`
            # evaluates it (left to right, no FMA: the launch turns contraction off).
            d_low = tl.load(dist + low * n + offs, mask=in_doc, other=0.0)
            d_high = tl.load(dist + high * n + offs, mask=in_doc, other=0.0)
            size_f = size.to(tl.float64)
            t = 1.0 / (size_low + size_high + size).to(tl.float64)  # float64 division and sqrt: IEEE
            updated = tl.sqrt((size + size_low).to(tl.float64) * t * d_low * d_low
                                 + (size + size_high).to(tl.float64) * t * d_high * d_high
                                 - size_f * t * current_min * current_min)
            update = (size > 0) & (offs != high)
            tl.store(dist + high * n + offs, updated, mask=update)
            tl.store(dist + offs * n + high, updated, mask=update)
            tl.debug_barrier()  # the next scans read these rows and columns

        # --- the merges sorted by height (a stable sort, NaN last), then relabelled -------------
        num_merges = n - 1
        is_merge = offs < num_merges
        unordered = height != height  # noqa: PLR0124 (NaN)
        ordered_count = tl.sum((is_merge & (height == height)).to(tl.int32), axis=0)  # noqa: PLR0124
        sorted_low = tl.zeros([BLOCK_N], dtype=tl.int32)
        sorted_high = tl.zeros([BLOCK_N], dtype=tl.int32)
        sorted_height = tl.zeros([BLOCK_N], dtype=tl.float64)
        for k in range(num_merges):
            h = _pick(height, offs, k)
            earlier = offs < k
            rank = tl.where(h == h,  # noqa: PLR0124 (not NaN: NaN heights sort last)
                            tl.sum((is_merge & (height < h)).to(tl.int32), axis=0)
                            + tl.sum((earlier & (height == h)).to(tl.int32), axis=0),
                            ordered_count + tl.sum((earlier & unordered).to(tl.int32), axis=0))
            sorted_low = tl.where(offs == rank, _pick(merged_low, offs, k), sorted_low)
            sorted_high = tl.where(offs == rank, _pick(merged_high, offs, k), sorted_high)
            sorted_height = tl.where(offs == rank, h, sorted_height)
        # SciPy's `label`: merge k (in height order) is node n + k and joins the clusters that
        # hold its two slots. `root` maps each row to the node that holds it so far.
        root = offs
        left = tl.zeros([BLOCK_N], dtype=tl.int32)
        right = tl.zeros([BLOCK_N], dtype=tl.int32)
        for k in range(num_merges):
            root_low = _pick(root, offs, _pick(sorted_low, offs, k))
            root_high = _pick(root, offs, _pick(sorted_high, offs, k))
            left = tl.where(offs == k, tl.minimum(root_low, root_high), left)
            right = tl.where(offs == k, tl.maximum(root_low, root_high), right)
            root = tl.where((root == root_low) | (root == root_high), n + k, root)

        # --- fcluster(criterion="maxclust") ----------------------------------------------------
        # A node's greatest height below it is its own (its children sort before it), so a cut
        # at a height leaves n minus the merges at or under it clusters. SciPy's binary search
        # over the sorted heights for the lowest cut with at most max_clusters clusters:
        lower = n * 0 - 1
        upper = num_merges
        while upper - lower > 1:
            middle = (lower + upper) >> 1
            threshold = _pick(sorted_height, offs, middle)
            clusters = n - tl.sum((is_merge & (sorted_height <= threshold)).to(tl.int32), axis=0)
            too_many = clusters > max_clusters
            lower = tl.where(too_many, middle, lower)
            upper = tl.where(too_many, upper, middle)
        cutoff = _pick(sorted_height, offs, upper)
        # SciPy's `cluster_monocrit`: a depth-first walk from the root, left child first. A node
        # under the cut heads a cluster, numbered when first reached; a row outside every such
        # node is its own cluster, numbered when its parent is left.
        stack = tl.where(offs == 0, 2 * n - 2, tl.zeros([BLOCK_N], dtype=tl.int32))
        depth = n * 0
        visited = tl.zeros([BLOCK_N], dtype=tl.int32)  # by merge
        leader = n * 0 - 1  # the merge heading the cluster being walked, or -1
        count = n * 0
        labels = tl.zeros([BLOCK_N], dtype=tl.int32)
        while depth >= 0:
            merge = _pick(stack, offs, depth) - n
            child_left = _pick(left, offs, merge)
            child_right = _pick(right, offs, merge)
            heads = (leader == -1) & (_pick(sorted_height, offs, merge) <= cutoff)
            leader = tl.where(heads, merge, leader)
            count += heads.to(tl.int32)
            go_left = (child_left >= n) & (_pick(visited, offs, child_left - n) == 0)
            go_right = (go_left == 0) & (child_right >= n) & (_pick(visited, offs, child_right - n) == 0)
            descend = go_left | go_right
            child = tl.where(go_left, child_left, child_right)
            visited = tl.where(descend & (offs == child - n), 1, visited)
            stack = tl.where(descend & (offs == depth + 1), child, stack)
            leaving = descend == 0
            left_row = leaving & (child_left < n)
            count += (left_row & (leader == -1)).to(tl.int32)
            labels = tl.where(left_row & (offs == child_left), count, labels)
            right_row = leaving & (child_right < n)
            count += (right_row & (leader == -1)).to(tl.int32)
            labels = tl.where(right_row & (offs == child_right), count, labels)
            leader = tl.where(leaving & (leader == merge), -1, leader)
            depth = tl.where(descend, depth + 1, depth - 1)

        label_start = tl.load(label_offset_ptr + doc)
        tl.store(labels_ptr + label_start + offs, labels, mask=in_doc)
        tl.store(found_ptr + doc, count)
        if WRITE_LINKAGE:
            linkage = linkage_ptr + label_start * 3 + offs * 3
            tl.store(linkage, left.to(tl.float64), mask=is_merge)
            tl.store(linkage + 1, right.to(tl.float64), mask=is_merge)
            tl.store(linkage + 2, sorted_height, mask=is_merge)


@triton.jit
def _cluster_means_kernel(
    x_ptr,  # [T, D] the batch's rows
    doc_start_ptr,  # [B] int64: a document's first row in x
    doc_len_ptr,  # [B] int64: its rows
    keep_ptr,  # [B] int64: its protected rows (<= its rows)
    max_clusters_ptr,  # [B] int64: >= its pooled rows: not pooled, copied
    labels_ptr,  # [sum n] int32: each pooled row's cluster, 1-based
    label_offset_ptr,  # [B] int64
    found_ptr,  # [B] int32: clusters made
    out_ptr,  # [bound rows, D] float32, zeroed: protected rows, then max_clusters means
    out_start_ptr,  # [B] int64: a document's first output row
    x_row_stride,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_N: tl.constexpr,  # next power of two >= the longest pooled document
):
    doc = tl.program_id(0)
    start = tl.load(doc_start_ptr + doc)
    length = tl.load(doc_len_ptr + doc).to(tl.int32)
    keep = tl.load(keep_ptr + doc).to(tl.int32)
    max_clusters = tl.load(max_clusters_ptr + doc).to(tl.int32)
    out_start = tl.load(out_start_ptr + doc)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    n = length - keep
    pooled = max_clusters < n
    # Rows copied as they are: the protected ones, or all of a document not pooled.
    copied = tl.where(pooled, keep, length)
    for r in range(copied):
        row = tl.load(x_ptr + (start + r) * x_row_stride + offs_d, mask=d_mask, other=0.0)
        tl.store(out_ptr + (out_start + r) * D + offs_d, row.to(tl.float32), mask=d_mask)
    if pooled:
        sums = out_ptr + (out_start + keep) * D
        label_start = tl.load(label_offset_ptr + doc)
        for r in range(n):  # in row order, as scatter_add_ adds them
            label = tl.load(labels_ptr + label_start + r)
            row = tl.load(x_ptr + (start + keep + r) * x_row_stride + offs_d, mask=d_mask, other=0.0)
            total_ptrs = sums + (label - 1) * D + offs_d
            total = tl.load(total_ptrs, mask=d_mask, other=0.0) + row.to(tl.float32)
            tl.store(total_ptrs, total, mask=d_mask)
            tl.debug_barrier()  # the next row may add to the same sum
        offs_n = tl.arange(0, BLOCK_N)
        labels = tl.load(labels_ptr + label_start + offs_n, mask=offs_n < n, other=0)
        found = tl.load(found_ptr + doc)
        for c in range(found):
            members = tl.sum((labels == c + 1).to(tl.int32), axis=0)
            total = tl.load(sums + c * D + offs_d, mask=d_mask, other=0.0)
            tl.store(sums + c * D + offs_d, tl.div_rn(total, tl.full([BLOCK_D], 1, tl.float32) * members),
                     mask=d_mask)


@dataclass
class PooledBatch:
    """A batch being pooled on its device. ``values``: ``[bound rows, D]`` in the input's dtype,
    each document's protected rows then up to ``max_clusters`` means (a document not pooled:
    its rows); ``bound_lengths``: those rows per document (host); ``found``: the clusters each
    pooled document got (on the device; fewer than its budget only on tied heights)."""

    values: torch.Tensor
    bound_lengths: np.ndarray
    keep: np.ndarray
    pooled: np.ndarray
    found: torch.Tensor

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        """The pooled rows, packed, and their lengths (reads ``found``: a sync)."""
        lengths, rows = self.lengths_and_rows(self.found.cpu().numpy())
        if rows is None:
            return self.values, lengths
        return self.values[torch.from_numpy(rows).to(self.values.device)], lengths

    def lengths_and_rows(self, found: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Given ``found`` (on the host): the documents' pooled lengths, and the rows of
        ``values`` they keep (None: all of them). The cut made fewer clusters than its budget
        only where heights tie; the rows of the clusters not made (zeros) are dropped."""
        if (found < 0).any():  # marked by pool_documents
            from ..model.pooling import non_finite_error

            raise non_finite_error(int(np.argmax(found < 0)))
        lengths = np.where(self.pooled, self.keep + found, self.bound_lengths).astype(np.int64)
        if np.array_equal(lengths, self.bound_lengths):
            return lengths, None
        starts = np.concatenate([[0], np.cumsum(self.bound_lengths)[:-1]])
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]).astype(np.int64)
        return lengths, rows


def _fail(message: str):
    raise ValueError(f"pool_documents: {message}")


def pool_documents(values: torch.Tensor, lengths, pool_factor: int, protected: int) -> PooledBatch:
    """Pool the documents packed in ``values [T, D]`` (``lengths`` rows each, in order, on the
    host) as PyLate does: after each one's first ``protected`` rows, ``max(rows // pool_factor,
    1)`` clusters by Ward linkage on cosine distance (SciPy's, to the bit, on the distances of
    `_cosine_distance_kernel`), each replaced by its mean. Queued on values' device without a
    sync; `PooledBatch.result` gives the rows and lengths. A document of at most ``pool_factor``
    rows past the protected ones (nothing to merge) is copied. Up to 512 rows a document."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        _fail("values must be a 2-D tensor [tokens, dim]")
    if values.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        _fail(f"values are on {values.device}: the kernels need a CUDA tensor (or TRITON_INTERPRET=1)")
    if values.dtype not in _DTYPES:
        _fail(f"values dtype {values.dtype} is not float16, bfloat16 or float32")
    if values.stride(1) != 1 and values.shape[1] > 1:
        _fail(f"values need unit stride along dim (got strides {values.stride()})")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != values.shape[0]:
        _fail(f"lengths must be {values.shape[0]} rows in all, one non-negative count per document")
    if not isinstance(pool_factor, int) or pool_factor < 1:
        _fail(f"pool_factor must be an integer >= 1, got {pool_factor!r}")
    if not isinstance(protected, int) or protected < 0:
        _fail(f"protected must be an integer >= 0, got {protected!r}")
    keep = np.minimum(lengths, protected)
    rows = lengths - keep
    max_clusters = np.maximum(rows // pool_factor, 1)
    pooled = max_clusters < rows
    if int(rows[pooled].max(initial=0)) > MAX_POOLED_ROWS:
        _fail(f"a document has {int(rows.max())} rows to pool; up to {MAX_POOLED_ROWS} are supported")
    bound_lengths = np.where(pooled, keep + max_clusters, lengths)
    device, dim = values.device, values.shape[1]
    found = torch.zeros(len(lengths), dtype=torch.int32, device=device)
    out = torch.zeros((int(bound_lengths.sum()), dim), dtype=torch.float32, device=device)
    if len(lengths) == 0 or dim == 0:
        return PooledBatch(out.to(values.dtype), bound_lengths, keep, pooled, found)

    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out_starts = np.concatenate([[0], np.cumsum(bound_lengths)[:-1]])
    pooled_rows = np.where(pooled, rows, 0)  # the distance and clustering kernels skip the others
    label_offsets = np.concatenate([[0], np.cumsum(pooled_rows)[:-1]])
    squares = pooled_rows * pooled_rows
    dist_offsets = np.concatenate([[0], np.cumsum(squares)[:-1]])
    labels = torch.empty(max(int(pooled_rows.sum()), 1), dtype=torch.int32, device=device)
    block_n = max(16, triton.next_power_of_2(int(pooled_rows.max())))
    # Every document's numbers in one copy to the device, a row each.
    table = host_to_device(np.stack([starts, lengths, keep, max_clusters, out_starts, label_offsets, pooled_rows,
                                     dist_offsets, starts + keep]), torch.int64, device)
    (starts_d, lengths_d, keep_d, max_clusters_d, out_starts_d, label_offsets_d, pooled_rows_d, dist_offsets_d,
     first_pooled_d) = table

    scratch_ends = np.cumsum(squares * 8)  # each document's last scratch byte, all in one buffer

    with on_device(values):
        # The distance matrices of a group of documents at a time, within the scratch budget
        # (a document alone past it is a group of its own).
        group_start = 0
        while group_start < len(lengths):
            budget_end = (scratch_ends[group_start - 1] if group_start else 0) + _SCRATCH_BYTES
            group_end = max(group_start + 1, int(np.searchsorted(scratch_ends, budget_end, side="right")))
            group = slice(group_start, group_end)
            if pooled_rows[group].any():
                dist = torch.empty(max(int(squares[group].sum()), 1), dtype=torch.float64, device=device)
                base = int(dist_offsets[group_start])
                tiles = triton.cdiv(int(pooled_rows[group].max()), _DISTANCE_TILE)
                _cosine_distance_kernel[(group_end - group_start, tiles, tiles)](
                    values, first_pooled_d[group], pooled_rows_d[group], dist_offsets_d[group], dist, base,
                    values.stride(0), D=dim, BLOCK=_DISTANCE_TILE, BLOCK_K=_DISTANCE_K, num_warps=4)
                # No FMA: SciPy's Lance-Williams update rounds each product and sum on its own.
                _ward_clusters_kernel[(group_end - group_start,)](
                    dist, dist_offsets_d[group], base, pooled_rows_d[group], max_clusters_d[group], labels,
                    label_offsets_d[group], found[group], dist,
                    BLOCK_N=block_n, WRITE_LINKAGE=False, num_warps=4, enable_fp_fusion=False)
            group_start = group_end
        _cluster_means_kernel[(len(lengths),)](
            values, starts_d, lengths_d, keep_d, max_clusters_d, labels, label_offsets_d, found, out, out_starts_d,
            values.stride(0), D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_N=block_n, num_warps=1)
        # A pooled document with a NaN or an infinity in its rows to pool gets found = -1 (on
        # the device, no sync), which `lengths_and_rows` turns into the CPU path's error: on a
        # GPU the distance clamp's max drops a NaN, so the kernels would pool it silently.
        if pooled.any():
            non_finite = (~torch.isfinite(values).all(dim=1)).to(torch.int32).cumsum(0)
            non_finite = torch.cat([non_finite.new_zeros(1), non_finite])
            found.masked_fill_(non_finite[first_pooled_d + pooled_rows_d] > non_finite[first_pooled_d], -1)
    return PooledBatch(out.to(values.dtype), bound_lengths, keep, pooled, found)
