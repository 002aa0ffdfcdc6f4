"""Token pooling's Triton kernels (`kernels/pooling.py`) against SciPy and the CPU pooling.

The clustering kernel must give SciPy's labels to the bit on the same distances: it is run on
the distance kernel's own output, which SciPy is given too. The distances are checked against a
float64 reference, and the whole launcher against the CPU path's code (`model/pooling.py`) fed
those reference distances. On the CPU these run in Triton's interpreter (small documents: the
clustering is a loop of vector steps per merge).
"""

import dataclasses

import numpy as np
import pytest
import torch
import triton
from aot_compile import OTHER_GPUS, SHARED_MEMORY, compile_case
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, poisoned

from colbert_triton.kernels import pooling
from colbert_triton.model.pooling import _scipy, cluster_means, ward_labels
from colbert_triton.model.pooling import pool_documents as pool_on_the_host

hierarchy, squareform = _scipy()


def _rows(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    """Unit rows: independent, in tight groups (as a text's tokens often are), with exact
    duplicates (a repeated row: distance 0, tied merge heights), all identical, or the "mirror"
    layout below (a tie inside the nearest-neighbour chain)."""
    gen = np.random.default_rng(seed)
    if kind == "groups":
        centres = gen.standard_normal((max(1, n // 8), dim))
        x = centres[gen.integers(0, len(centres), n)] + 0.3 * gen.standard_normal((n, dim))
    else:
        x = gen.standard_normal((n, dim))
        if kind == "duplicates":
            x[gen.integers(0, n, n // 3)] = x[gen.integers(0, n, n // 3)]
        elif kind == "identical":
            x[:] = x[0]
        elif kind == "mirror":
            # Rows 0-3 at -65, +30, -30 and 0 degrees in one plane: the chain goes 0 -> 2 -> 3,
            # where rows 1 and 2 are exactly as far from row 3 (products of 1 and 0 are exact),
            # and SciPy keeps the chain's previous row (2) on that tie, not the first (1).
            x = 0.05 * x  # the other rows: far from the plane's
            x[:4] = 0
            angles = np.radians([-65, 30, -30, 0])
            x[:4, 0], x[:4, 1] = np.cos(angles), np.sin(angles)
            x[3, 1] = 0
            x[4:, 2] = 1
    return torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)


def _distances(rows: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The distance kernel's ``n x n`` float64 block for one document, in a poisoned scratch."""
    n = rows.shape[0]
    values = rows.to(dtype).to(KERNEL_DEVICE)
    dist = poisoned((n * n,), torch.float64)
    tiles = triton.cdiv(n, pooling._DISTANCE_TILE)
    as_device = lambda array, dt: torch.tensor(array, dtype=dt, device=KERNEL_DEVICE)
    pooling._cosine_distance_kernel[(1, tiles, tiles)](
        values, as_device([0], torch.int64), as_device([n], torch.int64), as_device([0], torch.int64), dist, 0,
        values.stride(0), D=values.shape[1], BLOCK=pooling._DISTANCE_TILE, BLOCK_K=pooling._DISTANCE_K)
    return dist.view(n, n)


def _reference_distances(rows: torch.Tensor) -> torch.Tensor:
    """``max(1 - s, 0)`` with ``s`` the float32 rounding of the float64 dot products (exact
    products of float32 values, summed in float64)."""
    similarity = (rows.double() @ rows.double().t()).float()
    return (1 - similarity).clamp_min(0).double()


@pytest.mark.parametrize("n, dim", [(1, 96), (2, 32), (17, 96), (33, 128), (40, 7)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_distances_are_one_minus_the_rounded_float32_similarity(n, dim, dtype):
    rows = _rows("groups", n, dim, seed=n + dim).to(dtype).float()
    got = _distances(rows, dtype).cpu()
    expected = _reference_distances(rows)
    assert not got.isnan().any(), "an entry of the block was not written"
    # The same up to the float64 summation order, which can move a rounding by one float32 step.
    assert (got - expected).abs().max() <= 2 ** -23
    assert (got == expected).double().mean() >= 0.99
    assert (got >= 0).all()


_CASES = [  # (kind, rows, clusters)
    ("independent", 2, 1), ("independent", 3, 1), ("independent", 7, 3), ("independent", 30, 15),
    ("independent", 64, 21), ("groups", 41, 20), ("groups", 65, 32), ("duplicates", 24, 12),
    ("duplicates", 50, 16), ("identical", 9, 4), ("mirror", 4, 2), ("mirror", 12, 6),
]


@pytest.mark.parametrize("kind, n, clusters", _CASES)
def test_ward_clusters_are_scipys_to_the_bit(kind, n, clusters):
    rows = _rows(kind, n, 96, seed=n)
    dist = _distances(rows)
    expected = ward_labels(dist.cpu().numpy(), clusters, hierarchy, squareform)
    condensed = squareform(dist.cpu().numpy(), checks=False)
    expected_linkage = hierarchy.linkage(condensed, method="ward")
    labels = torch.full((n,), -7, dtype=torch.int32, device=KERNEL_DEVICE)
    found = torch.full((1,), -7, dtype=torch.int32, device=KERNEL_DEVICE)
    linkage = poisoned((n, 3), torch.float64)
    scratch = dist.reshape(-1).clone()  # updated in place by the linkage
    as_device = lambda array, dt: torch.tensor(array, dtype=dt, device=KERNEL_DEVICE)
    pooling._ward_clusters_kernel[(1,)](
        scratch, as_device([0], torch.int64), 0, as_device([n], torch.int64), as_device([clusters], torch.int64),
        labels, as_device([0], torch.int64), found, linkage, BLOCK_N=max(16, triton.next_power_of_2(n)),
        WRITE_LINKAGE=True, enable_fp_fusion=False)
    # The tree itself, heights to the bit (the sizes column is not needed by the cut).
    np.testing.assert_array_equal(linkage[: n - 1].cpu().numpy(), expected_linkage[:, :3])
    np.testing.assert_array_equal(labels.cpu().numpy(), expected)
    assert int(found) == expected.max() <= clusters
    if kind == "identical":  # every height ties at 0: the cut can only keep them together
        assert int(found) == 1


def _reference_pooling(values: torch.Tensor, lengths, pool_factor: int, protected: int) -> list[torch.Tensor]:
    """The CPU path's clustering and means, given the distance kernel's distances."""
    pooled = []
    for document in torch.split(values.float().cpu(), list(lengths), 0):
        kept, to_pool = document[:protected], document[protected:]
        clusters = max(len(to_pool) // pool_factor, 1)
        if clusters >= len(to_pool):
            pooled.append(document)
            continue
        labels = ward_labels(_reference_distances(to_pool).numpy(), clusters, hierarchy, squareform)
        pooled.append(torch.cat([kept, cluster_means(to_pool, labels, clusters)]))
    return pooled


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("pool_factor, protected", [(2, 1), (3, 0), (2, 4)])
def test_pool_documents_is_the_cpu_pooling(dtype, pool_factor, protected):
    # Empty, protected-only, too short to merge, just long enough, and longer documents.
    lengths = np.array([0, 1, 2, 3, 5, 6, 23, 38, 4])
    values = torch.cat([_rows("groups", int(n), 96, seed=i) for i, n in enumerate(lengths)]).to(dtype)
    batch = pooling.pool_documents(values.to(KERNEL_DEVICE), lengths, pool_factor, protected)
    got, got_lengths = batch.result()
    expected = _reference_pooling(values, lengths, pool_factor, protected)
    np.testing.assert_array_equal(got_lengths, [len(e) for e in expected])
    assert got.dtype == dtype and got.device.type == torch.device(KERNEL_DEVICE).type
    assert torch.equal(got.cpu(), torch.cat(expected).to(dtype))


def test_a_batch_with_nothing_to_pool_is_copied():
    lengths = np.array([0, 1, 2, 2])  # at most one row past the protected one
    values = _rows("independent", 5, 96, seed=3).to(KERNEL_DEVICE)
    batch = pooling.pool_documents(values, lengths, 2, 1)
    got, got_lengths = batch.result()
    np.testing.assert_array_equal(got_lengths, lengths)
    assert torch.equal(got, values)


def test_tied_heights_make_fewer_clusters_and_their_rows_are_dropped():
    # Ten identical rows, then ten independent ones: the first document's cut keeps one cluster
    # of its budget of five, the second all ten of its budget.
    lengths = np.array([11, 21])
    values = torch.cat([_rows("identical", 11, 96, seed=1), _rows("independent", 21, 96, seed=2)])
    batch = pooling.pool_documents(values.to(KERNEL_DEVICE), lengths, 2, 1)
    np.testing.assert_array_equal(batch.bound_lengths, [6, 11])
    assert batch.found.cpu().tolist() == [1, 10]
    got, got_lengths = batch.result()
    np.testing.assert_array_equal(got_lengths, [2, 11])
    expected = _reference_pooling(values, lengths, 2, 1)
    assert torch.equal(got.cpu(), torch.cat(expected))


def test_a_batch_larger_than_the_scratch_is_pooled_in_groups(monkeypatch):
    lengths = np.array([12, 30, 9, 17])
    values = torch.cat([_rows("groups", int(n), 96, seed=i) for i, n in enumerate(lengths)])
    whole, whole_lengths = pooling.pool_documents(values.to(KERNEL_DEVICE), lengths, 2, 1).result()
    launches = []
    kernel = pooling._ward_clusters_kernel
    monkeypatch.setattr(pooling, "_SCRATCH_BYTES", 30 * 30 * 8)  # one document's distances
    monkeypatch.setattr(pooling, "_ward_clusters_kernel", _Counting(kernel, launches))
    grouped, grouped_lengths = pooling.pool_documents(values.to(KERNEL_DEVICE), lengths, 2, 1).result()
    # Squared rows 121, 841, 64, 256 (x 8 bytes) against a budget of 900: (0), (1), (2, 3).
    assert launches == [1, 1, 2]
    np.testing.assert_array_equal(grouped_lengths, whole_lengths)
    assert torch.equal(grouped, whole)


class _Counting:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid[0])
        return self.kernel[grid]


@pytest.mark.parametrize("call, message", [
    (lambda v: pooling.pool_documents(v.numpy(), [4], 2, 1), "2-D tensor"),
    (lambda v: pooling.pool_documents(v.double(), [4], 2, 1), "dtype"),
    (lambda v: pooling.pool_documents(v.t(), [96], 2, 1), "unit stride"),
    (lambda v: pooling.pool_documents(v, [3], 2, 1), "4 rows in all"),
    (lambda v: pooling.pool_documents(v, [5, -1], 2, 1), "non-negative"),
    (lambda v: pooling.pool_documents(v, [4], 0, 1), "pool_factor"),
    (lambda v: pooling.pool_documents(v, [4], 2, -1), "protected"),
])
def test_bad_input_is_refused_with_a_clear_error(call, message):
    values = torch.nn.functional.normalize(torch.randn(4, 96), dim=1).to(KERNEL_DEVICE)
    with pytest.raises(ValueError, match=message):
        call(values)


def test_documents_longer_than_the_registers_hold_are_refused():
    values = torch.zeros(pooling.MAX_POOLED_ROWS + 2, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="513 rows to pool; up to 512"):
        pooling.pool_documents(values, [pooling.MAX_POOLED_ROWS + 2], 2, 1)


def test_the_longest_document_is_the_cpu_pooling():
    """512 rows after the protected one (BLOCK_N 512; ~40 s in the interpreter), beside a short
    document."""
    lengths = np.array([pooling.MAX_POOLED_ROWS + 1, 3])
    values = torch.cat([_rows("groups", int(n), 96, seed=i) for i, n in enumerate(lengths)])
    got, got_lengths = pooling.pool_documents(values.to(KERNEL_DEVICE), lengths, 2, 1).result()
    expected = _reference_pooling(values, lengths, 2, 1)
    np.testing.assert_array_equal(got_lengths, [len(e) for e in expected])
    assert torch.equal(got.cpu(), torch.cat(expected))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        pooling.pool_documents(torch.zeros(4, 8), [4], 2, 1)


# ---------------------------------------------------------------------------------------------
# The model's path: with the Triton backend, documents are pooled by these kernels.


@pytest.fixture(scope="module")
def triton_model(stanford_dir):
    from colbert_triton import ColBERT

    return ColBERT.from_pretrained(stanford_dir, device=KERNEL_DEVICE, backend="triton", cuda_graphs=False)


def test_the_triton_backend_pools_with_the_kernels(triton_model, monkeypatch):
    from texts import DOCUMENTS

    from colbert_triton import PoolingProcesses
    from colbert_triton.model import pooling as cpu_pooling

    docs = DOCUMENTS[:4]
    plain = triton_model.encode_documents(docs, packed=True)
    expected, expected_lengths = pooling.pool_documents(plain.values, plain.lengths_array, 2, 1).result()
    # Neither SciPy nor the pooling processes are used: they would fail here.
    monkeypatch.setattr(cpu_pooling, "_scipy", lambda: (_ for _ in ()).throw(ImportError("no scipy")))
    monkeypatch.setattr(PoolingProcesses, "__init__", lambda *a: pytest.fail("pooling processes started"))
    # Two batches (one pooled behind the other), into host memory (on a GPU: the copy path).
    pooled = triton_model.encode_documents(docs, batch_size=2, pool_factor=2, pooling_processes=2,
                                           output_device="cpu")
    assert [len(item) for item in pooled] == expected_lengths.tolist()
    assert all(item.device.type == "cpu" for item in pooled)
    assert torch.equal(torch.cat(pooled), expected.cpu())


def test_the_pipeline_drops_the_clusters_a_tied_cut_did_not_make():
    from colbert_triton.model.pooling import BatchPipeline

    first = (torch.cat([_rows("identical", 11, 96, seed=1), _rows("independent", 21, 96, seed=2)]), np.array([11, 21]))
    second = (_rows("groups", 15, 96, seed=3), np.array([15]))
    with BatchPipeline(2, 1, on_device=True) as pipeline:
        done = pipeline.put(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in first), "a")
        assert done == []  # one batch behind
        done += pipeline.put(second[0].to(KERNEL_DEVICE), second[1], "b")
        done += pipeline.finish()
    assert [tag for *_, tag in done] == ["a", "b"]
    for (values, lengths, _), (batch, batch_lengths) in zip(done, (first, second)):
        expected = _reference_pooling(batch, batch_lengths, 2, 1)
        np.testing.assert_array_equal(lengths, [len(e) for e in expected])
        assert torch.equal(values.cpu(), torch.cat(expected))
    np.testing.assert_array_equal(done[0][1], [2, 11])  # the identical rows: one cluster of five


def test_documents_longer_than_the_kernels_hold_are_pooled_on_the_cpu(triton_model, monkeypatch):
    """A checkpoint whose documents can pass 512 rows after the protected ones: its Triton model
    pools with SciPy (needed then), not with the kernels."""
    from colbert_triton.model import pooling as cpu_pooling

    assert triton_model._pools_on_device(1)
    monkeypatch.setattr(triton_model, "settings",
                        dataclasses.replace(triton_model.settings, doc_maxlen=pooling.MAX_POOLED_ROWS + 2))
    assert not triton_model._pools_on_device(1) and triton_model._pools_on_device(2)
    monkeypatch.setattr(cpu_pooling, "_scipy", lambda: (_ for _ in ()).throw(ImportError("no scipy here")))
    with pytest.raises(ImportError, match="no scipy here"):
        triton_model.encode_documents(["a document"], pool_factor=2)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA streams")
def test_on_a_gpu_the_pooling_does_not_hold_up_the_encoders_next_batch(monkeypatch):
    """The pipeline queues the pooling kernels on a stream of its own: work the encoder queues
    after a batch (its next batch) does not wait for that batch's pooling."""
    from colbert_triton.model.pooling import BatchPipeline

    real = pooling.pool_documents

    def slow(*args):
        torch.cuda._sleep(400_000_000)  # ~200 ms, on the stream the pooling is queued on
        return real(*args)

    lengths = np.array([30, 7, 64])
    values = torch.cat([_rows("groups", int(n), 96, seed=i) for i, n in enumerate(lengths)]).cuda()
    monkeypatch.setattr(pooling, "pool_documents", slow)
    with BatchPipeline(2, 1, on_device=True) as pipeline:
        assert pipeline.put(values * 1, lengths, "a") == []
        encoder_next = torch.cuda.Event()
        (values * 2).sum()  # the encoder's next batch, queued after the put
        encoder_next.record()
        encoder_next.synchronize()
        assert not pipeline._copying[-1].query(), "the encoder's next work waited for the pooling"
        ((pooled, pooled_lengths, tag),) = pipeline.finish()
    expected, expected_lengths = real(values, lengths, 2, 1).result()
    assert tag == "a" and pooled_lengths.tolist() == expected_lengths.tolist()
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("arch", [90, *OTHER_GPUS])
def test_every_pooling_launch_compiles(arch):
    """The three kernels, for documents of 16 to 512 pooled rows and each input dtype, compile
    for the H100 and the other GPUs (tests/aot_compile.py: Triton's pipeline with ptxas), within
    their shared memory; on sm_90 without spilling (elsewhere a few bytes can: sm_120's Ward
    kernel spills 8, a matter of speed, as the encoder's launches there)."""
    launches = compile_case("pooling", arch)
    kernels = {launch["kernel"] for launch in launches}
    assert kernels == {"_cosine_distance_kernel", "_ward_clusters_kernel", "_cluster_means_kernel"}
    assert {launch["config"]["BLOCK_N"] for launch in launches if "BLOCK_N" in launch["config"]} == {64, 512}
    for launch in launches:
        assert launch["shared"] <= SHARED_MEMORY[arch], launch
        assert arch != 90 or launch["spill_bytes"] in (0, None), launch
    ward = [launch for launch in launches if launch["kernel"] == "_ward_clusters_kernel"]
    assert all(launch["config"]["enable_fp_fusion"] is False for launch in ward)


# (The interpreter's NumPy warns of the inf * 0 products an infinity makes.)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_to_pool_are_refused_as_the_cpu_path_refuses_them(bad):
    """A NaN or an infinity in the rows a document pools: the kernels raise the CPU path's error
    (its SciPy linkage, as PyLate's, refuses such distances), naming the document; on a GPU the
    distance clamp's max drops a NaN, so they would pool it silently. In a protected row, or in a
    document too short to pool, the value is kept as it is, by both."""
    lengths = [5, 9, 2]  # pooled, pooled, copied (one row past the protected one)
    values = torch.cat([_rows("groups", n, 96, seed=i) for i, n in enumerate(lengths)])
    kept = values.clone()
    kept[0, 3] = kept[15, 7] = bad  # document 0's protected row, document 2
    on_the_host, host_lengths = pool_on_the_host(kept, np.array(lengths), 2, 1)
    got, got_lengths = pooling.pool_documents(kept.to(KERNEL_DEVICE), lengths, 2, 1).result()
    np.testing.assert_array_equal(got_lengths, host_lengths)
    torch.testing.assert_close(got.cpu(), on_the_host, equal_nan=True)
    broken = values.clone()
    broken[8, 5] = bad  # document 1's third row to pool
    message = "document 1 of the batch has a NaN or infinite value in the rows it pools"
    with pytest.raises(ValueError, match=message):
        pool_on_the_host(broken, np.array(lengths), 2, 1)
    with pytest.raises(ValueError, match=message):
        pooling.pool_documents(broken.to(KERNEL_DEVICE), lengths, 2, 1).result()
