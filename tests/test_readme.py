"""The README's Python examples run as written, on the tests' checkpoint instead of the hub's.

Only what the examples leave to the reader is supplied: the texts and ids, the padded tensors the
drop-in takes, and the checkpoint path in place of the hub id (no hub here).
"""

import re
from pathlib import Path

import numpy as np
import torch
from conftest import require_reference

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_ID = '"answerdotai/answerai-colbert-small-v1"'


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_the_examples_these_tests_run():
    blocks = _python_blocks()
    assert len(blocks) == 5
    assert HUB_ID in blocks[0] and "PoolingProcesses(" in blocks[1]
    assert "from colbert_triton import pylate as scores" in blocks[2] and "patch_pylate()" in blocks[3]
    assert "ExactIndex()" in blocks[4]


def test_python_api_example(stanford_dir, tmp_path, monkeypatch):
    code = _python_blocks()[0].replace(HUB_ID, repr(str(stanford_dir)))
    monkeypatch.chdir(tmp_path)  # it writes corpus.safetensors
    texts = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "ColBERT scores with late interaction."]
    scope = {"texts": texts, "my_ids": ["eiffel", "banana", "colbert"]}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 (the README's own code)
    # what the example's comments say it returns
    assert [tuple(q.shape) for q in scope["queries"]] == [(32, 96)]
    assert all(d.shape[1] == 96 for d in scope["docs"]) and len(scope["docs"]) == 3
    assert tuple(scope["corpus"].values.shape) == (sum(len(d) for d in scope["docs"]), 96)
    assert scope["model"].score(scope["queries"], scope["corpus"]).shape == (1, 3)
    # "about half the rows": all but the protected [CLS] row, halved (rounded down)
    assert list(scope["pooled"].lengths_host) == [1 + (len(d) - 1) // 2 for d in scope["docs"]]
    assert scope["ids"] == ["eiffel", "banana", "colbert"]
    assert (tmp_path / "corpus.safetensors").is_file()


def test_pooling_processes_example(model):
    parts = [["The Eiffel Tower is in Paris.", "Bananas are yellow."], ["ColBERT scores with late interaction."]]
    scope = {"model": model, "parts_of_the_corpus": parts}
    exec(compile(_python_blocks()[1], str(README), "exec"), scope)  # noqa: S102 (the README's own code)
    assert scope["workers"].closed  # "stopped when the block ends"
    expected = model.encode_documents(parts[-1], packed=True, pool_factor=2)  # the last part's
    assert scope["pooled"].lengths_host == expected.lengths_host and torch.equal(scope["pooled"].values, expected.values)


def test_pylate_drop_in_example():
    require_reference("pylate.scores")  # the drop-in hands PyLate's other names through
    gen = torch.Generator().manual_seed(0)
    # as many queries as documents: the example's colbert_scores_pairwise pairs them
    queries = torch.nn.functional.normalize(torch.randn(3, 32, 96, generator=gen), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(3, 10, 96, generator=gen), dim=-1)
    lengths = torch.tensor([10, 4, 1])
    scope = {"queries": queries, "documents": documents, "queries_mask": torch.ones(3, 32),
             "documents_mask": (torch.arange(10) < lengths[:, None]).float(),
             "candidates": documents[None].expand(3, -1, -1, -1),  # each query's K = 3 candidates
             "candidates_mask": (torch.arange(10) < lengths[:, None]).float().expand(3, -1, -1)}
    exec(compile(_python_blocks()[2], str(README), "exec"), scope)  # noqa: S102 (the README's own code)
    assert callable(scope["rerank"])


def test_patch_pylate_example():
    scores = require_reference("pylate.scores")
    from colbert_triton import pylate as dropin

    try:
        exec(compile(_python_blocks()[3], str(README), "exec"), {})  # noqa: S102 (the README's own code)
        assert scores.colbert_scores is dropin.colbert_scores
    finally:
        dropin.unpatch_pylate()
    assert scores.colbert_scores.__module__ == "pylate.scores.colbert"


def test_exact_index_example(model):
    require_reference("pylate.retrieve")
    texts = ["The Eiffel Tower is in Paris.", "Bananas are yellow.", "ColBERT scores with late interaction."]
    scope = {"documents_ids": ["eiffel", "banana", "colbert"],
             "documents_embeddings": [d.numpy() for d in model.encode_documents(texts)],
             "queries_embeddings": [q.numpy() for q in model.encode_queries(["where is the eiffel tower?"])]}
    exec(compile(_python_blocks()[4], str(README), "exec"), scope)  # noqa: S102 (the README's own code)
    results = scope["results"]
    assert len(results) == 1 and len(results[0]) == 3
    # the exact scores (the tests' model has a random head: the order means nothing, but is model.rerank's)
    ranked = model.rerank(model.encode_queries(["where is the eiffel tower?"])[0], model.encode_documents(texts))
    assert [r["id"] for r in results[0]] == [scope["documents_ids"][i] for i, _ in ranked]
    np.testing.assert_allclose([r["score"] for r in results[0]], [s for _, s in ranked], atol=1e-5)
