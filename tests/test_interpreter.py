"""kernels/_interpreter.py: the CPU interpreter's workarounds hold on each Triton signature."""

from __future__ import annotations

import operator
import types

import numpy as np
import pytest

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
