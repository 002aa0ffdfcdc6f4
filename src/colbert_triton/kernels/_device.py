"""The launch device: Triton launches on the *current* CUDA device, not on the arguments' one."""

from __future__ import annotations

import contextlib

import torch


def on_device(where: torch.Tensor | torch.device):
    """Make the GPU of ``where`` (a tensor or a device) current for what follows: a no-op on the
    CPU and when it already is current.

    Triton launches, CUDA events, streams and graph captures all use the current device;
    without this a model on ``cuda:1`` would launch on GPU 0 with GPU 1's pointers.
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)
