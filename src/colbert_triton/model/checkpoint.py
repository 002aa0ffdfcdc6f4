"""Finding and reading a BERT ColBERT checkpoint, in either on-disk format.

Two layouts hold the same model (SPEC.md §1):

- Stanford (`colbert-ai`): root ``config.json`` (architectures ``HF_ColBERT``), ``model.safetensors``
  (or ``pytorch_model.bin``) with the encoder under a ``bert.`` prefix and ``linear.weight`` at the
  root, ``artifact.metadata`` (JSON settings), tokenizer files.
- PyLate / sentence-transformers: ``modules.json`` naming a Transformer module directory (plain
  BertModel weights, no prefix) and a Dense module directory (``linear.weight``), settings in
  ``config_sentence_transformers.json``.

Like PyLate, the sentence-transformers layout wins when ``modules.json`` is present; otherwise
the Stanford files alone suffice. A name is a local directory or a hub id (downloaded through
huggingface_hub's cache, which honours ``HF_HUB_OFFLINE``), with an optional ``revision``.
"""

from __future__ import annotations

import json
import math
import numbers
import string
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

DEFAULT_MODEL = "answerdotai/answerai-colbert-small-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, data, source: str) -> "BertConfig":
        get = _SettingsFile(data, source)
        model_type = get.value("model_type", "bert")
        if model_type != "bert":
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a BERT model")
        hidden_act = get.value("hidden_act", "gelu")
        if hidden_act != "gelu":
            raise CheckpointError(f"{source}: hidden_act {hidden_act!r} is not supported (exact 'gelu' only)")
        if get.value("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{source}: only absolute position embeddings are supported")

        def size(key: str, default: int | None = None, minimum: int = 1) -> int:
            value = get.integer(key, default)
            if value is None:
                raise CheckpointError(f"{source}: missing key {key!r}")
            if value < minimum:
                raise CheckpointError(f"{source}: {key} must be at least {minimum}, got {value}")
            return value

        # A zero or negative epsilon makes LayerNorm divide by zero or take a negative root: NaNs.
        eps = get.value("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise CheckpointError(f"{source}: layer_norm_eps must be a positive number, got {eps!r}")
        config = cls(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            num_layers=size("num_hidden_layers", minimum=0),
            num_heads=size("num_attention_heads"),
            intermediate_size=size("intermediate_size"),
            max_position_embeddings=size("max_position_embeddings", 512),
            type_vocab_size=size("type_vocab_size", 2),
            layer_norm_eps=float(eps),
        )
        if config.hidden_size % config.num_heads:
            raise CheckpointError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        return config


PUNCTUATION = tuple(string.punctuation)


@dataclass(frozen=True)
class ColBERTSettings:
    """How texts become token sequences, read from the checkpoint's metadata.

    Defaults, used only where the checkpoint says nothing, are PyLate's for a Stanford
    checkpoint: markers ``[unused0]``/``[unused1]``, 32-token queries with [MASK] expansion that
    is not attended to, punctuation dropped from documents. PyLate's default document length
    (180) applies when neither the metadata nor the caller gives one.
    """

    query_prefix: str = "[unused0]"
    document_prefix: str = "[unused1]"
    query_maxlen: int = 32
    doc_maxlen: int = 180
    attend_to_mask_tokens: bool = False
    do_query_expansion: bool = True
    skiplist_words: tuple[str, ...] = PUNCTUATION
    # sentence-transformers' `do_lower_case` (sentence_bert_config.json): texts lowercased in
    # Python before tokenizing, so a literal [MASK] in a text is no longer the special token.
    lowercase_texts: bool = False
    # sentence-transformers' default prompt (config_sentence_transformers.json's
    # `default_prompt_name` into its `prompts`): PyLate's encode puts it before every query and
    # document text, and so does the tokenizer here.
    prompt: str = ""

    def with_lengths(self, query_maxlen: int | None, doc_maxlen: int | None) -> "ColBERTSettings":
        for name, value in (("query_maxlen", query_maxlen), ("doc_maxlen", doc_maxlen)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        return replace(
            self,
            query_maxlen=self.query_maxlen if query_maxlen is None else int(query_maxlen),
            doc_maxlen=self.doc_maxlen if doc_maxlen is None else int(doc_maxlen),
        )

    @classmethod
    def from_stanford_metadata(cls, meta: dict, source: str) -> "ColBERTSettings":
        defaults = cls()
        get = _SettingsFile(meta, source)
        return cls(
            query_prefix=get.text("query_token_id", defaults.query_prefix),
            document_prefix=get.text("doc_token_id", defaults.document_prefix),
            query_maxlen=get.integer("query_maxlen", defaults.query_maxlen),
            doc_maxlen=get.integer("doc_maxlen", defaults.doc_maxlen),
            attend_to_mask_tokens=get.flag("attend_to_mask_tokens", False),
            skiplist_words=PUNCTUATION if get.flag("mask_punctuation", True) else (),
        )

    @classmethod
    def from_sentence_transformers(cls, config: dict, source: str,
                                   lowercase_texts: bool = False) -> "ColBERTSettings":
        defaults = cls()
        get = _SettingsFile(config, source)
        expansion = get.flag("do_query_expansion", True)
        skiplist = get.value("skiplist_words", PUNCTUATION)
        if not isinstance(skiplist, (list, tuple)) or not all(isinstance(w, str) for w in skiplist):
            raise CheckpointError(f"{source}: skiplist_words must be a list of strings")
        given = get.value("prompts", {})
        if not isinstance(given, dict) or not all(isinstance(p, str) for p in given.values()):
            raise CheckpointError(f"{source}: prompts must be an object of prompt texts")
        prompts = {"query": "", "document": "", **given}  # sentence-transformers' starting prompts
        prompt_name = get.text("default_prompt_name", None)
        if prompt_name is not None and prompt_name not in prompts:
            raise CheckpointError(f"{source}: default_prompt_name {prompt_name!r} is not one of the "
                                  f"prompts {sorted(prompts)}")
        return cls(
            query_prefix=get.text("query_prefix", "[Q] "),
            document_prefix=get.text("document_prefix", "[D] "),
            # PyLate takes a length of 0 as unset too.
            query_maxlen=get.integer("query_length", defaults.query_maxlen) or defaults.query_maxlen,
            doc_maxlen=get.integer("document_length", defaults.doc_maxlen) or defaults.doc_maxlen,
            attend_to_mask_tokens=expansion and get.flag("attend_to_expansion_tokens", False),
            do_query_expansion=expansion,
            skiplist_words=tuple(skiplist),
            lowercase_texts=lowercase_texts,
            prompt="" if prompt_name is None else prompts[prompt_name],
        )


class _SettingsFile:
    """Typed reads of a settings file's keys. As in PyLate, a key set to null counts as unset;
    a default of None makes the key optional."""

    def __init__(self, data, source: str):
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        self.data, self.source = data, source

    def value(self, key: str, default):
        value = self.data.get(key)
        return default if value is None else value

    def text(self, key: str, default: str) -> str:
        value = self.value(key, default)
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{self.source}: {key} must be a string, got {value!r}")
        return value

    def integer(self, key: str, default: int | None) -> int | None:
        value = self.value(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{self.source}: {key} must be an integer, got {value!r}")
        return value

    def flag(self, key: str, default: bool | None) -> bool | None:
        value = self.value(key, default)
        if value is not None and not isinstance(value, bool):
            raise CheckpointError(f"{self.source}: {key} must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class TokenSpec:
    """An added token: its text and matching flags, as transformers' AddedToken (a special
    token's default: matched in the raw text, not the normalised one)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False
    special: bool = True


# transformers' special-token attributes with BertTokenizer's defaults: the tokenizer PyLate and
# Stanford ColBERT load a BERT checkpoint with.
BERT_SPECIAL_TOKENS = {"bos_token": None, "eos_token": None, "unk_token": TokenSpec("[UNK]"),
                       "sep_token": TokenSpec("[SEP]"), "pad_token": TokenSpec("[PAD]"),
                       "cls_token": TokenSpec("[CLS]"), "mask_token": TokenSpec("[MASK]")}


@dataclass(frozen=True)
class TokenizerFiles:
    """What the tokenizer is built from (tokenization.ColBERTTokenizer.from_files)."""

    tokenizer_file: Path | None  # tokenizer.json
    vocab_file: Path | None  # vocab.txt, the fallback
    # BertNormalizer settings from tokenizer_config.json; None: tokenizer.json's normalizer as is
    bert_normalizer: dict | None = None
    # special tokens by attribute (see BERT_SPECIAL_TOKENS), None for one set to null
    special_tokens: dict[str, TokenSpec | None] = field(default_factory=lambda: dict(BERT_SPECIAL_TOKENS))
    # the other special tokens transformers registers: listed (extra_special_tokens and its
    # older name) and model-specific (an object of named tokens, other *_token keys)
    extra_special_tokens: tuple[TokenSpec, ...] = ()
    model_specific_tokens: tuple[TokenSpec, ...] = ()
    # tokenizer_config.json's split_special_tokens: special tokens written in a text are not matched
    split_special_tokens: bool = False
    # tokenizer_config.json's truncation_side: "left" keeps a long text's last word pieces
    truncation_side: str = "right"
    # tokenizer_config.json's added_tokens_decoder by id, which replaces tokenizer.json's added
    # tokens; None when it has none
    added_tokens_decoder: dict[int, TokenSpec] | None = None
    # added_tokens.json's tokens by id, which join tokenizer.json's (read without a decoder)
    added_tokens_json: dict[int, TokenSpec] = field(default_factory=dict)

    @property
    def source(self) -> Path:
        return self.tokenizer_file or self.vocab_file


@dataclass
class Checkpoint:
    """Everything read from disk: config, settings, raw tensors and the tokenizer files."""

    source: str
    config: BertConfig
    settings: ColBERTSettings
    encoder_tensors: dict[str, torch.Tensor]  # BertModel names, no "bert." prefix
    head_weight: torch.Tensor  # [dim, hidden]
    head_bias: torch.Tensor | None
    tokenizer: TokenizerFiles
    metadata_dim: int | None = field(default=None)


class _Files:
    """Fetches a checkpoint's files from a local directory or the Hugging Face hub cache."""

    def __init__(self, name_or_path: str, revision: str | None, cache_dir=None, token=None):
        self.name = str(name_or_path)
        self.revision = revision
        self.cache_dir = cache_dir
        self.token = token
        self.unreachable = False  # set once the hub could not be reached: later files from the cache only
        path = Path(self.name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"{self.name}: is a file; expected a checkpoint directory")
            if revision is not None:
                raise CheckpointError("revision applies to hub ids, not to a local directory")
            self.local = path
        elif self.name.startswith((".", "/", "~")) or self.name.count("/") > 1:
            raise CheckpointError(f"{self.name}: no such checkpoint directory")
        else:
            self.local = None

    def describe(self, relpath: str) -> str:
        if self.local is not None:
            return str(self.local / relpath)
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.name}{at}:{relpath}"

    def get(self, relpath: str, required: bool = True) -> Path | None:
        if self.local is not None:
            path = self.local / relpath
            if path.is_file():
                return path
            if required:
                raise CheckpointError(f"{path}: missing checkpoint file")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(
                hf_hub_download(
                    self.name, relpath, revision=self.revision, cache_dir=self.cache_dir,
                    token=self.token, local_files_only=self.unreachable,
                )
            )
        except LocalEntryNotFoundError:
            # Offline (HF_HUB_OFFLINE=1) or the hub unreachable, and the file not in the cache.
            # The remaining files come from the cache only (each download would retry again).
            self.unreachable = True
            if required:
                raise CheckpointError(
                    f"{self.describe(relpath)}: not in the local Hugging Face cache, and it could not be "
                    "downloaded (HF_HUB_OFFLINE is set or the hub is unreachable); pass a local "
                    "checkpoint directory instead"
                ) from None
            return None
        except EntryNotFoundError:
            if required:
                raise CheckpointError(
                    f"{self.describe(relpath)}: missing checkpoint file (not in the repository)"
                ) from None
            return None
        except RevisionNotFoundError:
            raise CheckpointError(f"{self.name}: revision {self.revision!r} not found") from None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{self.name}: not a local directory and not a model on the hub"
            ) from None
        except HFValidationError as bad:
            raise CheckpointError(f"{self.name}: not a valid hub id or local path ({bad})") from None

    def json(self, relpath: str, required: bool = True):
        path = self.get(relpath, required)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise CheckpointError(f"{path}: malformed JSON ({bad})") from None

    def tensors(self, directory: str) -> tuple[dict[str, torch.Tensor], Path]:
        prefix = f"{directory}/" if directory else ""
        path = self.get(prefix + "model.safetensors", required=False)
        if path is not None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(str(path)), path
            except (SafetensorError, OSError, ValueError) as bad:
                raise CheckpointError(f"{path}: unreadable safetensors file ({bad})") from None
        path = self.get(prefix + "pytorch_model.bin", required=False)
        if path is None:
            raise CheckpointError(
                f"{self.describe(prefix + 'model.safetensors')}: missing checkpoint file "
                "(no pytorch_model.bin either)"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as bad:  # torch raises many types for a corrupt pickle
            raise CheckpointError(f"{path}: unreadable weights file ({bad})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict")
        return state, path


def encoder_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("bert."):
            name = name[len("bert."):]
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if name.startswith(("embeddings.", "encoder.")) and not name.endswith("position_ids"):
            out[name] = tensor
    return out


def _tokenizer_files(files: _Files, directory: str, tokenizer_args: _SettingsFile | None = None) -> TokenizerFiles:
    """``tokenizer_args``: sentence-transformers' (sentence_bert_config.json), which it passes
    to transformers as arguments: they win over every file."""
    prefix = f"{directory}/" if directory else ""
    tokenizer_file = files.get(prefix + "tokenizer.json", required=False)
    if tokenizer_file is None and directory:
        tokenizer_file = files.get("tokenizer.json", required=False)
    vocab_file = None
    if tokenizer_file is None:
        vocab_file = files.get(prefix + "vocab.txt", required=False)
        if vocab_file is None:
            raise CheckpointError(
                f"{files.describe(prefix + 'tokenizer.json')}: missing checkpoint file (no vocab.txt either)"
            )
    where = prefix + "tokenizer_config.json"
    tok_config = files.json(where, required=False)
    tok_config = _SettingsFile({} if tok_config is None else tok_config, files.describe(where))
    map_where = prefix + "special_tokens_map.json"
    tokens_map = files.json(map_where, required=False)
    if tokens_map is not None:
        tokens_map = _SettingsFile(tokens_map, files.describe(map_where))
    # As transformers (v5, PyLate's) reads them: tokenizer_config.json's settings, the arguments
    # over them, then special_tokens_map.json's special tokens over those (but for one the
    # arguments set), unless tokenizer_config.json lists its added_tokens_decoder (then the map
    # and added_tokens.json are not read).
    if "added_tokens_decoder" in tok_config.data:
        tokens_map = None
    config = tok_config
    if tokenizer_args is not None:
        config = _SettingsFile({**tok_config.data, **tokenizer_args.data},
                               f"{tok_config.source} with {tokenizer_args.source}")
    special_tokens, listed, model_specific, legacy_special = _special_token_settings(
        tok_config, tokens_map, tokenizer_args)
    decoder = _added_tokens_decoder(tok_config)
    # added_tokens.json only without a decoder
    legacy = {} if decoder is not None else _added_tokens_json(files, prefix, legacy_special)
    return TokenizerFiles(
        tokenizer_file, vocab_file, _bert_normalizer(config), special_tokens, listed, model_specific,
        config.flag("split_special_tokens", False), _truncation_side(config), decoder, legacy)


def _truncation_side(tok_config: _SettingsFile) -> str:
    side = tok_config.text("truncation_side", "right")
    if side not in ("right", "left"):
        raise CheckpointError(f"{tok_config.source}: truncation_side must be 'right' or 'left', got {side!r}")
    return side


def _added_tokens_decoder(tok_config: _SettingsFile) -> dict[int, TokenSpec] | None:
    decoder = tok_config.data.get("added_tokens_decoder")
    if decoder is None:
        return None
    if not isinstance(decoder, dict) or not all(isinstance(i, str) and i.isdigit() for i in decoder):
        raise CheckpointError(f"{tok_config.source}: added_tokens_decoder must map token ids to tokens")
    return {int(i): _token_spec(token, f"added_tokens_decoder[{i}]", tok_config.source, special=None)
            for i, token in decoder.items()}


def _added_tokens_json(files: _Files, prefix: str, special_texts: set[str]) -> dict[int, TokenSpec]:
    """The older added_tokens.json (text -> id), as transformers reads it: a token is special
    (and then not normalised) if its text is among ``special_texts`` (the special tokens
    transformers holds as texts by then: see _special_token_settings)."""
    where = prefix + "added_tokens.json"
    legacy = files.json(where, required=False)
    if legacy is None:
        return {}
    if not isinstance(legacy, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in legacy.values()):
        raise CheckpointError(f"{files.describe(where)}: expected an object mapping tokens to ids")
    return {i: TokenSpec(text, normalized=text not in special_texts, special=text in special_texts)
            for text, i in legacy.items()}


def _special_token_settings(tok_config: _SettingsFile, tokens_map: _SettingsFile | None,
                            tokenizer_args: _SettingsFile | None) -> tuple[
        dict[str, TokenSpec | None], tuple[TokenSpec, ...], tuple[TokenSpec, ...], set[str]]:
    """The special tokens transformers registers, as (named by attribute, listed,
    model-specific, the texts it counts as special when it reads added_tokens.json). Named:
    BertTokenizer's defaults and the cls_token etc. keys (a text or an AddedToken object; null
    means none: a key given as null is not unset here, it is how transformers reads it).
    Listed: extra_special_tokens (or its older name additional_special_tokens). Model-specific:
    an object given as extra_special_tokens, any other key ending in "_token".

    Step by step as transformers 5 reads them (PreTrainedTokenizerBase._from_pretrained, then
    __init__): tokenizer_config.json's keys with the arguments' over them, the older list name
    only where the newer key is absent; the "_token" keys holding a string, then the object's
    names over them, set aside (model-specific). Then special_tokens_map.json's keys (when read;
    one the arguments set is skipped) replace those left, but for its extra_special_tokens list,
    which joins the list, and its object, whose names go over the ones set aside. Its
    additional_special_tokens count where no extra_special_tokens key is left; its "_token"
    keys (and token objects under such keys in tokenizer_config.json) count under names not set
    aside.

    A listed token is special when given as a string, or as an object from
    special_tokens_map.json; an object from tokenizer_config.json (or the arguments) is special
    if it says so or if its text is a named or model-specific token's."""
    args = {} if tokenizer_args is None else tokenizer_args.data

    def given(key, value, source, from_map=False):
        """A key's value with its file and whether that is special_tokens_map.json; a list's
        entries each with theirs and their name (lists merge)."""
        if key in BERT_SPECIAL_TOKENS:
            _token_spec(value, key, source, special=True)  # checked here, if overridden later too
        elif key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(value, list):
                value = [(entry, source, from_map, f"{key}[{i}]") for i, entry in enumerate(value)]
            elif value is not None and not isinstance(value, dict):
                raise CheckpointError(f"{source}: {key} must be a list or an object of tokens")
        return value, source, from_map

    kwargs = {key: given(key, value, tok_config.source) for key, value in tok_config.data.items()}
    kwargs.update((key, given(key, value, tokenizer_args.source)) for key, value in args.items())
    if "additional_special_tokens" in kwargs:
        kwargs.setdefault("extra_special_tokens", kwargs.pop("additional_special_tokens"))

    def model_specific(key, value, source, from_map=False) -> TokenSpec | None:
        """A "_token" key's token, or None where transformers does not take one."""
        if key in BERT_SPECIAL_TOKENS or not key.endswith("_token"):
            return None
        if isinstance(value, str) or (isinstance(value, dict) and (from_map or value.get("__type") == "AddedToken")):
            return _token_spec(value, key, source, special=True)
        return None

    explicit = {}  # the model-specific tokens set aside first
    for key, (value, source, _) in list(kwargs.items()):
        if isinstance(value, str) and (token := model_specific(key, value, source)) is not None:
            explicit[key] = token
            del kwargs[key]

    def set_aside_object():
        if isinstance(kwargs.get("extra_special_tokens", (None,))[0], dict):
            value, source, _ = kwargs.pop("extra_special_tokens")
            for name, entry in value.items():
                if (token := _token_spec(entry, f"extra_special_tokens[{name!r}]", source, special=True)) is not None:
                    explicit[name] = token

    set_aside_object()
    if tokens_map is not None:
        for key, value in tokens_map.data.items():
            if args.get(key):
                continue
            value, source, from_map = given(key, value, tokens_map.source, from_map=True)
            if key == "extra_special_tokens" and isinstance(value, list):
                # joins the list (transformers drops a repeat: so does the registration)
                old = kwargs.get(key, (None,))[0]
                value = (old if isinstance(old, list) else []) + value
            kwargs[key] = (value, source, from_map)
        set_aside_object()
    # added_tokens.json is read here: its special tokens are the named ones and the listed ones
    # transformers holds as texts so far (strings, special_tokens_map.json's objects; not
    # tokenizer_config.json's objects, nor special_tokens_map.json's additional_special_tokens)
    def text(value, from_map):
        return value if isinstance(value, str) else value.get("content") if from_map and isinstance(value, dict) else None

    listed_then = kwargs.get("extra_special_tokens", (None,))[0]
    legacy_special = {text(value, from_map) for name in BERT_SPECIAL_TOKENS
                      for value, _, from_map in [kwargs.get(name, (None, None, False))]}
    legacy_special |= {text(entry, from_map) for entry, _, from_map, _ in
                       (listed_then if isinstance(listed_then, list) else ())}
    legacy_special.discard(None)
    named = {name: default if name not in kwargs else _token_spec(kwargs[name][0], name, kwargs[name][1], special=True)
             for name, default in BERT_SPECIAL_TOKENS.items()}
    # (transformers' __init__)
    if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    entries, entries_source, _ = kwargs.get("extra_special_tokens", (None, None, None))
    if isinstance(entries, dict):  # special_tokens_map.json's additional_special_tokens (transformers fails too)
        raise CheckpointError(f"{entries_source}: additional_special_tokens must be a list of tokens")
    found = {key: token for key, (value, source, from_map) in kwargs.items()
             if (token := model_specific(key, value, source, from_map)) is not None}
    model_specific_tokens = {**found, **explicit}
    named_texts = {t.content for t in (*named.values(), *model_specific_tokens.values()) if t is not None}
    listed = [token for entry, source, from_map, name in entries or ()
              if (token := _token_spec(entry, name, source, special=True,
                                       named_texts=None if from_map else named_texts)) is not None]
    return named, tuple(listed), tuple(model_specific_tokens.values()), legacy_special


def _token_spec(value, name: str, source: str, *, special: bool | None,
                named_texts: set[str] | None = None) -> TokenSpec | None:
    """A token as transformers reads it: a special token's text, an AddedToken object, or null
    (special=True), or an added_tokens_decoder entry, an object whose own "special" counts
    (special=None). ``named_texts`` with special=True (a listed token in tokenizer_config.json):
    an object is special as it says, or if its text is a named token's (transformers makes it
    so; its unstated normalized flag follows, AddedToken's default being read when used)."""
    if special and (value is None or isinstance(value, str)):
        return None if value is None else TokenSpec(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {key: value[key] for key in ("lstrip", "rstrip", "normalized", "single_word", "special")
                 if key in value}
        if special and named_texts is None:
            flags["special"] = True  # transformers makes it special whatever the object says
        if set(value) - set(flags) - {"content", "__type"} or not all(isinstance(f, bool) for f in flags.values()):
            raise CheckpointError(f"{source}: {name} has unknown keys or non-boolean flags: {value!r}")
        if named_texts is not None:
            flags["special"] = flags.get("special", False) or value["content"] in named_texts
        flags.setdefault("special", False)
        flags.setdefault("normalized", not flags["special"])
        return TokenSpec(value["content"], **flags)
    what = "a string, a token object with a 'content' string, or null" if special else \
        "a token object with a 'content' string"
    raise CheckpointError(f"{source}: {name} must be {what}; got {value!r}")


def _bert_normalizer(get: _SettingsFile) -> dict | None:
    """The text normalisation transformers' BertTokenizer applies (what PyLate and Stanford
    ColBERT tokenize with): built from tokenizer_config.json's do_lower_case (default true),
    strip_accents and tokenize_chinese_chars (default true), whatever normalizer tokenizer.json
    holds (the two agree in a well-formed checkpoint). None for another tokenizer class, whose
    tokenizer.json is taken as it is."""
    if get.text("tokenizer_class", None) not in (None, "BertTokenizer", "BertTokenizerFast"):
        return None
    return {"lowercase": get.flag("do_lower_case", True), "strip_accents": get.flag("strip_accents", None),
            "handle_chinese_chars": get.flag("tokenize_chinese_chars", True)}


def _load_dense(files: _Files, directory: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """One Dense module: (where its weights are, weight [out, in], bias [out] or None)."""
    prefix = f"{directory}/" if directory else ""
    config = files.json(prefix + "config.json", required=False)
    config = _SettingsFile({} if config is None else config, files.describe(prefix + "config.json"))
    activation = config.text("activation_function", "torch.nn.modules.linear.Identity")
    if not activation.endswith("Identity"):
        raise CheckpointError(f"{config.source}: activation {activation!r} is not supported (Identity only)")
    tensors, path = files.tensors(directory)
    weight, bias = tensors.get("linear.weight"), tensors.get("linear.bias")
    if weight is None:
        raise CheckpointError(f"{path}: no 'linear.weight' tensor (the ColBERT projection)")
    if weight.dim() != 2:
        raise CheckpointError(f"{path}: 'linear.weight' has shape {tuple(weight.shape)}, expected [out, in]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"{path}: 'linear.bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    # What the config says of the weights must hold (sentence-transformers builds the module from
    # it and refuses weights that do not fit).
    out_features, in_features = config.integer("out_features", None), config.integer("in_features", None)
    if out_features not in (None, weight.shape[0]) or in_features not in (None, weight.shape[1]):
        raise CheckpointError(f"{config.source}: in_features {in_features} / out_features {out_features}, but "
                              f"{path} holds a {weight.shape[0]} x {weight.shape[1]} linear.weight")
    has_bias = config.flag("bias", None)
    if has_bias is not None and has_bias != (bias is not None):
        raise CheckpointError(f"{config.source}: bias is {str(has_bias).lower()}, but {path} "
                              f"{'lacks' if has_bias else 'holds'} a linear.bias")
    return str(path), weight, bias


def _fold_dense(layers: list[tuple[str, torch.Tensor, torch.Tensor | None]]):
    """Compose a chain of bias-affine Dense layers with identity activations into one."""
    where, weight, bias = layers[0]
    weight = weight.double()
    bias = None if bias is None else bias.double()
    for next_where, next_weight, next_bias in layers[1:]:
        if next_weight.shape[1] != weight.shape[0]:
            raise CheckpointError(f"Dense layers do not chain: {where} gives {weight.shape[0]} features, "
                                  f"{next_where} takes {next_weight.shape[1]}")
        bias = None if bias is None else next_weight.double() @ bias
        if next_bias is not None:
            bias = next_bias.double() if bias is None else bias + next_bias.double()
        weight = next_weight.double() @ weight
        where = next_where
    return weight.float(), None if bias is None else bias.float()


def load_checkpoint(name_or_path: str = DEFAULT_MODEL, revision: str | None = None,
                    cache_dir=None, token=None) -> Checkpoint:
    files = _Files(name_or_path, revision, cache_dir, token)
    modules = files.json("modules.json", required=False)
    if modules is not None:
        return _load_sentence_transformers(files, modules)
    return _load_stanford(files)


def _load_stanford(files: _Files) -> Checkpoint:
    config_json = files.json("config.json")
    config = BertConfig.from_json(config_json, files.describe("config.json"))
    meta = files.json("artifact.metadata", required=False)
    meta = {} if meta is None else meta
    where = files.describe("artifact.metadata")
    settings = ColBERTSettings.from_stanford_metadata(meta, where)
    tensors, path = files.tensors("")
    head = tensors.get("linear.weight")
    if head is None:
        raise CheckpointError(f"{path}: no 'linear.weight' tensor (the ColBERT projection)")
    if "linear.bias" in tensors:
        # Stanford's projection is nn.Linear(bias=False): colbert-ai (transformers drops the
        # unexpected key) and PyLate load such a checkpoint without the bias, and so must we.
        warnings.warn(f"{path}: 'linear.bias' is not used: Stanford ColBERT's projection has no bias, "
                      "and colbert-ai and PyLate load this checkpoint without it", UserWarning, stacklevel=4)
    return Checkpoint(
        source=files.describe(""), config=config, settings=settings,
        encoder_tensors=encoder_tensors(tensors), head_weight=head,
        head_bias=None, tokenizer=_tokenizer_files(files, ""),
        metadata_dim=_SettingsFile(meta, where).integer("dim", None),
    )


def _load_sentence_transformers(files: _Files, modules) -> Checkpoint:
    where = files.describe("modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{where}: expected a list of module entries")
    transformer_dirs, dense_dirs, unused = [], [], []
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", ""))
        directory = str(module.get("path", "")).strip("/")
        if kind.endswith(".Transformer"):
            transformer_dirs.append(directory)
        elif kind.endswith(".Dense"):
            dense_dirs.append(directory)
        else:
            unused.append(kind)
    if len(transformer_dirs) != 1 or not dense_dirs:
        # PyLate would add a Dense module of random weights to a model that has none.
        found = ", ".join(unused) or "none other"
        raise CheckpointError(f"{where}: expected one Transformer module followed by Dense modules "
                              f"(other modules: {found})")
    if unused:
        # PyLate keeps a model's Transformer and Dense modules and drops the rest.
        warnings.warn(f"{where}: modules not used ({', '.join(unused)}): a ColBERT model is its "
                      "Transformer and Dense modules, as PyLate loads it", UserWarning, stacklevel=4)
    encoder_dir = transformer_dirs[0]
    prefix = f"{encoder_dir}/" if encoder_dir else ""
    st_config = files.json("config_sentence_transformers.json", required=False)
    st_config = {} if st_config is None else st_config
    sbert_where = prefix + "sentence_bert_config.json"
    sbert = files.json(sbert_where, required=False)
    sbert = _SettingsFile({} if sbert is None else sbert, files.describe(sbert_where))
    # sentence-transformers' Transformer module passes its config_args to AutoConfig, whose
    # keyword arguments override what config.json says.
    config_args = _SettingsFile(sbert.value("config_args", {}), f"{sbert.source}: config_args").data
    config_where = files.describe(prefix + "config.json")
    config_json = _SettingsFile(files.json(prefix + "config.json"), config_where).data
    config = BertConfig.from_json({**config_json, **config_args},
                                  config_where + (" with config_args" if config_args else ""))
    # ... and lowercases texts itself when its config says so.
    lowercase = sbert.flag("do_lower_case", False)
    tokenizer_args = sbert.value("tokenizer_args", None)
    if tokenizer_args is not None:
        tokenizer_args = _SettingsFile(tokenizer_args, f"{sbert.source}: tokenizer_args")
    settings = ColBERTSettings.from_sentence_transformers(
        st_config, files.describe("config_sentence_transformers.json"), lowercase_texts=lowercase)
    tensors, _ = files.tensors(encoder_dir)
    head_weight, head_bias = _fold_dense([_load_dense(files, d) for d in dense_dirs])
    return Checkpoint(
        source=files.describe(""), config=config, settings=settings,
        encoder_tensors=encoder_tensors(tensors), head_weight=head_weight, head_bias=head_bias,
        tokenizer=_tokenizer_files(files, encoder_dir, tokenizer_args),
    )
