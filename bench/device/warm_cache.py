"""Triton's compile cache for the GPU machine, filled here: the kernel variants the test suite
and the benchmarks launch, compiled ahead of time for sm_90 by the Triton build the machine has,
so that its few minutes go to running kernels rather than compiling them.

Triton's JIT looks a compiled kernel up on disk under a hash of: Triton's own build (its Python
sources and `libtriton.so`), the kernel's source and line, the launch's specialisation (argument
types, pointer alignment, integers equal to 1 or divisible by 16, constexpr values), the compile
options (warps, stages, register cap, target sm_90) and ptxas's version. Nothing of the GPU
itself is in it, so a kernel compiled here by the same Triton wheel is found there. Where the
machine's Triton differs (another build), nothing is found and the JIT compiles as before.

Steps (bench/device/prepare.sh runs `compile`, bench/device/run.sh `unpack`; `record` is rare):
  record    `COLBERT_TRITON_RECORD_LAUNCHES=F pytest -p warm_cache tests` (PYTHONPATH=bench/device)
            on the CPU (Triton's interpreter) appends each distinct launch of the run to F, one
            JSON line each: the kernel's module and name, each argument reduced to what the JIT
            specialises on, the launch options. `python warm_cache.py record-aot F` adds the
            launches of tests/aot_compile.py's cases (the model's shapes and the benchmarks'
            configurations). The result is kept in the repository, bench/device/launches.jsonl
            (recording runs the whole suite: ~25 min with COLBERT_TRITON_MEMCHECK=0 and
            COLBERT_TRITON_SKIP_AOT=1, under which test_memcheck.py fails as it should; then
            `compile F CACHE_DIR --rewrite` below); a launch whose kernel has changed its
            parameters since is reported and skipped, and a launch not recorded compiles on the
            GPU as it always did.
  compile   `python warm_cache.py compile F CACHE_DIR [--jobs N] [--binaries-only] [--rewrite]`, without
            TRITON_INTERPRET, in the Python and Triton of the GPU machine (prepare.sh makes a venv
            of them): every recorded launch goes through Triton's own JIT binder
            (`JITFunction.warmup`) with a driver that only names the sm_90 target, so the JIT
            specialises and compiles exactly as it would there and writes the kernel to CACHE_DIR
            (--binaries-only: the binary and its metadata only, for the carry). KEY.json records
            the build compiled with. Where the carried cache is for another build, run.sh's
            `warm` step runs this on the GPU machine itself, all its cores compiling each variant
            once, before the test workers would compile them, several at once.
            --rewrite keeps one line per compiled kernel in F (a new recording holds many).
  unpack    `python warm_cache.py unpack ARCHIVE CACHE_DIR` on the GPU machine: the packed cache
            put in place, and whether this Triton is the build it was compiled with (else the
            JIT finds nothing and compiles as it would have).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
ARCH = 90  # H100 and H200

# Integer arguments that are not constexpr: Triton keys them only on being 1, divisible by 16, and
# their range (i32 / i64); these stand-ins keep that and let the file hold each variant once.
_I32 = range(-(2**31), 2**31)


def _integer_stand_in(value: int, specialize: bool) -> int:
    base = 0 if value in _I32 else 2**32
    if not specialize:
        return base + 3
    if value == 1:
        return 1
    return base + (16 if value % 16 == 0 else 3)


def _is_constexpr(annotation) -> bool:
    return "constexpr" in str(annotation)  # `from __future__ import annotations` leaves a string


def describe_launch(fn, jit_options: dict, args: tuple, kwargs: dict) -> dict:
    """One launch of the Python function ``fn`` (decorated with ``jit_options``) reduced to what
    Triton's JIT keys its compiled variant on."""
    import inspect

    import torch
    import triton.language as tl

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    no_specialize = set(jit_options.get("do_not_specialize") or ())
    described = {}
    for name, param in params.items():
        if name not in bound:
            continue  # a default: the JIT fills it in the same way
        value = bound[name]
        if isinstance(value, torch.Tensor):
            described[name] = {"tensor": str(value.dtype).removeprefix("torch."),
                               "aligned": value.data_ptr() % 16 == 0}
        elif isinstance(value, bool):
            described[name] = value if _is_constexpr(param.annotation) else False  # i1: not keyed on its value
        elif value is None or isinstance(value, str):
            described[name] = value
        elif isinstance(value, int):
            described[name] = value if _is_constexpr(param.annotation) else _integer_stand_in(
                value, name not in no_specialize)
        elif isinstance(value, float):
            described[name] = value if _is_constexpr(param.annotation) else 0.5
        elif isinstance(value, tl.dtype):
            described[name] = {"tl_dtype": value.name}
        else:
            raise TypeError(f"{fn.__qualname__}: argument {name} of type {type(value).__name__} cannot be recorded")
    options = {k: v for k, v in kwargs.items() if k not in params}
    return {"module": fn.__module__, "kernel": fn.__qualname__, "args": described, "options": options}


# ----------------------------------------------------------------------------------------------
# record: a pytest plugin
# ----------------------------------------------------------------------------------------------

_seen: set[str] = set()


def _append(path: str, launch: dict) -> None:
    line = json.dumps(launch, sort_keys=True)
    if line in _seen:
        return
    _seen.add(line)
    with open(path, "a") as f:  # xdist workers append whole lines
        f.write(line + "\n")


def pytest_configure(config):
    path = os.environ.get("COLBERT_TRITON_RECORD_LAUNCHES")
    if not path or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recorded_run(self, *args, grid, warmup, **kwargs):
        if "<locals>" not in self.fn.__qualname__:  # a kernel defined in a function cannot be imported
            try:
                _append(path, describe_launch(self.fn, self.kwargs, args, kwargs))
            except TypeError as error:  # not recorded; the GPU compiles it as before
                warnings.warn(f"warm_cache: {error}", stacklevel=2)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded_run


def record_aot(path: str) -> None:
    """The launches of every case in tests/aot_compile.py (as `compile_case` makes them for sm_90)."""
    sys.path[:0] = [str(_ROOT / "src"), str(_ROOT / "tests")]
    os.environ.pop("TRITON_INTERPRET", None)
    import aot_compile

    for case in aot_compile.CASES:
        for recorder in aot_compile.record_case(case, ARCH).values():
            kernel = recorder.kernel
            while isinstance(kernel, aot_compile._Recorder):  # an earlier case's, still in place
                kernel = kernel.kernel
            for args, kwargs in recorder.launches:
                _append(path, describe_launch(kernel.fn, {"do_not_specialize": kernel.do_not_specialize},
                                              args, kwargs))


# ----------------------------------------------------------------------------------------------
# compile: through Triton's JIT, for sm_90, without a GPU
# ----------------------------------------------------------------------------------------------

class _Pointer:
    """A tensor as the JIT's specialisation sees it: a dtype and an address (16-byte aligned or not)."""

    def __init__(self, dtype, aligned: bool):
        self.dtype, self._address = dtype, 0 if aligned else 2

    def data_ptr(self) -> int:
        return self._address


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


class _CompileOnlyDriver:
    """Names the GPU compiled for; the JIT asks nothing else of a driver before launching, and a
    warm-up does not launch."""

    def __init__(self, arch: int):
        self.target = _target(arch)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def build_key() -> dict:
    """What of this machine enters every cache key but the kernel's own: Triton's build (its
    sources and libtriton.so), the CUDA backend (ptxas's version, the target) and the
    environment variables Triton counts. Compare it with the GPU machine's."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import triton_key

    return {"triton": triton.__version__, "build": hashlib.sha256(triton_key().encode()).hexdigest(),
            "backend": make_backend(_target(ARCH)).hash(),
            "environment": get_cache_invalidating_env_vars()}


def _argument(value):
    """A recorded argument as the JIT's specialisation sees it."""
    import torch
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        return _Pointer(getattr(torch, value["tensor"]), value["aligned"])
    if isinstance(value, dict):
        return tl.dtype(value["tl_dtype"])
    return value


def _compile_one(launch: dict) -> tuple[str | None, str | None]:
    """Compile one recorded launch into the cache: (the compiled kernel's cache key, None), or
    (None, why it was skipped)."""
    from triton.runtime.jit import JITFunction

    try:
        kernel = importlib.import_module(launch["module"])
        for part in launch["kernel"].split("."):
            kernel = getattr(kernel, part)
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # under @triton.autotune / @triton.heuristics: the launch names its config
        args = {name: _argument(value) for name, value in launch["args"].items()}
        unknown = set(args) - set(kernel.arg_names)
        if unknown:
            raise TypeError(f"no parameter(s) {sorted(unknown)}")
        return kernel.warmup(grid=(1,), **args, **launch["options"]).hash, None
    except Exception as error:  # noqa: BLE001 (a stale or unloadable record: the GPU compiles it as before)
        return None, f"{launch['module']}.{launch['kernel']}: {type(error).__name__}: {error}"[:300]


def _start_compiling(cache_dir: str, binaries_only: bool) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, also where tests/conftest.py is imported
    os.environ["TRITON_CACHE_DIR"] = str(Path(cache_dir).resolve())
    if binaries_only:  # not in the cache key; a cache hit reads only the metadata and the binary
        os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    sys.path[:0] = [str(_ROOT / "src"), str(_ROOT / "tests")]
    from triton.runtime import driver

    driver.set_active(_CompileOnlyDriver(ARCH))


def compile_launches(launches_path: str, cache_dir: str, jobs: int = 1, *, binaries_only: bool = False,
                     rewrite: bool = False) -> int:
    """Compile every launch recorded in ``launches_path`` into ``cache_dir`` (``jobs`` processes)
    and write KEY.json. ``binaries_only``: keep only what a cache hit reads (the metadata and the
    binary, not the IR: a fifth of the size, for the carry). ``rewrite``: keep in
    ``launches_path`` one launch per compiled kernel (a new recording holds many of each)."""
    launches = [json.loads(line) for line in Path(launches_path).read_text().splitlines() if line.strip()]
    started = time.time()
    if jobs <= 1:
        _start_compiling(cache_dir, binaries_only)
        results = list(map(_compile_one, launches))
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs, _start_compiling, (cache_dir, binaries_only)) as pool:
            results = pool.map(_compile_one, launches, chunksize=4)
    skipped = [reason for _, reason in results if reason]
    for reason in sorted(set(skipped)):
        print(f"warm_cache: skipped {reason}", file=sys.stderr)
    for group in Path(cache_dir).glob("*/__grp__*.json") if binaries_only else ():  # also the Triton IR
        files = json.loads(group.read_text())
        kept = {name: path for name, path in files["child_paths"].items() if name.endswith((".json", ".cubin"))}
        for name in set(files["child_paths"]) - set(kept):
            Path(files["child_paths"][name]).unlink(missing_ok=True)
        group.write_text(json.dumps({"child_paths": kept}))
    Path(cache_dir, "KEY.json").write_text(json.dumps(build_key(), indent=1) + "\n")
    kernels = sum(1 for _ in Path(cache_dir).glob("*/*.cubin"))
    print(f"warm_cache: {len(launches) - len(skipped)} of {len(launches)} recorded launches compiled or found, "
          f"{len(skipped)} skipped (why: above), {time.time() - started:.0f} s; {kernels} kernels in {cache_dir}")
    if rewrite:
        first = {}
        for launch, (key, _) in zip(launches, results):
            if key is not None:
                first.setdefault(key, launch)
        Path(launches_path).write_text("".join(json.dumps(launch, sort_keys=True) + "\n" for launch in first.values()))
    return 0


def unpack(archive: str, cache_dir: str) -> int:
    """On the GPU machine: unpack the cache into ``cache_dir`` (Triton's groups name their files
    by absolute path: pointed at their new place) and say whether this Triton will find it
    (0: its build is the one compiled with)."""
    import tarfile

    cache = Path(cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    for group in cache.glob("*/__grp__*.json"):
        files = json.loads(group.read_text())["child_paths"]
        group.write_text(json.dumps({"child_paths": {name: str(group.parent / Path(path).name)
                                                     for name, path in files.items()}}))
    recorded = json.loads((cache / "KEY.json").read_text())
    here = build_key()
    differs = [k for k in recorded if recorded[k] != here.get(k)]
    count = sum(1 for _ in cache.glob("*/*.cubin"))
    if differs:
        print(f"warm_cache: the carried compile cache ({count} kernels) will not be found: this machine's "
              + "; ".join(f"{k} is {here.get(k)!r}, compiled with {recorded[k]!r}" for k in differs))
        return 1
    print(f"warm_cache: the carried compile cache ({count} kernels) matches this Triton ({here['triton']})")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("record-aot", help="add tests/aot_compile.py's launches to LAUNCHES")
    command.add_argument("launches")
    command = commands.add_parser("compile", help="compile LAUNCHES into CACHE_DIR for sm_90")
    command.add_argument("launches")
    command.add_argument("cache_dir")
    command.add_argument("--jobs", type=int, default=1)
    command.add_argument("--binaries-only", action="store_true", help="keep only what a cache hit reads")
    command.add_argument("--rewrite", action="store_true", help="keep one launch per kernel in LAUNCHES")
    command = commands.add_parser("unpack", help="on the GPU machine: ARCHIVE into CACHE_DIR, and check it")
    command.add_argument("archive")
    command.add_argument("cache_dir")
    args = parser.parse_args(argv)
    if args.command == "record-aot":
        record_aot(args.launches)
        return 0
    if args.command == "compile":
        return compile_launches(args.launches, args.cache_dir, args.jobs, binaries_only=args.binaries_only,
                                rewrite=args.rewrite)
    return unpack(args.archive, args.cache_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
