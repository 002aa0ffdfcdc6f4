"""Bounds, race and initialisation checks for kernels run in Triton's CPU interpreter (the tests'
compute-sanitizer).

On a GPU a load or store without the right mask reads or writes past a tensor: a fault when it
leaves the allocation, silently wrong values or a corrupted neighbour when it does not. The
interpreter runs such a kernel on host memory without a word (numpy reads whatever lies there),
and a masked ``other`` or a later ``tl.where`` can hide the stray values from every output a
test compares. So, while installed, every element a kernel loads or stores under a true mask
must lie inside one of the tensors passed to that launch (the bytes its view spans, not the
storage behind it: a view of a longer buffer, such as `poisoned`'s, ends where the view ends),
or the launch fails naming the kernel, the access and the nearest argument.

It also checks what the interpreter's order hides: it runs a launch's programs one after
another, a GPU all at once in no set order. So no program may load a byte that another program
of the same launch stores (the value read would depend on which ran first), nor store a byte
another one stores; a program's own bytes it may read and write as it likes.

And what host memory hides: a fresh `torch.empty` on the CPU is often zeros, on a GPU whatever the
last kernel left. So `poison_allocations` fills what the package allocates uninitialised
(`torch.empty`, `torch.empty_like`, `Tensor.new_empty`, called from `colbert_triton`) with NaN,
or the integer type's largest value (an index read before it is written then reaches out of
bounds), or True: an element read before it is written shows in a result or fails a launch.

Installed for the whole test session by conftest.py where the kernels are interpreted; tests of
the checker itself are in test_memcheck.py.
"""

from __future__ import annotations

import inspect
import sys
import threading

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


class _Launch(threading.local):
    def __init__(self):
        self.kernel = ""
        self.names: list[str] = []
        self.starts = np.zeros(0, dtype=np.uint64)  # the arguments' spans, sorted by start
        self.ends = np.zeros(0, dtype=np.uint64)
        # The program that stored each byte (-1: none yet), per 2^_CHUNK_BITS bytes of memory,
        # made at the first store into the chunk: an argument may span gigabytes (a view with
        # long strides) of which a launch stores a few rows.
        self.writers: dict[int, np.ndarray] = {}
        self.program = 0


_launch = _Launch()
_CHUNK_BITS = 16


def _tensors(name: str, value):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(f"{name}[{i}]", item)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The first byte of a view and one past its last (empty views span nothing)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def _set_launch(fn, args, kwargs) -> None:
    bound = inspect.getcallargs(fn, *args, **kwargs)
    spans = [(*_span(t), name) for key, value in bound.items() for name, t in _tensors(key, value)]
    spans = sorted(s for s in spans if s[1] > s[0])
    _launch.kernel = getattr(fn, "__name__", str(fn))
    _launch.names = [name for _, _, name in spans]
    _launch.starts = np.array([s[0] for s in spans], dtype=np.uint64)
    _launch.ends = np.array([s[1] for s in spans], dtype=np.uint64)
    _launch.writers = {}
    _launch.program = 0


def _check(kind: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
    addresses = np.asarray(ptrs, dtype=np.uint64)[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs))]
    if addresses.size == 0:
        return
    # The argument starting at or before each address: the only one that can hold it, unless
    # views overlap, which a kernel's arguments may (then any containing one will do).
    slot = np.searchsorted(_launch.starts, addresses, side="right") - 1
    inside = slot >= 0
    ends = np.where(inside, _launch.ends[np.maximum(slot, 0)], 0)
    inside &= addresses + np.uint64(itemsize) <= ends
    if not inside.all():
        for address in np.unique(addresses[~inside]):
            if any(s <= address and address + itemsize <= e for s, e in zip(_launch.starts, _launch.ends)):
                continue
            raise OutOfBounds(_describe(kind, int(address), itemsize, int((~inside).sum())))
    _check_races(kind, addresses, itemsize)


def _check_races(kind: str, addresses: np.ndarray, itemsize: int) -> None:
    if kind == "load" and not _launch.writers:  # nothing stored yet in this launch: nothing to race
        return
    me = _launch.program
    byte_addresses = (addresses[:, None] + np.arange(itemsize, dtype=np.uint64)).reshape(-1)
    chunks = byte_addresses >> np.uint64(_CHUNK_BITS)
    for chunk in np.unique(chunks):
        writers = _launch.writers.get(int(chunk))
        if writers is None and kind == "load":
            continue
        if writers is None:
            writers = _launch.writers[int(chunk)] = np.full(1 << _CHUNK_BITS, -1, dtype=np.int64)
        in_chunk = byte_addresses[chunks == chunk]
        offsets = (in_chunk & np.uint64((1 << _CHUNK_BITS) - 1)).astype(np.int64)
        owners = writers[offsets]
        others = (owners != -1) & (owners != me)
        if others.any():
            first = int(np.argmax(others))
            where = _where(int(in_chunk[first]))
            raise Race(f"{_launch.kernel}: program {me} {kind}s the byte at {where}, which program "
                       f"{int(owners[first])} of the same launch stores (the GPU runs them in no set "
                       "order)")
        if kind == "store":
            writers[offsets] = me


def _where(address: int) -> str:
    for start, end, name in zip(_launch.starts, _launch.ends, _launch.names):
        if start <= address < end:
            return f"offset {address - int(start)} of {name}"
    return hex(address)


def _describe(kind: str, address: int, itemsize: int, count: int) -> str:
    where = "no tensor argument at all"
    if _launch.starts.size:
        distances = [(address - int(s) if address >= int(s) else int(e) - address - itemsize, i)
                     for i, (s, e) in enumerate(zip(_launch.starts, _launch.ends))]
        _, i = min((abs(d), i) for d, i in distances)
        start, end = int(_launch.starts[i]), int(_launch.ends[i])
        if address >= end:
            where = f"{address - end} bytes past the end of {_launch.names[i]} ({end - start} bytes)"
        else:
            where = f"{start - address} bytes before {_launch.names[i]}"
    return (f"{_launch.kernel}: a {kind} of {itemsize}-byte elements reaches outside its "
            f"arguments ({count} element(s) of this access); the first: {where}")


def install() -> None:
    """Check every interpreted launch from now on (idempotent)."""
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor._init_args_hst, "_memcheck", False):
        return
    init_args = executor._init_args_hst

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _set_launch(self.fn, args_hst, kwargs_hst)  # kwargs: already the kernel's own
        return args_hst, kwargs_hst

    init_args_checked._memcheck = True
    executor._init_args_hst = init_args_checked

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    set_grid_idx = builder.set_grid_idx

    def set_program(self, x, y, z):
        set_grid_idx(self, x, y, z)
        nx, ny, _ = self.grid_dim
        _launch.program = x + nx * (y + ny * z)

    def itemsize(ptrs) -> int:
        return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

    def masked_load(self, ptrs, mask, other, *rest):
        _check("load", ptrs.data, mask.data, itemsize(ptrs))
        return load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs.data, mask.data, itemsize(ptrs))
        return store(self, ptrs, value, mask, *rest)

    masked_load.unchecked, masked_store.unchecked, set_program.unchecked = load, store, set_grid_idx
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.set_grid_idx = set_program


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype == torch.bool:
        tensor.fill_(True)
    elif tensor.numel():
        tensor.fill_(torch.iinfo(tensor.dtype).max)
    return tensor


def _poisoning(allocate):
    def allocate_poisoned(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "colbert_triton" or caller.startswith("colbert_triton."):
            _poison(tensor)
        return tensor

    allocate_poisoned.unpoisoned = allocate
    return allocate_poisoned


def poison_allocations() -> None:
    """Fill what `colbert_triton` allocates uninitialised from now on (idempotent)."""
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        if not hasattr(getattr(owner, name), "unpoisoned"):
            setattr(owner, name, _poisoning(getattr(owner, name)))
