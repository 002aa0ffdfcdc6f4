"""A GPU fault charged to the test that caused it (used by tests/conftest.py and bench/conftest.py)."""

import os
import sys

import pytest
import torch


def end_process_on_cuda_fault(nodeid: str) -> None:
    """Wait for the test's kernels; if one faulted, stop this process.

    A device fault (an illegal address, a trap) is sticky: every later CUDA call in the process
    fails with it, so the tests after it would report the same error instead of their own.
    Synchronising here charges an asynchronous fault to the test that caused it; ending the
    process lets pytest-xdist report that test as crashed and start a fresh worker (and a
    serial run stops with the test named)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:  # torch.AcceleratorError is a RuntimeError
        message = f"CUDA fault after {nodeid}: {exc}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(3)
        else:
            pytest.exit(message, returncode=3)
