"""Multi-vector embeddings laid end to end: the form the encoder produces and the kernels consume."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch


def check_embedding_list(tensors, what: str) -> None:
    """A list of [tokens, dim] tensors sharing dim, dtype and device, or a clear error."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{what}[{i}] must be 2-D [tokens, dim], got shape {tuple(t.shape)}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{what}[{i}] has dim {t.shape[1]}, {what}[0] has {first.shape[1]}")
        if t.dtype != first.dtype:
            raise TypeError(f"{what}[{i}] is {t.dtype}, {what}[0] is {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{what}[{i}] is on {t.device}, {what}[0] is on {first.device}")


@dataclass(frozen=True)
class PackedEmbeddings:
    """``n`` variable-length embedding matrices stored as one ``values [T, dim]`` tensor.

    Item ``i`` is ``values[offsets[i]:offsets[i + 1]]``. ``offsets`` is int64 on the same device
    as ``values``; ``lengths_host`` keeps the lengths on the host so that slicing and batching
    never wait on the device.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    lengths_host: tuple[int, ...]

    def __post_init__(self):
        if self.values.dim() != 2:
            raise ValueError(f"values must be [T, dim], got shape {tuple(self.values.shape)}")
        if self.offsets.dim() != 1 or self.offsets.shape[0] != len(self.lengths_host) + 1:
            raise ValueError("offsets must be [n + 1] for n lengths")
        if sum(self.lengths_host) != self.values.shape[0]:
            raise ValueError(
                f"lengths add up to {sum(self.lengths_host)} rows but values has {self.values.shape[0]}"
            )
        # Scoring reads offsets, slicing reads lengths_host: they must agree. Checked where it is
        # free (offsets on the CPU); device offsets come from from_lengths or to(), built right.
        if self.offsets.device.type == "cpu":
            expected = torch.tensor((0, *itertools.accumulate(self.lengths_host)), dtype=torch.int64)
            if not torch.equal(self.offsets.long(), expected):
                raise ValueError(f"offsets {self.offsets.tolist()} disagree with lengths {list(self.lengths_host)}")

    @classmethod
    def from_lengths(cls, values: torch.Tensor, lengths) -> "PackedEmbeddings":
        lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in lengths):
            raise ValueError("lengths must be >= 0")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        return cls(values, offsets.to(values.device), lengths)

    @classmethod
    def from_list(cls, tensors: list[torch.Tensor]) -> "PackedEmbeddings":
        if not tensors:
            raise ValueError("cannot pack an empty list of embeddings")
        check_embedding_list(tensors, "embeddings")
        return cls.from_lengths(torch.cat(list(tensors), 0), [t.shape[0] for t in tensors])

    def __len__(self) -> int:
        return len(self.lengths_host)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def starts(self) -> torch.Tensor:
        return self.offsets[:-1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"a PackedEmbeddings index must be an integer, got {type(i).__name__}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        start = sum(self.lengths_host[:i])
        return self.values[start : start + self.lengths_host[i]]

    def to_list(self) -> list[torch.Tensor]:
        return list(torch.split(self.values, list(self.lengths_host), 0))

    def to(self, *args, **kwargs) -> "PackedEmbeddings":
        values = self.values.to(*args, **kwargs)
        return PackedEmbeddings(values, self.offsets.to(values.device), self.lengths_host)
