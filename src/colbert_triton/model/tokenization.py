"""Texts to ColBERT token sequences, exactly as Stanford ColBERT and PyLate build them (SPEC.md).

    query:    [CLS] [unused0] wordpieces[:query_maxlen-3] [SEP] [MASK] ... up to query_maxlen
              keys = the tokens before the [MASK] expansion (unless attend_to_mask_tokens)
    document: [CLS] [unused1] wordpieces[:doc_maxlen-3] [SEP]
              rows whose id is in the punctuation skip-list are dropped after encoding

Word pieces come from the checkpoint's own `tokenizers` file, batched in Rust; the per-text work
in Python is only list concatenation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import pairwise

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from .checkpoint import CheckpointError, ColBERTSettings, TokenizerFiles


@dataclass
class TokenizedBatch:
    """Token ids per text plus what the encoder and the head need to know about them."""

    sequences: list[np.ndarray]  # int64 ids per text
    key_lens: np.ndarray  # attended tokens per text (a prefix of the sequence)
    keep: list[np.ndarray] | None  # rows kept in the output per text; None = all rows

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, index) -> "TokenizedBatch":
        return TokenizedBatch(
            [self.sequences[i] for i in index],
            self.key_lens[np.asarray(index, dtype=np.int64)],
            None if self.keep is None else [self.keep[i] for i in index],
        )


def check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string (wrap it in a list)")
    if isinstance(texts, dict):
        raise TypeError(f"{what} must be a list of strings, got a dict (pass its values() or keys())")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] is {type(text).__name__}, expected str")
    try:
        "".join(texts).encode("utf-8")  # one pass: the tokenizer takes only valid Unicode
    except UnicodeEncodeError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as bad:
                raise ValueError(f"{what}[{i}] is not valid Unicode ({bad.reason} at character "
                                 f"{bad.start})") from None
    return texts


class ColBERTTokenizer:
    def __init__(self, tokenizer: Tokenizer, settings: ColBERTSettings, max_positions: int,
                 files: TokenizerFiles | None = None):
        """``files``: the checkpoint's tokenizer settings this applies (special tokens,
        split_special_tokens, truncation_side); None: BERT's defaults."""
        self.settings = settings
        files = TokenizerFiles(None, None) if files is None else files
        special_tokens = files.special_tokens
        tokenizer.no_padding()
        tokenizer.no_truncation()  # some tokenizer.json files carry padding/truncation to 128
        # transformers registers the checkpoint's special tokens, so such a token written in a
        # text is that token. One that is an added token already keeps that token's flags, but a
        # named one (CLS, SEP, ..., or model-specific) becomes special (what split_special_tokens
        # looks at). One missing from the vocabulary transformers would add with a new id past
        # the embedding: not added here (the ones used below are refused).
        named = [t for t in (*special_tokens.values(), *files.model_specific_tokens) if t is not None]
        named_texts = {t.content for t in named}
        serialised = json.loads(tokenizer.to_str())
        for token in serialised["added_tokens"]:
            token["special"] = token["special"] or token["content"] in named_texts
        base = json.dumps(serialised)  # before the others are added: see _prepared
        added = {token["content"] for token in serialised["added_tokens"]}
        # The others are added as transformers adds them: in one call, in its order (the named
        # tokens, then the listed ones), a token given twice with the same flags once. The
        # tokenizers library then reads a text given twice with different flags in a way of its
        # own (which texts match from the first, the lstrip/rstrip/single_word flags from the
        # last) that a serialised copy loses: _prepared repeats the call.
        to_add = []
        for t in (*named, *files.extra_special_tokens):
            if t.content not in added and t not in to_add and tokenizer.token_to_id(t.content) is not None:
                to_add.append(t)
        special = [AddedToken(t.content, lstrip=t.lstrip, rstrip=t.rstrip, normalized=t.normalized,
                              single_word=t.single_word, special=t.special) for t in to_add]
        tokenizer.add_tokens(special)
        # PyLate registers the markers as added tokens (plain strings: a token the tokenizer
        # already lists as added keeps its own flags), so a marker written in a text is one token.
        markers = [p for p in (settings.query_prefix, settings.document_prefix) if p]
        tokenizer.add_tokens(markers)

        def token_id(token: str, what: str) -> int:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise CheckpointError(f"the tokenizer has no {what} token {token!r}")
            return found

        def special_id(*names: str) -> int:
            """The first of these special tokens that is set (not null)."""
            for name in names:
                if special_tokens[name] is not None:
                    content = special_tokens[name].content
                    found = tokenizer.token_to_id(content)
                    if found is None:
                        raise CheckpointError(f"the tokenizer has no {content} token (the checkpoint's {name})")
                    return found
            raise CheckpointError(f"the tokenizer's {', '.join(names)} {'is' if len(names) == 1 else 'are all'} "
                                  f"null in the checkpoint's tokenizer settings")

        self.cls_id = special_id("cls_token")
        self.sep_id = special_id("sep_token")
        # The query expansion token: [MASK], or as PyLate falls back when there is none, EOS or PAD.
        self.mask_id = special_id("mask_token", "eos_token", "pad_token")
        unk = special_tokens["unk_token"]
        unk_id = None if unk is None else tokenizer.token_to_id(unk.content)
        self.query_marker = [token_id(settings.query_prefix, "query marker")] if settings.query_prefix else []
        self.doc_marker = [token_id(settings.document_prefix, "document marker")] if settings.document_prefix else []
        # PyLate maps each skip word with convert_tokens_to_ids, which gives [UNK] for a word
        # missing from the vocabulary; mirror it so both drop the same rows.
        skip = {tokenizer.token_to_id(w) for w in settings.skiplist_words}
        skip = {unk_id if i is None else i for i in skip} - {None}
        self.skiplist_ids = np.array(sorted(skip), dtype=np.int64)
        # id -> dropped, for any number of rows at once (sized by the largest id: a vocabulary's
        # ids need not be contiguous)
        self._skip_table = np.zeros(max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1,
                                    dtype=bool)
        self._skip_table[self.skiplist_ids] = True

        # Every sequence starts with its head and ends with [SEP]; word pieces fill the rest.
        self._query_head = [self.cls_id] + self.query_marker
        self._doc_head = [self.cls_id] + self.doc_marker
        self._query_budget = settings.query_maxlen - len(self._query_head) - 1
        self._doc_budget = settings.doc_maxlen - len(self._doc_head) - 1
        if self._query_budget < 0 or self._doc_budget < 0:
            raise ValueError(
                f"query_maxlen={settings.query_maxlen} / doc_maxlen={settings.doc_maxlen} leave no room "
                f"for [CLS], the marker and [SEP]: each must be at least "
                f"{len(self._query_head) + 1} / {len(self._doc_head) + 1}"
            )
        if max(settings.query_maxlen, settings.doc_maxlen) > max_positions:
            raise ValueError(
                f"query_maxlen={settings.query_maxlen} / doc_maxlen={settings.doc_maxlen} exceed "
                f"the model's {max_positions} positions"
            )
        self._query_tok = self._prepared(base, special, markers, self._query_budget, files)
        self._doc_tok = self._prepared(base, special, markers, self._doc_budget, files)

    def added_tokens(self) -> dict[int, str]:
        """Every token matched whole in a text (special tokens, markers, added tokens), by id."""
        return {i: token.content for i, token in self._doc_tok.get_added_tokens_decoder().items()}

    @staticmethod
    def _prepared(base: str, special: list[AddedToken], markers: list[str], budget: int,
                  files: TokenizerFiles) -> Tokenizer:
        """A tokenizer of its own for one word-piece budget: from the JSON taken before the
        special tokens and the markers were added, with those added by the same calls as
        transformers and PyLate make. (A copy serialised after them would lose how the live
        tokenizer reads a text added twice with different flags, and would list a marker the
        file already had with add_tokens' flags, which the live tokenizer, like PyLate's, does
        not apply.) As in transformers, with split_special_tokens special tokens written in a
        text are word pieces (other added tokens still match), and truncation_side says which
        end of a long text is cut."""
        tok = Tokenizer.from_str(base)
        tok.add_tokens(special)
        tok.add_tokens(markers)
        tok.encode_special_tokens = files.split_special_tokens
        if budget > 0:
            tok.enable_truncation(max_length=budget, direction=files.truncation_side)
        return tok

    @classmethod
    def from_files(cls, files: TokenizerFiles, settings: ColBERTSettings, max_positions: int) -> "ColBERTTokenizer":
        """The tokenizer as transformers' BertTokenizer (v5, PyLate's) builds it from these files.

        With ``files.bert_normalizer`` (the BertNormalizer settings transformers would use, see
        checkpoint._bert_normalizer; None takes tokenizer.json as it is), the parts it rebuilds
        whatever tokenizer.json says are rebuilt the same way: the normalizer from those
        settings, the BERT pre-tokenizer, and the word-piece limits ("##" pieces, words of up to
        100 characters, longer ones the checkpoint's unknown token). A well-formed BERT
        checkpoint's file says the same. From a vocabulary alone: word pieces over it, those
        parts with BERT's defaults, and the special tokens. The added tokens are tokenizer.json's
        as transformers amends them (files.added_tokens_decoder, files.added_tokens_json)."""
        special_tokens, bert_normalizer, source = files.special_tokens, files.bert_normalizer, files.source
        unk = special_tokens["unk_token"]
        if unk is None and (bert_normalizer is not None or files.tokenizer_file is None):
            raise CheckpointError(f"{source}: the tokenizer's unk_token is null (word pieces need one)")
        if files.tokenizer_file is not None:
            try:
                tokenizer = Tokenizer.from_file(str(files.tokenizer_file))
            except Exception as bad:  # the Rust side raises plain Exception
                raise CheckpointError(f"{source}: unreadable tokenizer ({bad})") from None
        else:
            try:
                tokenizer = Tokenizer(models.WordPiece(models.WordPiece.read_file(str(files.vocab_file)),
                                                       unk_token=unk.content))
            except Exception as bad:
                raise CheckpointError(f"{source}: unreadable vocabulary ({bad})") from None
            bert_normalizer = {} if bert_normalizer is None else bert_normalizer  # BERT's defaults
        replaced = files.added_tokens_decoder is not None
        if replaced or files.added_tokens_json:
            # The decoder's list replaces tokenizer.json's; added_tokens.json's joins it, and
            # tokenizer.json's entry wins an id both give (transformers reads it last).
            data = json.loads(tokenizer.to_str())
            given = files.added_tokens_decoder if replaced else files.added_tokens_json
            tokens = {i: {"id": i, **asdict(token)} for i, token in given.items()}
            if not replaced:
                tokens.update({token["id"]: token for token in data["added_tokens"]})
            data["added_tokens"] = [tokens[i] for i in sorted(tokens)]
            tokenizer = Tokenizer.from_str(json.dumps(data))
        if bert_normalizer is not None:
            tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, **bert_normalizer)
            tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            if isinstance(tokenizer.model, models.WordPiece):
                tokenizer.model.continuing_subword_prefix = "##"
                tokenizer.model.max_input_chars_per_word = 100
                tokenizer.model.unk_token = unk.content
                if tokenizer.token_to_id(unk.content) is None:
                    raise CheckpointError(f"{source}: the tokenizer has no unk token {unk.content!r}")
        try:
            return cls(tokenizer, settings, max_positions, files)
        except CheckpointError as bad:  # name the file that lacks the token
            raise CheckpointError(f"{source}: {bad}") from None

    def _pack(self, tok: Tokenizer, texts: list[str], head: list[int], budget: int,
              pad_to: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every text as ``head + word pieces[:budget] + [SEP]``, then [MASK] up to ``pad_to``,
        laid end to end: (ids, each text's start, each text's length before the expansion).

        One tokenizer call (Rust, all cores), one Python list and one conversion to numpy: numpy
        calls per text would cost more than the tokenizer itself on a many-core machine, and
        numpy passes over the whole batch cost more than this for one short query.
        """
        if budget > 0 and texts:  # `tok` truncates to the budget
            # As PyLate's encode and sentence-transformers' Transformer module (its tokenizer)
            # prepare them: after the checkpoint's default prompt, if any, stripped (it matters
            # only to a marker with a space in it, such as "[Q] "), and lowercased where the
            # checkpoint says so.
            prompt = self.settings.prompt
            texts = [(prompt + t).strip() for t in texts]
            if self.settings.lowercase_texts:
                texts = [t.lower() for t in texts]
            word_pieces = (e.ids for e in tok.encode_batch(texts, add_special_tokens=False))
        else:  # no texts, or a query_maxlen that leaves no room for word pieces
            word_pieces = ([] for _ in texts)
        flat, key_lens = [], []
        for pieces in word_pieces:
            flat += head
            flat += pieces
            flat.append(self.sep_id)
            key_lens.append(len(head) + len(pieces) + 1)
            if pad_to is not None:
                flat += [self.mask_id] * (pad_to - key_lens[-1])
        key_lens = np.array(key_lens, dtype=np.int64)
        lens = key_lens if pad_to is None else np.full(len(texts), pad_to, dtype=np.int64)
        return np.array(flat, dtype=np.int64), np.cumsum(lens) - lens, key_lens

    def queries(self, texts, *, checked: bool = False) -> TokenizedBatch:
        """``checked``: the caller has already passed ``texts`` through check_texts."""
        texts = texts if checked else check_texts(texts, "queries")
        s = self.settings
        ids, starts, key_lens = self._pack(
            self._query_tok, texts, self._query_head, self._query_budget,
            s.query_maxlen if s.do_query_expansion else None,
        )
        if s.do_query_expansion and s.attend_to_mask_tokens:
            key_lens = np.full(len(texts), s.query_maxlen, dtype=np.int64)
        return TokenizedBatch(_split(ids, starts), key_lens, None)

    def documents(self, texts, *, checked: bool = False) -> TokenizedBatch:
        """``checked``: the caller has already passed ``texts`` through check_texts."""
        texts = texts if checked else check_texts(texts, "documents")
        ids, starts, key_lens = self._pack(self._doc_tok, texts, self._doc_head, self._doc_budget, None)
        # Rows kept (not punctuation) as indices within each text, from one pass over all tokens.
        kept = np.flatnonzero(~self._skip_table[ids])
        text_of_kept = np.searchsorted(starts, kept, side="right") - 1
        kept_starts = np.searchsorted(text_of_kept, np.arange(len(texts)))
        keep = _split(kept - starts[text_of_kept], kept_starts)
        return TokenizedBatch(_split(ids, starts), key_lens, keep)


def _split(flat: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Views of ``flat`` cut at ``starts``, one per start (plain slices: np.split costs ~4x)."""
    bounds = starts.tolist() + [flat.size]
    return [flat[a:b] for a, b in pairwise(bounds)]
