"""Token pooling (PyLate's ``pool_factor``): the pooling against PyLate's own on the same rows,
the encoder path around it, its errors and the CLI. Encoding parity with PyLate's
``encode(pool_factor=...)``: test_parity_pylate.py."""

import json
import sys
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE, require_reference
from safetensors import safe_open
from texts import DOCUMENTS, LONG_DOCUMENTS

from colbert_triton import ColBERT, PackedEmbeddings, PoolingProcesses
from colbert_triton.cli import main
from colbert_triton.model.pooling import (
    BatchPipeline,
    _PoolingInProcesses,
    pool_documents,
)


def _random_documents(lengths, dim=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1) for n in lengths]


@pytest.mark.parametrize("pool_factor", [2, 3, 5])
@pytest.mark.parametrize("protected_tokens", [0, 1, 4])
def test_pooling_is_pylates_to_the_bit(pool_factor, protected_tokens):
    models = require_reference("pylate.models")
    docs = _random_documents([0, 1, 2, 3, 4, 5, 6, 17, 64, 300])
    # Orthogonal rows: every merge at one height, where maxclust makes one cluster, not the few asked.
    docs.append(torch.eye(96)[:13])
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    values, pooled_lengths = pool_documents(torch.cat(docs), lengths, pool_factor, protected_tokens)
    # PyLate's method reads nothing of its model.
    theirs = models.ColBERT.pool_embeddings_hierarchical(None, docs, pool_factor, protected_tokens)
    assert pooled_lengths.tolist() == [len(t) for t in theirs]
    assert pooled_lengths.tolist() != lengths.tolist()
    for mine, ref in zip(torch.split(values, pooled_lengths.tolist()), theirs):
        assert torch.equal(mine, ref)


def test_rows_equal_to_rounding_merge_first_where_pylate_fails():
    """Ten copies each of two rows a rounding over unit length (as a normalised row can be): the
    copies' distances come out below 0, the linkage then has a negative height and SciPy refuses
    it (PyLate raises); taken as 0, each row's copies merge into one cluster at height 0 (so
    maxclust makes two, not the nine asked for), whose mean is that row."""
    models = require_reference("pylate.models")
    twins = _random_documents([2], seed=3)[0] * (1 + 2**-20)  # on every BLAS, not by its rounding
    doc = torch.cat([twins[:1].repeat(10, 1), twins[1:].repeat(10, 1)])
    to_pool = doc[1:]
    assert (1 - (to_pool @ to_pool.T)).min() < 0  # what makes SciPy refuse it
    with pytest.raises(ValueError, match="negative distances"):
        models.ColBERT.pool_embeddings_hierarchical(None, [doc], 2, 1)
    pooled, lengths = pool_documents(doc, np.array([20]), 2, 1)
    assert lengths.tolist() == [3]
    assert torch.equal(pooled[0], doc[0])
    nearest = torch.cdist(pooled[1:], twins).min(dim=1)
    assert nearest.values.max() < 1e-6 and sorted(nearest.indices.tolist()) == [0, 1]


def test_pool_factor_one_and_short_documents_leave_the_rows_as_they_are():
    docs = _random_documents([1, 2, 3])
    values, lengths = torch.cat(docs), np.array([len(d) for d in docs])
    assert pool_documents(values, lengths, 1, 1)[0] is values
    # One row past the protected [CLS] makes one cluster: nothing to merge.
    short = values[:3]
    assert pool_documents(short, lengths[:2], 2, 1)[0] is short
    # Protected rows past the end: nothing left to pool.
    pooled, pooled_lengths = pool_documents(values, lengths, 2, 25)
    assert pooled is values and pooled_lengths is lengths
    assert len(pool_documents(short, lengths[:2], 2, 0)[0]) == 2  # unprotected: 2 rows -> 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pooling_keeps_the_device_and_dtype_and_clusters_in_float32(dtype):
    docs = _random_documents([40, 7, 90], seed=1)
    lengths = np.array([len(d) for d in docs])
    values = torch.cat(docs).to(KERNEL_DEVICE, dtype)
    pooled, pooled_lengths = pool_documents(values, lengths, 3, 1)
    assert pooled.device == values.device and pooled.dtype == dtype
    expected, expected_lengths = pool_documents(values.cpu().float(), lengths, 3, 1)
    assert pooled_lengths.tolist() == expected_lengths.tolist()
    assert torch.equal(pooled.cpu(), expected.to(dtype))


def test_encoding_pools_each_document_whatever_the_batches(model):
    docs = DOCUMENTS + LONG_DOCUMENTS
    plain = model.encode_documents(docs)
    pooled = model.encode_documents(docs, batch_size=64, pool_factor=2, protected_tokens=1)
    packed = model.encode_documents(docs, batch_size=4, packed=True, pool_factor=2, protected_tokens=1)
    assert isinstance(packed, PackedEmbeddings) and len(packed) == len(docs)
    for doc, unpooled, a, b in zip(docs, plain, pooled, packed.to_list()):
        clusters = max((len(unpooled) - 1) // 2, 1)
        assert len(a) == (1 + clusters if clusters < len(unpooled) - 1 else len(unpooled)), doc
        torch.testing.assert_close(a[:1], unpooled[:1], atol=2e-6, rtol=0)  # the protected [CLS] row
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert sum(map(len, pooled)) < 0.6 * sum(map(len, plain))
    for a, b in zip(model.encode_documents(docs, pool_factor=1), plain):
        assert torch.equal(a, b)


def test_a_16_bit_model_pools_its_own_rows(stanford_dir):
    model = ColBERT.from_pretrained(stanford_dir, device="cpu", dtype=torch.float16)
    plain = model.encode_documents(LONG_DOCUMENTS, packed=True)
    pooled = model.encode_documents(LONG_DOCUMENTS, packed=True, pool_factor=3)
    expected, lengths = pool_documents(plain.values, plain.lengths_array, 3, 1)
    assert pooled.values.dtype == torch.float16 and list(pooled.lengths_host) == lengths.tolist()
    assert torch.equal(pooled.values, expected)


def test_pooling_in_worker_processes_is_the_same_to_the_bit(model, monkeypatch):
    docs = _random_documents([300, 0, 1, 57, 2, 129, 5, 64], seed=4)
    lengths = np.array([len(d) for d in docs])
    values = torch.cat(docs)
    expected, expected_lengths = pool_documents(values, lengths, 3, 1)
    with PoolingProcesses(3) as workers:  # documents dealt round robin: 3, 3 and 2
        pooled, pooled_lengths = pool_documents(values, lengths, 3, 1, workers)
        one, _ = pool_documents(values[:300], lengths[:1], 3, 1, workers)  # fewer documents than processes
    assert pooled_lengths.tolist() == expected_lengths.tolist() and torch.equal(pooled, expected)
    assert torch.equal(one, expected[: expected_lengths[0]])
    texts = DOCUMENTS + LONG_DOCUMENTS
    in_process = model.encode_documents(texts, batch_size=8, packed=True, pool_factor=2)
    handed = []  # (processes, documents) per batch handed to them
    hand = PoolingProcesses.submit
    monkeypatch.setattr(PoolingProcesses, "submit",
                        lambda self, documents, *settings: handed.append((self.count, len(documents)))
                        or hand(self, documents, *settings))
    shared = model.encode_documents(texts, batch_size=8, packed=True, pool_factor=2, pooling_processes=2)
    assert handed == [(2, 8), (2, 8), (2, len(texts) - 16)]
    assert shared.lengths_host == in_process.lengths_host and torch.equal(shared.values, in_process.values)


def _batches(count, seed=5):
    """``count`` packed batches of random documents: (values, lengths)."""
    batches = []
    for b in range(count):
        docs = _random_documents([30 + 7 * b, 1, 12, 3 + b], seed=seed + b)
        batches.append((torch.cat(docs), np.array([len(d) for d in docs])))
    return batches


def _assert_pooled_in_order(finished, batches):
    assert [tag for *_, tag in finished] == list(range(len(batches)))
    for (values, lengths, _), batch in zip(finished, batches):
        expected, expected_lengths = pool_documents(*batch, 2, 1)
        assert lengths.tolist() == expected_lengths.tolist() and torch.equal(values, expected)


def test_the_pipeline_pools_each_batch_in_order_one_behind_the_encoder():
    batches = _batches(4)
    finished = []
    with BatchPipeline(2, 1) as pipeline:
        for tag, batch in enumerate(batches):
            handed = pipeline.put(*batch, tag)
            # A batch is pooled once the next one is put (on a GPU: queued), not before.
            assert [t for *_, t in handed] == ([tag - 1] if tag else [])
            finished += handed
        finished += pipeline.finish()
    _assert_pooled_in_order(finished, batches)
    with BatchPipeline(1, 1) as pipeline:  # nothing to pool: each batch back at once, as it is
        ((values, lengths, tag),) = pipeline.put(*batches[0], "a")
        assert values is batches[0][0] and lengths is batches[0][1] and tag == "a"
        assert pipeline.finish() == []


def test_the_pipeline_waits_for_the_device_before_pooling_a_batch():
    """On a GPU each batch is copied to the host without blocking: pooling it must wait for that
    copy, which waits for the work queued before it (here a spin of the GPU, then the values)."""
    batches = _batches(3)
    finished = []
    with BatchPipeline(2, 1) as pipeline:
        for tag, (values, lengths) in enumerate(batches):
            on_device = values.to(KERNEL_DEVICE)
            if KERNEL_DEVICE == "cuda":
                torch.cuda._sleep(20_000_000)  # ~10 ms of queued work before the values below exist
            finished += pipeline.put(on_device * 1, lengths, tag)
        finished += pipeline.finish()
    for values, _, _ in finished:
        assert values.device.type == KERNEL_DEVICE
    _assert_pooled_in_order([(values.cpu(), lengths, tag) for values, lengths, tag in finished], batches)


class _Unfinished(Future):
    """A pooling process's result, made only when waited for (recorded in ``waits``) or by hand."""

    def __init__(self, tag, documents, waits):
        super().__init__()
        self.tag, self.documents, self.waits = tag, documents, waits

    def finish(self):
        pooled = pool_documents(torch.cat(self.documents), np.array([len(d) for d in self.documents]), 2, 1)
        self.set_result((pooled[0].numpy(), pooled[1].tolist()))

    def result(self, timeout=None):
        if not self.done():
            self.waits.append(self.tag)
            self.finish()
        return super().result(timeout)


class _ProcessesByHand:
    """`PoolingProcesses`' interface, each batch's result made when waited for or by hand."""

    def __init__(self):
        self.submitted, self.waits = [], []

    def submit(self, documents, pool_factor, protected_tokens):
        future = _Unfinished(len(self.submitted), list(documents), self.waits)
        self.submitted.append(future)
        return _PoolingInProcesses(len(documents), [range(len(documents))], [future])


def test_the_pipeline_keeps_two_batches_with_the_processes_and_waits_for_the_oldest_only():
    batches = _batches(6)
    processes = _ProcessesByHand()
    finished = []
    with BatchPipeline(2, 1, processes, batches_in_flight=2) as pipeline:
        for tag, batch in enumerate(batches[:4]):
            finished += pipeline.put(*batch, tag)
        # Batches 0-2 handed to the processes (3 is being copied); 0 was waited for, to keep two.
        assert len(processes.submitted) == 3 and processes.waits == [0]
        assert [t for *_, t in finished] == [0]
        processes.submitted[2].finish()  # done before 1
        finished += pipeline.put(*batches[4], 4)  # 3 handed over: three in flight, so 1 is waited for
        assert processes.waits == [0, 1] and [t for *_, t in finished] == [0, 1, 2]  # 2 without a wait
        processes.submitted[3].finish()
        finished += pipeline.put(*batches[5], 5)  # two in flight (3 and 4), the oldest done: handed back
        assert processes.waits == [0, 1] and [t for *_, t in finished] == [0, 1, 2, 3]
        finished += pipeline.finish()
        assert processes.waits == [0, 1, 4, 5]
    _assert_pooled_in_order(finished, batches)


def test_an_error_drops_the_batches_the_processes_have_not_started():
    batches = _batches(4)
    processes = _ProcessesByHand()
    with pytest.raises(KeyError), BatchPipeline(2, 1, processes) as pipeline:
        for tag, batch in enumerate(batches):
            pipeline.put(*batch, tag)
        raise KeyError("the encoder failed")
    assert [future.cancelled() for future in processes.submitted] == [False, True, True]  # 0 was waited for


def test_pooling_processes_kept_across_calls(model, monkeypatch):
    texts = DOCUMENTS + LONG_DOCUMENTS
    expected = model.encode_documents(texts, batch_size=8, packed=True, pool_factor=2)
    with PoolingProcesses(2) as workers:
        first = model.encode_documents(texts, batch_size=8, packed=True, pool_factor=2, pooling_processes=workers)
        started = set(workers._executor._processes)
        encode_batch, calls = ColBERT._encode_batch, []

        def fails_third(self, part):
            calls.append(part)
            if len(calls) == 3:
                raise RuntimeError("the encoder failed")
            return encode_batch(self, part)

        monkeypatch.setattr(ColBERT, "_encode_batch", fails_third)
        with pytest.raises(RuntimeError, match="the encoder failed"):  # the caller's processes keep running
            model.encode_documents(texts, batch_size=8, pool_factor=2, pooling_processes=workers)
        monkeypatch.setattr(ColBERT, "_encode_batch", encode_batch)
        second = model.encode_documents(texts, batch_size=8, packed=True, pool_factor=2, pooling_processes=workers)
        assert set(workers._executor._processes) == started and not workers.closed
    assert workers.closed
    for shared in (first, second):
        assert shared.lengths_host == expected.lengths_host and torch.equal(shared.values, expected.values)
    with pytest.raises(ValueError, match="pooling_processes: these pooling processes are stopped"):
        model.encode_documents(texts, pool_factor=2, pooling_processes=workers)
    with pytest.raises(ValueError, match="these pooling processes are stopped"):
        pool_documents(*_batches(1)[0], 2, 1, workers)


@pytest.mark.parametrize("count", [0, -1, 1.0, "2", None])
def test_a_bad_number_of_pooling_processes_is_refused(count):
    with pytest.raises(ValueError, match="the number of pooling processes must be a positive integer"):
        PoolingProcesses(count)


def test_a_pooling_process_that_dies_is_a_clear_error():
    docs = _random_documents([40, 50])
    values, lengths = torch.cat(docs), np.array([40, 50])
    with PoolingProcesses(1) as workers:
        pool_documents(values, lengths, 2, 1, workers)  # the process is started
        for process in list(workers._executor._processes.values()):
            process.kill()
            process.join()
        with pytest.raises(RuntimeError, match="the pooling processes stopped .* one was killed"):
            pool_documents(values, lengths, 2, 1, workers)


@pytest.mark.parametrize("settings, message", [
    ({"pool_factor": 0}, "pool_factor must be a positive integer, got 0"),
    ({"pool_factor": -2}, "pool_factor must be a positive integer"),
    ({"pool_factor": 1.5}, "pool_factor must be a positive integer, got 1.5"),
    ({"pool_factor": True}, "pool_factor must be a positive integer"),
    ({"pool_factor": "2"}, "pool_factor must be a positive integer"),
    ({"pool_factor": 2, "protected_tokens": -1}, "protected_tokens must be an integer of at least 0, got -1"),
    ({"pool_factor": 2, "protected_tokens": None}, "protected_tokens must be an integer of at least 0"),
    ({"pool_factor": 2, "pooling_processes": -1}, "pooling_processes must be an integer of at least 0, got -1"),
    ({"pooling_processes": 2.0}, "pooling_processes must be an integer of at least 0"),
])
def test_bad_pooling_settings_are_refused_before_encoding(model, monkeypatch, settings, message):
    monkeypatch.setattr(ColBERT, "_encode", lambda *args: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match=message):
        model.encode_documents(DOCUMENTS, **settings)


def test_pooling_without_scipy_says_so_before_encoding(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.cluster", None)  # an import of it now fails
    encode = ColBERT._encode
    monkeypatch.setattr(ColBERT, "_encode", lambda *args: pytest.fail("encoded before the check"))
    with pytest.raises(ImportError, match="pool_factor > 1 clusters .* with SciPy, which is not installed"):
        model.encode_documents(DOCUMENTS, pool_factor=2)
    monkeypatch.setattr(ColBERT, "_encode", encode)
    assert len(model.encode_documents(DOCUMENTS[:2], pool_factor=1)) == 2  # no SciPy needed


@pytest.fixture
def docs_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(LONG_DOCUMENTS)))
    return path


def test_cli_encode_pools_documents(stanford_dir, docs_file, tmp_path, model, capsys):
    common = ["--model", str(stanford_dir), "--device", "cpu"]
    out = tmp_path / "pooled.safetensors"
    assert main(["encode", *common, "--input", str(docs_file), "--output", str(out),
                 "--pool-factor", "3", "--protected-tokens", "2", "--pooling-processes", "2"]) == 0
    expected = model.encode_documents(LONG_DOCUMENTS, packed=True, pool_factor=3, protected_tokens=2)
    with safe_open(str(out), "pt") as f:
        torch.testing.assert_close(f.get_tensor("values"), expected.values, atol=2e-6, rtol=0)
        assert f.get_tensor("offsets").tolist() == expected.offsets.tolist()
        assert f.metadata()["pool_factor"] == "3" and f.metadata()["protected_tokens"] == "2"
    plain = tmp_path / "plain.safetensors"
    assert main(["encode", *common, "--input", str(docs_file), "--output", str(plain), "--pool-factor", "1"]) == 0
    with safe_open(str(plain), "pt") as f:
        assert "pool_factor" not in f.metadata() and "protected_tokens" not in f.metadata()
    capsys.readouterr()
    assert main(["rank", *common, "--documents", str(out), "--query", "paris", "-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--kind", "queries", "--pool-factor", "2"], "--pool-factor pools documents; queries are never pooled"),
    (["--pool-factor", "0"], "pool_factor must be a positive integer, got 0"),
    (["--pool-factor", "2", "--protected-tokens", "-1"], "protected_tokens must be an integer of at least 0"),
    (["--pool-factor", "2", "--pooling-processes", "-2"], "pooling_processes must be an integer of at least 0"),
    (["--pool-factor", "2", "--no-scipy"], "with SciPy, which is not installed"),
])
def test_cli_pooling_errors(stanford_dir, docs_file, tmp_path, capsys, monkeypatch, args, message):
    if "--no-scipy" in args:
        args.remove("--no-scipy")
        monkeypatch.setitem(sys.modules, "scipy.cluster", None)
    out = tmp_path / "o.safetensors"
    assert main(["encode", "--model", str(stanford_dir), "--device", "cpu", "--input", str(docs_file),
                 "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
