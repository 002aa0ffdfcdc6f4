"""kernels/_interpreter.py: the CPU interpreter's workarounds hold on each Triton signature."""

from __future__ import annotations

import operator
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import KERNEL_DEVICE, poisoned

from colbert_triton.kernels import _interpreter


@pytest.mark.parametrize("with_scope", [True, False], ids=["triton-3.6", "triton-3.2-to-3.5"])
def test_scalar_index_patch_takes_either_signature(with_scope):
    """Triton 3.6 calls `_patch_lang_tensor(tensor, scope)` and restores what the scope set;
    3.2-3.5 call `_patch_lang_tensor(tensor)`. Each gets the original's work plus an
    ``__index__`` that reads a one-element array (a loop bound loaded from memory)."""
    calls = []

    class Scope:
        def set_attr(self, obj, name, value):
            calls.append(("scope", name))
            setattr(obj, name, value)

    if with_scope:
        def original(tensor, scope):
            calls.append(("original", tensor.__name__))
    else:
        def original(tensor):
            calls.append(("original", tensor.__name__))

    interpreter = types.SimpleNamespace(_patch_lang_tensor=original)
    _interpreter.install_scalar_index(interpreter)
    _interpreter.install_scalar_index(interpreter)  # a second install wraps nothing again

    class Tensor:
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    interpreter._patch_lang_tensor(Tensor, *([Scope()] if with_scope else []))
    assert calls[0] == ("original", "Tensor") and len(calls) == (2 if with_scope else 1)
    assert operator.index(Tensor(7)) == 7 and list(range(Tensor(3))) == [0, 1, 2]


# --- GPU numerics (`fix_gpu_numerics`): what the interpreter computes for bf16 and TF32 is what
# a GPU computes. On a GPU these run compiled, the reference for the expectations below.


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                PRECISION: tl.constexpr):
    offs_m, offs_n, offs_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :])
    b = tl.load(b_ptr + offs_k[:, None] * N + offs_n[None, :])
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], tl.dot(a, b, input_precision=PRECISION))


def _dot(a: torch.Tensor, b: torch.Tensor, precision: str = "tf32") -> torch.Tensor:
    out = poisoned((a.shape[0], b.shape[1]), torch.float32)
    _dot_kernel[(1,)](a.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), out, M=a.shape[0], N=b.shape[1],
                      K=a.shape[1], PRECISION=precision)
    return out.cpu()


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n  # one program, BLOCK >= n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        out = poisoned(tuple(x.shape), dtype)
    else:
        out = torch.full(tuple(x.shape), torch.iinfo(dtype).max, dtype=dtype, device=KERNEL_DEVICE)
    _cast_kernel[(1,)](x.to(KERNEL_DEVICE), out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return out.cpu()


def test_bfloat16_dot_multiplies_values():
    """The interpreter took a bf16 dot's operands as their uint16 bit patterns (results ~1e9)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen).to(torch.bfloat16)
    b = torch.randn(32, 16, generator=gen).to(torch.bfloat16)
    # bf16 products are exact in fp32; only the fp32 summation order may differ.
    torch.testing.assert_close(_dot(a, b), (a.double() @ b.double()).float(), atol=1e-5, rtol=1e-5)


def test_float32_dots_take_their_input_precision():
    """The interpreter multiplied float32 operands in full float32 at any precision. A "tf32"
    dot loses what TF32's 10-bit mantissa drops (relative 2^-11 an operand if rounded, 2^-10 if
    truncated: 2.3e-4 and 4.4e-4 here), "tf32x3" and "ieee" keep float32's accuracy (under
    K * 2^-24 in any summation order: 1.1e-7 and 1.6e-7 in the interpreter)."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 64, generator=gen), torch.randn(64, 16, generator=gen)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()  # what the products' relative errors scale by

    def error(precision):
        return float(((_dot(a, b, precision).double() - exact) / scale).abs().max())

    assert error("ieee") < 64 * 2**-24
    assert 2**-14 < error("tf32") <= 2**-9
    assert error("tf32x3") < 64 * 2**-24


# Ties between two bf16 values (1 + 2^-8: to 1; 1 + 3 * 2^-8: to 1 + 2^-6, the even one), their
# negatives, past bf16's largest (to inf), infinities, fp32 subnormals, signed zero.
_TO_BF16 = [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), -(1 + 3 * 2**-8),
            3.4e38, -3.4e38, float("inf"), float("-inf"), 1e-40, -3e-39, 0.0, -0.0, 0.1, -1e-5]


@pytest.mark.parametrize("source", [torch.float32, torch.float16, torch.float64])
def test_casts_to_bfloat16_round_to_nearest_even(source):
    """The interpreter truncated to bf16; a GPU rounds to nearest even, as torch does."""
    values = torch.tensor(_TO_BF16, dtype=torch.float64).to(source)
    got, want = _cast(values, torch.bfloat16), values.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (got, want)
    nan = _cast(torch.tensor([float("nan")], dtype=source), torch.bfloat16)
    assert torch.isnan(nan).all()


# (NumPy warns of the float16 overflow it rounds to inf.)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.int32])
def test_casts_from_bfloat16_take_the_value(target):
    """bf16 to float32 is exact; to float16 rounds (past its range: inf); to an integer truncates
    toward zero (the interpreter had these right; the fix takes them over)."""
    values = [1.0, -2.5, 0.1, 7.75, -1e-3, 0.0, 123.0, -65280.0]
    if target != torch.int32:
        values += [1e5, -3e38, float("inf"), 1e-30]
    source = torch.tensor(values).to(torch.bfloat16)
    got, want = _cast(source, target), source.to(target)
    assert torch.equal(got, want), (got, want)


@triton.jit
def _max_min_kernel(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x, y = tl.load(x_ptr + offs), tl.load(y_ptr + offs)
    tl.store(out_ptr + offs, tl.maximum(x, y))
    tl.store(out_ptr + BLOCK + offs, tl.minimum(x, y))
    tl.store(out_ptr + 2 * BLOCK + offs, tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL))
    tl.store(out_ptr + 3 * BLOCK + offs, tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL))
    rows = tl.reshape(x, (BLOCK // 4, 4))
    tl.store(out_ptr + 4 * BLOCK + tl.arange(0, BLOCK // 4), tl.max(rows, axis=1))
    tl.store(out_ptr + 4 * BLOCK + BLOCK // 4 + tl.arange(0, BLOCK // 4), tl.min(rows, axis=1))


# (NumPy warns of the all-NaN row its nanmax reduces.)
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_max_and_min_drop_nan_unless_told_to_propagate_it():
    """``tl.maximum``/``tl.minimum`` (PTX max.f32/min.f32) and the ``tl.max``/``tl.min``
    reductions give the other operand for a NaN; with ``propagate_nan=ALL`` NaN wins. Triton
    3.6's interpreter propagated NaN in the elementwise ones."""
    nan = float("nan")
    x = torch.tensor([nan, 1.0, nan, -2.0] + [nan, nan, 3.0, nan] + [nan] * 4 + [0.5, -1.0, 2.0, 7.0])
    y = torch.tensor([3.0, nan, nan, 5.0] * 4)
    out = poisoned((4 * 16 + 8,), torch.float32)
    _max_min_kernel[(1,)](x.to(KERNEL_DEVICE), y.to(KERNEL_DEVICE), out, BLOCK=16)
    out = out.cpu()
    torch.testing.assert_close(out[:16], torch.fmax(x, y), equal_nan=True)
    torch.testing.assert_close(out[16:32], torch.fmin(x, y), equal_nan=True)
    torch.testing.assert_close(out[32:48], torch.maximum(x, y), equal_nan=True)
    torch.testing.assert_close(out[48:64], torch.minimum(x, y), equal_nan=True)
    # Row by row (x as 4 x 4): the max and min of the non-NaN values; NaN for the all-NaN row.
    torch.testing.assert_close(out[64:68], torch.tensor([1.0, 3.0, nan, 7.0]), equal_nan=True)
    torch.testing.assert_close(out[68:72], torch.tensor([-2.0, 3.0, nan, -1.0]), equal_nan=True)


def test_gpu_numerics_install_once():
    builder = type("Builder", (), {"create_dot": lambda *a: "dot", "cast_impl": lambda *a: "cast"})
    interpreter = types.SimpleNamespace(InterpreterBuilder=builder, TensorHandle=types.SimpleNamespace)
    _interpreter.install_gpu_numerics(interpreter)
    dot = interpreter.InterpreterBuilder.create_dot
    _interpreter.install_gpu_numerics(interpreter)
    assert interpreter.InterpreterBuilder.create_dot is dot
