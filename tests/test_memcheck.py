"""tests/memcheck.py, the interpreter's bounds and race checker: it must fail a kernel that loads
or stores outside its arguments (the accesses a GPU would fault on, or silently get wrong), or
whose programs share bytes one of them stores, and pass one that keeps inside its arguments
(masked-off lanes and views of longer buffers included) and to each program's own outputs; and
what the package allocates uninitialised must come poisoned."""

import types

import memcheck
import pytest
import torch
import triton
import triton.language as tl
from conftest import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="checks the CPU interpreter's launches")


@triton.jit
def _copy(src_ptr, dst_ptr, n, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr, SHIFT: tl.constexpr,
          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n
    if MASK_LOAD:
        x = tl.load(src_ptr + offs + SHIFT, mask=in_bounds, other=0.0)
    else:
        x = tl.load(src_ptr + offs + SHIFT)
    # The stray lanes' values are discarded here, as a kernel might: only the checker sees them.
    x = tl.where(in_bounds, x, 0.0)
    if MASK_STORE:
        tl.store(dst_ptr + offs, x, mask=in_bounds)
    else:
        tl.store(dst_ptr + offs, x)


@triton.jit
def _first_of_each(src_ptr, starts_ptr, dst_ptr):
    i = tl.program_id(0)
    tl.store(dst_ptr + i, tl.load(src_ptr + tl.load(starts_ptr + i)))


def _run(n, *, mask_load=True, mask_store=True, shift=0, dst=None):
    src = torch.arange(n, dtype=torch.float32)
    dst = torch.empty(n, dtype=torch.float32) if dst is None else dst
    _copy[(triton.cdiv(n, 16),)](src, dst, n, MASK_LOAD=mask_load, MASK_STORE=mask_store, SHIFT=shift,
                                 BLOCK=16)
    return src, dst


def test_accesses_inside_the_arguments_pass():
    src, dst = _run(37)  # three programs, the last with 11 masked-off lanes
    assert torch.equal(src, dst)
    buffer = torch.full((64,), float("nan"))
    _run(16, mask_load=False, mask_store=False, dst=buffer[:16])  # whole tiles need no mask
    assert torch.equal(buffer[:16], torch.arange(16.0)) and buffer[16:].isnan().all()


@pytest.mark.parametrize("case, expect", [
    ({"mask_load": False}, "a load of 4-byte elements .* past the end of src_ptr"),
    ({"mask_store": False}, "a store of 4-byte elements .* past the end of dst_ptr"),
    ({"shift": -1}, "a load .* 4 bytes before src_ptr"),
])
def test_a_stray_access_fails_the_launch_naming_it(case, expect):
    with pytest.raises(Exception, match=expect) as failure:
        _run(37, **case)
    assert "_copy" in str(failure.value)


def test_a_view_of_a_longer_buffer_ends_where_the_view_ends():
    buffer = torch.zeros(64)
    with pytest.raises(Exception, match="store .* past the end of dst_ptr"):
        _run(37, mask_store=False, dst=buffer[:37])  # the buffer's storage goes on; the view not


def test_a_loaded_index_is_checked_too():
    src = torch.arange(10.0)
    dst = torch.empty(3)
    _first_of_each[(3,)](src, torch.tensor([0, 4, 9]), dst)
    assert dst.tolist() == [0.0, 4.0, 9.0]
    with pytest.raises(Exception, match="load .* past the end of src_ptr"):
        _first_of_each[(3,)](src, torch.tensor([0, 4, 10]), dst)


@triton.jit
def _scatter(src_ptr, dst_ptr, index_ptr, READ_NEIGHBOUR: tl.constexpr):
    i = tl.program_id(0)
    x = tl.load(src_ptr + i)
    tl.store(dst_ptr + tl.load(index_ptr + i), x)
    tl.store(dst_ptr + tl.load(index_ptr + i), x + 1.0)  # a program may rewrite its own bytes
    if READ_NEIGHBOUR:
        if i > 0:
            x += tl.load(dst_ptr + tl.load(index_ptr + i - 1))
        tl.store(dst_ptr + tl.load(index_ptr + i), x)


def test_programs_that_keep_to_their_own_outputs_pass():
    dst = torch.zeros(4)
    _scatter[(4,)](torch.arange(4.0), dst, torch.tensor([3, 1, 0, 2]), READ_NEIGHBOUR=False)
    assert dst.tolist() == [3.0, 2.0, 4.0, 1.0]


def test_two_programs_storing_one_element_fail():
    with pytest.raises(Exception, match=r"program 2 stores the byte at offset 4 of dst_ptr, which program 1 "):
        _scatter[(4,)](torch.arange(4.0), torch.zeros(4), torch.tensor([3, 1, 1, 2]), READ_NEIGHBOUR=False)


def test_a_program_reading_another_ones_output_fails():
    # Right in the interpreter's order (program 0 first), a race on a GPU.
    with pytest.raises(Exception, match=r"program 1 loads the byte at offset 12 of dst_ptr, which program 0 "):
        _scatter[(4,)](torch.arange(4.0), torch.zeros(4), torch.tensor([3, 1, 0, 2]), READ_NEIGHBOUR=True)


def test_each_launch_starts_with_no_writers():
    dst = torch.zeros(4)
    for _ in range(2):  # the second launch's programs store what the first one's stored
        _scatter[(4,)](torch.arange(4.0), dst, torch.tensor([3, 1, 0, 2]), READ_NEIGHBOUR=False)


def test_it_is_installed_once_for_the_test_session():
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    assert getattr(interpreter.GridExecutor._init_args_hst, "_memcheck", False)
    memcheck.install()  # a second install wraps nothing again
    for method in (builder.create_masked_load, builder.create_masked_store, builder.set_grid_idx):
        assert not hasattr(method.unchecked, "unchecked")


def _allocate():
    x = torch.zeros(2)
    return (torch.empty(3), torch.empty(2, dtype=torch.int32), x.new_empty(2),
            torch.empty_like(x, dtype=torch.bool), torch.empty(0, dtype=torch.int64))


def _module_allocating(name):
    """`_allocate` as if defined in module ``name`` (the poisoning looks at the caller's module)."""
    return types.SimpleNamespace(allocate=types.FunctionType(
        _allocate.__code__, {"__name__": name, "torch": torch}))


def test_the_package_allocates_poisoned_and_nothing_else_does(monkeypatch):
    floats, ints, new, flags, nothing = _module_allocating("colbert_triton._memcheck_probe").allocate()
    assert floats.isnan().all() and new.isnan().all() and flags.all() and nothing.numel() == 0
    assert (ints == torch.iinfo(torch.int32).max).all()

    poisoned = []
    monkeypatch.setattr(memcheck, "_poison", poisoned.append)
    _module_allocating("colbert_tritonic").allocate()
    torch.empty(3)
    assert poisoned == []  # the tests' and other packages' allocations are left as they come
    memcheck.poison_allocations()  # a second install wraps nothing again
    assert not hasattr(torch.empty.unpoisoned, "unpoisoned")
