"""Test-session set-up shared by every test module.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter. It is chosen here,
before any kernel module is imported, because `triton.jit` reads TRITON_INTERPRET when a
kernel is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter multiplies bfloat16 tl.dot operands as raw bits: bf16 is tested on a GPU only.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE
