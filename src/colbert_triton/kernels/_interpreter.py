"""Workarounds for Triton's CPU interpreter (TRITON_INTERPRET=1); compiled GPU code is untouched."""

from __future__ import annotations

import threading

import numpy as np


def fix_scalar_loop_bounds() -> None:
    """Let the CPU interpreter run loops whose bound is loaded from memory.

    Triton's interpreter (3.2 to 3.6) turns a scalar into a Python int with
    ``int(array_of_shape_(1,))``, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed
    upstream by #9172). Our kernels loop over a document's or a sequence's own length, a bound
    loaded from memory. Applied by `kernels/__init__.py` under TRITON_INTERPRET=1 only, and
    only when this NumPy refuses.
    """
    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    install_scalar_index(interpreter)


def install_scalar_index(interpreter) -> None:
    """Wrap ``interpreter._patch_lang_tensor`` (which puts the interpreter's methods on
    `tl.tensor` for a launch) so that a scalar tensor also gets an ``__index__`` that NumPy 2.4
    accepts."""
    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_fixed", False):
        return

    def scalar_index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):  # Triton 3.6: (tensor, scope); 3.2-3.5: (tensor)
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", scalar_index)
        else:
            tensor.__index__ = scalar_index

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


def serialize_launches() -> None:
    """Run one interpreted launch at a time in this process.

    Triton's interpreter keeps the grid position in one global builder and swaps `tl`'s
    functions in and out around each launch: two threads launching at once (a server sharing
    a model, in CPU tests) fail with "x >= grid_dim[0]" or "Did you forget to add @triton.jit".
    Compiled GPU launches are untouched."""
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__
    if getattr(original, "_serialized", False):
        return
    lock = threading.RLock()

    def call(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    call._serialized = True
    interpreter.GridExecutor.__call__ = call


def fix_bfloat16() -> None:
    """Let the CPU interpreter compute bfloat16 dots and casts as a GPU does.

    NumPy has no bfloat16, so Triton's interpreter (3.6 and 3.9 checked) holds bf16 values as
    their raw uint16 bits, multiplies the operands of a bf16 ``tl.dot`` as those integers, and
    casts to bf16 by truncation where a GPU rounds to nearest even. Here a bf16 dot operand is
    widened to float32 first (exact; tensor cores multiply bf16 exactly into an fp32
    accumulator), and every cast to or from bf16 passes through float32, rounding to nearest
    even on the way down (torch's conversion, a GPU's). Other arithmetic on bf16 values stays
    wrong in the interpreter: our kernels compute in float32 (as a GPU does for bf16
    elementwise math) and use bf16 only to load, dot, convert and store.
    Applied by `kernels/__init__.py` under TRITON_INTERPRET=1 only.
    """
    from triton.runtime import interpreter

    install_bfloat16(interpreter)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def install_bfloat16(interpreter) -> None:
    """Wrap the interpreter's ``create_dot`` and ``cast_impl`` (through which every float cast
    of the interpreter goes) for bf16 values; other dtypes pass through unchanged."""
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bfloat16_fixed", False):
        return
    import triton.language as tl

    bf16 = tl.bfloat16
    handle = interpreter.TensorHandle
    dot, cast = builder.create_dot, builder.cast_impl

    def widened(operand):
        if operand.dtype.scalar != bf16:
            return operand
        return handle(_bf16_bits_to_float32(operand.data), tl.float32)

    def create_dot(self, a, b, acc, *precision):
        return dot(self, widened(a), widened(b), acc, *precision)

    def cast_impl(self, src, dst_type):
        src_type, dst_scalar = src.dtype.scalar, dst_type.scalar
        if bf16 not in (src_type, dst_scalar) or src_type == dst_scalar:
            return cast(self, src, dst_type)
        values = _bf16_bits_to_float32(src.data) if src_type == bf16 else src.data
        if dst_scalar == bf16:  # (an integer past 2^24 rounds twice: to float32, then to bf16)
            return handle(_float32_to_bf16_bits(values.astype(np.float32)), bf16)
        return handle(values.astype(interpreter._get_np_dtype(dst_type)), dst_scalar)

    create_dot._bfloat16_fixed = True
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
