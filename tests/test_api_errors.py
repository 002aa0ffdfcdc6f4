"""Error paths of the user-facing API that the other test files leave out.

The rule under test: bad input gets an error that says what was wrong, never a crash deep
inside, a silent wrong answer or a NaN.
"""

import json

import numpy as np
import pytest
import torch
from checkpoints import build_pylate, build_stanford
from conftest import KERNEL_DEVICE

from colbert_triton import (
    CheckpointError,
    ColBERT,
    PackedEmbeddings,
    rerank,
    score,
    score_candidates,
    search,
)
from colbert_triton import pylate as dropin


def embeddings(*lengths: int, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """One [length, dim] random matrix per length; only shapes matter to these tests."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator) for n in lengths]


# Two queries of 4 rows against three documents: the shapes every scoring case below starts from.
QUERIES = embeddings(4, 4)
DOCS = embeddings(3, 5, 2, seed=1)
PADDED_QUERIES = torch.stack(QUERIES)  # [2, 4, 16]
PADDED_DOCS = torch.randn(3, 5, 16)  # [3, 5, 16]


# ---------------------------------------------------------------------------------------------
# colbert_triton.score / search / rerank / score_candidates


@pytest.mark.parametrize("queries", [QUERIES, PADDED_QUERIES, PackedEmbeddings.from_list(QUERIES)],
                         ids=["list", "padded", "packed"])
def test_rerank_takes_exactly_one_query(queries):
    with pytest.raises(ValueError, match="rerank takes one query, got 2"):
        rerank(queries, DOCS)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_search_rejects_chunk_size_below_one(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        search(QUERIES, DOCS, 2, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1.5, None, "4"])
def test_search_rejects_a_chunk_size_that_is_not_an_integer(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be"):
        search(QUERIES, DOCS, 2, chunk_size=chunk_size)


@pytest.mark.parametrize("candidates, error, message", [
    ([[0.0, 1.0], [1.0, 2.0]], TypeError, r"integer indices, got torch\.float32"),
    (np.array([[0.0, 1.0], [1.0, 2.0]]), TypeError, r"integer indices, got torch\.float64"),
    # A boolean mask is not a list of indices, although torch would index with it.
    ([[True, False], [True, True]], TypeError, r"integer indices, got torch\.bool"),
    (torch.zeros(2, 1, 1, dtype=torch.long), ValueError, r"\[Q, K\] with Q=2, got shape \(2, 1, 1\)"),
    ([[0], [1], [2]], ValueError, r"\[Q, K\] with Q=2, got shape \(3, 1\)"),
    ([0, 1], ValueError, r"\[Q, K\] with Q=2, got shape \(1, 2\)"),  # 1-D means one query
    (1, ValueError, r"\[Q, K\] with Q=2, got shape \(\)"),
    # -1 marks an unused slot; any other negative index is an error, not a count from the end.
    ([[0, -2], [1, 1]], ValueError, r"must lie in \[0, 3\) \(or -1 for an empty slot\)"),
], ids=["float", "numpy-float64", "bool", "3-D", "too-many-rows", "1-D-for-2-queries", "scalar",
        "index-minus-2"])
def test_score_candidates_rejects_bad_indices(candidates, error, message):
    with pytest.raises(error, match=message):
        score_candidates(QUERIES, DOCS, candidates)


def test_score_candidates_rejects_ragged_candidate_lists():
    with pytest.raises(ValueError, match="candidates"):
        score_candidates(QUERIES, DOCS, [[0, 1], [2]])


@pytest.mark.parametrize("queries, documents, masks, message", [
    (PADDED_QUERIES, DOCS, {"documents_mask": torch.ones(3, 5)}, "not with a list or packed ones"),
    (PADDED_QUERIES, PackedEmbeddings.from_list(DOCS), {"documents_mask": torch.ones(3, 5)},
     "not with a list or packed ones"),
    (QUERIES, DOCS, {"queries_mask": torch.ones(2, 4)}, r"padded \[Q, Lq, dim\] query tensor, not with a list"),
    (PackedEmbeddings.from_list(QUERIES), DOCS, {"queries_mask": torch.ones(2, 4)},
     r"padded \[Q, Lq, dim\] query tensor, not with a list"),
], ids=["list-documents", "packed-documents", "list-queries", "packed-queries"])
def test_a_mask_goes_with_padded_tensors_only(queries, documents, masks, message):
    """Lists and packed embeddings carry their own lengths: a mask beside them is a mistake."""
    with pytest.raises(ValueError, match=message):
        score(queries, documents, **masks)


@pytest.mark.parametrize("masks, message", [
    ({"queries_mask": torch.ones(2, 3)}, r"queries_mask has shape \(2, 3\), expected \(2, 4\)"),
    ({"queries_mask": torch.ones(4)}, r"queries_mask has shape \(4,\), expected \(2, 4\)"),
    ({"documents_mask": torch.ones(3, 4)}, r"documents_mask has shape \(3, 4\), expected \(3, 5\)"),
])
def test_masks_of_the_wrong_shape(masks, message):
    with pytest.raises(ValueError, match=message):
        score(PADDED_QUERIES, PADDED_DOCS, **masks)


def test_rerank_query_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"queries_mask has shape \(1, 3\), expected \(1, 4\)"):
        rerank(PADDED_QUERIES[:1], DOCS, query_mask=torch.ones(1, 3))


@pytest.mark.parametrize("queries, documents, message", [
    (torch.randn(1, 2, 4, 16), DOCS, r"queries must be \[Q, Lq, dim\] or \[Lq, dim\], got shape \(1, 2, 4, 16\)"),
    (QUERIES, torch.randn(1, 3, 5, 16), r"documents must be \[N, L, dim\] or \[L, dim\], got shape \(1, 3, 5, 16\)"),
    (torch.randn(16), DOCS, r"queries must be .* got shape \(16,\)"),
    (QUERIES, torch.randn(16), r"documents must be .* got shape \(16,\)"),
    ([torch.randn(1, 4, 16)], DOCS, r"queries\[0\] must be 2-D \[tokens, dim\], got shape \(1, 4, 16\)"),
    (torch.randn(0, 4, 16), DOCS, "queries is empty"),
    (QUERIES, [], "documents is empty"),
    (torch.randn(2, 4, 0), torch.randn(3, 5, 0), "embeddings have dim 0"),
], ids=["4-D-queries", "4-D-documents", "1-D-queries", "1-D-documents", "3-D-list-item", "no-queries",
        "no-documents-list", "dim-0"])
def test_inputs_of_the_wrong_rank_or_empty(queries, documents, message):
    with pytest.raises(ValueError, match=message):
        score(queries, documents)


@pytest.mark.parametrize("documents, message", [
    ([d.to("meta") for d in DOCS], "queries are on cpu but documents are on meta"),
    ([DOCS[0], DOCS[1].to("meta")], r"documents\[1\] is on meta, documents\[0\] is on cpu"),
    (PADDED_DOCS.to("meta"), "queries are on cpu but documents are on meta"),
], ids=["all-documents", "one-document", "padded"])
def test_inputs_on_different_devices(documents, message):
    # The device check comes before any value is read, so a meta tensor (shape, no data) reaches it.
    with pytest.raises(ValueError, match=message):
        score(QUERIES, documents)


# ---------------------------------------------------------------------------------------------
# PackedEmbeddings

VALUES = torch.randn(5, 4)  # five rows: lengths (2, 3) fit them


@pytest.mark.parametrize("values, offsets, lengths, message", [
    (torch.randn(5), [0, 5], (5,), r"values must be \[T, dim\], got shape \(5,\)"),
    (torch.randn(1, 5, 4), [0, 5], (5,), r"values must be \[T, dim\], got shape \(1, 5, 4\)"),
    (VALUES, [0, 5], (2, 3), r"offsets must be \[n \+ 1\] for n lengths"),
    (VALUES, [[0, 2, 5]], (2, 3), r"offsets must be \[n \+ 1\] for n lengths"),
    (VALUES, [0, 2, 4], (2, 2), "lengths add up to 4 rows but values has 5"),
], ids=["1-D-values", "3-D-values", "short-offsets", "2-D-offsets", "lengths-short-of-rows"])
def test_packed_embeddings_checks_its_fields(values, offsets, lengths, message):
    with pytest.raises(ValueError, match=message):
        PackedEmbeddings(values, torch.tensor(offsets), lengths)


def test_packed_embeddings_rejects_negative_lengths_and_float_offsets():
    # Offsets that agree with the lengths: only the sign (or the dtype) is wrong.
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        PackedEmbeddings(VALUES, torch.tensor([0, 3, 2, 5]), (3, -1, 3))
    with pytest.raises(TypeError, match="offsets must be int32 or int64, got torch.float32"):
        PackedEmbeddings(VALUES, torch.tensor([0.0, 2.0, 5.0]), (2, 3))


@pytest.mark.parametrize("offsets", [[0, 4, 5], [1, 3, 5]], ids=["inner-offset", "first-offset"])
def test_packed_embeddings_rejects_offsets_that_disagree_with_lengths(offsets):
    with pytest.raises(ValueError, match="offsets"):
        PackedEmbeddings(VALUES, torch.tensor(offsets), (2, 3))


@pytest.mark.parametrize("lengths, message", [
    ([6, -1], "lengths must be >= 0"),
    ([2, 2], "lengths add up to 4 rows but values has 5"),
    ([2, 4], "lengths add up to 6 rows but values has 5"),
    # Lengths whose int64 sum wraps around to the number of rows:
    ([2**63 - 1, 2**63 - 1, 7], r"lengths\[0\] = 9223372036854775807 but values has 5 rows"),
    ([2.5, 2.5], r"lengths\[0\] = 2.5 is not a whole number"),
    (np.array([2.0, 3.0001]), r"lengths\[1\] = 3.0001 is not a whole number"),
    ([2, float("nan")], r"lengths\[1\] = nan is not a whole number"),
    ([2**64, 3], r"lengths\[0\] = 18446744073709551616 is out of range"),
    (np.array([2, 2**64 - 1], dtype=np.uint64), r"lengths\[1\] = 18446744073709551615 is out of range"),
    (torch.tensor(5), "lengths must be one-dimensional"),
])
def test_from_lengths_checks_the_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        PackedEmbeddings.from_lengths(VALUES, lengths)


@pytest.mark.parametrize("lengths, message", [
    (None, "lengths must be a sequence of whole numbers, got NoneType"),
    ("23", "lengths must be a sequence of whole numbers, got str"),  # not the lengths 2 and 3
    ([2, None], r"lengths must be whole numbers, got lengths\[1\] = None"),
    (["2", "3"], "lengths must be whole numbers, got <U1"),
    (torch.tensor([True, False, True]), "lengths must be whole numbers, got bool"),  # a mask
])
def test_from_lengths_refuses_what_is_not_whole_numbers(lengths, message):
    with pytest.raises(TypeError, match=message):
        PackedEmbeddings.from_lengths(VALUES, lengths)


@pytest.mark.parametrize("lengths", [(2.0, 3.0), torch.tensor([2.0, 3.0]), torch.tensor([2.0, 3.0], dtype=torch.bfloat16),
                                     np.array([2, 3], dtype=np.uint8)],
                         ids=["integral-floats", "mask-sum", "bfloat16", "uint8"])
def test_whole_lengths_of_any_number_type_become_python_ints(lengths):
    for packed in (PackedEmbeddings.from_lengths(VALUES, lengths),
                   PackedEmbeddings(VALUES, torch.tensor([0, 2, 5]), tuple(lengths.tolist())
                                    if hasattr(lengths, "tolist") else lengths)):
        assert packed.lengths_host == (2, 3) and all(type(n) is int for n in packed.lengths_host)
        assert packed.lengths_array.tolist() == [2, 3] and not packed.lengths_array.flags.writeable
        assert torch.equal(packed[1], VALUES[2:])


def test_lengths_that_each_fit_but_whose_sum_wraps_are_refused():
    """Five lengths of 2^62 over a broadcast view of 2^62 rows: each fits, and their int64 sum
    wraps to exactly the row count; only the running sum going negative shows it."""
    values = torch.zeros(1, 1).expand(2**62, 1)
    with pytest.raises(ValueError, match="add up to more than"):
        PackedEmbeddings.from_lengths(values, [2**62] * 5)
    with pytest.raises(ValueError, match="add up to more than"):
        PackedEmbeddings(values, torch.tensor([0, 2**62, 0, 0, 0, 2**62]), (2**62,) * 5)


def test_packed_embeddings_rejects_offsets_that_wrap():
    """Offsets [0, 2^63 - 1, -2, 5]: their differences wrap to non-negative "lengths" that add
    up to the 5 rows; slicing by them read rows -2..2 (scoring: garbage, silently)."""
    with pytest.raises(ValueError, match="but values has 5 rows"):
        PackedEmbeddings(VALUES, torch.tensor([0, 2**63 - 1, -2, 5]), (2**63 - 1, 2**63 - 1, 7))


@pytest.mark.parametrize("items, error, message", [
    ([torch.randn(2, 4), torch.randn(2, 3)], ValueError, r"\[1\] has dim 3"),
    ([torch.randn(2, 4), torch.randn(4)], ValueError, r"\[1\] must be 2-D"),
    ([np.ones((2, 4), dtype=np.float32)], TypeError, r"\[0\] must be a torch\.Tensor"),
], ids=["dim-mismatch", "1-D-item", "numpy-item"])
def test_from_list_names_the_bad_item(items, error, message):
    with pytest.raises(error, match=message):
        PackedEmbeddings.from_list(items)


@pytest.mark.parametrize("lengths, index, message", [
    ((2, 3), 2, "index 2 out of range for 2 items"),
    ((2, 3), -3, "index -3 out of range for 2 items"),
    ((), 0, "index 0 out of range for 0 items"),
])
def test_indexing_past_the_end_is_an_index_error(lengths, index, message):
    packed = PackedEmbeddings.from_lengths(torch.randn(sum(lengths), 4), lengths)
    with pytest.raises(IndexError, match=message):
        packed[index]


@pytest.mark.parametrize("index", [slice(0, 1), 1.0], ids=["slice", "float"])
def test_indexing_with_a_non_integer_says_so(index):
    packed = PackedEmbeddings.from_lengths(VALUES, (2, 3))
    with pytest.raises(TypeError, match="must be an integer"):
        packed[index]


# ---------------------------------------------------------------------------------------------
# ColBERT (the model): rerank, search, dtype


@pytest.mark.parametrize("query, count", [
    (["first query", "second query"], 2),
    ([], 0),
    (embeddings(32, 32, dim=96), 2),
    (torch.randn(2, 32, 96), 2),
], ids=["two-texts", "no-query", "two-embeddings", "padded-embeddings"])
def test_model_rerank_takes_exactly_one_query(model, query, count):
    with pytest.raises(ValueError, match=f"rerank takes one query, got {count}"):
        model.rerank(query, ["a document", "another document"])


def test_model_search_rejects_chunk_size_below_one(model):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.search(["a query"], ["a document"], k=1, chunk_size=0)


def test_model_search_checks_chunk_size_before_encoding(model, monkeypatch):
    monkeypatch.setattr(model, "encode_documents", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.search(["a query"], ["a document"], k=1, chunk_size=0)


@pytest.mark.parametrize("method", ["score", "rerank", "search"])
def test_model_scoring_checks_inputs_unless_told_not_to(model, method):
    """NaN embeddings are refused by default; check_inputs=False reaches the scorer, where
    the NaN shows in exactly the scores it enters."""
    docs = model.encode_documents(["a document", "another document"])
    docs[1] = docs[1].clone()
    docs[1][0, 0] = float("nan")
    call = getattr(model, method)
    query = ["a query"]
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(query, docs)
    if method == "score":
        scores = call(query, docs, check_inputs=False)[0]
    elif method == "rerank":
        scores = torch.tensor([s for _, s in sorted(call(query, docs, check_inputs=False))])
    else:
        scores = call(query, docs, k=2, check_inputs=False)[0][0]
    assert int(scores.isnan().sum()) == 1


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float64], ids=str)
def test_model_dtype_must_be_a_supported_float(stanford_dir, dtype):
    # Checked before the checkpoint is read, so this costs no loading.
    with pytest.raises(ValueError, match=f"dtype must be float32, float16 or bfloat16, got {dtype}"):
        ColBERT.from_pretrained(stanford_dir, device="cpu", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The checkpoint's tokenizer


def _rename_token(tokenizer_dir, old: str, new: str) -> None:
    """Rename a token in both tokenizer files (tokenizer.json and the vocab.txt fallback): the
    checkpoint then lacks ``old`` while every token id stays where it was."""
    path = tokenizer_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["model"]["vocab"][new] = tok["model"]["vocab"].pop(old)
    for added in tok["added_tokens"]:
        if added["content"] == old:
            added["content"] = new
    path.write_text(json.dumps(tok))
    vocab = tokenizer_dir / "vocab.txt"
    vocab.write_text("\n".join(new if line == old else line for line in vocab.read_text().split("\n")))


def _build(layout: str, dst):
    """A checkpoint in the given layout, and the directory holding its tokenizer files."""
    if layout == "stanford":
        path = build_stanford(dst)
        return path, path
    path = build_pylate(dst)
    return path, path / "0_Transformer"


@pytest.mark.parametrize("layout, token, tokenizer_file, message", [
    ("stanford", "[MASK]", "tokenizer.json", r"tokenizer\.json: the tokenizer has no \[MASK\] token"),
    ("pylate", "[MASK]", "tokenizer.json", r"tokenizer\.json: the tokenizer has no \[MASK\] token"),
    ("stanford", "[CLS]", "tokenizer.json", r"tokenizer\.json: the tokenizer has no \[CLS\] token"),
    ("stanford", "[SEP]", "tokenizer.json", r"tokenizer\.json: the tokenizer has no \[SEP\] token"),
    ("stanford", "[MASK]", "vocab.txt", r"vocab\.txt: the tokenizer has no \[MASK\] token"),
    ("stanford", "[CLS]", "vocab.txt", r"vocab\.txt: the tokenizer has no \[CLS\] token \(the checkpoint's cls_token\)"),
])
def test_tokenizer_without_a_special_token(tmp_path, layout, token, tokenizer_file, message):
    path, tokenizer_dir = _build(layout, tmp_path / "ckpt")
    _rename_token(tokenizer_dir, token, "[RENAMED]")
    if tokenizer_file == "vocab.txt":
        (tokenizer_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        ColBERT.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("metadata, markers", [
    ({"query_token_id": "[Q]"}, r"\('\[Q\]', '\[unused1\]'\)"),
    ({"doc_token_id": "[D]"}, r"\('\[unused0\]', '\[D\]'\)"),
], ids=["query-marker", "document-marker"])
def test_stanford_markers_missing_from_the_vocabulary(tmp_path, metadata, markers):
    """The Stanford twin of test_checkpoint's PyLate case: a marker the vocabulary lacks would be
    added past the embedding table; the error names both markers instead."""
    path = build_stanford(tmp_path / "ckpt", metadata=metadata)
    with pytest.raises(CheckpointError, match=markers + " are not in the tokenizer's vocabulary"):
        ColBERT.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("layout", ["stanford", "pylate"])
def test_unreadable_or_missing_tokenizer_files_are_named(tmp_path, layout):
    path, tokenizer_dir = _build(layout, tmp_path / "ckpt")
    (tokenizer_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: unreadable tokenizer"):
        ColBERT.from_pretrained(path, device="cpu")
    (tokenizer_dir / "tokenizer.json").unlink()
    (tokenizer_dir / "vocab.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match=r"vocab\.txt: unreadable vocabulary"):
        ColBERT.from_pretrained(path, device="cpu")
    (tokenizer_dir / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing checkpoint file \(no vocab\.txt either\)"):
        ColBERT.from_pretrained(path, device="cpu")


# ---------------------------------------------------------------------------------------------
# colbert_triton.pylate, the PyLate drop-in

PYLATE_QUERIES = torch.randn(3, 6, 16)  # (A, S, H)
PYLATE_DOCS = torch.randn(5, 7, 16)  # (B, T, H)
PYLATE_GROUPS = torch.randn(2, 4, 7, 16)  # (A, N, T, H) for two queries


def test_kd_scores_need_one_document_group_per_query():
    with pytest.raises(ValueError, match="3 queries but documents are grouped for 2"):
        dropin.colbert_kd_scores(PYLATE_QUERIES, PYLATE_GROUPS)


@pytest.mark.parametrize("queries, documents, message", [
    (list(PYLATE_QUERIES), list(PYLATE_DOCS), "3 queries but 5 documents"),
    ([], [], "no pairs to score"),
    (np.zeros((0, 3, 16), dtype=np.float32), np.zeros((0, 3, 16), dtype=np.float32), "no pairs to score"),
], ids=["unequal-counts", "empty-lists", "empty-arrays"])
def test_pairwise_needs_equal_nonzero_counts(queries, documents, message):
    with pytest.raises(ValueError, match=message):
        dropin.colbert_scores_pairwise(queries, documents)


@pytest.mark.parametrize("value", [{"a": 1}, "text", 3.0, None, {1, 2}, ["a", "b"]],
                         ids=["dict", "str", "float", "None", "set", "list-of-str"])
def test_convert_to_tensor_rejects_unsupported_types(value):
    with pytest.raises(TypeError, match=f"cannot convert {type(value).__name__} to a tensor"):
        dropin.convert_to_tensor(value)


@pytest.mark.parametrize("documents, error, message", [
    ([PYLATE_DOCS[0].numpy(), PYLATE_DOCS[1, :3].numpy()], ValueError, "different shapes"),
    ([PYLATE_DOCS[0].tolist(), PYLATE_DOCS[1, :3].tolist()], ValueError, "different shapes"),
    ([PYLATE_DOCS[0], 3.0], TypeError, "cannot convert"),
], ids=["ragged-arrays", "ragged-nested-lists", "tensor-and-float"])
def test_colbert_scores_names_ragged_or_mixed_lists(documents, error, message):
    with pytest.raises(error, match=message):
        dropin.colbert_scores(PYLATE_QUERIES, documents)


# Empty meta tensors: the drop-in reads every input's values (the NaN check) before it compares
# devices, which a meta tensor with elements cannot serve; CPU and CUDA tensors both can.
@pytest.mark.parametrize("call", [
    lambda: dropin.colbert_scores(PYLATE_QUERIES, torch.empty(0, 7, 16, device="meta")),
    lambda: dropin.colbert_kd_scores(PYLATE_QUERIES, torch.empty(3, 0, 7, 16, device="meta")),
    lambda: dropin.colbert_scores_pairwise([PYLATE_QUERIES[0]], [torch.empty(0, 16, device="meta")]),
], ids=["colbert_scores", "colbert_kd_scores", "colbert_scores_pairwise"])
def test_inputs_on_different_devices_in_the_dropin(call):
    with pytest.raises(ValueError, match="inputs are on different devices: cpu and meta"):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: dropin.colbert_scores(PYLATE_QUERIES, PYLATE_DOCS, queries_mask=torch.ones(3, 5)),
     r"queries_mask has shape \(3, 5\), expected \(3, 6\)"),
    (lambda: dropin.colbert_scores(PYLATE_QUERIES, PYLATE_DOCS, queries_mask=torch.ones(6)),
     r"queries_mask has shape \(6,\), expected \(3, 6\)"),
    (lambda: dropin.colbert_kd_scores(PYLATE_QUERIES[:2], PYLATE_GROUPS, queries_mask=torch.ones(2, 5)),
     r"queries_mask has shape \(2, 5\), expected \(2, 6\)"),
    (lambda: dropin.colbert_kd_scores(PYLATE_QUERIES[:2], PYLATE_GROUPS, documents_mask=torch.ones(2, 7)),
     r"documents_mask has shape \(2, 7\), expected \(2, 4, 7\)"),
], ids=["scores-queries-mask", "scores-1-D-queries-mask", "kd-queries-mask", "kd-documents-mask"])
def test_dropin_masks_of_the_wrong_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dropin_rerank_needs_one_group_per_query():
    with pytest.raises(ValueError, match="1 queries but 2"):
        dropin.rerank([["a"], ["b"]], [PYLATE_QUERIES[0]], [[PYLATE_DOCS[0]], [PYLATE_DOCS[1]]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropin_rerank_says_each_query_is_2d(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    query, document = PYLATE_QUERIES.to(device), PYLATE_DOCS[0].to(device)  # a 3-D "query"
    with pytest.raises(ValueError, match=r"each query must be \[S, H\], got shape \(3, 6, 16\)"):
        dropin.rerank([["a"]], [query], [[document]], backend=backend)


@pytest.mark.parametrize(("bad", "error", "message"), [
    (torch.ones(3, 8), ValueError, "queries have dim 16 but documents have dim 8"),
    (torch.ones(3, 16, dtype=torch.float64), TypeError, "queries are torch.float32 but documents are torch.float64"),
    (torch.ones(16), ValueError, r"expected queries with 2 dims and documents with 2, got shapes \(6, 16\) and \(16,\)"),
    (torch.tensor(1.0), ValueError, r"got shapes \(6, 16\) and \(\)"),
    (torch.ones(3, 16, dtype=torch.int32), TypeError, "documents embeddings must be floating point"),
], ids=["dim", "dtype", "1-D", "0-D", "integer"])
def test_dropin_rerank_names_a_bad_candidate_among_many(bad, error, message):
    """The kernel path checks a query's candidates in one pass; one that differs, wherever it is
    among them, still gets the error that names what is wrong with it."""
    query = PYLATE_QUERIES[0].to(KERNEL_DEVICE)
    candidates = [PYLATE_DOCS[i % 3].to(KERNEL_DEVICE) for i in range(40)]
    candidates[29] = bad.to(KERNEL_DEVICE)
    with pytest.raises(error, match=message):
        dropin.rerank([list(range(40))], [query], [candidates], backend="triton")
