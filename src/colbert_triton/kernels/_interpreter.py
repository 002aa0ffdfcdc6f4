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
