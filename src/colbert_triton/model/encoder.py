"""The BERT encoder and ColBERT head over packed tokens, written once against `model/ops.py`.

Weights keep Hugging Face's BertModel semantics; the only re-arrangement is that the query, key
and value projections are concatenated into one ``[3H, H]`` matrix so attention's input is a
single GEMM (as in TEI's FlashBert).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .checkpoint import BertConfig, CheckpointError
from .ops import PackedBatch


@dataclass
class LayerWeights:
    qkv_weight: torch.Tensor  # [3H, H]
    qkv_bias: torch.Tensor  # [3H]
    out_weight: torch.Tensor  # [H, H]
    out_bias: torch.Tensor
    attn_ln_weight: torch.Tensor
    attn_ln_bias: torch.Tensor
    ffn_in_weight: torch.Tensor  # [I, H]
    ffn_in_bias: torch.Tensor
    ffn_out_weight: torch.Tensor  # [H, I]
    ffn_out_bias: torch.Tensor
    ffn_ln_weight: torch.Tensor
    ffn_ln_bias: torch.Tensor


@dataclass
class EncoderWeights:
    config: BertConfig
    word: torch.Tensor  # [V, H]
    position: torch.Tensor  # [P, H]
    token_type_row: torch.Tensor  # [H]: ColBERT feeds token type 0 everywhere
    emb_ln_weight: torch.Tensor
    emb_ln_bias: torch.Tensor
    layers: list[LayerWeights]
    head_weight: torch.Tensor | None  # [dim, H]; None: the trunk alone (PyLate's own Dense projects)
    head_bias: torch.Tensor | None

    @property
    def dim(self) -> int:
        return int(self.head_weight.shape[0])

    @classmethod
    def from_checkpoint(cls, config: BertConfig, tensors: dict[str, torch.Tensor],
                        head_weight: torch.Tensor | None, head_bias: torch.Tensor | None,
                        source: str) -> "EncoderWeights":
        h, inter = config.hidden_size, config.intermediate_size

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            tensor = tensors.get(name)
            if tensor is None:
                raise CheckpointError(f"{source}: missing tensor {name!r}")
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, config says {shape}"
                )
            return tensor.float()

        layers = []
        for i in range(config.num_layers):
            p = f"encoder.layer.{i}."
            qkv = [get(f"{p}attention.self.{n}.weight", (h, h)) for n in ("query", "key", "value")]
            qkv_b = [get(f"{p}attention.self.{n}.bias", (h,)) for n in ("query", "key", "value")]
            layers.append(LayerWeights(
                qkv_weight=torch.cat(qkv, 0), qkv_bias=torch.cat(qkv_b, 0),
                out_weight=get(f"{p}attention.output.dense.weight", (h, h)),
                out_bias=get(f"{p}attention.output.dense.bias", (h,)),
                attn_ln_weight=get(f"{p}attention.output.LayerNorm.weight", (h,)),
                attn_ln_bias=get(f"{p}attention.output.LayerNorm.bias", (h,)),
                ffn_in_weight=get(f"{p}intermediate.dense.weight", (inter, h)),
                ffn_in_bias=get(f"{p}intermediate.dense.bias", (inter,)),
                ffn_out_weight=get(f"{p}output.dense.weight", (h, inter)),
                ffn_out_bias=get(f"{p}output.dense.bias", (h,)),
                ffn_ln_weight=get(f"{p}output.LayerNorm.weight", (h,)),
                ffn_ln_bias=get(f"{p}output.LayerNorm.bias", (h,)),
            ))
        if head_weight is not None and (head_weight.dim() != 2 or head_weight.shape[1] != h):
            raise CheckpointError(
                f"{source}: projection 'linear.weight' has shape {tuple(head_weight.shape)}, expected [dim, {h}]"
            )
        return cls(
            config=config,
            word=get("embeddings.word_embeddings.weight", (config.vocab_size, h)),
            position=get("embeddings.position_embeddings.weight", (config.max_position_embeddings, h)),
            token_type_row=get("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h))[0],
            emb_ln_weight=get("embeddings.LayerNorm.weight", (h,)),
            emb_ln_bias=get("embeddings.LayerNorm.bias", (h,)),
            layers=layers,
            head_weight=None if head_weight is None else head_weight.float(),
            head_bias=None if head_bias is None else head_bias.float(),
        )

    def to(self, device, dtype: torch.dtype) -> "EncoderWeights":
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype).contiguous()
            if isinstance(value, LayerWeights):
                return LayerWeights(**{f.name: move(getattr(value, f.name)) for f in fields(value)})
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        return EncoderWeights(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def encode_hidden(weights: EncoderWeights, batch: PackedBatch, ops) -> torch.Tensor:
    """BERT's last hidden state for every packed token: ``[T, H]``."""
    cfg = weights.config
    eps = cfg.layer_norm_eps
    x = ops.embed(batch, weights.word, weights.position, weights.token_type_row,
                  weights.emb_ln_weight, weights.emb_ln_bias, eps)
    for layer in weights.layers:
        qkv = ops.linear(x, layer.qkv_weight, layer.qkv_bias)
        context = ops.attention(qkv, batch, cfg.num_heads, cfg.head_dim)
        x = ops.linear_residual_layernorm(context, layer.out_weight, layer.out_bias, x,
                                          layer.attn_ln_weight, layer.attn_ln_bias, eps)
        hidden = ops.linear(x, layer.ffn_in_weight, layer.ffn_in_bias, activation="gelu")
        x = ops.linear_residual_layernorm(hidden, layer.ffn_out_weight, layer.ffn_out_bias, x,
                                          layer.ffn_ln_weight, layer.ffn_ln_bias, eps)
    return x


def encode_packed(weights: EncoderWeights, batch: PackedBatch, ops,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """ColBERT embeddings: hidden states of the kept ``rows`` (all if None), projected and L2-normalised."""
    hidden = encode_hidden(weights, batch, ops)
    return ops.project_normalize(hidden, weights.head_weight, weights.head_bias, rows=rows)
