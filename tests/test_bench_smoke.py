"""The benchmarks' preparation and checks run on tiny shapes without a GPU.

A device session has minutes: a benchmark that breaks there (a peer's call signature, a
reference with the wrong padding semantics, a baseline's loading arguments) costs a whole run.
Here every implementation of bench/test_bench_maxsim.py is prepared and checked against ours
exactly as before timing, on the CPU (our kernel under the interpreter), at odd sizes with short
documents, where PyLate's zero-padding visibly differs from excluding padded slots. The peers
run when installed; their CUDA-only entry points are skipped. The encoder suites
(bench/test_bench_encoder.py, bench/test_bench_encoder_ops.py) run every case once, in float16,
on a few short sequences and a 2-layer model, with a `measure` that only calls.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import require_reference

from colbert_triton.model.pooling import PoolingProcesses

# Appended, not prepended: bench/ has a conftest.py of its own that must not shadow this one.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench" / "device"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU the benchmarks themselves run (bench/)")

CUDA_ONLY = {"flash-maxsim-rerank", "flash-maxsim-rerank-direct", "lik-varlen"}
PEERS = {"flash-maxsim": "flash_maxsim", "lik": "late_interaction_kernels"}


@pytest.fixture
def bench(monkeypatch):
    import test_bench_maxsim

    monkeypatch.setattr(test_bench_maxsim, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    test_bench_maxsim._DATA.clear()
    yield test_bench_maxsim
    test_bench_maxsim._DATA.clear()


def _tiny_cases(bench):
    return [
        bench.Case("rerank", 1, 7, 5, 5, 96, torch.float16),
        bench.Case("batch-varlen", 3, 6, 1, 9, 128, torch.float16),
        bench.Case("candidates", 2, 3, 1, 9, 96, torch.float16, candidates=True, corpus=8),
    ]


@pytest.mark.parametrize("impl", ["ours", "eager", "pylate", "flash-maxsim", "lik"])
def test_maxsim_benchmark_checks_pass(bench, impl):
    if impl == "pylate":
        require_reference("pylate.scores")
    elif impl in PEERS:
        pytest.importorskip(PEERS[impl])
    for case in _tiny_cases(bench):
        data = bench.get_data(case)
        fn = bench.checked(impl, case, data)  # raises if it disagrees with ours
        assert fn().shape == data.reference.shape


def test_query_registers_variant_matches_ours(bench):
    """ours-qregs (the kernel with q_in_regs) is checked like a peer and gives our scores exactly;
    single-query and candidate shapes (one query a tile, no wgmma) skip it."""
    rerank, batch, candidates = _tiny_cases(bench)
    data = bench.get_data(batch)
    for impl in ("ours-qregs", "ours-qregs-128"):
        fn = bench.checked(impl, batch, data)
        assert torch.equal(fn(), bench.prepare("ours", batch, data)())
        for case in (rerank, candidates):
            with pytest.raises(pytest.skip.Exception, match="q_in_regs"):
                bench.checked(impl, case, bench.get_data(case))


def test_pylate_check_uses_zero_padding(bench):
    """PyLate's scores differ from the exact ones on short documents, and the check knows it."""
    require_reference("pylate.scores")
    case = bench.Case("batch-varlen", 3, 6, 1, 9, 128, torch.float16)
    data = bench.get_data(case)
    pylate = bench.prepare("pylate", case, data)().float()
    exact = bench.prepare("ours", case, data)().float()
    assert (pylate - exact).abs().max() > 0.15  # would fail the check against exact scores
    torch.testing.assert_close(pylate, bench.ours_with_zero_padding(case, data), atol=2e-2, rtol=2e-2)


PYLATE_CALLS = ("pylate-auto", "pylate-rerank", "pylate-rerank-host", "ours-pylate-dropin", "ours-pylate-rerank",
                "ours-pylate-rerank-host")


@pytest.mark.parametrize("impl", PYLATE_CALLS)
def test_pylate_call_benchmarks_check_pass(bench, impl):
    """PyLate's calls as its users make them, on PyLate and on our drop-in: checked under PyLate's
    semantics, the retriever's rerank against padding to its longest candidate (shorter than the
    case's width here, so a check against the width would fail), on fp16 at d = 96 only."""
    require_reference("pylate.scores")
    rerank, batch, candidates = _tiny_cases(bench)
    short_rerank = bench.Case("rerank-varlen", 1, 3, 1, 13, 96, torch.float16)  # lengths 4, 3, 2
    # Each query pads to its own longest candidate (3 and 4 here), not the batch's.
    uneven = bench.Case("candidates", 2, 2, 1, 7, 96, torch.float16, candidates=True, corpus=4)
    ran = []
    for case in (rerank, short_rerank, batch, candidates, uneven):
        data = bench.get_data(case)
        try:
            fn = bench.checked(impl, case, data)
        except pytest.skip.Exception:
            continue
        ran.append(case.name)
        got = bench.ranked_scores(fn(), case, data) if impl in bench.WALL_CLOCK else fn()
        assert got.shape == data.reference.shape and not got.isnan().any()
    is_rerank = "-rerank" in impl
    assert ran == ["rerank", "rerank-varlen", "candidates", "candidates"]
    data = bench.get_data(short_rerank)
    assert int(data.lengths.max()) < short_rerank.max_len
    if is_rerank:
        got = bench.ranked_scores(bench.prepare(impl, short_rerank, data)(), short_rerank, data)
        assert (got - bench.ours_with_zero_padding(short_rerank, data)).abs().max() > 0.02


def test_every_implementation_is_covered(bench):
    assert set(bench.IMPLS) == ({"ours", "ours-qregs", "ours-qregs-128", "eager", "pylate"} | set(PEERS)
                                | CUDA_ONLY)
    assert bench.PYLATE_CALLS == PYLATE_CALLS


# --------------------------------------------------------------------------------------------
# Encoder suites


def _call_once(fn, **record):
    """`measure` without timing (bench/conftest.py's dry pass): one call, a made-up median."""
    fn()
    return {**record, "cold": None, "warm": {"median_ms": 1.0}}


def _dry_floor(**work):
    return float("nan"), "dry"


@pytest.fixture
def encoder_ops_bench(monkeypatch):
    import test_bench_encoder_ops as ops_bench

    monkeypatch.setattr(ops_bench, "DEVICE", "cpu")
    monkeypatch.setattr(ops_bench, "floor_ms", _dry_floor)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    # A few documents and queries with odd lengths (one query with a single key) instead of 16k tokens.
    monkeypatch.setattr(ops_bench, "_doc_lengths", lambda: [37, 20, 3])
    monkeypatch.setattr(ops_bench, "_query_lengths", lambda: ([32] * 3, [5, 32, 1]))
    return ops_bench


def test_encoder_ops_benchmark_checks_pass(encoder_ops_bench):
    """Every per-op case prepares, runs its implementations and passes its check against TorchOps."""
    bench, dtype = encoder_ops_bench, torch.float16
    batches = bench.make_batches()
    assert [batch.num_tokens for batch in batches.values()] == [60, 96]
    bench.test_bench_embed_layernorm(_call_once, batches, dtype)
    for case in bench.LINEAR_CASES:
        bench.test_bench_linear(_call_once, batches, case, dtype)
    for case in bench.LN_CASES:
        bench.test_bench_linear_residual_layernorm(_call_once, batches, case, dtype)
    for which in ("docs", "queries"):
        bench.test_bench_varlen_attention(_call_once, batches, which, dtype)
    bench.test_bench_project_normalize(_call_once, batches, dtype)
    bench.test_bench_encoder_layer(_call_once, batches, dtype)


def test_encoder_ops_benchmark_check_fails_on_a_wrong_row(encoder_ops_bench):
    """The check the timed implementations pass would catch one wrong row."""
    reference = torch.randn(10, 384)
    wrong = reference.clone()
    wrong[7] = torch.randn(384)
    with pytest.raises(AssertionError, match="wrong-one is off TorchOps"):
        encoder_ops_bench._measure_all(_call_once, {"TorchOps": lambda: reference, "wrong-one": lambda: wrong},
                                       shape="rows", floor=(None, None), ours="wrong-one")


@pytest.fixture
def encoder_bench(monkeypatch, tmp_path):
    import test_bench_encoder as encoder_bench
    from checkpoints import build_stanford

    monkeypatch.setattr(encoder_bench, "DEVICE", "cpu")
    monkeypatch.setattr(encoder_bench, "floor_ms", _dry_floor)
    # Short sequences: the interpreter runs every kernel of our encoder on the CPU.
    monkeypatch.setattr(encoder_bench, "WORKLOADS", encoder_bench.make_workloads(3, (5, 40), 1, 40, 3))
    monkeypatch.setattr(encoder_bench, "E2E_TEXTS", 3)
    monkeypatch.setattr(encoder_bench, "E2E_WORDS", (1, 30))
    monkeypatch.setattr(encoder_bench, "POOLED_TEXTS", 5)
    monkeypatch.setattr(encoder_bench, "POOLED_BATCH_DOCS", 3)
    monkeypatch.setattr(encoder_bench, "POOLED_BATCH_ROWS", (5, 24))
    monkeypatch.setitem(encoder_bench.LATENCY_TEXTS, "1 document ~200 tok", ("late interaction, " * 9, False))
    checkpoint = build_stanford(tmp_path / "answerai-shape", num_layers=2, dim=96)
    return encoder_bench, checkpoint, encoder_bench.load_models(checkpoint)


def test_encoder_benchmark_cases_run(encoder_bench, monkeypatch):
    """Whole-encoder throughput (ours checked against the torch path; HF BertModel eager and sdpa
    loaded as the suite loads them), latency and end-to-end cases, with PyLate's encode."""
    bench, checkpoint, models = encoder_bench
    require_reference("transformers")
    require_reference("pylate.models")
    assert list(bench.WORKLOADS) == ["docs 3 x 5-40 tok", "docs 1 x 40 tok", "queries 3 x 32 tok"]
    for workload in bench.WORKLOADS:
        for impl in ("ours-triton", "ours-torch", "hf-sdpa", "hf-eager"):
            bench.test_encoder_throughput(_call_once, models, checkpoint, workload, impl)
    for impl in ("ours-triton", "ours-torch", "pylate", "ours-pylate-patched"):
        for case in bench.LATENCY_TEXTS:
            bench.test_latency_end_to_end(_call_once, models, checkpoint, case, impl)
        bench.test_documents_end_to_end(_call_once, models, checkpoint, impl)
    bench.test_documents_end_to_end(_call_once, models, checkpoint, "ours-triton-to-host")
    with PoolingProcesses(1) as workers:
        for impl in ("ours-triton", "ours-triton-host", "ours-triton-processes", "ours-triton-then-pool", "pylate",
                     "ours-pylate-patched"):
            with monkeypatch.context() as patch:  # the host variants' switch, undone after each
                bench.test_pooled_documents_end_to_end(_call_once, models, checkpoint, workers, patch, impl)
        for impl in ("ours-triton", "ours-host", "ours-host-processes", "pylate"):
            bench.test_pooled_batch_alone(_call_once, workers, impl)


def test_patched_pylate_check_fails_on_wrong_rows(encoder_bench, monkeypatch):
    """The patched-PyLate rows' check passes our trunk's rows and fails them moved off (a wrong
    trunk), and the patch is taken back either way."""
    from colbert_triton.model import encoder

    bench, checkpoint, _ = encoder_bench
    pylate_models = require_reference("pylate.models")
    texts = bench.e2e_texts(2)
    with bench.patched_pylate("ours-pylate-patched", checkpoint, texts):
        assert "forward" in pylate_models.ColBERT.__dict__
    assert "forward" not in pylate_models.ColBERT.__dict__
    encode_hidden = encoder.encode_hidden
    monkeypatch.setattr(encoder, "encode_hidden", lambda *args: encode_hidden(*args) + 0.5)
    with pytest.raises(AssertionError, match="worst-token cosine error"), \
            bench.patched_pylate("ours-pylate-patched", checkpoint, texts):
        pass
    assert "forward" not in pylate_models.ColBERT.__dict__


def test_encoder_benchmark_check_fails_on_wrong_embeddings(encoder_bench):
    """The whole-encoder check passes the 16-bit PyTorch path's own output and fails one token
    moved off (a wrong row)."""
    from colbert_triton.model.encoder import encode_packed
    from colbert_triton.model.ops import PackedBatch

    bench, _, models = encoder_bench
    sequences, key_lens = bench.WORKLOADS["docs 3 x 5-40 tok"]
    batch = PackedBatch.from_sequences(sequences, key_lens, "cpu")
    with torch.inference_mode():
        eager = encode_packed(models["torch"].weights, batch, models["torch"].ops)
    bench.check_against_reference(models, batch, eager, "ours-torch")
    wrong = eager.clone()
    wrong[5] = torch.nn.functional.normalize(wrong[5].float() + 0.1 * torch.randn(96), dim=0).to(wrong.dtype)
    with pytest.raises(AssertionError, match="worst-token cosine error"):
        bench.check_against_reference(models, batch, wrong, "ours-triton")


# --------------------------------------------------------------------------------------------
# The measuring itself (bench/common.py: Measure), with the GPU timers stubbed


def test_measure_times_several_implementations_per_test_and_keeps_each_record_at_once(tmp_path, monkeypatch):
    """pytest-benchmark takes one measurement per test: only the first call goes to it, every
    call is timed and recorded, each record appended to the partial file as it is taken (a
    stopped step keeps them), which summarize.py reads."""
    import json

    import common
    import summarize

    calls = []
    monkeypatch.setattr(common, "time_cuda", lambda fn, **kw: (fn(), {"median_ms": 2.0, "calls": 10})[1])
    monkeypatch.setattr(common, "time_wall", lambda fn, **kw: (fn(), {"median_ms": 3.0, "calls": 20})[1])
    monkeypatch.setattr(common, "RECORDS", [])
    monkeypatch.setattr(common, "DRY_RUN", False)

    class OneUseBenchmark:
        group, extra_info, used = None, {}, 0

        def pedantic(self, fn, rounds, warmup_rounds):
            self.used += 1
            assert self.used == 1, "pytest-benchmark measures once per test"

    benchmark, partial = OneUseBenchmark(), tmp_path / "2026-12-01_gpu_abc_partial-1.jsonl"
    measure = common.Measure(benchmark, partial)
    measure(lambda: calls.append("ours"), suite="s", shape="a", impl="ours", ours=True, tokens=1000,
            floor_ms=1.0, floor_kind="compute")
    measure(lambda: calls.append("peer"), suite="s", shape="a", impl="peer")
    measure(lambda: calls.append("variant"), suite="s", shape="a", impl="ours-alt", variant=True)
    measure(lambda: calls.append("wall"), suite="s-latency", shape="b", impl="ours", ours=True, wall=True)
    assert benchmark.used == 1 and calls == ["ours", "ours", "peer", "peer", "variant", "variant", "wall"]
    records = [json.loads(line) for line in partial.read_text().splitlines()]
    assert records == common.RECORDS and len(records) == 4
    assert records[0]["tokens_per_s"] == 1000 / 2e-3 and records[0]["timing"] == "cuda-events"
    assert records[2]["variant"] and records[3]["timing"] == "wall" and records[3]["cold"]["median_ms"] == 3.0
    assert summarize.main([str(tmp_path)]) == 0


def test_summarize_reads_a_partial_session(tmp_path, capsys):
    import json

    import summarize

    record = {"suite": "maxsim", "shape": "rerank", "impl": "ours", "ours": True,
              "cold": {"median_ms": 0.02}, "warm": {"median_ms": 0.02}, "floor_ms": 0.01}
    peer = {**record, "impl": "lik", "ours": False, "cold": {"median_ms": 0.05}}
    (tmp_path / "x_partial-7.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(peer) + "\n{cut mid-wr")
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL" in out and "| maxsim | rerank | 0.0200 | lik | 0.0500 | 2.50 |" in out


def test_peer_autotuners_retune_for_each_case(monkeypatch):
    """A peer's autotuner keyed without the case's sizes would reuse the first case's choice:
    starting a case forgets every choice of the peers' packages (and their disk cache), and the
    record names what each peer chose for the case."""
    import types

    import triton
    import triton.language as tl
    from common import autotuned, forget_autotuning

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 4):
        pytest.skip("triton.autotune starts a GPU driver at decoration before Triton 3.4")

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
    @triton.jit
    def _peer_kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    peer = types.ModuleType("fake_peer.kernels")
    peer._peer_kernel, peer.heuristic = _peer_kernel, types.SimpleNamespace(fn=_peer_kernel)
    monkeypatch.setitem(sys.modules, "fake_peer.kernels", peer)
    chosen = _peer_kernel.configs[1]
    _peer_kernel.cache[(7,)], _peer_kernel.best_config, _peer_kernel.cache_results = chosen, chosen, True
    assert autotuned("fake_peer") == {"fake_peer.kernels._peer_kernel": str(chosen),
                                      "fake_peer.kernels.heuristic": str(chosen)}
    assert autotuned("other_package") == {}
    forget_autotuning("fake_peer")
    assert _peer_kernel.cache == {} and _peer_kernel.cache_results is False
    assert autotuned("fake_peer") == {}  # nothing chosen since
