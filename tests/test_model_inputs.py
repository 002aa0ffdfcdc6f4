"""How the model treats bad or unusual text input."""

import numpy as np
import pytest
import torch
from texts import LONG


def test_non_string_inputs_are_rejected(model):
    with pytest.raises(TypeError, match=r"documents\[1\] is NoneType"):
        model.encode_documents(["ok", None])
    with pytest.raises(TypeError, match=r"queries\[0\] is int"):
        model.encode_queries([3])
    with pytest.raises(TypeError, match="single string"):
        model.encode_queries("a bare string")
    with pytest.raises(TypeError, match="list of strings"):
        model.encode_documents(42)


def test_empty_list_and_bad_batch_size(model):
    with pytest.raises(ValueError, match="empty"):
        model.encode_documents([])
    with pytest.raises(ValueError, match="batch_size"):
        model.encode_queries(["x"], batch_size=0)


def test_long_text_is_truncated_like_the_references(model):
    tokens = model.tokenizer.documents([LONG * 5])
    assert len(tokens.sequences[0]) == 300
    assert tokens.sequences[0][-1] == 102
    q = model.tokenizer.queries([LONG])
    assert len(q.sequences[0]) == 32 and q.key_lens[0] == 32 and q.sequences[0][-1] == 102


def test_query_rows_are_unit_vectors_and_mask_rows_computed(model):
    q = model.encode_queries(["short"])[0]
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(32))


def test_score_accepts_texts(model):
    direct = model.score(["a query"], ["first doc", "second doc"])
    embedded = model.score(model.encode_queries(["a query"]), model.encode_documents(["first doc", "second doc"]))
    torch.testing.assert_close(direct, embedded)
    ranked = model.rerank("a query", ["first doc", "second doc"])
    assert sorted(i for i, _ in ranked) == [0, 1]
    scores, index = model.search(["a query", "another"], ["x", "y", "z"], k=2)
    assert scores.shape == index.shape == (2, 2)
    torch.testing.assert_close(model.score(np.array(["a query"]), np.array(["first doc", "second doc"])),
                               direct)


def test_bad_k_is_rejected_before_encoding(model, monkeypatch):
    monkeypatch.setattr(model, "encode_documents", lambda *a, **k: pytest.fail("encoded before checking k"))
    for bad_k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.rerank("a query", ["doc"], k=bad_k)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            model.search(["a query"], ["doc"], k=bad_k)


def test_progress_bar_can_be_switched(model, capsys):
    model.encode_documents(["a"] * 20, batch_size=2, show_progress=True)
    assert "Encoding" in capsys.readouterr().err
    model.encode_documents(["a"] * 20, batch_size=2, show_progress=False)
    assert "Encoding" not in capsys.readouterr().err
