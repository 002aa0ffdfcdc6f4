"""Multi-vector embeddings laid end to end: the form the encoder produces and the kernels consume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# What embeddings may be stored as: the scorers read these (float64 is scored in float32).
EMBEDDING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64 = (-(1 << 63), (1 << 63) - 1)  # what lengths and integer ids may hold


def check_embedding_dtype(dtype: torch.dtype, what: str, error=TypeError) -> None:
    if dtype not in EMBEDDING_DTYPES:
        raise error(f"{what} must be floating point (float16, bfloat16, float32 or float64), got {dtype}")


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


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: equal means the same object
class PackedEmbeddings:
    """``n`` variable-length embedding matrices stored as one ``values [T, dim]`` tensor.

    Item ``i`` is ``values[offsets[i]:offsets[i + 1]]``. ``offsets`` is int64 on the same device
    as ``values``; ``lengths_host`` keeps the lengths on the host so that slicing and batching
    never wait on the device.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    lengths_host: tuple[int, ...]
    # ``lengths_host`` as a read-only int64 numpy array, made once by the constructor.
    lengths_array: np.ndarray = dataclasses.field(init=False, repr=False)
    # Private: the checked lengths when ``offsets`` was built from them here (from_lengths, to,
    # pin_memory, a checked file), so that device offsets are not read back to be compared.
    _built_from: dataclasses.InitVar[np.ndarray | None] = None

    def __post_init__(self, _built_from):
        for name in ("values", "offsets"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        _check_values_layout(self.values)
        if self.offsets.dim() != 1 or self.offsets.shape[0] != len(self.lengths_host) + 1:
            raise ValueError("offsets must be [n + 1] for n lengths")
        if self.offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"offsets must be int32 or int64, got {self.offsets.dtype}")
        if self.offsets.device != self.values.device:
            raise ValueError(f"offsets are on {self.offsets.device} but values on {self.values.device}")
        if _built_from is not None:
            object.__setattr__(self, "lengths_array", _built_from)
            return
        # One numpy pass each (Python loops took half a second for a million items).
        lengths = _lengths_array(self.lengths_host)
        ends = _checked_ends(lengths, self.values.shape[0])
        # Scoring reads offsets, slicing reads lengths_host: they must agree (device offsets are
        # read back once here: from_lengths and to() build theirs from checked lengths).
        offsets = self.offsets.cpu().numpy()
        if offsets[0] != 0 or not np.array_equal(offsets[1:], ends):
            shown = offsets.tolist() if offsets.size <= 20 else f"[{offsets[0]}, {offsets[1]}, ...]"
            raise ValueError(f"offsets {shown} disagree with the lengths (offsets must be 0 followed by "
                             f"the running sum of the lengths)")
        lengths.flags.writeable = False
        object.__setattr__(self, "lengths_array", lengths)
        object.__setattr__(self, "lengths_host", tuple(lengths.tolist()))  # Python ints (2.0 -> 2)

    @classmethod
    def from_lengths(cls, values: torch.Tensor, lengths) -> PackedEmbeddings:
        """Item ``i`` is the next ``lengths[i]`` rows of ``values``; ``lengths``: whole numbers
        (a list, a numpy array or a tensor, of integers or integral floats such as a mask's sum)."""
        if not isinstance(values, torch.Tensor):  # before values.device (numpy < 2 has none)
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        _check_values_layout(values)
        lengths = _lengths_array(lengths)
        ends = _checked_ends(lengths, values.shape[0])
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.from_numpy(ends)
        lengths.flags.writeable = False
        return cls(values, offsets.to(values.device), tuple(lengths.tolist()), lengths)

    @classmethod
    def from_list(cls, tensors: list[torch.Tensor]) -> PackedEmbeddings:
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

    def to(self, *args, **kwargs) -> PackedEmbeddings:
        values = self.values.to(*args, **kwargs)
        if values is self.values:  # already there, in that dtype: not validated again
            return self
        return PackedEmbeddings(values, self.offsets.to(values.device), self.lengths_host, self.lengths_array)

    def pin_memory(self) -> PackedEmbeddings:
        """A copy in pinned host memory (needs CUDA): `search` then streams it to the GPU
        without a staging copy per block. PyTorch rounds a pinned allocation up to a power of
        two bytes (70 GB pins 128 GB): for a corpus near the host's memory, keep it unpinned
        (`search` then stages each block through a small pinned buffer)."""
        return PackedEmbeddings(self.values.pin_memory(), self.offsets.cpu(), self.lengths_host,
                                self.lengths_array)


def _lengths_array(lengths) -> np.ndarray:
    """Item lengths as an int64 array, or a clear error: whole numbers only (2.5 rows is a
    caller's bug, not 2), within int64."""
    if isinstance(lengths, torch.Tensor):  # (float64: numpy has no bfloat16)
        lengths = lengths.detach().cpu()
        lengths = (lengths.double() if lengths.is_floating_point() else lengths).numpy()
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__"):
        raise TypeError(f"lengths must be a sequence of whole numbers, got {type(lengths).__name__}")
    try:
        array = np.asarray(lengths)
    except (ValueError, TypeError, OverflowError) as bad:
        raise TypeError(f"lengths must be a sequence of whole numbers: {bad}") from None
    if array.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.floor(array)) & (np.abs(array) < 2.0**63)  # floats: 2^63 itself is out
        if not whole.all():
            i = int(np.argmin(whole))
            raise ValueError(f"lengths[{i}] = {float(array[i])} is not a whole number")
    elif array.dtype.kind == "u":
        if array.max() > _INT64[1]:
            raise ValueError(f"lengths[{int(np.argmax(array))}] = {array.max()} is out of range")
    elif array.dtype.kind == "O":  # numbers past int64, or things that are not numbers
        for i, item in enumerate(array.tolist()):
            if not isinstance(item, int) or isinstance(item, bool):
                raise TypeError(f"lengths must be whole numbers, got lengths[{i}] = {item!r}")
            if not _INT64[0] <= item <= _INT64[1]:
                raise ValueError(f"lengths[{i}] = {item} is out of range")
    elif array.dtype.kind != "i":  # a boolean array is a mask, not lengths
        raise TypeError(f"lengths must be whole numbers, got {array.dtype}")
    return array.astype(np.int64)


def _check_values_layout(values: torch.Tensor) -> None:
    if values.dim() != 2:
        raise ValueError(f"values must be [T, dim], got shape {tuple(values.shape)}")


def _checked_ends(lengths: np.ndarray, num_rows: int) -> np.ndarray:
    """The running sum of the lengths, checked to tile ``num_rows`` rows exactly."""
    if lengths.size and lengths.min() < 0:
        i = int(np.argmin(lengths))
        raise ValueError(f"lengths must be >= 0, got lengths[{i}] = {lengths[i]}")
    if lengths.size and lengths.max() > num_rows:
        i = int(np.argmax(lengths))
        raise ValueError(f"lengths[{i}] = {lengths[i]} but values has {num_rows} rows")
    ends = np.cumsum(lengths)
    # Lengths in [0, 2^63) wrap the int64 sum only by making a running sum negative.
    if ends.size and ends.min() < 0:
        raise ValueError(f"lengths add up to more than the {num_rows} rows of values")
    total = int(ends[-1]) if ends.size else 0
    if total != num_rows:
        raise ValueError(f"lengths add up to {total} rows but values has {num_rows}")
    return ends


# ---------------------------------------------------------------------------------------------
# Files: safetensors holding ``values [T, dim]``, ``offsets [n + 1]`` and the ids as a tensor
# (``ids`` int64 when every id is an integer, else ``ids_json``, the UTF-8 bytes of a JSON list:
# never in the header, which safetensors caps at 100 MB, ~10M ids), with string metadata from
# the writer (the ColBERT model writes its identity there).

_LAYOUT = "values[offsets[i]:offsets[i+1]] is item i"


class EmbeddingsFile(NamedTuple):
    embeddings: PackedEmbeddings
    ids: list  # one per item: the writer's ids, or 0 .. n - 1
    metadata: dict[str, str]


class EmbeddingsFileInfo(NamedTuple):
    """What a file's header says, read without its tensors."""

    metadata: dict[str, str]
    num_items: int
    num_rows: int
    dim: int


def check_output_path(path) -> None:
    """A path a file can be written to (checked before any costly work that ends in writing it)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"output directory does not exist: {path.parent}")


def _ids_list(ids) -> list:
    """The ids as a list of Python values (numpy and torch scalars made plain)."""
    # A string iterates as its characters and a set in no set order: neither is an id per item.
    if isinstance(ids, (str, bytes, bytearray, set, frozenset)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"ids must be a list (or another sequence) with one id per item, got {type(ids).__name__}")
    if hasattr(ids, "tolist"):  # a numpy array or a tensor of ids
        ids = ids.tolist()
        if not isinstance(ids, list):  # a 0-d array
            raise TypeError("ids must be a list (or another sequence) with one id per item, got a 0-d array")
    # Numpy and torch scalars made plain (an object array's tolist() keeps them).
    return [i.item() if hasattr(i, "item") and not isinstance(i, (str, bytes)) else i for i in ids]


def _ids_tensor(ids: list) -> tuple[str, torch.Tensor]:
    if all(type(i) is int and _INT64[0] <= i <= _INT64[1] for i in ids):
        return "ids", torch.tensor(ids, dtype=torch.int64)
    bad_number = next((i for i, x in enumerate(ids) if isinstance(x, float) and not math.isfinite(x)), None)
    if bad_number is not None:
        raise TypeError(f"ids[{bad_number}] = {ids[bad_number]!r}: NaN and infinite ids are not valid JSON")
    try:
        text = json.dumps(ids, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as bad:  # ValueError: a list or dict that contains
        # itself, or a NaN in one; RecursionError: nested past Python's limit
        raise TypeError(f"ids must be JSON-serialisable: {bad}") from None
    # Ids that JSON changes (a tuple comes back a list, dict keys strings) would not match the
    # caller's own once loaded: refused here rather than found different later.
    stored = json.loads(text)
    if stored != ids:
        i = next(i for i, (a, b) in enumerate(zip(stored, ids)) if a != b)
        raise TypeError(f"ids[{i}] = {ids[i]!r} would come back from the file as {stored[i]!r} (ids are "
                        "stored as JSON: a tuple comes back a list, dict keys strings); give ids that JSON "
                        "keeps as they are, such as strings, numbers or lists")
    return "ids_json", torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def save_embeddings(path, embeddings: PackedEmbeddings | list[torch.Tensor], *, ids=None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write packed embeddings (on any device; stored as they are, dtype kept) to a safetensors file.

    ``embeddings``: a `PackedEmbeddings`, or a list of ``[tokens, dim]`` tensors sharing dim,
    dtype and device, written one after another, never joined (a corpus in host memory need
    not fit there twice). ``ids``: a list (or array) of one id per item (default 0 .. n - 1),
    each one that JSON keeps as it is (``load_embeddings`` gives back an equal list): strings,
    numbers, None, lists and dicts with string keys; a tuple (it would come back a list) is an
    error. ``metadata``: extra string entries; "layout" is reserved.
    """
    if isinstance(embeddings, PackedEmbeddings):
        parts, lengths, dim = [embeddings.values], embeddings.lengths_array, embeddings.dim
        dtype, what = embeddings.values.dtype, "embeddings.values"
    elif isinstance(embeddings, (list, tuple)):
        if not embeddings:
            raise ValueError("embeddings is an empty list: nothing to write (its dim is unknown)")
        check_embedding_list(embeddings, "embeddings")
        parts, lengths, dim = embeddings, np.array([t.shape[0] for t in embeddings], dtype=np.int64), embeddings[0].shape[1]
        dtype, what = embeddings[0].dtype, "embeddings"
    else:
        raise TypeError(f"embeddings must be a PackedEmbeddings or a list of [tokens, dim] tensors, "
                        f"got {type(embeddings).__name__}")
    check_embedding_dtype(dtype, what)  # what load_embeddings reads
    ids = list(range(len(lengths))) if ids is None else _ids_list(ids)
    if len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} ids for {len(lengths)} items")
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key == "layout":
            raise ValueError(f"metadata key {key!r} is reserved")
    ids_name, ids_tensor = _ids_tensor(ids)
    check_output_path(path)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tensors = [("values", dtype, (int(offsets[-1]), dim), parts),
               ("offsets", torch.int64, (len(offsets),), [torch.from_numpy(offsets)]),
               (ids_name, ids_tensor.dtype, tuple(ids_tensor.shape), [ids_tensor])]
    # Written as open() would: through a symbolic link, with the file's mode kept (a new file:
    # 0o666 less the umask); into a private temporary file renamed over the path, so a reader
    # (a loaded corpus is the file mapped into memory) keeps the file it opened.
    target = Path(os.path.realpath(path))
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
    try:
        _write_safetensors(target, tensors, {**extra, "layout": _LAYOUT}, mode)
    except OSError as bad:
        raise ValueError(f"could not write {path}: {bad.strerror or bad}") from None


# safetensors' names of the dtypes written here.
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.int64: "I64", torch.uint8: "U8"}


def _write_safetensors(target: Path, tensors, metadata: dict[str, str], mode: int) -> None:
    """The safetensors format, written a part at a time: a little-endian u64 header size, the
    JSON header (each tensor's dtype, shape and byte range; ``__metadata__``), padded with
    spaces to 8 bytes, then the tensors' bytes end to end. ``tensors``: (name, dtype, shape,
    parts), the parts' rows making the tensor in order."""
    header, begin = {"__metadata__": metadata}, 0
    for name, dtype, shape, _ in tensors:
        end = begin + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(temporary)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(len(text).to_bytes(8, "little"))
            file.write(text)
            for _, dtype, _, parts in tensors:
                for part in _on_host(parts):
                    # numpy has no bfloat16: its bits are written as int16.
                    file.write(memoryview((part.view(torch.int16) if dtype == torch.bfloat16 else part).numpy()))
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# Device parts are joined up to this size before their copy to the host: one copy per chunk, not
# per item (a corpus saved from a list of GPU tensors has one per document).
_HOST_CHUNK_BYTES = 64 << 20


def _on_host(parts):
    """``parts`` on the host, in order, as contiguous tensors whose rows end to end are theirs:
    host parts as they are, runs of device parts joined into chunks of up to _HOST_CHUNK_BYTES
    and copied over once each."""
    def joined(run):  # one part alone (a packed corpus's values) is copied, not joined first
        return run[0].cpu() if len(run) == 1 else torch.cat(run).cpu()

    run, run_bytes = [], 0
    for part in parts:
        part = part.detach()
        if part.device.type == "cpu":
            if run:
                yield joined(run)
                run, run_bytes = [], 0
            yield part.contiguous()
            continue
        run.append(part.reshape(-1))
        run_bytes += part.numel() * part.element_size()
        if run_bytes >= _HOST_CHUNK_BYTES:
            yield joined(run)
            run, run_bytes = [], 0
    if run:
        yield joined(run)


def _read_umask_by_setting_it() -> int:
    mask = os.umask(0o022)  # os.umask sets it for every thread: put back at once
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask_by_setting_it()  # for systems without /proc (imports run first)


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return _UMASK_AT_IMPORT


@contextlib.contextmanager
def _pinned(path):
    """A path naming the file ``path`` names now, for the whole block: every open inside reads
    that one file, even if a new one is renamed over ``path`` meanwhile (as a save in progress,
    safetensors' included, does), so its header and its values cannot come from two files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embeddings file not found: {path}")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as bad:
        raise ValueError(f"{path}: cannot be read ({bad.strerror})") from None
    try:
        held = Path(f"/proc/self/fd/{fd}")  # Linux: opens the held file, not the name
        yield held if held.exists() else path
    finally:
        os.close(fd)


def _read_header(source, path) -> EmbeddingsFileInfo:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(source), "pt") as file:
            missing = {"values", "offsets"} - set(file.keys())
            if missing:
                raise ValueError(f"{path}: not an embeddings file (no {', '.join(sorted(missing))} tensor)")
            values_shape = file.get_slice("values").get_shape()
            offsets_shape = file.get_slice("offsets").get_shape()
            metadata = dict(file.metadata() or {})
    except (SafetensorError, RuntimeError) as bad:
        raise ValueError(f"{path}: not a safetensors file ({bad})") from None
    if len(values_shape) != 2:
        raise ValueError(f"{path}: values must be [T, dim], got shape {tuple(values_shape)}")
    if len(offsets_shape) != 1 or offsets_shape[0] < 1:
        raise ValueError(f"{path}: offsets must be [n + 1], got shape {tuple(offsets_shape)}")
    return EmbeddingsFileInfo(metadata, offsets_shape[0] - 1, values_shape[0], values_shape[1])


def embeddings_file_info(path) -> EmbeddingsFileInfo:
    """The metadata and sizes of an embeddings file, from its header alone (cheap for any size)."""
    with _pinned(path) as source:
        return _read_header(source, path)


def load_embeddings(path, *, device="cpu", check=None) -> EmbeddingsFile:
    """Read a file written by `save_embeddings` (or ``colbert-triton encode``), checked whole:
    a file that is not such a file, or whose offsets, values and ids disagree, is an error.

    ``check``: called with the file's `EmbeddingsFileInfo` before its values are read, to refuse
    it by raising; what it sees and what is read are one file, whatever is saved to ``path``
    meanwhile."""
    from safetensors import SafetensorError, safe_open

    with _pinned(path) as source:
        info = _read_header(source, path)
        if check is not None:
            check(info)
        try:
            with safe_open(str(source), "pt") as file:
                names = set(file.keys())
                values, offsets = file.get_tensor("values"), file.get_tensor("offsets")
                ids_kind = next((n for n in ("ids", "ids_json") if n in names), None)
                stored_ids = file.get_tensor(ids_kind) if ids_kind else None
        except (SafetensorError, RuntimeError) as bad:
            raise ValueError(f"{path}: not a safetensors file ({bad})") from None
    check_embedding_dtype(values.dtype, f"{path}: values", ValueError)
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{path}: offsets must be int32 or int64, got {offsets.dtype}")
    offsets = offsets.to(torch.int64).numpy()
    # Compared, never subtracted first: differences of crafted offsets could wrap past int64.
    if offsets[0] != 0 or offsets[-1] != values.shape[0] or np.any(offsets[1:] < offsets[:-1]):
        raise ValueError(f"{path}: offsets must rise from 0 to the {values.shape[0]} rows of values")
    lengths = np.diff(offsets)
    lengths.flags.writeable = False
    ids = _read_ids(path, ids_kind, stored_ids, info.metadata)
    if ids is None:
        ids = list(range(len(lengths)))
    elif len(ids) != len(lengths):
        raise ValueError(f"{path}: it holds {len(ids)} ids for {len(lengths)} items")
    embeddings = PackedEmbeddings(values, torch.from_numpy(offsets), tuple(lengths.tolist()), lengths)
    return EmbeddingsFile(embeddings.to(available_device(device)), ids, info.metadata)


def pick_device(device) -> torch.device:
    """``device``, or CUDA when there is one and the CPU otherwise, as `available_device` checks it;
    "cuda" fixed to the GPU current now, so a later torch.cuda.set_device does not move a model's
    (or an index's) launches, events and buffers to another GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = available_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def available_device(device) -> torch.device:
    """``device`` as a torch.device that this machine has, or a clear error."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        # meta has no data and the others (mps, xpu, ...) are untested: refused here, not deep
        # in the first op that meets a CPU tensor.
        raise ValueError(f"device must be a CPU or a CUDA device, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def _read_ids(path, kind, tensor, metadata) -> list | None:
    if kind == "ids":
        if tensor.dim() != 1 or tensor.dtype != torch.int64:
            raise ValueError(f"{path}: ids must be a 1-D int64 tensor, got {tensor.dtype} {tuple(tensor.shape)}")
        return tensor.tolist()
    if kind == "ids_json":
        try:
            text = bytes(tensor.numpy()).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: its ids are not UTF-8 JSON") from None
    elif "ids" in metadata:  # files of the first version kept them in the header
        text = metadata["ids"]
    else:
        return None
    try:
        ids = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested past Python's limit
        raise ValueError(f"{path}: its ids are not JSON (or nested too deeply to read)") from None
    if not isinstance(ids, list):
        raise ValueError(f"{path}: its ids are not a JSON list")
    return ids
