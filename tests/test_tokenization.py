"""The batched tokenizer against a text-at-a-time reference, over the settings a checkpoint can
carry (markers or none, [MASK] expansion on or off and attended or not, lengths that leave no
room for word pieces) and the texts that stress the packing (empty, punctuation only, longer
than the budget, one text, none)."""

from dataclasses import replace

import numpy as np
import pytest
from texts import DOCUMENTS, LONG, QUERIES
from tokenizers import Tokenizer

from colbert_triton.model.tokenization import ColBERTTokenizer

TEXTS = ["", "!!! ... ,,,", " a ", LONG * 3, "What, exactly, is [unused1] late-interaction?",
         *QUERIES[:3], *DOCUMENTS[:3]]


def _reference(tokenizer: ColBERTTokenizer, texts, is_query: bool):
    """One text at a time, with the checkpoint's own tokenizer object, as PyLate builds them."""
    s = tokenizer.settings
    tok = tokenizer._query_tok if is_query else tokenizer._doc_tok
    head = [tokenizer.cls_id] + (tokenizer.query_marker if is_query else tokenizer.doc_marker)
    budget = (s.query_maxlen if is_query else s.doc_maxlen) - len(head) - 1
    sequences, key_lens, keep = [], [], []
    for text in texts:
        text = text.strip()  # as sentence-transformers does before tokenizing
        if s.lowercase_texts:
            text = text.lower()
        pieces = tok.encode(text, add_special_tokens=False).ids if budget > 0 else []
        ids = head + pieces[:budget] + [tokenizer.sep_id]
        key_lens.append(len(ids))
        if is_query and s.do_query_expansion:
            ids += [tokenizer.mask_id] * (s.query_maxlen - len(ids))
            if s.attend_to_mask_tokens:
                key_lens[-1] = s.query_maxlen
        sequences.append(ids)
        keep.append([i for i, t in enumerate(ids) if t not in set(tokenizer.skiplist_ids.tolist())])
    return sequences, key_lens, keep


def _variant(model, **changes) -> ColBERTTokenizer:
    base = model.tokenizer
    tokenizer = Tokenizer.from_str(base._doc_tok.to_str())
    tokenizer.no_truncation()
    return ColBERTTokenizer(tokenizer, replace(base.settings, **changes), max_positions=512)


SETTINGS = {
    "checkpoint": {},
    "no markers": {"query_prefix": "", "document_prefix": ""},
    "no expansion": {"do_query_expansion": False},
    "mask attended": {"attend_to_mask_tokens": True},
    "no expansion, mask attended": {"do_query_expansion": False, "attend_to_mask_tokens": True},
    "no room for words": {"query_maxlen": 3, "doc_maxlen": 3},
    "one word": {"query_maxlen": 4, "doc_maxlen": 4},
    "long": {"query_maxlen": 64, "doc_maxlen": 512},
    "lowercased texts": {"lowercase_texts": True},
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("is_query", [True, False], ids=["queries", "documents"])
def test_batched_tokenizer_matches_text_at_a_time(model, name, is_query):
    tokenizer = _variant(model, **SETTINGS[name])
    for texts in (TEXTS, TEXTS[3:4], []):
        batch = tokenizer.queries(texts) if is_query else tokenizer.documents(texts)
        sequences, key_lens, keep = _reference(tokenizer, texts, is_query)
        assert [s.tolist() for s in batch.sequences] == sequences
        assert all(s.dtype == np.int64 for s in batch.sequences)
        assert batch.key_lens.dtype == np.int64 and batch.key_lens.tolist() == key_lens
        if is_query:
            assert batch.keep is None
        else:
            assert [k.tolist() for k in batch.keep] == keep
        assert len(batch.subset(list(range(len(texts)))[::-1])) == len(texts)
