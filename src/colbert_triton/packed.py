"""Multi-vector embeddings laid end to end: the form the encoder produces and the kernels consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
