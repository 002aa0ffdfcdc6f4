"""GPU validity without a GPU: compile every kernel launch a launcher makes, for sm_90 or another GPU.

The Triton interpreter enforces no GPU limit (tl.dot tiles >= 16, power-of-two aranges, shared
memory, registers). Here each launcher is called on CPU tensors of the model's shapes with its
kernels swapped for a recorder, and every recorded launch is compiled by Triton's own pipeline
(ptxas included) with the specialisation the JIT would use; cuobjdump reports the spills.

Run as a script in a fresh process without TRITON_INTERPRET, so the kernels are real
JITFunctions: ``python tests/aot_compile.py CASE [ARCH]`` prints one JSON line per launch
(ARCH: the compute capability compiled for, 90 by default). `compile_case(CASE, ARCH)` does
that from a test and returns the parsed lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Shared memory a block may use (bytes, opt-in) by compute capability: the budget the launchers
# read from the device (kernels/_device.py), given here for the GPU compiled for.
SHARED_MEMORY = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# The GPUs besides sm_90 whose launches must fit: a T4, an A100, an RTX 30/A10 (sm_89 has the
# same budget), a B200 and an RTX 50.
OTHER_GPUS = (75, 80, 86, 100, 120)


def compile_case(case: str, arch: int = 90) -> list[dict]:
    if os.environ.get("COLBERT_TRITON_SKIP_AOT") == "1":
        # bench/device/run.sh: CI's compiler gives the same answers, and device time is short.
        pytest.skip("ahead-of-time compile checks off (COLBERT_TRITON_SKIP_AOT=1): CI runs them")
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton.runtime.jit

    if not hasattr(triton.runtime.jit, "native_specialize_impl"):  # how `specialization` keys
        pytest.skip("the ahead-of-time compile checks need Triton >= 3.6 (native_specialize_impl)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A cache of its own: the one bench/device/run.sh unpacks holds binaries only, no PTX to read.
    env["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "colbert-triton-aot-cache")
    done = subprocess.run([sys.executable, str(Path(__file__)), case, str(arch)], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas for the CUDA backend on this machine")
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


class _Recorder:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _record(targets):
    recorders = {}
    for module, name in targets:
        recorders[name] = _Recorder(getattr(module, name))
        setattr(module, name, recorders[name])
    return recorders


def _zeros(*shape, dtype):
    import torch

    return torch.zeros(*shape, dtype=dtype)


def _encoder_case():
    import torch

    from colbert_triton.kernels import attention, embedding, head, linear

    recorders = _record([(attention, "_varlen_attention_kernel"), (embedding, "_embed_layernorm_kernel"),
                         (head, "_project_normalize_kernel"), (linear, "_linear_kernel"),
                         (linear, "_linear_residual_layernorm_kernel"),
                         (linear, "_bias_residual_layernorm_kernel"), (linear, "_bias_activation_kernel")])
    r = _zeros
    T, H = 256, 384
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        ids = torch.zeros(T, dtype=torch.int64)
        embedding.embed_layernorm(ids, ids, r(30522, H, dtype=dt), r(512, H, dtype=dt), r(H, dtype=dt),
                                  r(H, dtype=dt), r(H, dtype=dt), 1e-12)
        for n, k, act in [(3 * H, H, None), (1536, H, "gelu")]:
            linear.linear(r(T, k, dtype=dt), r(n, k, dtype=dt), r(n, dtype=dt), act)
        for k in (H, 1536):
            linear.linear_residual_layernorm(r(T, k, dtype=dt), r(H, k, dtype=dt), r(H, dtype=dt),
                                             r(T, H, dtype=dt), r(H, dtype=dt), r(H, dtype=dt), 1e-12)
        linear.bias_residual_layernorm(r(T, H, dtype=dt), r(H, dtype=dt), r(T, H, dtype=dt),
                                       r(H, dtype=dt), r(H, dtype=dt), 1e-12)
        for max_len in (32, 300):  # both tile configs; the lengths only need to be well formed
            attention.varlen_attention(r(T, 3 * H, dtype=dt), cu, cu[1:] - cu[:-1], max_len, 12, 32,
                                       check_lengths=False)
            # The model's path: the host-built tile table.
            block_m = attention.attention_config(32, max_len, dt)["BLOCK_M"]
            table = torch.from_numpy(attention.attention_tile_table([100, 156], [100, 156], block_m))
            attention.varlen_attention(r(T, 3 * H, dtype=dt), cu, cu[1:] - cu[:-1], max_len, 12, 32,
                                       tiles=attention.AttentionTiles(table, block_m), check_lengths=False)
        attention.varlen_attention(r(T, 3 * 768, dtype=dt), cu, cu[1:] - cu[:-1], 300, 12, 64)
        for d in (96, 128):
            head.project_normalize(r(T, H, dtype=dt), r(d, H, dtype=dt), None, torch.arange(T))
    dt = torch.float16
    linear.linear(r(T, H, dtype=dt), r(1536, H, dtype=dt), r(1536, dtype=dt), "gelu", backend="torch")
    for hidden in (768, 1024):  # BERT-base and BERT-large checkpoints
        linear.linear_residual_layernorm(r(T, 4 * hidden, dtype=dt), r(hidden, 4 * hidden, dtype=dt),
                                         r(hidden, dtype=dt), r(T, hidden, dtype=dt), r(hidden, dtype=dt),
                                         r(hidden, dtype=dt), 1e-12)
    attention.varlen_attention(r(T, 3 * 1536, dtype=dt), cu, cu[1:] - cu[:-1], 300, 12, 128)
    return recorders


def _fused_layernorm_case():
    """The encoder's LayerNorm-fused GEMMs (hidden 384, 768, 1024; K = hidden and 4 x hidden) in
    16-bit and fp32, with their tiles sized for the GPU compiled for; where none fit, the unfused
    path's launches."""
    import torch

    from colbert_triton.kernels import linear

    recorders = _record([(linear, "_linear_residual_layernorm_kernel"), (linear, "_linear_kernel"),
                         (linear, "_bias_residual_layernorm_kernel")])
    rows = 256
    for dt in (torch.float16, torch.float32):  # bfloat16 takes float16's tiles
        for hidden in (384, 768, 1024):
            for k in (hidden, 4 * hidden):
                linear.linear_residual_layernorm(_zeros(rows, k, dtype=dt), _zeros(hidden, k, dtype=dt),
                                                 _zeros(hidden, dtype=dt), _zeros(rows, hidden, dtype=dt),
                                                 _zeros(hidden, dtype=dt), _zeros(hidden, dtype=dt), 1e-12)
    return recorders


def _maxsim_case():
    import torch

    from colbert_triton.kernels import maxsim as maxsim_mod

    recorders = _record([(maxsim_mod, "_maxsim_kernel")])
    # The launcher accepts CPU tensors only for the interpreter; the kernel is already a real
    # JITFunction (decorated before this line), so claiming the interpreter here only lets the
    # launcher run its host code on CPU tensors for the recorder.
    os.environ["TRITON_INTERPRET"] = "1"
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for d in (96, 128):
            docs = _zeros(4000, d, dtype=dt)
            starts = torch.arange(10) * 300
            lengths = torch.full((10,), 300)
            for num_queries, query_len in ((1, 32), (8, 32), (64, 32), (4, 300)):
                queries = _zeros(num_queries, query_len, d, dtype=dt)
                maxsim_mod.maxsim(queries, docs, starts, lengths)
            queries = _zeros(64, 32, d, dtype=dt)
            cand = torch.arange(64 * 5).view(64, 5) % 10
            maxsim_mod.maxsim(queries, docs, starts[cand], lengths[cand],
                              pad_floor=torch.zeros(64, 5, dtype=torch.bool))
    return recorders


def _maxsim_query_registers_case():
    """``q_in_regs`` tiles through the launcher, as a benchmark or a future default would run
    them: the heuristic's many-query tile (64 queries, Lq 32, 16-bit, d 96 and 128) with the
    switch on, and 128 rows on one warpgroup (d 96 under a 168-register cap), on the flat and
    the per-document loop; and a 300-token query (two 256-row chunks, each reloaded)."""
    import torch

    from colbert_triton.kernels import maxsim as maxsim_mod

    recorders = _record([(maxsim_mod, "_maxsim_kernel")])
    os.environ["TRITON_INTERPRET"] = "1"  # host code on CPU tensors, as in _maxsim_case
    for dt in (torch.float16, torch.bfloat16):
        for d in (96, 128):
            docs = _zeros(4000, d, dtype=dt)
            starts, lengths = torch.arange(10) * 300, torch.full((10,), 300)
            queries = _zeros(64, 32, d, dtype=dt)
            out = torch.empty(64, 10)
            heuristic = maxsim_mod._kernel_config(dt, d, 32, 64)._replace(q_in_regs=True)
            one_warpgroup = heuristic._replace(qb=4, num_warps=4, maxnreg=168 if d <= 96 else None)
            for cfg in (heuristic, one_warpgroup):
                for flat in (True, False):
                    maxsim_mod._launch(queries, docs, starts, lengths, None, out, cfg._replace(flat=flat))
            if dt == torch.float16 and d == 96:  # a long query: its chunks reloaded in the loops
                long_queries = _zeros(4, 300, d, dtype=dt)
                cfg = maxsim_mod._kernel_config(dt, d, 300, 4)._replace(q_in_regs=True)
                for flat in (True, False):
                    maxsim_mod._launch(long_queries, docs, starts, lengths, None, torch.empty(4, 10),
                                       cfg._replace(flat=flat))
    return recorders


def _maxsim_counts_case():
    """One model's MaxSim calls with other query counts, document counts and lengths: they must
    all share the specialisation of their mode (shared documents, candidates)."""
    import torch

    from colbert_triton.kernels import maxsim as maxsim_mod

    recorders = _record([(maxsim_mod, "_maxsim_kernel")])
    os.environ["TRITON_INTERPRET"] = "1"  # host code on CPU tensors, as in _maxsim_case
    docs = _zeros(20_000, 96, dtype=torch.float16)
    for num_queries, lengths, candidates in [(16, [30, 300, 7], None), (16, list(range(1, 12)), None),
                                             (40, [299] * 33, None), (9, [64] * 16 + [0], None),
                                             (3, [30, 5], 4), (5, [30, 5, 9], 17), (1000, [3] * 5, 1)]:
        lengths = torch.tensor(lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        queries = _zeros(num_queries, 32, 96, dtype=torch.float16)
        if candidates is not None:
            pick = torch.arange(num_queries * candidates).view(num_queries, candidates) % len(lengths)
            starts, lengths = starts[pick], lengths[pick]
        maxsim_mod.maxsim(queries, docs, starts, lengths)
    return recorders


def _encoder_batches_case():
    """One layer's launches for batches of other sizes and lengths: per kernel, only the
    attention's two tile buckets (queries <= 64 tokens, documents) may differ."""
    import numpy as np
    import torch

    from colbert_triton.kernels import attention, head, linear

    recorders = _record([(attention, "_varlen_attention_kernel"), (head, "_project_normalize_kernel"),
                         (linear, "_linear_kernel")])
    hidden, dt = 384, torch.float16
    for lengths in ([32, 32], [300, 41, 120], [77], [90] * 16, [1], [32] * 33, [200, 512, 3, 7, 65]):
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        tokens = int(cu[-1])
        qkv = linear.linear(_zeros(tokens, hidden, dtype=dt), _zeros(3 * hidden, hidden, dtype=dt),
                            _zeros(3 * hidden, dtype=dt))
        ctx = attention.varlen_attention(qkv, cu, cu[1:] - cu[:-1], max(lengths), 12, 32)
        head.project_normalize(ctx, _zeros(96, hidden, dtype=dt), None, torch.arange(0, tokens, 2))
    return recorders


def _pooling_case():
    """Token pooling's three kernels for documents of 16 to 512 pooled rows (every BLOCK_N), in
    each input dtype, at d 96 and 128."""
    import numpy as np
    import torch

    from colbert_triton.kernels import pooling

    recorders = _record([(pooling, "_cosine_distance_kernel"), (pooling, "_ward_clusters_kernel"),
                         (pooling, "_cluster_means_kernel")])
    os.environ["TRITON_INTERPRET"] = "1"  # the launcher's host code on CPU tensors, as in _maxsim_case
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for d in (96, 128):
            for longest in (17, 300, 513):
                lengths = np.array([longest, 5, 40])
                pooling.pool_documents(_zeros(int(lengths.sum()), d, dtype=dt), lengths, 2, 1)
    return recorders


CASES = {"encoder": _encoder_case, "pooling": _pooling_case, "fused-layernorm": _fused_layernorm_case, "maxsim": _maxsim_case, "maxsim-counts": _maxsim_counts_case,
         "maxsim-query-registers": _maxsim_query_registers_case, "encoder-batches": _encoder_batches_case}


def specialization(kernel, args, kwargs):
    """What Triton's JIT keys a launch's compiled variant on: (signature, constexprs, attrs, options)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion") if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", key
            continue
        signature[param.name] = kind
        if key == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return values, signature, constexprs, attrs, options


def record_case(case: str, arch: int = 90) -> dict:
    """The case's launches, kernel by kernel, as its launchers make them for the GPU ``arch``."""
    from colbert_triton.kernels import linear, maxsim

    linear.shared_memory_limit = maxsim.shared_memory_limit = lambda device: SHARED_MEMORY[arch]
    return CASES[case]()


def main(case: str, arch: int = 90) -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    recorders = record_case(case, arch)
    if case in ("maxsim-counts", "encoder-batches"):  # specialisations only, nothing compiled
        for name, recorder in recorders.items():
            for args, kwargs in recorder.launches:
                _, signature, constexprs, attrs, options = specialization(recorder.kernel, args, kwargs)
                print(json.dumps({"kernel": name, "key": repr((signature, constexprs, sorted(attrs.items()),
                                                               options))}))
        return
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    for name, recorder in recorders.items():
        kernel = recorder.kernel
        for args, kwargs in recorder.launches:
            values, signature, constexprs, attrs, options = specialization(kernel, args, kwargs)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options)
            stack = registers = None
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                    f.write(compiled.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                os.unlink(f.name)
                match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
                stack = int(match.group(2)) if match else None
                registers = int(match.group(1)) if match else None
            # wgmma instructions by tile width N, and whether the A operand is a register list
            # or a shared-memory descriptor: "{acc...}, {a...}, desc_b" vs "{acc...}, desc_a, desc_b".
            wgmma = {}
            for n, register_a in re.findall(r"wgmma\.mma_async\.\S*\.m64n(\d+)k\d+\S* (\{[^}]*\}, \{)?",
                                            compiled.asm["ptx"]):
                key = f"n{n} {'registers' if register_a else 'shared'}"
                wgmma[key] = wgmma.get(key, 0) + 1
            config = {k: v for k, v in constexprs.items() if k.isupper()}
            dtype = next(v.dtype for v in values.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
            print(json.dumps({"kernel": name, "dtype": str(dtype), "config": {**config, **options},
                              "shared": compiled.metadata.shared, "registers": registers,
                              "spill_bytes": stack, "wgmma": wgmma}, default=str))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
