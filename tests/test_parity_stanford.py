"""Encoding and scoring against Stanford ColBERT's own code (colbert-ai 0.2.22) loading the same
Stanford-layout checkpoint directories.

PyLate is the reference everywhere else; this is the second one the README names. colbert-ai's
`Checkpoint` encodes with its QueryTokenizer/DocTokenizer and `ColBERT.query/doc`, and scores
with `colbert_score`. Three shims, none touching what is compared: its HF wrapper calls
`init_weights` where transformers 5 needs `post_init`; it would build its model class from the
metadata's hub id (no hub here), so the class comes from the checkpoint directory; its C++
extension (segmented MaxSim, for indexing) is not built. A fourth fills a gap of its own: with
`mask_punctuation: false` it has no skiplist (see `_stanford`).
"""

import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
import torch
from checkpoints import build_stanford, link_weights
from conftest import require_reference
from texts import DOCUMENTS, QUERIES

from colbert_triton import ColBERT

# Where we differ on purpose (README, "Markers in text"): the marker registered as an added
# token makes the literal text "[unused0]" in an input the marker; Stanford's tokenizer splits it.
LITERAL_MARKER = "tokens like [MASK] and [unused0] inside text"


def _stanford(path, monkeypatch):
    """colbert-ai's Checkpoint for a directory, as it loads on a machine without a GPU."""
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")  # colbert-ai imports GitPython
    hf_colbert = require_reference("colbert.modeling.hf_colbert")
    base_colbert = require_reference("colbert.modeling.base_colbert")
    modeling = require_reference("colbert.modeling.colbert")
    checkpoint = require_reference("colbert.modeling.checkpoint")
    infra = require_reference("colbert.infra")
    if require_reference("colbert.parameters").DEVICE.type != "cpu":
        # it puts its model on the GPU when there is one (documents in fp16): these compare fp32
        pytest.skip("colbert-ai runs on the GPU where there is one; these tests compare on the CPU")
    # the C++ indexing extension: not what is compared
    monkeypatch.setattr(modeling.ColBERT, "loaded_extensions", True, raising=False)

    def model_class(_name):
        wrapper = hf_colbert.class_factory(str(path))

        class PostInit(wrapper):
            def __init__(self, config, colbert_config):
                super().__init__(config, colbert_config)
                self.post_init()

        return PostInit

    monkeypatch.setattr(base_colbert, "class_factory", model_class)
    with redirect_stdout(io.StringIO()):  # it prints each first query and document it encodes
        ref = checkpoint.Checkpoint(str(path), colbert_config=infra.ColBERTConfig(gpus=0))
    if not ref.colbert_config.mask_punctuation:
        # 0.2.22 sets its skiplist only when punctuation is masked, and `doc` then fails on the
        # missing attribute; ColBERT v1 started from an empty one (nothing skipped), set here.
        ref.skiplist = {}
    return ref


def _variant(tmp_path, stanford_dir, **metadata):
    """A copy of the Stanford checkpoint with artifact.metadata edited."""
    path = tmp_path / "variant"
    shutil.copytree(stanford_dir, path, copy_function=link_weights)
    meta = json.loads((path / "artifact.metadata").read_text())
    (path / "artifact.metadata").write_text(json.dumps({**meta, **metadata}))
    return path


def _assert_same_embeddings(path, queries, documents, monkeypatch):
    ref = _stanford(path, monkeypatch)
    ours = ColBERT.from_pretrained(path, device="cpu")
    with redirect_stdout(io.StringIO()):
        theirs_q = ref.queryFromText(queries)  # [B, query_maxlen, dim]
        theirs_d = ref.docFromText(documents, keep_dims=False)  # kept rows only
    for texts, encoded, expected in ((queries, ours.encode_queries(queries), theirs_q),
                                     (documents, ours.encode_documents(documents), theirs_d)):
        for text, mine, theirs in zip(texts, encoded, expected):
            assert mine.shape == theirs.shape, text
            torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0, msg=text)
    return ref, ours


def test_embeddings_match_stanford_colbert(stanford_dir, monkeypatch):
    queries = [q for q in QUERIES if q != LITERAL_MARKER]
    _assert_same_embeddings(stanford_dir, queries, DOCUMENTS, monkeypatch)


def test_a_literal_marker_in_a_query_is_the_one_documented_difference(stanford_dir, monkeypatch):
    ref = _stanford(stanford_dir, monkeypatch)
    ours = ColBERT.from_pretrained(stanford_dir, device="cpu")
    marker = ref.query_tokenizer.Q_marker_token_id
    with redirect_stdout(io.StringIO()):
        theirs = ref.query_tokenizer.tensorize([LITERAL_MARKER])[0][0].tolist()
    mine = ours.tokenizer.queries([LITERAL_MARKER]).sequences[0].tolist()
    assert theirs.count(marker) == 1 and mine.count(marker) == 2  # ours: the text's marker too
    assert len(mine) == len(theirs) and mine[:2] == theirs[:2] == [ref.query_tokenizer.cls_token_id, marker]


@pytest.mark.parametrize("metadata", [
    {"mask_punctuation": False},  # PyLate ignores it; Stanford keeps the punctuation rows
    {"attend_to_mask_tokens": True},
    {"query_maxlen": 12, "doc_maxlen": 20},  # truncation of both
    {"query_maxlen": 64},
    {"query_token_id": "[unused2]", "doc_token_id": "[unused3]"},
], ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_checkpoint_settings_read_as_stanford_colbert_reads_them(tmp_path, stanford_dir, metadata, monkeypatch):
    path = _variant(tmp_path, stanford_dir, **metadata)
    queries = [q for q in QUERIES if q != LITERAL_MARKER]
    ref, ours = _assert_same_embeddings(path, queries, DOCUMENTS, monkeypatch)
    assert ours.settings.query_maxlen == ref.colbert_config.query_maxlen
    assert ours.settings.doc_maxlen == ref.colbert_config.doc_maxlen


def test_scores_and_ranking_match_stanford_colbert(stanford_dir, monkeypatch):
    colbert_score = require_reference("colbert.modeling.colbert").colbert_score
    ref = _stanford(stanford_dir, monkeypatch)
    ours = ColBERT.from_pretrained(stanford_dir, device="cpu")
    queries = [q for q in QUERIES if q != LITERAL_MARKER]
    with redirect_stdout(io.StringIO()):
        theirs_q = ref.queryFromText(queries)
        ids, attention = ref.doc_tokenizer.tensorize(DOCUMENTS)
        padded, mask = ref.doc(ids, attention, keep_dims="return_mask")  # as its training scores
    theirs = torch.stack([colbert_score(q[None], padded, mask, config=ref.colbert_config)
                          for q in theirs_q])
    mine = ours.score(queries, DOCUMENTS)
    torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=0)
    for i, query in enumerate(queries):
        ranked = [index for index, _ in ours.rerank(query, DOCUMENTS)]
        # Stanford sorts its scores; equal ones (the duplicated document) keep the lower index
        order = sorted(range(len(DOCUMENTS)), key=lambda j: (-float(theirs[i, j]), j))
        assert ranked == order, query


WORDS = ["hello", "World", "Crème", "東京", "☃", "don't", ",", ".", "?!", "(x)", "a-b", "[", "]",
         "[MASK]", "[CLS]", "x" * 120, "tokenization", "3.5%", "\t", "naïve", "ÅÄÖ", "🙂"]


@pytest.mark.parametrize("seed", range(6))
def test_random_settings_and_texts_read_as_stanford_colbert_reads_them(tmp_path, stanford_dir, seed, monkeypatch):
    """Seeded draws of the metadata Stanford ColBERT reads (lengths down to 3, no room for a word
    piece, and past the texts, the mask flags, other markers) and of texts around those lengths."""
    import random

    rng = random.Random(seed)
    metadata = {"query_maxlen": rng.choice([3, 4, 5, 9, 32, 70]), "doc_maxlen": rng.choice([3, 4, 7, 16, 300]),
                "attend_to_mask_tokens": rng.random() < 0.5, "mask_punctuation": rng.random() < 0.5}
    if rng.random() < 0.3:
        metadata.update(query_token_id="[unused5]", doc_token_id="[unused6]")
    path = _variant(tmp_path, stanford_dir, **metadata)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(8)]
    _assert_same_embeddings(path, texts, texts, monkeypatch)


def test_a_projection_bias_in_a_stanford_checkpoint_is_unused_as_in_colbert_ai(tmp_path, monkeypatch):
    """Stanford's projection has no bias: colbert-ai (and PyLate) load a checkpoint that holds a
    'linear.bias' without it; so do we, with a warning that says so."""
    path = build_stanford(tmp_path / "bias", head_bias=0.5)
    with pytest.warns(UserWarning, match="'linear.bias' is not used"):
        _assert_same_embeddings(path, QUERIES[:3], DOCUMENTS[:3], monkeypatch)
