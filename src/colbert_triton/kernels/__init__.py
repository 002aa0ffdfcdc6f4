"""Hand-written Triton kernels and their launchers, one file per op family."""

import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    from ._interpreter import (
        fix_gpu_numerics,
        fix_scalar_loop_bounds,
        serialize_launches,
    )

    fix_scalar_loop_bounds()
    fix_gpu_numerics()
    serialize_launches()
