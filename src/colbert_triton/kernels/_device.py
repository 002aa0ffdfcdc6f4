"""The launch device: Triton launches on the *current* CUDA device, not on the arguments' one."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
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


def host_to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host array on ``device``; to a GPU through pinned memory, so the copy is asynchronous
    (a pageable copy waits for the GPU to drain, stalling the host's preparation of the next
    batch)."""
    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy()).to(dtype)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# Shared memory a block may use on sm_90 (H100/H200: 227 KiB), the budget the launch configs
# were sized for; the interpreter (no GPU) is given it so it runs the sm_90 configs.
SM90_SHARED_MEMORY = 232448


def _index(device: torch.device) -> int:
    """A CUDA device's index; the current device's for a bare "cuda"."""
    return torch.cuda.current_device() if device.index is None else device.index


@functools.cache
def _shared_memory_limit(index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory a block may use on ``device`` (Triton's own launch check reads the
    same number): 99 KiB on sm_86/sm_89, 163 KiB on sm_80, 227 KiB on sm_90."""
    if device.type != "cuda":
        return SM90_SHARED_MEMORY
    return _shared_memory_limit(_index(device))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, read once per device."""
    return _capability(_index(device))
