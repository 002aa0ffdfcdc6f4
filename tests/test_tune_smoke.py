"""The GPU block-size sweep (bench/device/tune.py) runs end to end on tiny shapes.

It is meant for a GPU session with little device time, so it must work the first time there:
here every family's heuristic and one alternative config are launched (interpreter without a
GPU), checked against each other and written to JSON.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "device"))

import tune  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the sweep itself runs (bench/device/run.sh tune); its smoke "
                           "run would only spend device time compiling")
def test_tune_smoke(tmp_path):
    out = tmp_path / "tune.json"
    assert tune.main(["all", "--smoke", "--workers", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    entries = result["entries"]
    families = {e["family"] for e in entries}
    assert families == {"maxsim", "linear", "linear_ln", "attention"}
    assert all(e["error"] is None for e in entries), [e for e in entries if e["error"]]
    # Every case timed its heuristic and at least one alternative, all agreeing with it.
    for case in {e["case"] for e in entries}:
        configs = [e for e in entries if e["case"] == case and "impl" not in e["config"]]
        assert sum(e["default"] for e in configs) == 1
        assert len({json.dumps(e["config"], sort_keys=True) for e in configs}) >= 2
        assert all(e["ms"] is not None and e["max_abs_diff"] is not None for e in configs)
    # The several-query case also times the query tile in registers.
    assert any(e["config"].get("q_in_regs") for e in entries if e["case"] == "smoke Q3 N5 d96")


def test_tune_configs_are_distinct_and_valid():
    """The GPU grid (not run here) only holds configs that tl.dot and the kernels accept."""
    for case in tune.maxsim_cases(smoke=False):
        inputs = tune.make_inputs(case) if case.params[1] <= 1000 else None
        if inputs is None:
            continue
        configs = tune.maxsim_block_configs(case, inputs, smoke=False)
        assert len(configs) == len({json.dumps(c, sort_keys=True) for c in configs})
        for c in configs:
            assert c["qb"] * c["lq_tile"] >= 16 and c["block_n"] >= 16
            assert c["qb"] * c["lq_tile"] * c["block_n"] <= 256 * 128
            if c["q_in_regs"]:
                assert c["qb"] * c["lq_tile"] >= 64  # wgmma tiles only
        several_queries = case.params[0] > 1 and not case.params[5]
        assert any(c["q_in_regs"] for c in configs) == several_queries, case
    for case in tune.encoder_cases(smoke=False):
        if case.family in ("linear", "linear_ln"):
            for c in tune.linear_configs(case, smoke=False):
                assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
