"""Multi-vector embeddings laid end to end: the form the encoder produces and the kernels consume."""

from __future__ import annotations

import functools
import itertools
import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
        start = self._host_starts[i]
        return self.values[start : start + self.lengths_host[i]]

    @functools.cached_property
    def _host_starts(self) -> tuple[int, ...]:
        # Indexing item i is O(1) after one O(n) pass (a loop over a large corpus stays linear).
        return (0, *itertools.accumulate(self.lengths_host))

    def to_list(self) -> list[torch.Tensor]:
        return list(torch.split(self.values, list(self.lengths_host), 0))

    def to(self, *args, **kwargs) -> "PackedEmbeddings":
        values = self.values.to(*args, **kwargs)
        return PackedEmbeddings(values, self.offsets.to(values.device), self.lengths_host)


# ---------------------------------------------------------------------------------------------
# Files: safetensors with ``values [T, dim]``, ``offsets [n + 1]`` and string metadata (the ids
# as a JSON list, and whatever the writer adds: the ColBERT model writes its identity there).

_LAYOUT = "values[offsets[i]:offsets[i+1]] is item i"


class EmbeddingsFile(NamedTuple):
    embeddings: PackedEmbeddings
    ids: list  # one per item: the writer's ids, or 0 .. n - 1
    metadata: dict[str, str]


def check_output_path(path) -> None:
    """A path a file can be written to (checked before any costly work that ends in writing it)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"output directory does not exist: {path.parent}")


def save_embeddings(path, embeddings: PackedEmbeddings, *, ids=None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write packed embeddings (on any device; stored as they are, dtype kept) to a safetensors file.

    ``ids``: one JSON-serialisable id per item (default 0 .. n - 1). ``metadata``: extra string
    entries; "ids" and "layout" are reserved.
    """
    from safetensors.torch import save_file

    if not isinstance(embeddings, PackedEmbeddings):
        raise TypeError(f"embeddings must be a PackedEmbeddings, got {type(embeddings).__name__}")
    if ids is None:
        ids = list(range(len(embeddings)))
    elif hasattr(ids, "tolist"):  # a numpy array or a tensor of ids: Python scalars for JSON
        ids = ids.tolist()
    else:
        ids = [i.item() if hasattr(i, "item") and not isinstance(i, (str, bytes)) else i for i in ids]
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} items")
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key in ("ids", "layout"):
            raise ValueError(f"metadata key {key!r} is reserved")
    try:
        ids_json = json.dumps(ids)
    except TypeError as bad:
        raise TypeError(f"ids must be JSON-serialisable: {bad}") from None
    check_output_path(path)
    tensors = {"values": embeddings.values.detach().contiguous().cpu(),
               "offsets": embeddings.offsets.to(torch.int64).cpu()}
    save_file(tensors, str(path), metadata={**extra, "ids": ids_json, "layout": _LAYOUT})


def load_embeddings(path, *, device="cpu") -> EmbeddingsFile:
    """Read a file written by `save_embeddings` (or ``colbert-triton encode``), checked whole:
    a file that is not such a file, or whose offsets, values and ids disagree, is an error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embeddings file not found: {path}")
    try:
        with safe_open(str(path), "pt") as file:
            names = set(file.keys())
            missing = {"values", "offsets"} - names
            if missing:
                raise ValueError(f"{path}: not an embeddings file (no {', '.join(sorted(missing))} tensor)")
            values, offsets = file.get_tensor("values"), file.get_tensor("offsets")
            metadata = dict(file.metadata() or {})
    except SafetensorError as bad:
        raise ValueError(f"{path}: not a safetensors file ({bad})") from None
    if values.dim() != 2 or not values.is_floating_point():
        raise ValueError(f"{path}: values must be a floating-point [T, dim] tensor, got "
                         f"{values.dtype} of shape {tuple(values.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{path}: offsets must be a 1-D integer tensor [n + 1], got "
                         f"{offsets.dtype} of shape {tuple(offsets.shape)}")
    offsets = offsets.to(torch.int64)
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    if offsets[0] != 0 or offsets[-1] != values.shape[0] or any(n < 0 for n in lengths):
        raise ValueError(f"{path}: offsets must rise from 0 to the {values.shape[0]} rows of values")
    if "ids" in metadata:
        try:
            ids = json.loads(metadata["ids"])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: the ids in its metadata are not JSON") from None
        if not isinstance(ids, list) or len(ids) != len(lengths):
            raise ValueError(f"{path}: its metadata holds {len(ids) if isinstance(ids, list) else 'no list of'} "
                             f"ids for {len(lengths)} items")
    else:
        ids = list(range(len(lengths)))
    embeddings = PackedEmbeddings(values, offsets, tuple(lengths)).to(device)
    return EmbeddingsFile(embeddings, ids, metadata)
