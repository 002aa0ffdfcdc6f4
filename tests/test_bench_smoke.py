"""The MaxSim benchmark's preparation and checks run on tiny shapes without a GPU.

A device session has minutes: a benchmark that breaks there (a peer's call signature, a
reference with the wrong padding semantics) costs a whole run. Here every implementation of
bench/test_bench_maxsim.py is prepared and checked against ours exactly as before timing, on
the CPU (our kernel under the interpreter), at odd sizes with short documents, where PyLate's
zero-padding visibly differs from excluding padded slots. The peers run when installed; their
CUDA-only entry points are skipped.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import require_reference

# Appended, not prepended: bench/ has a conftest.py of its own that must not shadow this one.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU the benchmarks themselves run (bench/)")

CUDA_ONLY = {"flash-maxsim-rerank", "lik-varlen"}
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


def test_every_implementation_is_covered(bench):
    assert set(bench.IMPLS) == ({"ours", "ours-qregs", "ours-qregs-128", "eager", "pylate"} | set(PEERS)
                                | CUDA_ONLY)
