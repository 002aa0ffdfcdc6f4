"""Loading both checkpoint layouts, from a directory or the hub cache, and the errors on bad files."""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from checkpoints import build_pylate, build_stanford, link_weights
from conftest import KERNEL_DEVICE, require_reference

from colbert_triton import CheckpointError, ColBERT
from colbert_triton.model.checkpoint import load_checkpoint


def test_both_layouts_load_the_same_model(stanford_dir, pylate_dir):
    a, b = load_checkpoint(stanford_dir), load_checkpoint(pylate_dir)
    assert a.config == b.config
    assert a.settings == b.settings
    assert a.settings.query_maxlen == 32 and a.settings.doc_maxlen == 300
    assert a.settings.query_prefix == "[unused0]" and a.settings.document_prefix == "[unused1]"
    assert not a.settings.attend_to_mask_tokens
    assert len(a.settings.skiplist_words) == 32
    assert torch.equal(a.head_weight, b.head_weight)
    assert a.encoder_tensors.keys() == b.encoder_tensors.keys()
    for name in a.encoder_tensors:
        assert torch.equal(a.encoder_tensors[name], b.encoder_tensors[name]), name
    assert not any(k.startswith("pooler") for k in a.encoder_tensors)


def test_other_depth_and_dim(tmp_path):
    path = build_stanford(tmp_path / "deep", dim=128, num_layers=12,
                          metadata={"doc_maxlen": 180, "query_maxlen": 40})
    model = ColBERT.from_pretrained(path, device="cpu")
    assert model.dim == 128 and len(model.weights.layers) == 12
    q = model.encode_queries(["hello"])[0]
    d = model.encode_documents(["word " * 500])[0]
    assert q.shape == (40, 128) and d.shape == (180, 128)


def test_length_overrides(stanford_dir):
    model = ColBERT.from_pretrained(stanford_dir, device="cpu", query_maxlen=16, doc_maxlen=20)
    assert model.encode_queries(["a b c"])[0].shape == (16, 96)
    assert model.encode_documents(["word " * 100])[0].shape == (20, 96)
    with pytest.raises(ValueError, match="positions"):
        ColBERT.from_pretrained(stanford_dir, device="cpu", doc_maxlen=600)
    with pytest.raises(ValueError, match=r"query_maxlen=2 / doc_maxlen=300 leave no room .* at least 3 / 3"):
        ColBERT.from_pretrained(stanford_dir, device="cpu", query_maxlen=2)


def test_vocab_txt_fallback_gives_same_tokens(tmp_path, stanford_dir):
    copy = tmp_path / "vocab_only"
    shutil.copytree(stanford_dir, copy)
    (copy / "tokenizer.json").unlink()
    texts = ["Ça va? Crème brûlée!", "The quick brown fox", ""]
    a = ColBERT.from_pretrained(stanford_dir, device="cpu").tokenizer.documents(texts)
    b = ColBERT.from_pretrained(copy, device="cpu").tokenizer.documents(texts)
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))


def test_hub_id_through_offline_cache(tmp_path, stanford_dir, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, offline, with a revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-colbert"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(stanford_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    model = ColBERT.from_pretrained("someone/tiny-colbert", device="cpu", cache_dir=cache)
    local = ColBERT.from_pretrained(stanford_dir, device="cpu")
    texts = ["late interaction"]
    assert torch.equal(model.encode_queries(texts)[0], local.encode_queries(texts)[0])
    ColBERT.from_pretrained("someone/tiny-colbert", revision="v1", device="cpu", cache_dir=cache)
    with pytest.raises(CheckpointError, match="config.json"):
        ColBERT.from_pretrained("someone/missing-model", device="cpu", cache_dir=cache)


def test_unreachable_hub_says_so(tmp_path, monkeypatch):
    """Offline (or the hub unreachable) and not cached: the error says that, not "missing file"."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*pass a local"):
        ColBERT.from_pretrained("someone/uncached-model", device="cpu", cache_dir=tmp_path)


def _hub_answer(kind: str):
    """The exception huggingface_hub's hf_hub_download raises for each of the hub's answers."""
    from huggingface_hub import errors

    # The HTTP library huggingface_hub answers with: httpx (1.x), httpx2 (2.5 on), requests (0.x).
    http = sys.modules[errors.Response.__module__.split(".")[0]]
    if http.__name__ == "requests":
        response = errors.Response()
        response.status_code = 404
    else:
        response = errors.Response(404, request=http.Request("GET", "https://huggingface.co/someone/x"))
    return {
        "no-repository": errors.RepositoryNotFoundError("404 Repository Not Found", response=response),
        "no-revision": errors.RevisionNotFoundError("404 Revision Not Found", response=response),
        "no-file": errors.EntryNotFoundError("404 Entry Not Found"),
        "bad-id": errors.HFValidationError("Repo id must use alphanumeric chars"),
    }[kind]


@pytest.mark.parametrize("kind, message", [
    ("no-repository", "someone/tiny-colbert: not a local directory and not a model on the hub"),
    ("no-revision", "someone/tiny-colbert: revision 'v9' not found"),
    ("no-file", r"someone/tiny-colbert@v9:config.json: missing checkpoint file \(not in the repository\)"),
    ("bad-id", r"someone/tiny-colbert: not a valid hub id or local path \(Repo id must"),
])
def test_the_hubs_answers_are_named(monkeypatch, kind, message):
    """No hub here: its answers, as huggingface_hub raises them, each become an error that says
    what was not found (a typo in a model id is the common case)."""
    import huggingface_hub

    def download(repo_id, filename, **kwargs):
        raise _hub_answer(kind)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=message):
        ColBERT.from_pretrained("someone/tiny-colbert", revision="v9", device="cpu")


def test_markers_missing_from_the_vocabulary(tmp_path):
    """A PyLate checkpoint without its prefixes falls back to "[Q] "/"[D] ", which are not in the
    vocabulary: a clear error instead of an embedding lookup past the table (or NaN on Triton)."""
    path = build_pylate(tmp_path / "p")
    config_file = path / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config.pop("query_prefix"), config.pop("document_prefix")
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not in the tokenizer's vocabulary"):
        ColBERT.from_pretrained(path, device="cpu")


def test_missing_local_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ColBERT.from_pretrained("./does/not/exist", device="cpu")


def _corrupt(tmp_path, stanford_dir, name):
    copy = tmp_path / name
    shutil.copytree(stanford_dir, copy)
    return copy


def test_missing_and_malformed_files_are_named(tmp_path, stanford_dir):
    copy = _corrupt(tmp_path, stanford_dir, "no_config")
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "bad_json")
    (copy / "artifact.metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="artifact.metadata"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "no_weights")
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "bad_weights")
    (copy / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "bad_bin")
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: unreadable weights file"):
        ColBERT.from_pretrained(copy, device="cpu")
    torch.save([1, 2], copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: expected a state dict"):
        ColBERT.from_pretrained(copy, device="cpu")

    with pytest.raises(CheckpointError, match=r"config\.json: is a file; expected a checkpoint directory"):
        ColBERT.from_pretrained(stanford_dir / "config.json", device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "dim_mismatch")
    meta = json.loads((copy / "artifact.metadata").read_text())
    (copy / "artifact.metadata").write_text(json.dumps({**meta, "dim": 128}))
    with pytest.raises(CheckpointError, match="dim 128"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "wrong_act")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        ColBERT.from_pretrained(copy, device="cpu")

    copy = _corrupt(tmp_path, stanford_dir, "wrong_layers")
    (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    with pytest.raises(CheckpointError, match="encoder.layer.6"):
        ColBERT.from_pretrained(copy, device="cpu")


def test_missing_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = build_stanford(tmp_path / "s")
    state = load_file(str(path / "model.safetensors"))
    del state["linear.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="linear.weight"):
        ColBERT.from_pretrained(path, device="cpu")

    path = build_pylate(tmp_path / "p")
    (path / "1_Dense" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="1_Dense/model.safetensors"):
        ColBERT.from_pretrained(path, device="cpu")

    path = build_pylate(tmp_path / "p2")
    (path / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(CheckpointError, match=r"expected one Transformer module followed by Dense modules "
                                              r"\(other modules: sentence_transformers.models.Pooling\)"):
        ColBERT.from_pretrained(path, device="cpu")
    (path / "modules.json").write_text(json.dumps({"0": "0_Transformer"}))
    with pytest.raises(CheckpointError, match="modules.json: expected a list of module entries"):
        ColBERT.from_pretrained(path, device="cpu")

    path = build_pylate(tmp_path / "p3")
    save_file({"weight": torch.zeros(96, 384)}, str(path / "1_Dense" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1_Dense/model\.safetensors: no 'linear\.weight' tensor"):
        ColBERT.from_pretrained(path, device="cpu")
    save_file({"linear.weight": torch.zeros(96)}, str(path / "1_Dense" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'linear\.weight' has shape \(96,\), expected \[out, in\]"):
        ColBERT.from_pretrained(path, device="cpu")
    save_file({"linear.weight": torch.zeros(96, 384), "linear.bias": torch.zeros(95)},
              str(path / "1_Dense" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1_Dense/model\.safetensors: 'linear\.bias' has shape \(95,\), expected \(96,\)"):
        ColBERT.from_pretrained(path, device="cpu")
    (path / "1_Dense" / "config.json").write_text(json.dumps({"activation_function": 1}))
    with pytest.raises(CheckpointError, match=r"1_Dense/config\.json: activation_function must be a string"):
        ColBERT.from_pretrained(path, device="cpu")
    # A config that does not describe its weights, which sentence-transformers (PyLate) refuses too.
    for config, message in (({"in_features": 384, "out_features": 64}, "in_features 384 / out_features 64, but "),
                            ({"bias": True}, "bias is true, but "), ({"bias": False}, "bias is false, but ")):
        has_bias = config.get("bias") is False
        save_file({"linear.weight": torch.zeros(96, 384), **({"linear.bias": torch.zeros(96)} if has_bias else {})},
                  str(path / "1_Dense" / "model.safetensors"))
        (path / "1_Dense" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=r"1_Dense/config\.json: " + message):
            ColBERT.from_pretrained(path, device="cpu")


def test_bad_device_and_dtype(stanford_dir):
    with pytest.raises(ValueError, match="dtype"):
        ColBERT.from_pretrained(stanford_dir, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="device must be like"):
        ColBERT.from_pretrained(stanford_dir, device="gpu")
    with pytest.raises(ValueError, match="a CPU or a CUDA device, got meta"):
        ColBERT.from_pretrained(stanford_dir, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ColBERT.from_pretrained(stanford_dir, device="cuda")


def test_a_cuda_index_past_the_machines_gpus_is_a_clear_error(monkeypatch):
    from colbert_triton.packed import available_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="cuda:2 requested but this machine has 2 CUDA device"):
        available_device("cuda:2")


def test_cuda_without_an_index_is_pinned_to_the_current_gpu(monkeypatch):
    from colbert_triton.packed import pick_device as _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert _pick_device("cuda") == torch.device("cuda", 2)
    assert _pick_device(None) == torch.device("cuda", 2)
    assert _pick_device("cuda:1") == torch.device("cuda", 1)
    assert _pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("file, changes, message", [
    ("artifact.metadata", [1, 2], "artifact.metadata: expected a JSON object of settings, got list"),
    ("artifact.metadata", {"dim": "x"}, "artifact.metadata: dim must be an integer, got 'x'"),
    ("artifact.metadata", {"query_maxlen": "32"}, "artifact.metadata: query_maxlen must be an integer"),
    ("artifact.metadata", {"mask_punctuation": "no"}, "artifact.metadata: mask_punctuation must be true or false"),
    ("artifact.metadata", {"query_token_id": 5}, "artifact.metadata: query_token_id must be a string"),
    ("tokenizer_config.json", {"do_lower_case": "yes"}, "do_lower_case must be true or false"),
    ("special_tokens_map.json", [1], "special_tokens_map.json: expected a JSON object of settings"),
    ("special_tokens_map.json", {"cls_token": 5}, "special_tokens_map.json: cls_token must be a string, a token"),
    ("special_tokens_map.json", {"sep_token": {"content": "[SEP]", "normalized": "no"}},
     "special_tokens_map.json: sep_token has unknown keys or non-boolean flags"),
    ("tokenizer_config.json", {"sep_token": {"content": "[SEP]", "strip": True}},
     "tokenizer_config.json: sep_token has unknown keys"),
    ("special_tokens_map.json", {"cls_token": None}, r"tokenizer.json: the tokenizer's cls_token is null"),
    ("special_tokens_map.json", {"cls_token": "<cls>"}, r"tokenizer\.json: the tokenizer has no <cls> token \(the checkpoint's cls_token\)"),
    ("special_tokens_map.json", {"unk_token": "<unk>"}, "tokenizer.json: the tokenizer has no unk token '<unk>'"),
    ("special_tokens_map.json", {"unk_token": None}, "unk_token is null"),
    ("special_tokens_map.json", {"mask_token": None, "pad_token": None},
     "mask_token, eos_token, pad_token are all null"),
    ("tokenizer_config.json", {"added_tokens_decoder": [1]}, "added_tokens_decoder must map token ids to tokens"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "[PAD]"}}}, "must map token ids"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"0": "[PAD]"}},
     r"added_tokens_decoder\[0\] must be a token object with a 'content' string"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"0": {"content": "[PAD]", "special": 1}}},
     r"added_tokens_decoder\[0\] has unknown keys or non-boolean flags"),
    ("tokenizer_config.json", {"additional_special_tokens": "[unused5]"},
     "tokenizer_config.json: additional_special_tokens must be a list or an object of tokens"),
    ("tokenizer_config.json", {"split_special_tokens": "yes"}, "split_special_tokens must be true or false"),
    ("tokenizer_config.json", {"truncation_side": "middle"}, "truncation_side must be 'right' or 'left', got 'middle'"),
    ("special_tokens_map.json", {"extra_special_tokens": [5]},
     r"special_tokens_map.json: extra_special_tokens\[0\] must be a string"),
    ("special_tokens_map.json", {"additional_special_tokens": {"foo_token": "[unused1]"}},
     "special_tokens_map.json: additional_special_tokens must be a list of tokens"),
], ids=["metadata-list", "dim-text", "length-text", "flag-text", "marker-number", "lowercase-text",
        "tokens-map-list", "special-number", "special-flag-text", "special-unknown-key", "cls-null",
        "cls-missing", "unk-missing", "unk-null", "no-expansion-token", "decoder-list", "decoder-key",
        "decoder-entry-text", "decoder-flag-number", "additional-text", "split-text", "truncation-middle", "extra-number",
        "map-additional-object"])
def test_malformed_settings_are_named(tmp_path, stanford_dir, file, changes, message):
    copy = _corrupt(tmp_path, stanford_dir, "settings")
    path = copy / file
    data = changes if isinstance(changes, list) else {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        ColBERT.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("changes, message", [
    ([1], "expected a JSON object of settings, got list"),
    ({"model_type": "roberta"}, "model_type 'roberta' is not a BERT model"),
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1, got 0"),
    ({"num_attention_heads": -2}, "num_attention_heads must be at least 1, got -2"),
    ({"hidden_size": "384"}, "hidden_size must be an integer, got '384'"),
    ({"intermediate_size": 1536.5}, "intermediate_size must be an integer, got 1536.5"),
    ({"type_vocab_size": 0}, "type_vocab_size must be at least 1, got 0"),
    ({"num_hidden_layers": None}, "missing key 'num_hidden_layers'"),
    ({"layer_norm_eps": -1e-12}, "layer_norm_eps must be a positive number, got -1e-12"),
    ({"layer_norm_eps": 0}, "layer_norm_eps must be a positive number, got 0"),
    ({"layer_norm_eps": "1e-12"}, "layer_norm_eps must be a positive number, got '1e-12'"),
    ({"layer_norm_eps": True}, "layer_norm_eps must be a positive number, got True"),
], ids=["list", "roberta", "heads-zero", "heads-negative", "hidden-text", "ffn-fraction", "token-types-zero",
        "layers-null", "eps-negative", "eps-zero", "eps-text", "eps-true"])
def test_malformed_bert_configs_are_named(tmp_path, stanford_dir, changes, message):
    """Each of these crashed deep in the encoder (a division by zero, a negative reshape) or, for
    a negative or zero epsilon, encoded NaNs."""
    copy = _corrupt(tmp_path, stanford_dir, "config")
    path = copy / "config.json"
    data = changes if isinstance(changes, list) else {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        ColBERT.from_pretrained(copy, device="cpu")


def test_a_special_token_past_the_embedding_is_refused(tmp_path, stanford_dir):
    """A special token that tokenizer.json adds past the vocabulary (transformers would too) has
    no embedding row: refused at load, naming it."""
    copy = tmp_path / "s"
    shutil.copytree(stanford_dir, copy)
    path = copy / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"].append({"id": 30522, "content": "<cls>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data))
    path = copy / "special_tokens_map.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cls_token": "<cls>"}))
    with pytest.raises(CheckpointError, match=r"CLS \(30522\) token id is past the 30522-row embedding"):
        ColBERT.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("content", [[1], {"[unused5]": "6"}, {"[unused5]": -1}, {"[unused5]": True}])
def test_a_malformed_added_tokens_json_is_named(tmp_path, stanford_dir, content):
    copy = tmp_path / "s"
    shutil.copytree(stanford_dir, copy)
    (copy / "added_tokens.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="added_tokens.json: expected an object mapping tokens to ids"):
        ColBERT.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("where", ["tokenizer.json", "added_tokens_decoder"])
def test_an_added_token_past_the_embedding_is_refused(tmp_path, stanford_dir, where):
    """A text holding it would index past the embedding (PyLate grows the embedding with an
    untrained row): refused at load, naming it."""
    copy = tmp_path / "s"
    shutil.copytree(stanford_dir, copy)
    token = {"content": "<new>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
    path = copy / ("tokenizer.json" if where == "tokenizer.json" else "tokenizer_config.json")
    data = json.loads(path.read_text())
    if where == "tokenizer.json":
        data["added_tokens"].append({"id": 30522, **token})
    else:
        data["added_tokens_decoder"] = {"30522": token}
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"adds tokens past the 30522-row embedding: '<new>' \(30522\)"):
        ColBERT.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("changes, message", [
    ({"skiplist_words": "!?"}, "skiplist_words must be a list"),
    ({"prompts": ["query: "]}, "prompts must be an object of prompt texts"),
    ({"prompts": {"query": 1}}, "prompts must be an object of prompt texts"),
    ({"default_prompt_name": 1}, "default_prompt_name must be a string"),
    # sentence-transformers refuses it too (its starting prompts are "query" and "document").
    ({"prompts": {"q": "query: "}, "default_prompt_name": "search"},
     r"default_prompt_name 'search' is not one of the prompts \['document', 'q', 'query'\]"),
], ids=["skiplist-text", "prompts-list", "prompt-number", "prompt-name-number", "prompt-name-unknown"])
def test_pylate_settings_of_the_wrong_type_are_named(tmp_path, pylate_dir, changes, message):
    copy = tmp_path / "p"
    shutil.copytree(pylate_dir, copy, copy_function=link_weights)
    path = copy / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(CheckpointError, match="config_sentence_transformers.json: " + message):
        ColBERT.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("changes, message", [
    ({"config_args": [1]}, "sentence_bert_config.json: config_args: expected a JSON object of settings"),
    ({"config_args": {"num_attention_heads": 0}}, r"config\.json with config_args: num_attention_heads must be at least 1"),
    ({"tokenizer_args": [1]}, "sentence_bert_config.json: tokenizer_args: expected a JSON object of settings"),
    ({"tokenizer_args": {"do_lower_case": "no"}}, ("tokenizer_config.json with .*sentence_bert_config.json: "
                                                   "tokenizer_args: do_lower_case must be true or false")),
    ({"tokenizer_args": {"sep_token": 3}}, "sentence_bert_config.json: tokenizer_args: sep_token must be a string"),
])
def test_malformed_sentence_bert_configs_are_named(tmp_path, pylate_dir, changes, message):
    copy = tmp_path / "p"
    shutil.copytree(pylate_dir, copy, copy_function=link_weights)
    path = copy / "0_Transformer" / "sentence_bert_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(CheckpointError, match=message):
        ColBERT.from_pretrained(copy, device="cpu")


def test_lengths_given_at_load_must_be_integers(stanford_dir):
    for bad in (8.9, "32", True):
        with pytest.raises(ValueError, match="query_maxlen must be an integer"):
            ColBERT.from_pretrained(stanford_dir, device="cpu", query_maxlen=bad)
    model = ColBERT.from_pretrained(stanford_dir, device="cpu", query_maxlen=np.int64(16))
    assert model.settings.query_maxlen == 16


def test_relative_position_embeddings_are_refused(tmp_path, stanford_dir):
    """A BERT with relative position embeddings loads its weights fine but would encode differently:
    refused, not run as an absolute-position model."""
    copy = shutil.copytree(stanford_dir, tmp_path / "relative")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(CheckpointError, match="absolute position embeddings"):
        ColBERT.from_pretrained(copy, device="cpu")


def test_default_dtype_is_float16_on_cuda_and_float32_on_the_cpu():
    """dtype=None means float16 on CUDA (README, from_pretrained's docstring), float32 on the CPU; a
    named dtype is taken on either."""
    from colbert_triton.model.colbert import _pick_dtype

    assert _pick_dtype(None, torch.device("cuda", 0)) is torch.float16
    assert _pick_dtype(None, torch.device("cpu")) is torch.float32
    assert _pick_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16
    assert _pick_dtype(torch.float32, torch.device("cuda", 0)) is torch.float32


def test_heads_that_do_not_divide_the_hidden_size_are_refused(tmp_path, stanford_dir):
    """384 hidden units in 5 heads: a config error named as such, before any weight is shaped."""
    copy = shutil.copytree(stanford_dir, tmp_path / "heads")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="not a multiple of num_attention_heads"):
        ColBERT.from_pretrained(copy, device="cpu")


def test_head_dims_the_triton_attention_does_not_take(tmp_path, triton_by_default):
    """384 hidden units in 8 heads (head dim 48): named, the Triton backend refuses the checkpoint
    at load with the reason; by default (as on CUDA) the model runs the PyTorch encoder and
    encodes as it; a head dim the kernel takes keeps the Triton encoder."""
    from colbert_triton.model.ops import TorchOps, TritonOps

    path = build_stanford(tmp_path / "heads", num_layers=2)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
    with pytest.raises(ValueError, match=r"head dims \(16, 32, 64, 128\), this model's is 48"):
        ColBERT.from_pretrained(path, device=KERNEL_DEVICE, backend="triton")
    torch_model = ColBERT.from_pretrained(path, device="cpu", backend="torch")
    model = ColBERT.from_pretrained(path, device="cpu")
    assert model.backend == "torch" and isinstance(model.ops, TorchOps)
    texts = ["late interaction", "a longer document about retrieval with several tokens"]
    for ours, theirs in zip(model.encode_documents(texts), torch_model.encode_documents(texts)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    supported = build_stanford(tmp_path / "supported", num_layers=1)
    model = ColBERT.from_pretrained(supported, device="cpu")
    assert model.backend == "triton" and isinstance(model.ops, TritonOps)


def test_pylate_lengths_of_zero_mean_unset(tmp_path):
    """As in PyLate, query_length/document_length of 0 take the defaults (32, 180), as null does."""
    path = build_pylate(tmp_path / "zero", settings={"query_length": 0, "document_length": 0})
    settings = load_checkpoint(path).settings
    assert (settings.query_maxlen, settings.doc_maxlen) == (32, 180)


@pytest.mark.parametrize("changes", [{"query_maxlen": True}, {"doc_maxlen": False}])
def test_a_boolean_length_is_not_an_integer(tmp_path, stanford_dir, changes):
    """JSON true is not the length 1: named as a malformed setting."""
    copy = shutil.copytree(stanford_dir, tmp_path / "bool")
    meta = json.loads((copy / "artifact.metadata").read_text())
    (copy / "artifact.metadata").write_text(json.dumps({**meta, **changes}))
    with pytest.raises(CheckpointError, match="must be an integer"):
        ColBERT.from_pretrained(copy, device="cpu")


def test_a_revision_with_a_local_directory_is_refused(stanford_dir):
    """A revision names a hub commit: with a local directory it would be ignored, so it is an
    error."""
    with pytest.raises(CheckpointError, match="revision applies to hub ids"):
        ColBERT.from_pretrained(stanford_dir, revision="v1", device="cpu")


def test_an_unreachable_hub_is_asked_once(tmp_path, monkeypatch):
    """Once the hub could not be reached (not just offline: a timeout), every later file is read
    from the cache only, not retried over the network."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def unreachable(repo_id, filename, *, local_files_only=False, **kwargs):
        calls.append((filename, local_files_only))
        raise LocalEntryNotFoundError("unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        ColBERT.from_pretrained("someone/unreachable-model", device="cpu", cache_dir=tmp_path)
    assert len(calls) >= 2 and [only for _, only in calls] == [False] + [True] * (len(calls) - 1), calls


def test_pylate_tokenizer_at_the_root_is_found(tmp_path, pylate_dir):
    """A sentence-transformers checkpoint whose tokenizer.json lies at the root, not in the
    Transformer module's directory (and no vocab.txt there either), loads that tokenizer."""
    path = shutil.copytree(pylate_dir, tmp_path / "root-tokenizer")
    shutil.move(path / "0_Transformer" / "tokenizer.json", path / "tokenizer.json")
    (path / "0_Transformer" / "vocab.txt").unlink()
    moved = ColBERT.from_pretrained(path, device="cpu")
    reference = ColBERT.from_pretrained(pylate_dir, device="cpu")
    texts = ["The Eiffel Tower is in Paris.", "a [MASK] token"]
    for kind in ("queries", "documents"):
        got, want = getattr(moved.tokenizer, kind)(texts), getattr(reference.tokenizer, kind)(texts)
        assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences]


def test_chinese_characters_are_split_by_default(tmp_path, stanford_dir):
    """transformers' BertTokenizer splits CJK characters unless tokenize_chinese_chars is false: a
    tokenizer_config.json without the key splits them too."""
    def tokens(name, **changes):
        path = shutil.copytree(stanford_dir, tmp_path / name)
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("tokenize_chinese_chars", None)
        (path / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
        return ColBERT.from_pretrained(path, device="cpu").tokenizer.documents(["東京タワー東京"]).sequences[0].tolist()

    unset, split, whole = tokens("unset"), tokens("split", tokenize_chinese_chars=True), \
        tokens("whole", tokenize_chinese_chars=False)
    assert split != whole  # the text tells the two apart
    assert unset == split


def test_a_dense_activation_other_than_identity_is_refused(tmp_path, pylate_dir):
    """A Dense module with a Tanh cannot be folded into the linear head: refused, not loaded without
    it."""
    path = shutil.copytree(pylate_dir, tmp_path / "tanh")
    config = json.loads((path / "1_Dense" / "config.json").read_text())
    config["activation_function"] = "torch.nn.modules.activation.Tanh"
    (path / "1_Dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Identity only"):
        ColBERT.from_pretrained(path, device="cpu")


def test_a_chain_of_dense_layers_with_biases_folds_into_one(tmp_path, pylate_dir):
    """Two Dense modules, both with a bias, load as one affine head: W = W2 W1, b = W2 b1 + b2 (idx
    order, not file order, gives the chain)."""
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(pylate_dir, tmp_path / "two-dense")
    gen = torch.Generator().manual_seed(3)
    w1 = load_file(str(path / "1_Dense" / "model.safetensors"))["linear.weight"]
    b1 = torch.randn(w1.shape[0], generator=gen)
    w2, b2 = torch.randn(64, w1.shape[0], generator=gen) / 10, torch.randn(64, generator=gen)
    save_file({"linear.weight": w1, "linear.bias": b1}, str(path / "1_Dense" / "model.safetensors"))
    (path / "2_Dense").mkdir()
    for directory, weight in (("1_Dense", w1), ("2_Dense", w2)):
        (path / directory / "config.json").write_text(json.dumps({
            "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"}))
    save_file({"linear.weight": w2, "linear.bias": b2}, str(path / "2_Dense" / "model.safetensors"))
    modules = json.loads((path / "modules.json").read_text())
    modules = [{"idx": 2, "name": "2", "path": "2_Dense", "type": "pylate.models.Dense"}, *modules]
    (path / "modules.json").write_text(json.dumps(modules))
    ckpt = load_checkpoint(path)
    torch.testing.assert_close(ckpt.head_weight, (w2.double() @ w1.double()).float())
    torch.testing.assert_close(ckpt.head_bias, (w2.double() @ b1.double() + b2.double()).float())
    save_file({"linear.weight": w2[:, 1:].contiguous()}, str(path / "2_Dense" / "model.safetensors"))
    (path / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 95, "out_features": 64, "bias": False}))
    with pytest.raises(CheckpointError, match=r"Dense layers do not chain: \S*1_Dense/model\.safetensors gives "
                                              r"96 features, \S*2_Dense/model\.safetensors takes 95"):
        load_checkpoint(path)


def test_a_sentence_transformers_model_without_a_dense_module_is_refused(tmp_path, pylate_dir):
    """modules.json with a Transformer and no Dense: a CheckpointError naming modules.json (not an
    IndexError from folding no layers; PyLate would add a projection of random weights)."""
    path = shutil.copytree(pylate_dir, tmp_path / "no-dense")
    modules = [m for m in json.loads((path / "modules.json").read_text()) if m["type"].endswith("Transformer")]
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="modules.json: expected one Transformer module followed by Dense"):
        ColBERT.from_pretrained(path, device="cpu")


def test_sentence_bert_config_without_do_lower_case_keeps_the_case(tmp_path, pylate_dir):
    """sentence-transformers lowercases texts only when sentence_bert_config.json says
    do_lower_case: true; without the key a literal [MASK] stays the special token."""
    path = shutil.copytree(pylate_dir, tmp_path / "no-key")
    sbert = path / "0_Transformer" / "sentence_bert_config.json"
    sbert.write_text(json.dumps({k: v for k, v in json.loads(sbert.read_text()).items() if k != "do_lower_case"}))
    texts = ["a [MASK] in a text"]
    got = ColBERT.from_pretrained(path, device="cpu").tokenizer.documents(texts).sequences[0].tolist()
    want = ColBERT.from_pretrained(pylate_dir, device="cpu").tokenizer.documents(texts).sequences[0].tolist()
    assert got == want


def test_projection_of_the_wrong_shape_is_refused_at_load(tmp_path):
    """A projection whose input width is not the encoder's hidden size is refused by
    from_pretrained with a CheckpointError naming it, not left to fail at the first encode (a
    Dense bias of the wrong length: test_missing_tensors_are_named)."""
    from safetensors.torch import load_file, save_file

    path = build_stanford(tmp_path / "s")
    state = load_file(str(path / "model.safetensors"))
    state["linear.weight"] = state["linear.weight"][:, :100].contiguous()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"projection 'linear.weight' has shape \(\d+, 100\), expected \[dim, 384\]"):
        ColBERT.from_pretrained(path, device="cpu", backend="torch")


def test_encoder_tensor_of_the_wrong_shape_is_refused_at_load(tmp_path):
    """An encoder tensor whose shape disagrees with config.json (same rank, other sizes: here
    intermediate_size) is refused at load with both shapes named; checking only the rank would load
    it and fail, or read past a table, later."""
    path = build_stanford(tmp_path / "s")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 1000}))
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.layer\.0\.intermediate\.dense\.weight' "
                                              r"has shape \(1536, 384\), config says \(1000, 384\)"):
        ColBERT.from_pretrained(path, device="cpu", backend="torch")


def test_listed_token_objects_are_special_as_transformers_makes_them(tmp_path, stanford_dir):
    """A listed token given as a string is special; one given as an object in
    tokenizer_config.json is special only if it says so or if its text is a named token's, and
    its unstated normalized flag is then the opposite (what transformers' tokenizer holds after
    loading). Through tokenization the forced case is not seen (the named token is registered
    first, with the same text): checked here, on what is read."""
    path = shutil.copytree(stanford_dir, tmp_path / "listed")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(foo_token="[unused10]", extra_special_tokens=[
        {"content": "[unused10]", "__type": "AddedToken"},
        {"content": "[unused11]", "rstrip": True, "__type": "AddedToken"},
        {"content": "[unused13]", "special": True, "__type": "AddedToken"}, "[unused12]"])
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    listed = load_checkpoint(path).tokenizer.extra_special_tokens
    assert [(t.content, t.special, t.normalized, t.rstrip) for t in listed] == [
        ("[unused10]", True, False, False), ("[unused11]", False, True, True),
        ("[unused13]", True, False, False), ("[unused12]", True, False, False)]
    transformers = require_reference("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))._extra_special_tokens
    assert [(str(t), t.special, t.normalized, t.rstrip) if not isinstance(t, str) else (t, True, False, False)
            for t in theirs] == [(t.content, t.special, t.normalized, t.rstrip) for t in listed]
