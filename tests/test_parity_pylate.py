"""Encoding, scoring and reranking against PyLate 1.6.0 loading the same checkpoint directories."""

import json
import shutil

import numpy as np
import pytest
import torch
from checkpoints import OTHER_HEAD_DIMS, build_pylate, build_stanford, link_weights
from conftest import require_reference
from texts import DOCUMENTS, LONG_DOCUMENTS, QUERIES

from colbert_triton import ColBERT, PackedEmbeddings


@pytest.fixture(scope="module")
def pairs(stanford_dir, pylate_dir):
    models = require_reference("pylate.models")
    out = {}
    for name, path in (("stanford", stanford_dir), ("pylate", pylate_dir)):
        out[name] = (ColBERT.from_pretrained(path, device="cpu"),
                     models.ColBERT(model_name_or_path=str(path), device="cpu"))
    return out


@pytest.fixture(scope="module", params=["stanford", "pylate"])
def pair(request, pairs):
    return pairs[request.param]


def _assert_same_tokens(ours, ref, queries, documents):
    for is_query, texts in ((True, queries), (False, documents)):
        theirs = ref.tokenize(texts, is_query=is_query)
        mine = ours.tokenizer.queries(texts) if is_query else ours.tokenizer.documents(texts)
        for i, text in enumerate(texts):
            attn = theirs["attention_mask"][i].bool()
            ids = theirs["input_ids"][i]
            if is_query:
                expected = ids.tolist()  # all 32 rows, [MASK] expansion included
                assert mine.key_lens[i] == int(attn.sum()), text
            else:
                expected = ids[attn].tolist()
            assert mine.sequences[i].tolist() == expected, text


def test_token_ids_identical(pair):
    _assert_same_tokens(*pair, QUERIES, DOCUMENTS)


# Texts that reach the parts of the BERT tokenizer rebuild the texts above leave alone.
REBUILD_TEXTS = [
    "a\x00b c\x07d e\x1ff",  # control characters: BERT's clean_text drops them
    "word " + "x" * 150 + " end",  # a 150-character word: [UNK] past BERT's 100-character limit
    "tilde a～ and ～ alone",  # "##～" is the vocabulary's largest id
    "unaffable hyperparameterisation",  # several word pieces ("##" continuations)
]


def test_token_ids_identical_on_control_characters_long_words_and_the_last_vocabulary_id(pair):
    ours, ref = pair
    _assert_same_tokens(ours, ref, REBUILD_TEXTS, REBUILD_TEXTS)
    last_id = max(ours.tokenizer._doc_tok.get_vocab(with_added_tokens=True).values())
    tokens = ours.tokenizer.documents(["tilde a～"])
    assert last_id in tokens.sequences[0][tokens.keep[0]].tolist()  # not punctuation: kept


def test_a_tokenizer_file_with_another_subword_prefix_reads_as_pylate(tmp_path, stanford_dir):
    """transformers' BertTokenizer (PyLate's) rebuilds the word-piece model with "##"
    continuations whatever tokenizer.json says, and so must we."""
    models = require_reference("pylate.models")
    path = tmp_path / "prefix"
    shutil.copytree(stanford_dir, path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["model"]["continuing_subword_prefix"] = "@@"
    (path / "tokenizer.json").write_text(json.dumps(data))
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    _assert_same_tokens(ours, ref, REBUILD_TEXTS[3:], REBUILD_TEXTS[3:])


def test_embeddings_match(pair):
    ours, ref = pair
    for is_query, texts in ((True, QUERIES), (False, DOCUMENTS)):
        theirs = ref.encode(texts, is_query=is_query, batch_size=5)
        encode = ours.encode_queries if is_query else ours.encode_documents
        mine = encode(texts, batch_size=3)
        assert len(mine) == len(theirs)
        assert all(a.dtype == torch.float32 for a in mine)
        _assert_same_embeddings(texts, mine, theirs)


def _assert_same_embeddings(texts, mine, theirs):
    """Ours and PyLate's (numpy arrays) per text: the same rows, within 1e-5."""
    for text, a, b in zip(texts, mine, theirs):
        b = torch.as_tensor(np.asarray(b))
        assert a.shape == b.shape, text
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=text)


@pytest.mark.parametrize("pool_factor, protected_tokens", [(2, 1), (3, 0), (4, 3)])
def test_pooled_embeddings_match(pair, pool_factor, protected_tokens):
    ours, ref = pair
    texts = DOCUMENTS + LONG_DOCUMENTS
    theirs = ref.encode(texts, is_query=False, batch_size=5, pool_factor=pool_factor,
                        protected_tokens=protected_tokens)
    mine = ours.encode_documents(texts, batch_size=3, pool_factor=pool_factor, protected_tokens=protected_tokens)
    assert sum(map(len, mine)) < 0.8 * sum(map(len, ours.encode_documents(texts)))
    _assert_same_embeddings(texts, mine, theirs)


def test_embeddings_match_on_a_bert_base_head_dim(tmp_path):
    """A PyLate checkpoint with 64-wide heads (BERT-base's, as colbertv2.0's encoder): the shapes
    come from its config on both sides."""
    models = require_reference("pylate.models")
    path = build_pylate(tmp_path / "head64", num_layers=2, dim=128, width=OTHER_HEAD_DIMS["head64"])
    ours, ref = ColBERT.from_pretrained(path, device="cpu"), models.ColBERT(model_name_or_path=str(path), device="cpu")
    for is_query, texts in ((True, QUERIES[:4]), (False, DOCUMENTS[:6])):
        theirs = ref.encode(texts, is_query=is_query)
        mine = (ours.encode_queries if is_query else ours.encode_documents)(texts)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0)


def test_a_projection_bias_in_a_stanford_checkpoint_is_unused_as_in_pylate(tmp_path):
    models = require_reference("pylate.models")
    path = build_stanford(tmp_path / "bias", head_bias=0.5)
    with pytest.warns(UserWarning, match="'linear.bias' is not used"):
        ours = ColBERT.from_pretrained(path, device="cpu")
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    for a, b in zip(ours.encode_documents(DOCUMENTS[:4]), ref.encode(DOCUMENTS[:4], is_query=False), strict=True):
        torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0)


def _assert_same_ranking(mine: list[tuple[int, float]], ids: list, scores: list[float]):
    """Same scores in the same order; exact ties (the duplicate document) may swap places."""
    np.testing.assert_allclose([s for _, s in mine], scores, atol=1e-4)
    for (i, s), (j, t) in zip(mine, zip(ids, scores)):
        assert i == j or abs(s - t) < 1e-5


def test_scores_and_rerank_order_match(pair):
    """ColBERT.score/rerank (padding excluded) against PyLate scoring each document unpadded."""
    ours, ref = pair
    scores_mod = require_reference("pylate.scores")
    q_ref = ref.encode(QUERIES, is_query=True, convert_to_tensor=False)
    d_ref = ref.encode(DOCUMENTS, is_query=False, convert_to_tensor=False)
    q, d = ours.encode_queries(QUERIES), ours.encode_documents(DOCUMENTS, packed=True)
    mine = ours.score(q, d)
    theirs = torch.stack([
        scores_mod.colbert_scores_pairwise([torch.as_tensor(qi)] * len(d_ref),
                                           [torch.as_tensor(x) for x in d_ref], backend="torch")
        for qi in q_ref
    ])
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    for qi in range(len(QUERIES)):
        order = torch.sort(theirs[qi], descending=True, stable=True)
        _assert_same_ranking(ours.rerank(q[qi], d), order.indices.tolist(), order.values.tolist())


def test_pylate_rerank_semantics_match(pair):
    """pylate.rank.rerank (zero-padded candidates) against our drop-in, on each side's embeddings."""
    from colbert_triton import pylate as dropin

    ours, ref = pair
    rank = require_reference("pylate.rank")
    q_ref = ref.encode(QUERIES, is_query=True)
    d_ref = ref.encode(DOCUMENTS, is_query=False)
    ids = [[f"doc{i}" for i in range(len(DOCUMENTS))]] * len(QUERIES)
    expected = rank.rerank(ids, q_ref, [d_ref] * len(QUERIES))
    q, d = ours.encode_queries(QUERIES), ours.encode_documents(DOCUMENTS)
    got = dropin.rerank(ids, q, [d] * len(QUERIES))
    for exp, mine in zip(expected, got):
        index = {f"doc{i}": i for i in range(len(DOCUMENTS))}
        _assert_same_ranking([(index[r["id"]], r["score"]) for r in mine],
                             [index[r["id"]] for r in exp], [r["score"] for r in exp])


def test_packed_equals_list_and_batching_does_not_matter(model):
    a = model.encode_documents(DOCUMENTS, batch_size=1)
    b = model.encode_documents(DOCUMENTS, batch_size=64, packed=True)
    assert isinstance(b, PackedEmbeddings) and len(b) == len(DOCUMENTS)
    for x, y in zip(a, b.to_list()):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=0)
    assert b.offsets.tolist() == [0] + np.cumsum([len(x) for x in a]).tolist()


def test_punctuation_only_document_keeps_special_rows(model):
    d = model.encode_documents(["...!!!???", ""])
    assert d[0].shape == (3, 96) and d[1].shape == (3, 96)
    torch.testing.assert_close(d[0].norm(dim=-1), torch.ones(3))


def test_defaults_without_metadata_match_pylate(tmp_path):
    """A Stanford checkpoint without artifact.metadata: both fall back to the same settings."""
    from checkpoints import build_stanford

    models = require_reference("pylate.models")
    path = build_stanford(tmp_path / "no_metadata")
    (path / "artifact.metadata").unlink()
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    s = ours.settings
    assert (s.query_prefix, s.document_prefix, s.query_maxlen, s.doc_maxlen, s.attend_to_mask_tokens) == (
        ref.query_prefix, ref.document_prefix, ref.query_length, ref.document_length,
        ref.attend_to_expansion_tokens)
    long_text = "word " * 400
    assert ours.tokenizer.documents([long_text]).sequences[0].tolist() == \
        ref.tokenize([long_text], is_query=False)["input_ids"][0].tolist()


def test_device_mismatch_is_reported():
    from colbert_triton import score

    q = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="queries are on cpu but documents are on meta"):
        score(q, [torch.zeros(3, 8, device="meta")])


@pytest.mark.parametrize("settings", [
    {"prompts": {"query": "search_query: ", "document": "search_document: "}, "default_prompt_name": "query"},
    {"prompts": {"nl": "  Vraag:"}, "default_prompt_name": "nl"},  # spaces PyLate strips
    {"prompts": {}, "default_prompt_name": "document"},  # sentence-transformers' empty prompt
    {"prompts": {"query": "search_query: "}, "default_prompt_name": None},  # none by default
], ids=["query-prompt", "spaced-prompt", "empty-prompt", "no-default"])
def test_a_default_prompt_is_put_before_every_text_as_in_pylate(tmp_path, settings):
    """PyLate's encode puts the checkpoint's default prompt before every query and document
    (and counts it against their lengths), so a query is encoded as "search_query: ..."."""
    models = require_reference("pylate.models")
    path = build_pylate(tmp_path / "prompt", num_layers=2, settings=settings)
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    texts = [QUERIES[0], "  padded text  ", "", " ".join(DOCUMENTS)]  # the last past both lengths
    for is_query in (True, False):
        theirs = ref.encode(texts, is_query=is_query)
        mine = (ours.encode_queries if is_query else ours.encode_documents)(texts)
        for text, a, b in zip(texts, mine, theirs, strict=True):
            torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0, msg=text)


def test_modules_other_than_transformer_and_dense_are_dropped_as_in_pylate(tmp_path):
    """A Pooling module between the Transformer and the Dense and a Normalize after it (as a model
    built on a sentence-transformers checkpoint may list them): PyLate keeps the Transformer and
    Dense modules and drops the rest, and so do we, with a warning."""
    models = require_reference("pylate.models")
    path = build_pylate(tmp_path / "pooling", num_layers=2)
    transformer, dense = json.loads((path / "modules.json").read_text())
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384}))
    (path / "modules.json").write_text(json.dumps([
        transformer, {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {**dense, "idx": 2}, {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    with pytest.warns(UserWarning, match=r"modules not used \(sentence_transformers.models.Pooling, "
                                         r"sentence_transformers.models.Normalize\)"):
        ours = ColBERT.from_pretrained(path, device="cpu")
    for a, b in zip(ours.encode_documents(DOCUMENTS[:3]), ref.encode(DOCUMENTS[:3], is_query=False), strict=True):
        torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0)


def test_config_args_override_the_encoder_config_as_in_pylate(tmp_path):
    """sentence_bert_config.json's config_args go to AutoConfig, which lets them override
    config.json: here BERT's LayerNorm epsilon, which every layer uses."""
    models = require_reference("pylate.models")
    path = build_pylate(tmp_path / "config-args", num_layers=2)
    sbert = path / "0_Transformer" / "sentence_bert_config.json"
    sbert.write_text(json.dumps({**json.loads(sbert.read_text()), "config_args": {"layer_norm_eps": 0.1}}))
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    assert ours.weights.config.layer_norm_eps == ref[0].auto_model.config.layer_norm_eps == 0.1
    for a, b in zip(ours.encode_documents(DOCUMENTS[:3]), ref.encode(DOCUMENTS[:3], is_query=False), strict=True):
        torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [{"attend_to_expansion_tokens": True}, {"do_query_expansion": False}])
def test_query_settings_match_pylate(tmp_path, settings):
    """The query settings the model's own checkpoint leaves at their defaults."""
    from checkpoints import build_pylate

    models = require_reference("pylate.models")
    path = build_pylate(tmp_path / "p", settings=settings)
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    texts = ["what is the capital of france", "a"]
    theirs, mine = ref.tokenize(texts, is_query=True), ours.tokenizer.queries(texts)
    for i in range(len(texts)):
        attended = theirs["attention_mask"][i].bool()
        ids = theirs["input_ids"][i] if ref.do_query_expansion else theirs["input_ids"][i][attended]
        assert mine.sequences[i].tolist() == ids.tolist()
        assert mine.key_lens[i] == int(attended.sum())
    for a, b in zip(ours.encode_queries(texts), ref.encode(texts, is_query=True)):
        torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0)


def test_skiplist_word_outside_the_vocabulary_drops_unknown_rows(tmp_path):
    """As in PyLate, a skiplist word the vocabulary lacks maps to [UNK], so [UNK] rows go."""
    from checkpoints import build_pylate

    path = build_pylate(tmp_path / "p", settings={"skiplist_words": ["zzzqqqxx"]})
    tokenizer = ColBERT.from_pretrained(path, device="cpu").tokenizer
    unknown = tokenizer._doc_tok.token_to_id("[UNK]")
    tokens = tokenizer.documents(["emoji \U0001F642 here"])
    assert unknown in tokens.sequences[0].tolist()
    assert unknown not in tokens.sequences[0][tokens.keep[0]].tolist()


def test_stanford_mask_punctuation_false_keeps_punctuation(tmp_path):
    """A Stanford checkpoint's mask_punctuation: false is honoured as Stanford ColBERT does
    (PyLate 1.6 drops punctuation regardless; see README, where we differ)."""
    from checkpoints import build_stanford

    path = build_stanford(tmp_path / "s", metadata={"mask_punctuation": False})
    tokens = ColBERT.from_pretrained(path, device="cpu").tokenizer.documents(["a, b!"])
    assert tokens.keep[0].tolist() == list(range(len(tokens.sequences[0])))


# ---------------------------------------------------------------------------------------------
# Checkpoint files that set how texts are read: PyLate (transformers' BertTokenizer and
# sentence-transformers' Transformer module) is the reference for each.

ODD_TEXTS = ["Hello WORLD Ça va Crème", "東京 tokyo naïve résumé ÅÄÖ",
             "[MASK] and [unused0] and [UNUSED0] [Unused1] [sep] [SEP]", "  padded  ", "x[Q] ",
             "  [Q]   ", "a [D]", "[UNUSED0] x [unused0] y", "hello[unused1]world",
             "abcdefghijklmnopqrstuvwxyz hi, there?! supercalifragilisticexpialidocious",
             # special tokens by the names the cases below give them, and an unknown character
             ("a [unused10] b [UNUSED10] c [unused11]x [UNUSED11] ☃ [unused12] [UNUSED12] [unused12]x [PAD] [UNK] "
              "[unused13] z [unused4]"),
             # longer than both lengths: which end is cut shows
             "the first words " + "filler " * 400 + "the last words"]


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_word_piece(path, **changes):
    data = json.loads(path.read_text())
    data["model"].update(changes)
    path.write_text(json.dumps(data))


def _add_special_markers(path):
    """tokenizer.json lists the markers as special, unnormalised added tokens of its own."""
    data = json.loads(path.read_text())
    data["added_tokens"] += [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, t in ((1, "[unused0]"), (2, "[unused1]"))]
    path.write_text(json.dumps(data))


def _special_token(content, **flags):
    """A special token as special_tokens_map.json writes one (an AddedToken's fields)."""
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, **flags}


def _rename_special_tokens(directory, *, config=None, tokens_map=None, drop_map=False, drop_tokenizer=False):
    if drop_map:
        (directory / "special_tokens_map.json").unlink()
    if drop_tokenizer:
        (directory / "tokenizer.json").unlink()
    if config:
        _edit_json(directory / "tokenizer_config.json", **config)
    if tokens_map:
        _edit_json(directory / "special_tokens_map.json", **tokens_map)


# Special tokens renamed to vocabulary entries [unused10..13]: transformers (PyLate's tokenizer)
# takes tokenizer_config.json's names, special_tokens_map.json's over them unless
# tokenizer_config.json lists added_tokens_decoder.
RENAMED = {"cls_token": "[unused10]", "sep_token": "[unused11]", "mask_token": "[unused12]",
           "unk_token": "[unused13]"}
ADDED_TOKENS_DECODER = {str(i): {**_special_token(t), "special": True}
                        for i, t in ((0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]"))}

SETTINGS_FILES = {
    # tokenizer_config.json rules the normalisation, whatever tokenizer.json's normalizer says
    "cased": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", do_lower_case=False)),
    "accents-kept": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", strip_accents=False)),
    "no-chinese-split": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", tokenize_chinese_chars=False)),
    # transformers' BertTokenizer rebuilds the pre-tokenizer and the word-piece limits too
    "whitespace-pre-tokenizer": ("pylate", lambda d: _edit_json(d / "0_Transformer" / "tokenizer.json",
                                                                pre_tokenizer={"type": "WhitespaceSplit"})),
    "word-piece-limit": ("stanford", lambda d: _edit_word_piece(d / "tokenizer.json", max_input_chars_per_word=20)),
    # sentence-transformers lowercases texts itself (a literal [MASK] is then a word)
    "st-lowercase": ("pylate", lambda d: _edit_json(d / "0_Transformer" / "sentence_bert_config.json",
                                                    do_lower_case=True)),
    # an added token already in tokenizer.json keeps its own flags
    "special-markers": ("stanford", lambda d: _add_special_markers(d / "tokenizer.json")),
    # a null setting counts as unset, as in PyLate
    "null-settings": ("pylate", lambda d: _edit_json(d / "config_sentence_transformers.json",
                                                     do_query_expansion=None, query_length=None,
                                                     skiplist_words=None)),
    "null-metadata": ("stanford", lambda d: _edit_json(d / "artifact.metadata", query_maxlen=None,
                                                       query_token_id=None, doc_maxlen=None)),
    "special-tokens-in-config": ("stanford", lambda d: _rename_special_tokens(d, config=RENAMED, drop_map=True)),
    "special-tokens-in-map": ("pylate", lambda d: _rename_special_tokens(
        d / "0_Transformer", tokens_map={**RENAMED, "cls_token": _special_token("[unused10]")})),
    "special-tokens-map-over-config": ("stanford", lambda d: _rename_special_tokens(
        d, config={"cls_token": "[unused20]"}, tokens_map=RENAMED)),
    "special-tokens-config-with-decoder": ("stanford", lambda d: _rename_special_tokens(
        d, config={**RENAMED, "added_tokens_decoder": ADDED_TOKENS_DECODER}, tokens_map={"cls_token": "[unused20]"})),
    "special-token-flags": ("stanford", lambda d: _rename_special_tokens(d, tokens_map={
        "cls_token": _special_token("[unused10]", normalized=True),
        "sep_token": _special_token("[unused11]", lstrip=True, rstrip=True),
        "mask_token": {"content": "[unused12]", "special": False}})),  # special all the same: not normalised
    # a special token that is an added token already keeps that token's flags
    "special-token-flags-of-an-added-token": ("stanford", lambda d: _rename_special_tokens(d, tokens_map={
        "sep_token": _special_token("[SEP]", normalized=True)})),
    "special-token-flags-from-the-decoder": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", added_tokens_decoder={
        **ADDED_TOKENS_DECODER, "102": {**_special_token("[SEP]", normalized=True), "special": True}})),
    # ... and a named one becomes special: split_special_tokens then splits it in texts
    "split-a-named-token-listed-as-not-special": ("stanford", lambda d: _edit_json(
        d / "tokenizer_config.json", split_special_tokens=True, added_tokens_decoder={
            **ADDED_TOKENS_DECODER, "102": {**_special_token("[SEP]"), "special": False},
            "5": {**_special_token("[unused4]"), "special": False}},
        additional_special_tokens=["[unused4]"])),
    # ... and so does a model-specific one (a *_token key)
    "split-a-model-specific-token-listed-as-not-special": ("stanford", lambda d: _edit_json(
        d / "tokenizer_config.json", split_special_tokens=True, foo_token="[unused10]", added_tokens_decoder={
            **ADDED_TOKENS_DECODER, "11": {**_special_token("[unused10]"), "special": False}})),
    "special-tokens-vocab-only": ("stanford", lambda d: _rename_special_tokens(
        d, tokens_map=RENAMED, drop_tokenizer=True)),
    # added_tokens_decoder: transformers' added tokens come from it, not from tokenizer.json
    "added-tokens-decoder": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", added_tokens_decoder={
        **ADDED_TOKENS_DECODER, "1": {**_special_token("[unused0]"), "special": True},
        "2": {"content": "[unused1]"}, "11": {"content": "[unused10]", "special": True, "normalized": True},
        "12": {"content": "[unused11]"}})),  # not special: normalised by default
    "added-tokens-decoder-vocab-only": ("pylate", lambda d: (
        (d / "0_Transformer" / "tokenizer.json").unlink(),
        _edit_json(d / "0_Transformer" / "tokenizer_config.json", added_tokens_decoder={
            **ADDED_TOKENS_DECODER, "11": {**_special_token("[unused10]"), "special": True}}))),
    # the other special tokens transformers registers, and the older added_tokens.json
    "additional-special-tokens": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json",
                                                                   additional_special_tokens=["[unused10]"])),
    "extra-special-tokens-in-map": ("pylate", lambda d: _edit_json(d / "0_Transformer" / "special_tokens_map.json",
                                                                   extra_special_tokens={"foo_token": "[unused11]"})),
    # the map's additional_special_tokens count only where the config gave none; its extra list joins
    "extra-special-tokens-precedence": ("stanford", lambda d: (
        _edit_json(d / "tokenizer_config.json", additional_special_tokens=["[unused10]"]),
        _edit_json(d / "special_tokens_map.json", additional_special_tokens=["[unused11]"],
                   extra_special_tokens=["[unused12]"]))),
    # an object of named extra tokens does not stand for a list: the map's additional ones count
    "named-extra-special-tokens": ("pylate", lambda d: (
        _edit_json(d / "0_Transformer" / "tokenizer_config.json", extra_special_tokens={"foo_token": "[unused10]"}),
        _edit_json(d / "0_Transformer" / "special_tokens_map.json", additional_special_tokens=["[unused11]"]))),
    # the map's model-specific tokens add to the config's (one key in both: both count), and an
    # object of named tokens in the map takes the place of the config's list
    "model-specific-tokens-in-both-files": ("stanford", lambda d: (
        _edit_json(d / "tokenizer_config.json", foo_token="[unused10]", extra_special_tokens=["[unused12]"]),
        _edit_json(d / "special_tokens_map.json", foo_token="[unused11]",
                   extra_special_tokens={"bar_token": "[unused13]"}))),
    # a null in tokenizer_args does not stand against the map's token (seen from a vocabulary
    # alone, where only the special tokens are added tokens)
    "tokenizer-args-null-token": ("pylate", lambda d: (
        (d / "0_Transformer" / "tokenizer.json").unlink(),
        _edit_json(d / "0_Transformer" / "sentence_bert_config.json",
                   tokenizer_args={"pad_token": None, "sep_token": "[unused11]"}))),
    "model-specific-special-token": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json",
                                                                      foo_token="[unused12]")),
    "added-tokens-json": ("stanford", lambda d: (
        (d / "added_tokens.json").write_text(json.dumps({"[unused13]": 14, "[unused10]": 11})),
        _edit_json(d / "tokenizer_config.json", additional_special_tokens=["[unused10]"]))),
    # ... special (not normalised) only if transformers holds its text as a special token when it
    # reads the file: not special_tokens_map.json's additional_special_tokens (read later), nor a
    # token object in tokenizer_config.json (not converted yet)
    "added-tokens-json-and-later-special-tokens": ("stanford", lambda d: (
        (d / "added_tokens.json").write_text(json.dumps({"[unused10]": 11, "[unused11]": 12})),
        _edit_json(d / "special_tokens_map.json", additional_special_tokens=["[unused10]"]),
        _edit_json(d / "tokenizer_config.json", extra_special_tokens=[
            {"content": "[unused11]", "special": True, "__type": "AddedToken"}]))),
    # special tokens written in a text are word pieces then (the markers still match)
    "split-special-tokens": ("stanford", lambda d: _edit_json(d / "tokenizer_config.json", split_special_tokens=True)),
    # long texts keep their last word pieces
    "truncation-side-left": ("pylate", lambda d: _edit_json(d / "0_Transformer" / "tokenizer_config.json",
                                                            truncation_side="left")),
    # sentence-transformers passes sentence_bert_config.json's tokenizer_args to transformers
    "st-tokenizer-args": ("pylate", lambda d: _edit_json(d / "0_Transformer" / "sentence_bert_config.json",
                                                         tokenizer_args={"do_lower_case": False,
                                                                         "truncation_side": "left",
                                                                         "cls_token": "[unused10]"})),
    # a list in tokenizer_args stands: special_tokens_map.json's list does not join it
    "st-tokenizer-args-list-over-map": ("pylate", lambda d: (
        _edit_json(d / "0_Transformer" / "sentence_bert_config.json",
                   tokenizer_args={"extra_special_tokens": ["[unused10]"]}),
        _edit_json(d / "0_Transformer" / "special_tokens_map.json", extra_special_tokens=["[unused11]"]))),
    # no mask token: PyLate expands queries with the pad token
    "no-mask-token": ("stanford", lambda d: _rename_special_tokens(
        d, config={"mask_token": None, "pad_token": "[unused12]"}, drop_map=True)),
    # one text given twice with different flags: the tokenizers library matches the texts the
    # first allows, with the last one's lstrip/rstrip/single_word (two named tokens, from a
    # vocabulary alone; a named and a listed one)
    "one-text-two-named-tokens": ("stanford", lambda d: _rename_special_tokens(
        d, config={"pad_token": {"content": "[unused11]", "single_word": True, "__type": "AddedToken"},
                   "mask_token": {"content": "[unused11]", "normalized": True, "__type": "AddedToken"}},
        drop_map=True, drop_tokenizer=True)),
    "one-text-named-and-listed": ("stanford", lambda d: _rename_special_tokens(
        d, config={"mask_token": "[unused12]", "additional_special_tokens": [
            {"content": "[unused12]", "single_word": True, "__type": "AddedToken"}]}, drop_map=True)),
    # a listed token object from tokenizer_config.json is special only if it says so (or if it
    # is a named token's text): else normalised, and matched despite split_special_tokens
    "listed-object-not-special": ("stanford", lambda d: _edit_json(
        d / "tokenizer_config.json", split_special_tokens=True,
        extra_special_tokens=[{"content": "[unused10]", "__type": "AddedToken"}, "[unused13]"])),
    # model-specific tokens: special_tokens_map.json's object over tokenizer_config.json's by
    # name, a "_token" key's string under both, a token object under such a key
    "model-specific-objects": ("stanford", lambda d: _rename_special_tokens(
        d, config={"extra_special_tokens": {"foo_token": "[unused10]", "baz_token": "[unused11]"},
                   "bar_token": {"content": "[unused13]", "rstrip": True, "__type": "AddedToken"}},
        tokens_map={"extra_special_tokens": {"foo_token": "[unused12]"}, "baz_token": "[unused4]"})),
}


@pytest.mark.parametrize("case", SETTINGS_FILES)
def test_checkpoint_settings_files_read_as_pylate_reads_them(tmp_path, stanford_dir, pylate_dir, case):
    import shutil

    models = require_reference("pylate.models")
    layout, edit = SETTINGS_FILES[case]
    path = tmp_path / case
    shutil.copytree(stanford_dir if layout == "stanford" else pylate_dir, path)
    edit(path)
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    _assert_same_tokens_and_embeddings(ours, ref, ODD_TEXTS)


# Random tokenizer settings (a differential fuzz against PyLate, seeded): token names from the
# vocabulary, AddedToken flags, lists of extra special tokens, the map or tokenizer.json left
# out, tokenizer_args, and the rarer forms of _random_token_files. The pools overlap: a text
# given twice with different flags (as two named tokens, or as a named and a listed one) is
# read as the tokenizers library reads it.
NAMED_POOL = ["[unused3]", "[unused4]", "[unused5]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "[unused0]"]
EXTRA_POOL = ["[unused6]", "[unused7]", "[unused8]", "[unused1]", "[unused3]", "[SEP]"]
FUZZ_WORDS = ["hello", "World", "Crème", "東京", "☃", "don't", ",", "[", "]", "x"] + [
    form for t in NAMED_POOL + EXTRA_POOL for form in (t, t.lower(), t.upper(), t + "x")]


def _random_token_files(rng, directory):
    """Rarer forms: an added_tokens_decoder (the special tokens' entries, pool tokens', some
    flags changed), added_tokens.json, token objects under a "_token" key and in a
    model-specific object."""
    vocab = {word: i for i, word in enumerate((directory / "vocab.txt").read_text().splitlines())}

    def flags():
        return {f: rng.random() < 0.5 for f in ("lstrip", "rstrip", "normalized", "single_word") if rng.random() < 0.4}

    if rng.random() < 0.15:
        decoder = {}
        for text in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + rng.sample(NAMED_POOL + EXTRA_POOL, rng.randint(0, 2)):
            entry = _special_token(text, special=True)
            if rng.random() < 0.3:
                entry.update(flags(), special=rng.random() < 0.5)
            decoder[str(vocab[text])] = entry
        _edit_json(directory / "tokenizer_config.json", added_tokens_decoder=decoder)
    if rng.random() < 0.1:
        (directory / "added_tokens.json").write_text(json.dumps({t: vocab[t] for t in rng.sample(NAMED_POOL + EXTRA_POOL, 2)}))
    if rng.random() < 0.1:
        _edit_json(directory / "tokenizer_config.json",
                   baz_token={"content": rng.choice(EXTRA_POOL), **flags(), "__type": "AddedToken"})
    if rng.random() < 0.1:
        qux = rng.choice(EXTRA_POOL + NAMED_POOL)
        model_specific = {"qux_token": {"content": qux, **flags(), "__type": "AddedToken"},
                          "foo_token": rng.choice(EXTRA_POOL)}
        if rng.random() < 0.5:  # one text under two model-specific names, flags drawn apart
            model_specific["quux_token"] = {"content": qux, **flags(), "__type": "AddedToken"}
        _edit_json(directory / "tokenizer_config.json", extra_special_tokens=model_specific)


def _random_settings(rng, config: bool) -> dict:
    # an object in tokenizer_config.json (or the arguments) carries its type, as saved
    typed = {"__type": "AddedToken"} if config else {}

    def token(pool, as_object=True):
        content = rng.choice(pool)
        flags = {f: rng.random() < 0.5 for f in ("lstrip", "rstrip", "normalized", "single_word")
                 if rng.random() < 0.4}
        return {"content": content, **flags, **typed} if as_object and rng.random() < 0.4 else content

    settings = {}
    for name in ("cls_token", "sep_token", "mask_token", "unk_token", "pad_token"):
        if rng.random() < 0.25:
            settings[name] = token(NAMED_POOL)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if rng.random() < 0.2:
            # a listed object is read from tokenizer_config.json's typed form only (transformers
            # refuses one in special_tokens_map.json)
            tokens = [token(EXTRA_POOL, as_object=config) for _ in range(rng.randint(0, 2))]
            named = key == "extra_special_tokens" and rng.random() < 0.3  # transformers' newer form only
            settings[key] = {"foo_token": rng.choice(EXTRA_POOL)} if named else tokens
    if rng.random() < 0.1:
        settings["bar_token"] = token(EXTRA_POOL, as_object=config)
    if config:
        for key, values in (("do_lower_case", [True, False]), ("strip_accents", [True, False, None]),
                            ("split_special_tokens", [True, False]), ("truncation_side", ["left", "right"])):
            if rng.random() < 0.2:
                settings[key] = rng.choice(values)
    return settings


@pytest.mark.parametrize("seed", range(12))
def test_random_tokenizer_settings_read_as_pylate_reads_them(tmp_path, stanford_dir, pylate_dir, seed):
    import random

    models = require_reference("pylate.models")
    rng = random.Random(seed)
    layout = rng.choice(["stanford", "pylate"])
    path = tmp_path / "ckpt"
    # the weights linked, not copied (only the settings files are edited): a wide run of seeds
    # would otherwise write ~90 MB each
    shutil.copytree(stanford_dir if layout == "stanford" else pylate_dir, path, copy_function=link_weights)
    tokenizer_dir = path if layout == "stanford" else path / "0_Transformer"
    _edit_json(tokenizer_dir / "tokenizer_config.json", **_random_settings(rng, config=True))
    if rng.random() < 0.5:
        _edit_json(tokenizer_dir / "special_tokens_map.json", **_random_settings(rng, config=False))
    if rng.random() < 0.2:
        (tokenizer_dir / "tokenizer.json").unlink()
    if layout == "pylate" and rng.random() < 0.3:
        _edit_json(tokenizer_dir / "sentence_bert_config.json", tokenizer_args=_random_settings(rng, config=True))
    _random_token_files(rng, tokenizer_dir)
    texts = [" ".join(rng.choice(FUZZ_WORDS) for _ in range(rng.randint(0, 40))) for _ in range(6)]
    texts.append("first " + "filler " * 350 + "last")
    ref = models.ColBERT(model_name_or_path=str(path), device="cpu")
    ours = ColBERT.from_pretrained(path, device="cpu")
    _assert_same_tokens(ours, ref, texts, texts)


def _assert_same_tokens_and_embeddings(ours, ref, texts):
    for is_query in (True, False):
        theirs = ref.tokenize(texts, is_query=is_query)
        mine = ours.tokenizer.queries(texts) if is_query else ours.tokenizer.documents(texts)
        for i, text in enumerate(texts):
            attn = theirs["attention_mask"][i].bool()
            ids = theirs["input_ids"][i]
            expanded = is_query and ref.do_query_expansion
            assert mine.sequences[i].tolist() == (ids if expanded else ids[attn]).tolist(), text
        encode = ours.encode_queries if is_query else ours.encode_documents
        for text, a, b in zip(texts, encode(texts), ref.encode(texts, is_query=is_query)):
            torch.testing.assert_close(a, torch.as_tensor(np.asarray(b)), atol=1e-5, rtol=0, msg=text)


def test_pylates_default_markers_with_a_space(tmp_path, pylate_dir):
    """A checkpoint saved by PyLate with its default markers "[Q] " / "[D] " (new tokens, the
    embedding grown): texts are stripped as sentence-transformers strips them, so a marker
    written at a text's end is read as PyLate reads it."""
    models = require_reference("pylate.models")
    saved = tmp_path / "default-markers"
    models.ColBERT(model_name_or_path=str(pylate_dir), device="cpu", query_prefix="[Q] ",
                   document_prefix="[D] ").save(str(saved))
    ref = models.ColBERT(model_name_or_path=str(saved), device="cpu")
    ours = ColBERT.from_pretrained(saved, device="cpu")
    assert ours.settings.query_prefix == "[Q] " and ours.tokenizer.query_marker == [ref.query_prefix_id]
    _assert_same_tokens_and_embeddings(ours, ref, ODD_TEXTS)
