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


def fix_gpu_numerics() -> None:
    """Let the CPU interpreter compute dots and bfloat16 casts as a GPU does.

    bfloat16: NumPy has none, so Triton's interpreter (3.6 and 3.9 checked) holds bf16 values as
    their raw uint16 bits, multiplies the operands of a bf16 ``tl.dot`` as those integers, and
    casts to bf16 by truncation where a GPU rounds to nearest even. Here a bf16 dot operand is
    widened to float32 first (exact; tensor cores multiply bf16 exactly into an fp32
    accumulator), and every cast to or from bf16 passes through float32, rounding to nearest
    even on the way down (torch's conversion, a GPU's). Other arithmetic on bf16 values stays
    wrong in the interpreter: our kernels compute in float32 (as a GPU does for bf16
    elementwise math) and use bf16 only to load, dot, convert and store.

    TF32: the interpreter multiplies float32 dot operands in full float32 whatever the dot's
    ``input_precision``, so a kernel that leaves it at the default ("tf32") where it means
    "ieee" passes every CPU test and loses ~3 decimal digits on a GPU. Here a "tf32" dot of
    float32 operands multiplies them as a tensor core reads them (the top 19 bits: 10 of
    mantissa), and "tf32x3" is computed as Triton lowers it (F32DotTC: each operand split into
    a TF32 part rounded to nearest and the rest, three TF32 dots, small terms first, NaN in
    them dropped). "ieee", and 16-bit operands (which TF32 holds exactly), are unchanged.

    NaN in max and min: ``tl.maximum``/``tl.minimum`` without ``propagate_nan`` are PTX's
    ``max.f32``/``min.f32`` on a GPU, which give the other operand for a NaN one; Triton 3.6's
    interpreter propagated the NaN (``np.maximum``; its own ``tl.max``/``tl.min`` reductions
    already drop NaN, and 3.9's elementwise ops do too). Here they drop it (``np.fmax``).

    Applied by `kernels/__init__.py` under TRITON_INTERPRET=1 only.
    """
    from triton.runtime import interpreter

    install_gpu_numerics(interpreter)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


_TF32_DROPPED_BITS = np.uint32(0x1FFF)  # float32's low 13 mantissa bits, not in TF32's 10


def _tf32_truncated(values: np.ndarray) -> np.ndarray:
    """A float32 operand as a TF32 tensor-core dot reads it."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (bits & ~_TF32_DROPPED_BITS).view(np.float32)


def _tf32_rounded(values: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32``: nearest TF32 value, ties away from zero (inf and NaN kept)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & ~_TF32_DROPPED_BITS).view(np.float32)
    return np.where(np.isfinite(values), rounded, values)


def install_gpu_numerics(interpreter) -> None:
    """Wrap the interpreter's ``create_dot`` and ``cast_impl`` (through which every float cast
    of the interpreter goes), other dtypes and precisions passing through unchanged, and make
    its ``create_maxnumf``/``create_minnumf`` drop NaN."""
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_gpu_numerics", False):
        return
    import triton.language as tl
    from triton._C.libtriton import ir

    bf16, fp32 = tl.bfloat16, tl.float32
    handle = interpreter.TensorHandle
    dot, cast = builder.create_dot, builder.cast_impl

    def widened(operand):
        if operand.dtype.scalar != bf16:
            return operand
        return handle(_bf16_bits_to_float32(operand.data), fp32)

    def fp32_dot(self, a, b, acc, rest):
        return dot(self, handle(a, fp32), handle(b, fp32), acc, ir.INPUT_PRECISION.IEEE, *rest).data

    def create_dot(self, a, b, acc, precision, *rest):
        if a.dtype.scalar != fp32 or b.dtype.scalar != fp32 or acc.dtype.scalar != fp32:
            return dot(self, widened(a), widened(b), acc, precision, *rest)
        if precision == ir.INPUT_PRECISION.TF32:
            return dot(self, handle(_tf32_truncated(a.data), fp32), handle(_tf32_truncated(b.data), fp32),
                       acc, precision, *rest)
        if precision == ir.INPUT_PRECISION.TF32x3:
            a_big, b_big = _tf32_rounded(a.data), _tf32_rounded(b.data)
            a_small, b_small = (_tf32_truncated(x - big) for x, big in ((a.data, a_big), (b.data, b_big)))
            zeros = handle(np.zeros_like(acc.data), fp32)
            small = fp32_dot(self, a_small, b_big, zeros, rest)
            small = fp32_dot(self, a_big, b_small, handle(small, fp32), rest)
            small = np.where(np.isnan(small), np.float32(0), small)
            big = fp32_dot(self, a_big, b_big, handle(small, fp32), rest)
            return handle(big + acc.data, fp32)
        return dot(self, a, b, acc, precision, *rest)

    def cast_impl(self, src, dst_type):
        src_type, dst_scalar = src.dtype.scalar, dst_type.scalar
        if bf16 not in (src_type, dst_scalar) or src_type == dst_scalar:
            return cast(self, src, dst_type)
        values = _bf16_bits_to_float32(src.data) if src_type == bf16 else src.data
        if dst_scalar == bf16:  # (an integer past 2^24 rounds twice: to float32, then to bf16)
            return handle(_float32_to_bf16_bits(values.astype(np.float32)), bf16)
        return handle(values.astype(interpreter._get_np_dtype(dst_type)), dst_scalar)

    create_dot._gpu_numerics = True
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
