"""The operations the BERT encoder is built from, in two interchangeable implementations.

`model/encoder.py` runs one forward pass over a *packed* batch (all tokens of all sequences
concatenated into ``[T, hidden]``, sequence boundaries in ``cu_seqlens``) and calls only the
methods below. `TorchOps` is plain PyTorch (the CPU path and the eager baseline the benchmarks
compare with); `TritonOps` routes the same calls to the hand-written kernels in
`colbert_triton.kernels`. Both take and return the same shapes and dtypes, so the model code
is shared and only the ops differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels._device import host_to_device


@dataclass
class PackedBatch:
    """A batch of token sequences laid end to end, with the bookkeeping every op needs.

    Built on the host from the tokenizer's output, so nothing here forces a device sync.
    ``key_lens[b] <= seq_lens[b]``: every token of sequence b is a query row of attention,
    but only its first ``key_lens[b]`` tokens are keys (a ColBERT query's [MASK] expansion
    rows are computed without being attended to when ``attend_to_mask_tokens`` is false).
    """

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B + 1] int32, device
    key_lens: torch.Tensor  # [B] int32, device
    seq_lens_host: np.ndarray  # [B] int64
    key_lens_host: np.ndarray  # [B] int64
    max_seqlen: int
    _padded_index: torch.Tensor | None = field(default=None, repr=False)
    # Attention tile tables by (head_dim, dtype), built once and shared by every layer.
    _attention_tiles: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_host.shape[0])

    @classmethod
    def from_sequences(
        cls,
        sequences: list[np.ndarray],
        key_lens: list[int] | np.ndarray,
        device: torch.device | str,
    ) -> "PackedBatch":
        seq_lens = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        key_lens_host = np.asarray(key_lens, dtype=np.int64)
        if np.any(seq_lens < 1):
            raise ValueError("every sequence in a packed batch needs at least one token")
        if np.any(key_lens_host < 1) or np.any(key_lens_host > seq_lens):
            raise ValueError("key lengths must lie in [1, sequence length]")
        cu = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(seq_lens, out=cu[1:])
        ids = np.concatenate(sequences).astype(np.int64, copy=False)
        positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], seq_lens)
        return cls(
            input_ids=host_to_device(ids, torch.int64, device),
            position_ids=host_to_device(positions, torch.int64, device),
            cu_seqlens=host_to_device(cu, torch.int32, device),
            key_lens=host_to_device(key_lens_host, torch.int32, device),
            seq_lens_host=seq_lens,
            key_lens_host=key_lens_host,
            max_seqlen=int(seq_lens.max()),
        )

    def attention_tiles(self, head_dim: int, dtype: torch.dtype):
        """The query-tile table of this batch for the Triton attention kernel (host lengths ->
        one small upload per batch, not per layer)."""
        key = (head_dim, dtype)
        if key not in self._attention_tiles:
            from ..kernels.attention import AttentionTiles, attention_config, attention_tile_table

            block_m = attention_config(head_dim, self.max_seqlen, dtype)["BLOCK_M"]
            table = attention_tile_table(self.seq_lens_host, self.key_lens_host, block_m)
            self._attention_tiles[key] = AttentionTiles(
                host_to_device(table, torch.int32, self.cu_seqlens.device), block_m)
        return self._attention_tiles[key]

    def padded_index(self) -> torch.Tensor:
        """For each packed token, its row in a ``[B * max_seqlen]`` padded layout."""
        if self._padded_index is None:
            starts = np.repeat(np.arange(self.num_seqs) * self.max_seqlen, self.seq_lens_host)
            index = torch.from_numpy(starts).to(self.position_ids.device) + self.position_ids
            self._padded_index = index
        return self._padded_index


class TorchOps:
    """Plain PyTorch: what a careful eager implementation of BERT would run."""

    name = "torch"

    def embed(self, batch: PackedBatch, word, position, token_type_row, ln_weight, ln_bias, eps):
        x = F.embedding(batch.input_ids, word) + F.embedding(batch.position_ids, position)
        return F.layer_norm(x + token_type_row, (x.shape[-1],), ln_weight, ln_bias, eps)

    def linear(self, x, weight, bias, activation: str | None = None):
        y = F.linear(x, weight, bias)
        if activation == "gelu":
            y = F.gelu(y)
        elif activation is not None:
            raise ValueError(f"unsupported activation {activation!r}")
        return y

    def linear_residual_layernorm(self, x, weight, bias, residual, ln_weight, ln_bias, eps):
        y = F.linear(x, weight, bias) + residual
        return F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)

    def attention(self, qkv: torch.Tensor, batch: PackedBatch, num_heads: int, head_dim: int):
        """Scaled dot-product attention per sequence on a padded copy, back to packed rows."""
        hidden = num_heads * head_dim
        num_seqs, max_len = batch.num_seqs, batch.max_seqlen
        index = batch.padded_index()
        padded = qkv.new_zeros(num_seqs * max_len, 3 * hidden).index_copy_(0, index, qkv)
        q, k, v = padded.view(num_seqs, max_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        key_positions = torch.arange(max_len, device=qkv.device)
        key_mask = (key_positions[None, :] < batch.key_lens[:, None].to(key_positions.dtype))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return out.transpose(1, 2).reshape(num_seqs * max_len, hidden).index_select(0, index)

    def project_normalize(self, x, weight, bias, rows: torch.Tensor | None = None):
        if rows is not None:
            x = x.index_select(0, rows)
        y = F.linear(x, weight, bias)
        return F.normalize(y.float(), p=2, dim=-1, eps=1e-12).to(x.dtype)


class TritonOps:
    """The same calls on the hand-written Triton kernels (CUDA, or the CPU interpreter)."""

    name = "triton"

    def embed(self, batch, word, position, token_type_row, ln_weight, ln_bias, eps):
        from ..kernels.embedding import embed_layernorm

        return embed_layernorm(
            batch.input_ids, batch.position_ids, word, position, token_type_row, ln_weight, ln_bias, eps
        )

    def linear(self, x, weight, bias, activation=None):
        from ..kernels.linear import linear

        return linear(x, weight, bias, activation=activation)

    def linear_residual_layernorm(self, x, weight, bias, residual, ln_weight, ln_bias, eps):
        from ..kernels.linear import linear_residual_layernorm

        return linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps)

    def attention(self, qkv, batch, num_heads, head_dim):
        from ..kernels.attention import varlen_attention

        return varlen_attention(
            qkv, batch.cu_seqlens, batch.key_lens, batch.max_seqlen, num_heads, head_dim,
            tiles=batch.attention_tiles(head_dim, qkv.dtype),
        )

    def project_normalize(self, x, weight, bias, rows=None):
        from ..kernels.head import project_normalize

        return project_normalize(x, weight, bias, rows=rows)


def get_ops(name: str):
    if name == "torch":
        return TorchOps()
    if name == "triton":
        return TritonOps()
    raise ValueError(f"unknown ops backend {name!r}: expected 'torch' or 'triton'")
