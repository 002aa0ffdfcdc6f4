"""Input validation of the encoder kernel launchers, and the valid edge inputs next to it.

The project's rule: bad input gets a clear error that says what was wrong, never a crash deep in
a kernel, a silent wrong answer or a NaN. Each launcher of
`colbert_triton.kernels.{attention,linear,embedding,head}` gets a table of bad inputs, one defect
per row (the table's base arguments are valid, see `test_base_arguments_are_valid`), each of
which must raise a ``ValueError`` whose message names the defect before any kernel runs. The
branches `tests/test_encoder_kernels.py::test_validation_errors` already covers are not repeated.

The second half runs inputs that are valid but sit at an edge no other test reaches (an empty
batch, one row, GELU without a bias, fp32 parameters with fp16 activations, head widths of 1,
300 and 1024) against a float64 reference, writing into NaN-poisoned outputs with a guard band
(conftest.poisoned), so an unwritten element or a store past the end fails.

Everything is small: without CUDA the kernels run on Triton's CPU interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE, poisoned, randn

from colbert_triton.kernels.attention import (
    AttentionTiles,
    attention_config,
    attention_tile_table,
    varlen_attention,
)
from colbert_triton.kernels.embedding import embed_layernorm
from colbert_triton.kernels.head import project_normalize
from colbert_triton.kernels.linear import (
    bias_residual_layernorm,
    layernorm,
    linear,
    linear_residual_layernorm,
)

DEVICE = KERNEL_DEVICE
# A device the inputs are not on: the launchers must name the mismatch, not launch on it.
OTHER_DEVICE = "meta" if DEVICE == "cpu" else "cpu"
EPS = 1e-12
F16, F32 = torch.float16, torch.float32
# Max-abs error against the fp64 reference for O(1) outputs (as in test_encoder_kernels.py).
ATOL = {F32: 2e-5, F16: 1.5e-2}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _zeros(*shape, dtype=F32, device=DEVICE):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _ints(values, dtype=torch.int64, device=DEVICE):
    return torch.tensor(values, dtype=dtype, device=device)


def _every_other_column(t: torch.Tensor) -> torch.Tensor:
    """The same values with column stride 2: a valid shape whose layout the kernels cannot read."""
    wide = t.new_zeros(t.shape[0], 2 * t.shape[1])
    wide[:, ::2] = t
    return wide[:, ::2]


def _every_other_element(t: torch.Tensor) -> torch.Tensor:
    """The same 1-D values with stride 2 (not contiguous)."""
    wide = t.new_zeros(2 * t.shape[0])
    wide[::2] = t
    return wide[::2]


def _f64(t):
    return None if t is None else t.double().cpu()


def _assert_matches(got, expected, atol, out=None):
    """``got`` is ``out`` when one was given, finite, and within ``atol`` of the fp64 reference."""
    if out is not None:
        assert got is out, "the launcher did not return the out= buffer"
    assert tuple(got.shape) == tuple(expected.shape), (tuple(got.shape), tuple(expected.shape))
    assert torch.isfinite(got).all(), "non-finite values (an element left unwritten?)"
    if got.numel():
        err = (got.double().cpu() - expected).abs().max().item()
        assert err <= atol, f"max abs error {err:.3g} > {atol:.3g}"


def _reject(launcher, base_args: dict, changes, match: str):
    """Call ``launcher`` with one defect applied to valid arguments: it must raise a ValueError
    naming the defect (the launcher's name first, so a caller knows which op refused)."""
    args = dict(base_args)
    args.update(changes(base_args))
    with pytest.raises(ValueError, match=f"^{launcher.__name__}: .*{match}"):
        launcher(**args)


# --------------------------------------------------------------------------------------------
# Bad inputs: varlen_attention
# --------------------------------------------------------------------------------------------


def _attention_args():
    """Two sequences (4 and 6 tokens), 2 heads of 32, fp32: valid, and with a tile table."""
    block_m = attention_config(32, 6, F32)["BLOCK_M"]
    table = torch.from_numpy(attention_tile_table([4, 6], [4, 6], block_m)).to(DEVICE)
    return {
        "qkv": _zeros(10, 3 * 64), "cu_seqlens": _ints([0, 4, 10], torch.int32),
        "key_lens": _ints([4, 6], torch.int32), "max_seqlen": 6, "num_heads": 2, "head_dim": 32,
        "out": _zeros(10, 64), "tiles": AttentionTiles(table, block_m),
    }


def _table(args, table):
    """The changes that swap the valid tile table for ``table`` (the table's own checks)."""
    return {"tiles": args["tiles"]._replace(table=table)}


ATTENTION_BAD_INPUTS = {  # case: (the defect, applied to _attention_args(), what the message says)
    "qkv 1-D": (lambda a: {"qkv": a["qkv"][0]}, r"qkv must be a 2-D tensor \[T, 3 \* hidden\]"),
    "qkv a list": (lambda a: {"qkv": a["qkv"].tolist()}, "qkv must be a 2-D tensor"),
    "qkv float64": (lambda a: {"qkv": a["qkv"].double()}, "qkv dtype torch.float64 is not float16"),
    "qkv int32": (lambda a: {"qkv": a["qkv"].int()}, "qkv dtype torch.int32 is not float16"),
    "qkv column stride 2": (lambda a: {"qkv": _every_other_column(a["qkv"])},
                            "qkv needs unit stride along columns"),
    "num_heads 0": (lambda a: {"num_heads": 0}, "num_heads must be a positive int, got 0"),
    "num_heads negative": (lambda a: {"num_heads": -2}, "num_heads must be a positive int, got -2"),
    "num_heads float": (lambda a: {"num_heads": 2.0}, "num_heads must be a host int, got float"),
    "num_heads str": (lambda a: {"num_heads": "2"}, "num_heads must be a host int, got str"),
    "num_heads bool": (lambda a: {"num_heads": True}, "num_heads must be a host int, got bool"),
    "key_lens int64": (lambda a: {"key_lens": a["key_lens"].long()}, "key_lens must be a 1-D int32 tensor"),
    "key_lens 2-D": (lambda a: {"key_lens": a["key_lens"][None]}, "key_lens must be a 1-D int32 tensor"),
    "cu_seqlens a list": (lambda a: {"cu_seqlens": [0, 4, 10]}, "cu_seqlens must be a 1-D int32 tensor"),
    "cu_seqlens elsewhere": (lambda a: {"cu_seqlens": a["cu_seqlens"].to(OTHER_DEVICE)},
                             f"cu_seqlens is on {OTHER_DEVICE}, qkv on"),
    "key_lens elsewhere": (lambda a: {"key_lens": a["key_lens"].to(OTHER_DEVICE)},
                           f"key_lens is on {OTHER_DEVICE}, qkv on"),
    "cu_seqlens strided": (lambda a: {"cu_seqlens": _every_other_element(a["cu_seqlens"])},
                           "cu_seqlens must be contiguous"),
    "key_lens strided": (lambda a: {"key_lens": _every_other_element(a["key_lens"])},
                         "key_lens must be contiguous"),
    # bool is an int subclass: True would silently mean a max_seqlen of 1.
    "max_seqlen bool": (lambda a: {"max_seqlen": True}, "max_seqlen must be a host int"),
    "max_seqlen float": (lambda a: {"max_seqlen": 6.0}, "max_seqlen must be a host int"),
    "max_seqlen negative": (lambda a: {"max_seqlen": -1}, "max_seqlen must be >= 0, got -1"),
    # 0 would pick the short-sequence blocks and a grid of no tiles: the output left unwritten.
    "max_seqlen 0 with tokens": (lambda a: {"max_seqlen": 0, "tiles": None},
                                 "qkv has 10 rows but max_seqlen is 0"),
    "out wrong width": (lambda a: {"out": a["out"][:, :63]},
                        r"out must have shape \(10, 64\), got \(10, 63\)"),
    "out wrong rows": (lambda a: {"out": a["out"][:9]}, r"out must have shape \(10, 64\), got \(9, 64\)"),
    "out a list": (lambda a: {"out": a["out"].tolist()}, r"out must have shape \(10, 64\), got \(\)"),
    "out elsewhere": (lambda a: {"out": a["out"].to(OTHER_DEVICE)}, f"out is on {OTHER_DEVICE}, qkv on"),
    "out column stride 2": (lambda a: {"out": _every_other_column(a["out"])},
                            "out needs unit stride along columns"),
    "tiles a plain tuple": (lambda a: {"tiles": tuple(a["tiles"])}, "tiles must be an AttentionTiles"),
    "tiles a tensor": (lambda a: {"tiles": a["tiles"].table}, "tiles must be an AttentionTiles"),
    "tile table int64": (lambda a: _table(a, a["tiles"].table.long()),
                         r"tiles.table must be a contiguous \[num_tiles, 4\] int32 tensor"),
    "tile table 3 columns": (lambda a: _table(a, a["tiles"].table[:, :3].contiguous()),
                             r"tiles.table must be a contiguous \[num_tiles, 4\] int32 tensor"),
    "tile table 1-D": (lambda a: _table(a, a["tiles"].table.flatten()),
                       r"tiles.table must be a contiguous \[num_tiles, 4\] int32 tensor"),
    "tile table strided": (lambda a: _table(a, _every_other_column(a["tiles"].table)),
                           r"tiles.table must be a contiguous \[num_tiles, 4\] int32 tensor"),
    "tile table elsewhere": (lambda a: _table(a, a["tiles"].table.to(OTHER_DEVICE)),
                             f"tiles.table is on {OTHER_DEVICE}, qkv on"),
}


def test_varlen_attention_rejects_a_numpy_tile_table():
    """attention_tile_table returns a NumPy array; passed on unconverted it once crashed with an
    AttributeError inside the launcher."""
    args = _attention_args()
    numpy_table = attention_tile_table([4, 6], [4, 6], args["tiles"].block_m)
    with pytest.raises(ValueError, match="tiles.table must be"):
        varlen_attention(**{**args, "tiles": AttentionTiles(numpy_table, args["tiles"].block_m)})


@pytest.mark.parametrize("with_out", [False, True], ids=["no-out", "out"])
def test_varlen_attention_rejects_a_float_head_dim(with_out):
    """hidden / num_heads is a float equal to a supported size (32.0 == 32): it once passed the
    check and failed in torch.empty or in the kernel build."""
    args = _attention_args()
    if not with_out:
        args["out"] = None
    with pytest.raises(ValueError, match="head_dim"):
        varlen_attention(**{**args, "head_dim": 32.0, "tiles": None})


# --------------------------------------------------------------------------------------------
# Bad inputs: linear, linear_residual_layernorm, bias_residual_layernorm, layernorm
# --------------------------------------------------------------------------------------------


def _linear_args():
    return {"x": _zeros(4, 32), "weight": _zeros(16, 32), "bias": _zeros(16), "out": _zeros(4, 16)}


LINEAR_BAD_INPUTS = {  # case: (the defect, applied to _linear_args(), what the message says)
    "x a list": (lambda a: {"x": a["x"].tolist()}, "x must be a 2-D tensor, got list"),
    "weight 1-D": (lambda a: {"weight": a["weight"][0]},
                   r"weight must be a 2-D tensor, got tensor of shape \(32,\)"),
    "weight elsewhere": (lambda a: {"weight": a["weight"].to(OTHER_DEVICE)},
                         f"weight is on {OTHER_DEVICE}, the activations on"),
    "weight column stride 2": (lambda a: {"weight": _every_other_column(a["weight"])},
                               "weight needs unit stride along its last dimension"),
    # _check_vector, one branch each.
    "bias 2-D": (lambda a: {"bias": a["bias"][None]},
                 r"bias must be a 1-D tensor, got tensor of shape \(1, 16\)"),
    "bias a list": (lambda a: {"bias": a["bias"].tolist()}, "bias must be a 1-D tensor, got list"),
    "bias int64": (lambda a: {"bias": a["bias"].long()},
                   "bias dtype torch.int64 is not float16, bfloat16 or float32"),
    "bias elsewhere": (lambda a: {"bias": a["bias"].to(OTHER_DEVICE)},
                       f"bias is on {OTHER_DEVICE}, the activations on"),
    "bias strided": (lambda a: {"bias": _every_other_element(a["bias"])}, "bias must be contiguous"),
    "backend argument": (lambda a: {"backend": "cublas"},
                         r"unknown GEMM backend 'cublas': expected one of \('triton', 'torch'\)"),
    "out a list": (lambda a: {"out": a["out"].tolist()}, "out must be a 2-D tensor, got list"),
    "out wrong width": (lambda a: {"out": _zeros(4, 15)}, "out has 15 columns, expected 16"),
    "out float16": (lambda a: {"out": a["out"].half()},
                    "out dtype torch.float16 differs from the activations'"),
    "out column stride 2": (lambda a: {"out": _every_other_column(a["out"])},
                            "out needs unit stride along its last dimension"),
}


def _linear_residual_layernorm_args():
    return {"x": _zeros(4, 32), "weight": _zeros(16, 32), "bias": _zeros(16), "residual": _zeros(4, 16),
            "ln_weight": _zeros(16), "ln_bias": _zeros(16), "eps": EPS, "out": _zeros(4, 16)}


LINEAR_RESIDUAL_LAYERNORM_BAD_INPUTS = {
    "bias missing": (lambda a: {"bias": None}, "bias must be a 1-D tensor, got NoneType"),
    "residual float16": (lambda a: {"residual": a["residual"].half()},
                         "residual dtype torch.float16 differs from the activations' torch.float32"),
    "residual elsewhere": (lambda a: {"residual": a["residual"].to(OTHER_DEVICE)},
                           f"residual is on {OTHER_DEVICE}, the activations on"),
    "residual wrong width": (lambda a: {"residual": _zeros(4, 8)}, "residual has 8 columns, expected 16"),
    "residual column stride 2": (lambda a: {"residual": _every_other_column(a["residual"])},
                                 "residual needs unit stride along its last dimension"),
    "ln_weight int32": (lambda a: {"ln_weight": a["ln_weight"].int()},
                        "ln_weight dtype torch.int32 is not float16"),
    "ln_weight elsewhere": (lambda a: {"ln_weight": a["ln_weight"].to(OTHER_DEVICE)},
                            f"ln_weight is on {OTHER_DEVICE}"),
    "ln_bias strided": (lambda a: {"ln_bias": _every_other_element(a["ln_bias"])},
                        "ln_bias must be contiguous"),
    # _check_eps: bool is an int subclass, NaN fails every comparison, a string is no number.
    "eps bool": (lambda a: {"eps": True}, "eps must be a non-negative float, got True"),
    "eps NaN": (lambda a: {"eps": float("nan")}, "eps must be a non-negative float, got nan"),
    "eps str": (lambda a: {"eps": "1e-12"}, "eps must be a non-negative float, got '1e-12'"),
    "eps None": (lambda a: {"eps": None}, "eps must be a non-negative float, got None"),
    "backend argument": (lambda a: {"backend": "cublas"}, "unknown GEMM backend 'cublas'"),
    "out wrong rows": (lambda a: {"out": _zeros(5, 16)}, "out has 5 rows, expected 4"),
}


def _bias_residual_layernorm_args():
    return {"x": _zeros(4, 16), "bias": _zeros(16), "residual": _zeros(4, 16), "ln_weight": _zeros(16),
            "ln_bias": _zeros(16), "eps": EPS, "out": _zeros(4, 16)}


BIAS_RESIDUAL_LAYERNORM_BAD_INPUTS = {
    "x float64": (lambda a: {"x": a["x"].double()}, "x dtype torch.float64 is not float16"),
    "x column stride 2": (lambda a: {"x": _every_other_column(a["x"])}, "x needs unit stride"),
    "bias wrong length": (lambda a: {"bias": _zeros(8)}, "bias has 8 entries, expected 16"),
    "residual float16": (lambda a: {"residual": a["residual"].half()},
                         "residual dtype torch.float16 differs from the activations'"),
    "residual wrong rows": (lambda a: {"residual": _zeros(3, 16)}, "residual has 3 rows, expected 4"),
    "ln_bias elsewhere": (lambda a: {"ln_bias": a["ln_bias"].to(OTHER_DEVICE)},
                          f"ln_bias is on {OTHER_DEVICE}"),
    "eps negative infinity": (lambda a: {"eps": float("-inf")},
                              "eps must be a non-negative float, got -inf"),
    "out float16": (lambda a: {"out": a["out"].half()}, "out dtype torch.float16 differs"),
    "out column stride 2": (lambda a: {"out": _every_other_column(a["out"])}, "out needs unit stride"),
}


@pytest.mark.parametrize("changes, match", [
    (lambda a: {"eps": "1e-12"}, "eps must be a non-negative float, got '1e-12'"),
    (lambda a: {"ln_weight": a["ln_weight"][None]}, "ln_weight must be a 1-D tensor"),
], ids=["eps str", "ln_weight 2-D"])
def test_layernorm_rejects(changes, match):
    # layernorm is bias_residual_layernorm without bias and residual: its errors carry that name.
    args = {"x": _zeros(4, 16), "ln_weight": _zeros(16), "ln_bias": _zeros(16), "eps": EPS}
    args.update(changes(args))
    with pytest.raises(ValueError, match=f"^bias_residual_layernorm: {match}"):
        layernorm(**args)


# --------------------------------------------------------------------------------------------
# Bad inputs: embed_layernorm
# --------------------------------------------------------------------------------------------


def _embedding_args():
    return {"input_ids": _ints([1, 2, 3, 4]), "position_ids": _ints([0, 1, 2, 3]), "word": _zeros(10, 32),
            "position": _zeros(8, 32), "token_type_row": _zeros(32), "ln_weight": _zeros(32),
            "ln_bias": _zeros(32), "eps": EPS, "out": _zeros(4, 32)}


EMBEDDING_BAD_INPUTS = {  # case: (the defect, applied to _embedding_args(), what the message says)
    "word 1-D": (lambda a: {"word": a["word"][0]}, r"word must be a 2-D tensor \[vocab, hidden\]"),
    "word a list": (lambda a: {"word": a["word"].tolist()}, r"word must be a 2-D tensor \[vocab, hidden\]"),
    "word float64": (lambda a: {"word": a["word"].double()},
                     "word dtype torch.float64 is not float16, bfloat16 or float32"),
    "word int64": (lambda a: {"word": a["word"].long()}, "word dtype torch.int64 is not float16"),
    "word column stride 2": (lambda a: {"word": _every_other_column(a["word"])},
                             "word needs unit stride along hidden"),
    "position 1-D": (lambda a: {"position": a["position"][0]},
                     r"position must be a 2-D tensor \[rows, hidden\]"),
    "position float16": (lambda a: {"position": a["position"].half()},
                         "position dtype torch.float16 differs from the word table's torch.float32"),
    "position elsewhere": (lambda a: {"position": a["position"].to(OTHER_DEVICE)},
                           f"position is on {OTHER_DEVICE}, the word table on"),
    "position column stride 2": (lambda a: {"position": _every_other_column(a["position"])},
                                 "position needs unit stride along hidden"),
    "input_ids strided": (lambda a: {"input_ids": _every_other_element(a["input_ids"])},
                          "input_ids must be contiguous"),
    "input_ids a list": (lambda a: {"input_ids": [1, 2, 3, 4]}, "input_ids must be a 1-D int64 tensor"),
    "position_ids int32": (lambda a: {"position_ids": a["position_ids"].int()},
                           "position_ids must be a 1-D int64 tensor"),
    "position_ids 2-D": (lambda a: {"position_ids": a["position_ids"][None]},
                         "position_ids must be a 1-D int64 tensor"),
    "position_ids strided": (lambda a: {"position_ids": _every_other_element(a["position_ids"])},
                             "position_ids must be contiguous"),
    "position_ids elsewhere": (lambda a: {"position_ids": a["position_ids"].to(OTHER_DEVICE)},
                               f"position_ids is on {OTHER_DEVICE}, the word table on"),
    "ids of different lengths": (lambda a: {"position_ids": a["position_ids"][:3]},
                                 r"input_ids \(4,\) and position_ids \(3,\) differ"),
    "token_type_row 2-D": (lambda a: {"token_type_row": a["token_type_row"][None]},
                           "token_type_row must be a 1-D tensor of 32 values"),
    "token_type_row int64": (lambda a: {"token_type_row": a["token_type_row"].long()},
                             "token_type_row dtype torch.int64 is not float16"),
    "ln_weight elsewhere": (lambda a: {"ln_weight": a["ln_weight"].to(OTHER_DEVICE)},
                            f"ln_weight is on {OTHER_DEVICE}, the word table on"),
    "ln_bias strided": (lambda a: {"ln_bias": _every_other_element(a["ln_bias"])},
                        "ln_bias must be contiguous"),
    "eps negative": (lambda a: {"eps": -1e-12}, "eps must be a non-negative float, got -1e-12"),
    "eps bool": (lambda a: {"eps": False}, "eps must be a non-negative float, got False"),
    "eps NaN": (lambda a: {"eps": float("nan")}, "eps must be a non-negative float, got nan"),
    "eps str": (lambda a: {"eps": "1e-12"}, "eps must be a non-negative float, got '1e-12'"),
    "out wrong shape": (lambda a: {"out": _zeros(4, 31)}, r"out must have shape \(4, 32\)"),
    "out a list": (lambda a: {"out": a["out"].tolist()}, r"out must have shape \(4, 32\)"),
    "out float16": (lambda a: {"out": a["out"].half()},
                    "out must be torch.float32 on .*, got torch.float16"),
    "out elsewhere": (lambda a: {"out": a["out"].to(OTHER_DEVICE)},
                      f"out must be torch.float32 on .*, got torch.float32 on {OTHER_DEVICE}"),
    "out column stride 2": (lambda a: {"out": _every_other_column(a["out"])},
                            "out needs unit stride along hidden"),
    # Ids cannot be range-checked on the host; with no row to fall back on, the tables must not be empty.
    "empty word table": (lambda a: {"word": _zeros(0, 32)},
                         "the word and position tables must have at least one row"),
    "empty position table": (lambda a: {"position": _zeros(0, 32)},
                             "the word and position tables must have at least one row"),
}


# --------------------------------------------------------------------------------------------
# Bad inputs: project_normalize
# --------------------------------------------------------------------------------------------


def _head_args():
    return {"x": _zeros(4, 32), "weight": _zeros(16, 32), "bias": _zeros(16), "rows": _ints([3, 0]),
            "out": _zeros(2, 16)}


HEAD_BAD_INPUTS = {  # case: (the defect, applied to _head_args(), what the message says)
    "x float64": (lambda a: {"x": a["x"].double()},
                  "x dtype torch.float64 is not float16, bfloat16 or float32"),
    "x column stride 2": (lambda a: {"x": _every_other_column(a["x"])}, "x needs unit stride along hidden"),
    "weight a list": (lambda a: {"weight": a["weight"].tolist()},
                      r"weight must be a 2-D tensor \[D, 32\], got list"),
    "weight float16": (lambda a: {"weight": a["weight"].half()},
                       "weight must be torch.float32 on .*, got torch.float16"),
    "weight elsewhere": (lambda a: {"weight": a["weight"].to(OTHER_DEVICE)},
                         f"weight must be torch.float32 on .*, got torch.float32 on {OTHER_DEVICE}"),
    "weight column stride 2": (lambda a: {"weight": _every_other_column(a["weight"])},
                               "weight needs unit stride along hidden"),
    "D 0": (lambda a: {"weight": _zeros(0, 32), "bias": None, "out": None},
            r"output dim 0 is outside \[1, 1024\]"),
    "D 1025": (lambda a: {"weight": _zeros(1025, 32), "bias": None, "out": None},
               r"output dim 1025 is outside \[1, 1024\]"),
    "bias 2-D": (lambda a: {"bias": a["bias"][None]},
                 r"bias must be a 1-D tensor of 16 values, got tensor of shape \(1, 16\)"),
    "bias wrong length": (lambda a: {"bias": _zeros(15)}, "bias must be a 1-D tensor of 16 values"),
    "bias a list": (lambda a: {"bias": a["bias"].tolist()},
                    "bias must be a 1-D tensor of 16 values, got list"),
    "bias int64": (lambda a: {"bias": a["bias"].long()}, "bias must be a contiguous float tensor on"),
    "bias elsewhere": (lambda a: {"bias": a["bias"].to(OTHER_DEVICE)},
                       "bias must be a contiguous float tensor on"),
    "bias strided": (lambda a: {"bias": _every_other_element(a["bias"])},
                     "bias must be a contiguous float tensor"),
    "rows a list": (lambda a: {"rows": [3, 0]}, "rows must be a 1-D int64 tensor, got list"),
    "rows elsewhere": (lambda a: {"rows": a["rows"].to(OTHER_DEVICE)}, f"rows is on {OTHER_DEVICE}, x on"),
    "rows strided": (lambda a: {"rows": _every_other_element(a["rows"])}, "rows must be contiguous"),
    "out float16": (lambda a: {"out": a["out"].half()},
                    "out must be torch.float32 on .*, got torch.float16"),
    "out elsewhere": (lambda a: {"out": a["out"].to(OTHER_DEVICE)},
                      f"out must be torch.float32 on .*, got torch.float32 on {OTHER_DEVICE}"),
    "out column stride 2": (lambda a: {"out": _every_other_column(a["out"])},
                            "out needs unit stride along its last dimension"),
    # No row to fall back on for the in-kernel range check: refused on the host instead.
    "rows of an empty x": (lambda a: {"x": _zeros(0, 32)}, "rows selects 2 rows of an empty x"),
}


# Every launcher's table: (launcher, its valid arguments, {case: (defect, message)}).
BAD_INPUT_TABLES = [
    (varlen_attention, _attention_args, ATTENTION_BAD_INPUTS),
    (linear, _linear_args, LINEAR_BAD_INPUTS),
    (linear_residual_layernorm, _linear_residual_layernorm_args, LINEAR_RESIDUAL_LAYERNORM_BAD_INPUTS),
    (bias_residual_layernorm, _bias_residual_layernorm_args, BIAS_RESIDUAL_LAYERNORM_BAD_INPUTS),
    (embed_layernorm, _embedding_args, EMBEDDING_BAD_INPUTS),
    (project_normalize, _head_args, HEAD_BAD_INPUTS),
]


@pytest.mark.parametrize("launcher, base_args, changes, match", [
    pytest.param(launcher, base_args, *table[case], id=f"{launcher.__name__}: {case}")
    for launcher, base_args, table in BAD_INPUT_TABLES for case in table])
def test_bad_input_is_rejected(launcher, base_args, changes, match):
    _reject(launcher, base_args(), changes, match)


@pytest.mark.parametrize("launcher, base_args", [
    (varlen_attention, _attention_args),
    (linear, _linear_args),
    (linear_residual_layernorm, _linear_residual_layernorm_args),
    (bias_residual_layernorm, _bias_residual_layernorm_args),
    (embed_layernorm, _embedding_args),
    (project_normalize, _head_args),
], ids=["varlen_attention", "linear", "linear_residual_layernorm", "bias_residual_layernorm",
        "embed_layernorm", "project_normalize"])
def test_base_arguments_are_valid(launcher, base_args):
    """Each table above applies one defect to these arguments, so they must pass as they are:
    otherwise a case could fail for a reason other than the one it names."""
    args = base_args()
    got = launcher(**args)
    assert got is args["out"] and torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------
# Valid edges: the empty batch (T = 0)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_empty_batch(backend, activation):
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = _zeros(0, 40), randn(gen, 24, 40, scale=0.05), randn(gen, 24, scale=0.02)
    out = poisoned((0, 24), F32, DEVICE)
    got = linear(x, weight, bias, activation, out=out, backend=backend)
    _assert_matches(got, F.linear(_f64(x), _f64(weight), _f64(bias)), 0.0, out)
    # Without out=, a new empty [0, N] tensor of x's dtype.
    fresh = linear(x.half(), weight.half(), bias, activation, backend=backend)
    assert fresh.shape == (0, 24) and fresh.dtype == F16


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_residual_layernorm_empty_batch(backend):
    gen = torch.Generator().manual_seed(2)
    x, weight, bias = _zeros(0, 40), randn(gen, 24, 40, scale=0.05), randn(gen, 24, scale=0.02)
    residual, ln_weight, ln_bias = _zeros(0, 24), randn(gen, 24, shift=1.0), randn(gen, 24)
    out = poisoned((0, 24), F32, DEVICE)
    got = linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, EPS, out=out,
                                    backend=backend)
    want = F.layer_norm(F.linear(_f64(x), _f64(weight), _f64(bias)) + _f64(residual), (24,),
                        _f64(ln_weight), _f64(ln_bias), EPS)
    _assert_matches(got, want, 0.0, out)


@pytest.mark.parametrize("num_rows", [0, 1], ids=["T0", "T1"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
@pytest.mark.parametrize("has_bias, has_residual", [(True, True), (False, True), (False, False)],
                         ids=["bias+residual", "residual", "layernorm"])
def test_bias_residual_layernorm_empty_and_single_row(num_rows, dtype, has_bias, has_residual):
    """T = 1: one program, BLOCK_T - 1 masked rows (their stores must not land: guard band)."""
    gen = torch.Generator().manual_seed(3)
    n = 100
    x = randn(gen, num_rows, n, scale=2.0, shift=0.5, dtype=dtype)
    bias = randn(gen, n, scale=0.1, dtype=dtype) if has_bias else None
    residual = randn(gen, num_rows, n, dtype=dtype) if has_residual else None
    ln_weight = randn(gen, n, scale=0.1, shift=1.0, dtype=dtype)
    ln_bias = randn(gen, n, scale=0.05, dtype=dtype)
    out = poisoned((num_rows, n), dtype, DEVICE)
    got = bias_residual_layernorm(x, bias, residual, ln_weight, ln_bias, EPS, out=out)
    y = _f64(x) + (_f64(bias) if has_bias else 0) + (_f64(residual) if has_residual else 0)
    _assert_matches(got, F.layer_norm(y, (n,), _f64(ln_weight), _f64(ln_bias), EPS), ATOL[dtype], out)


def test_embed_layernorm_empty_batch():
    gen = torch.Generator().manual_seed(4)
    word, position = randn(gen, 10, 48, scale=0.05), randn(gen, 16, 48, scale=0.02)
    rows = [randn(gen, 48, scale=0.02), randn(gen, 48, shift=1.0), randn(gen, 48)]
    no_ids = _ints([])
    out = poisoned((0, 48), F32, DEVICE)
    got = embed_layernorm(no_ids, no_ids, word, position, *rows, EPS, out=out)
    want = F.layer_norm(_f64(word)[[]] + _f64(position)[[]], (48,), eps=EPS)
    _assert_matches(got, want, 0.0, out)
    # No token reads a table, so even empty tables are fine here.
    got = embed_layernorm(no_ids, no_ids, word[:0], position[:0], *rows, EPS)
    assert got.shape == (0, 48) and got.dtype == F32


@pytest.mark.parametrize("seq_lens", [[], [0, 0]], ids=["no-sequence", "empty-sequences"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_varlen_attention_empty_batch(seq_lens, dtype):
    cu_seqlens = _ints(np.concatenate([[0], np.cumsum(seq_lens)]).tolist(), torch.int32)
    key_lens = _ints(seq_lens, torch.int32)
    qkv = _zeros(0, 3 * 64, dtype=dtype)
    out = poisoned((0, 64), dtype, DEVICE)
    got = varlen_attention(qkv, cu_seqlens, key_lens, 0, 2, 32, out=out)
    _assert_matches(got, torch.zeros(0, 64, dtype=torch.float64), 0.0, out)
    fresh = varlen_attention(qkv, cu_seqlens, key_lens, 0, 2, 32)
    assert fresh.shape == (0, 64) and fresh.dtype == dtype


def test_project_normalize_empty_batch():
    weight = randn(torch.Generator().manual_seed(5), 16, 32, scale=0.05)
    for rows in (None, _ints([])):  # every row of an empty x; no row of it
        out = poisoned((0, 16), F32, DEVICE)
        got = project_normalize(_zeros(0, 32), weight, None, rows, out=out)
        _assert_matches(got, torch.zeros(0, 16, dtype=torch.float64), 0.0, out)


# --------------------------------------------------------------------------------------------
# Valid edges: GELU without bias, fp32 parameters with fp16 activations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])  # "torch": torch.mm + bias_activation without bias
@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_linear_gelu_without_bias(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    x, weight = randn(gen, 37, 24, dtype=dtype), randn(gen, 40, 24, scale=0.3, dtype=dtype)
    out = poisoned((37, 40), dtype, DEVICE)
    got = linear(x, weight, None, "gelu", out=out, backend=backend)
    _assert_matches(got, F.gelu(F.linear(_f64(x), _f64(weight))), ATOL[dtype], out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_fp32_bias_with_fp16_activations(backend, activation):
    """The module docstring: bias may be fp32 whatever the activation dtype."""
    gen = torch.Generator().manual_seed(7)
    x, weight = randn(gen, 9, 48, dtype=F16), randn(gen, 40, 48, scale=0.1, dtype=F16)
    bias = randn(gen, 40, scale=0.5)
    out = poisoned((9, 40), F16, DEVICE)
    got = linear(x, weight, bias, activation, out=out, backend=backend)
    want = F.linear(_f64(x), _f64(weight), _f64(bias))
    _assert_matches(got, F.gelu(want) if activation else want, ATOL[F16], out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n", [100, 1100], ids=["fused", "too-wide-to-fuse"])
def test_linear_residual_layernorm_fp32_params_with_fp16_activations(backend, n):
    """The module docstring: bias and LayerNorm parameters may be fp32 with fp16 activations.
    N = 1100 takes the unfused path (Triton GEMM + bias_residual_layernorm)."""
    gen = torch.Generator().manual_seed(8)
    num_rows, k = 5, 40
    x, weight = randn(gen, num_rows, k, dtype=F16), randn(gen, n, k, scale=0.05, dtype=F16)
    residual = randn(gen, num_rows, n, dtype=F16)
    bias, ln_bias = randn(gen, n, scale=0.1), randn(gen, n, scale=0.1)
    ln_weight = randn(gen, n, scale=0.1, shift=1.0)
    out = poisoned((num_rows, n), F16, DEVICE)
    got = linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, EPS, out=out,
                                    backend=backend)
    want = F.layer_norm(F.linear(_f64(x), _f64(weight), _f64(bias)) + _f64(residual), (n,),
                        _f64(ln_weight), _f64(ln_bias), EPS)
    _assert_matches(got, want, ATOL[F16], out)


def test_embed_layernorm_fp32_rows_with_fp16_tables():
    """The docstring: token_type_row, ln_weight and ln_bias may be any float dtype."""
    gen = torch.Generator().manual_seed(9)
    word, position = randn(gen, 20, 72, scale=0.05, dtype=F16), randn(gen, 16, 72, scale=0.02, dtype=F16)
    token_type, ln_bias = randn(gen, 72, scale=0.02), randn(gen, 72, scale=0.1)
    ln_weight = randn(gen, 72, scale=0.1, shift=1.0)
    ids, pos = _ints([19, 0, 5, 5, 11, 2, 7]), _ints([0, 1, 2, 3, 4, 15, 6])
    out = poisoned((7, 72), F16, DEVICE)
    got = embed_layernorm(ids, pos, word, position, token_type, ln_weight, ln_bias, EPS, out=out)
    summed = _f64(word)[ids.cpu()] + _f64(position)[pos.cpu()] + _f64(token_type)
    _assert_matches(got, F.layer_norm(summed, (72,), _f64(ln_weight), _f64(ln_bias), EPS), ATOL[F16], out)


# --------------------------------------------------------------------------------------------
# Valid edges: head widths D = 1, > 256 and the 1024 limit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, dtype, has_bias, rows", [
    (1, F32, True, None),  # one column: every vector is +-1
    (1, F16, False, [4, 0, 4]),
    (300, F32, True, [8, 1, 3, 3]),  # BLOCK_D 512: the wide-head config (halved K step)
    (300, F16, False, None),
    (1024, F32, True, [0, 9, 5]),  # the limit
], ids=["D1", "D1-fp16-gather", "D300-gather", "D300-fp16", "D1024"])
def test_project_normalize_head_widths(dim, dtype, has_bias, rows):
    gen = torch.Generator().manual_seed(10 + dim)
    x, weight = randn(gen, 10, 40, dtype=dtype), randn(gen, dim, 40, scale=0.05, dtype=dtype)
    bias = randn(gen, dim, scale=0.02, dtype=dtype) if has_bias else None
    rows_t = _ints(rows) if rows is not None else None
    out = poisoned((10 if rows is None else len(rows), dim), dtype, DEVICE)
    got = project_normalize(x, weight, bias, rows_t, out=out)
    x64 = _f64(x) if rows is None else _f64(x)[rows]
    want = F.normalize(F.linear(x64, _f64(weight), _f64(bias)), p=2, dim=-1, eps=1e-12)
    _assert_matches(got, want, ATOL[dtype] / 4, out)  # unit vectors: small entries
