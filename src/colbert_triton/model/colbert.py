"""The user-facing model: load a checkpoint, encode queries and documents, score, rank."""

from __future__ import annotations

import functools
import hashlib
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import fields

import numpy as np
import torch

from .. import scoring
from ..packed import (
    EmbeddingsFile,
    PackedEmbeddings,
    available_device,
    load_embeddings,
    pick_device,
    save_embeddings,
)
from .checkpoint import DEFAULT_MODEL, CheckpointError, load_checkpoint
from .encoder import EncoderWeights, LayerWeights, encode_packed
from .ops import PackedBatch, get_ops, host_to_device
from .pooling import BatchPipeline, PoolingProcesses, _scipy, check_pooling
from .tokenization import ColBERTTokenizer, TokenizedBatch, check_texts

# Show a progress bar by default when encoding takes more than this many batches.
_PROGRESS_MIN_BATCHES = 8
# Texts are tokenized this many batches at a time, the next chunk in a worker thread while the
# encoder runs this one (see _tokenized_ahead).
_TOKENIZE_AHEAD_BATCHES = 4


def _tokenized_ahead(tokenize, texts: list[str], chunks: list[np.ndarray]):
    """Each chunk's `TokenizedBatch`, in order. With more than one chunk a worker thread
    tokenizes ahead while the caller encodes: the tokenizer's Rust core releases the GIL and GPU
    kernels run asynchronously, so a corpus is no longer tokenized before its first kernel
    starts. One chunk (a query, a few documents) is tokenized inline: a thread's start-up would
    only add latency."""
    def run(index):
        return tokenize([texts[i] for i in index])

    if len(chunks) == 1:
        yield run(chunks[0])
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="colbert-tokenize") as pool:
        # One chunk in flight: the next is tokenized while the caller encodes this one, and no
        # more (a corpus tokenized far ahead would sit in host memory, ~16 bytes a token).
        pending = pool.submit(run, chunks[0])
        try:
            for index in chunks[1:]:
                ready = pending.result()
                pending = pool.submit(run, index)
                yield ready
            yield pending.result()
        finally:  # the caller stopped early (an error): tokenize nothing more
            pending.cancel()


def _pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


# Named in every file's metadata, so a later change of how the fingerprint is taken can tell an
# older file from another model's.
FINGERPRINT_METHOD = "sha256-of-all-weights-in-float16"


def _fingerprint(weights: EncoderWeights) -> str:
    """A short hash of every weight, each rounded to float16 first: the same checkpoint stored
    in float32 or float16, in either layout, loaded on any device in any dtype, gives the same
    fingerprint; any training step changes it."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
        elif isinstance(value, LayerWeights):
            for field in fields(value):
                add(getattr(value, field.name))
        elif isinstance(value, list):
            for item in value:
                add(item)

    for field in fields(weights):
        add(getattr(weights, field.name))
    return digest.hexdigest()[:16]


class ColBERT:
    """A BERT ColBERT checkpoint ready to encode and score.

    >>> model = ColBERT.from_pretrained("answerdotai/answerai-colbert-small-v1")
    >>> q = model.encode_queries(["what is late interaction?"])
    >>> d = model.encode_documents(["ColBERT scores with MaxSim.", "Unrelated text."])
    >>> model.score(q, d)           # [1, 2] float32
    """

    def __init__(self, weights: EncoderWeights, tokenizer: ColBERTTokenizer, device: torch.device,
                 dtype: torch.dtype, backend: str | None = None, source: str = "",
                 cuda_graphs: bool = True):
        self.device = device
        self.dtype = dtype
        self.backend = scoring.resolve_backend(device, backend)
        if self.backend == "triton":
            from ..kernels.attention import SUPPORTED_HEAD_DIMS

            head_dim = weights.config.head_dim
            if head_dim not in SUPPORTED_HEAD_DIMS:
                if backend == "triton":
                    raise ValueError(f"{source or 'this checkpoint'}: the Triton encoder's attention "
                                     f"takes head dims {SUPPORTED_HEAD_DIMS}, this model's is {head_dim} "
                                     f"(hidden_size / num_attention_heads): load it with backend='torch'")
                self.backend = "torch"  # the default: the PyTorch encoder, MaxSim still on the kernel
        self.ops = get_ops(self.backend)
        self.fingerprint = _fingerprint(weights)
        self.weights = weights.to(device, dtype)
        self.tokenizer = tokenizer
        self.settings = tokenizer.settings
        self.source = source
        self._graphs = None
        if cuda_graphs and device.type == "cuda" and self.backend == "triton":
            from .graphs import GraphedEncoder

            # Small batches (one query, a few documents) replay a captured forward: warmed here.
            try:
                self._graphs = GraphedEncoder(self.weights, self.ops, device)
            except RuntimeError as failed:  # a capture refused here (a profiler, a debugger, ...)
                warnings.warn(f"CUDA graphs could not be captured ({failed}); small batches run "
                              "the Triton forward eagerly", RuntimeWarning, stacklevel=3)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, revision: str | None = None,
                        device=None, dtype=None, *, query_maxlen: int | None = None,
                        doc_maxlen: int | None = None, backend: str | None = None,
                        cuda_graphs: bool = True, cache_dir=None, token=None) -> "ColBERT":
        """Load a hub id (through the huggingface_hub cache; ``HF_HUB_OFFLINE=1`` is honoured)
        or a local directory, in the Stanford or the PyLate/sentence-transformers layout.

        ``query_maxlen``/``doc_maxlen`` override the checkpoint's lengths. ``dtype`` defaults to
        float16 on CUDA and float32 on the CPU. ``backend`` picks the ops ("torch", "triton");
        by default the CPU runs the PyTorch path. With the Triton backend on CUDA, small batches
        replay CUDA graphs captured here at load (``cuda_graphs=False`` turns them off). The
        Triton attention takes head dims 16, 32, 64 and 128: other checkpoints run the PyTorch
        encoder by default and are refused with ``backend="triton"``.
        """
        device = pick_device(device)
        dtype = _pick_dtype(dtype, device)
        ckpt = load_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
        settings = ckpt.settings.with_lengths(query_maxlen, doc_maxlen)
        weights = EncoderWeights.from_checkpoint(ckpt.config, ckpt.encoder_tensors, ckpt.head_weight,
                                                 ckpt.head_bias, ckpt.source)
        if ckpt.metadata_dim is not None and ckpt.metadata_dim != weights.dim:
            raise CheckpointError(
                f"{ckpt.source}: artifact.metadata says dim {ckpt.metadata_dim} but linear.weight "
                f"projects to {weights.dim}"
            )
        tokenizer = ColBERTTokenizer.from_files(ckpt.tokenizer, settings, ckpt.config.max_position_embeddings)
        vocab_rows = weights.word.shape[0]
        specials = {"CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "query expansion": tokenizer.mask_id}
        past = [f"{what} ({i})" for what, i in specials.items() if i >= vocab_rows]
        if past:
            raise CheckpointError(f"{ckpt.source}: the tokenizer's {', '.join(past)} token id is past "
                                  f"the {vocab_rows}-row embedding")
        top_id = max([*tokenizer.query_marker, *tokenizer.doc_marker], default=0)
        if top_id >= vocab_rows:
            # PyLate would add the marker tokens and grow the embedding with untrained rows.
            raise CheckpointError(
                f"{ckpt.source}: the query/document markers ({settings.query_prefix!r}, "
                f"{settings.document_prefix!r}) are not in the tokenizer's vocabulary (token id "
                f"{top_id} is past the {vocab_rows}-row embedding); a PyLate checkpoint names them "
                f"in config_sentence_transformers.json (query_prefix, document_prefix)")
        beyond = sorted((i, token) for i, token in tokenizer.added_tokens().items() if i >= vocab_rows)
        if beyond:
            # A text holding one would index past the embedding (PyLate fails there too).
            listed = ", ".join(f"{token!r} ({i})" for i, token in beyond[:5])
            raise CheckpointError(f"{ckpt.source}: the tokenizer adds tokens past the {vocab_rows}-row "
                                  f"embedding: {listed}{', ...' if len(beyond) > 5 else ''}")
        return cls(weights, tokenizer, device, dtype, backend=backend, source=ckpt.source,
                   cuda_graphs=cuda_graphs)

    @property
    def dim(self) -> int:
        return self.weights.dim

    # -----------------------------------------------------------------------------------------
    # Encoding

    def encode_queries(self, texts, batch_size: int = 64, *, packed: bool = False,
                       show_progress: bool | None = None, output_device=None):
        """One ``[query_maxlen, dim]`` tensor per query (all rows, [MASK] expansion included).
        ``output_device="cpu"``: as `encode_documents`."""
        output_device = self._output_device(output_device)
        return self._encode(texts, "queries", batch_size, packed, show_progress, output_device=output_device)

    def encode_documents(self, texts, batch_size: int = 64, *, packed: bool = False,
                         show_progress: bool | None = None, pool_factor: int = 1,
                         protected_tokens: int = 1, pooling_processes: int | PoolingProcesses = 0,
                         output_device=None):
        """One ``[n_i, dim]`` tensor per document (punctuation rows dropped), or, with
        ``packed=True``, a `PackedEmbeddings` holding them all end to end in input order.

        ``output_device="cpu"`` (for a model on a GPU) moves each batch to host memory as it is
        encoded (overlapped with the next batch), so the GPU never holds more than a few
        batches: a corpus larger than its memory (then `save_embeddings`, or `search`, which
        streams a host corpus to the GPU). Default: the model's device.

        ``pool_factor`` > 1 pools each document's rows after its first ``protected_tokens``
        (``[CLS]``) into about 1/pool_factor as many, as PyLate's ``encode(pool_factor=...)``
        does: an index that many times smaller. With the Triton backend it runs on the GPU
        (`kernels.pooling`: SciPy's clustering step for step, queued behind the encoder).
        Otherwise on the CPU with SciPy (`model.pooling`), one batch behind the encoder (on a
        GPU the next batch is encoded meanwhile), in this process or shared among
        ``pooling_processes``: a number of worker processes started for the call (with
        ``spawn``: a script needs ``if __name__ == "__main__":``), or running
        `PoolingProcesses`, to keep them across calls (not used with the Triton backend)."""
        pooling = check_pooling(pool_factor, protected_tokens, pooling_processes)
        if pooling[0] > 1 and not self._pools_on_device(pooling[1]):
            _scipy()  # pooled on the CPU: SciPy, or a clear error before anything is encoded
        output_device = self._output_device(output_device)
        return self._encode(texts, "documents", batch_size, packed, show_progress, pooling, output_device)

    def _pools_on_device(self, protected_tokens: int) -> bool:
        """Token pooling by the Triton kernels, where the encoder runs: with the Triton backend,
        for documents they hold (a checkpoint with more than 512 positions pools on the CPU)."""
        from ..kernels.pooling import MAX_POOLED_ROWS

        return self.backend == "triton" and self.settings.doc_maxlen - protected_tokens <= MAX_POOLED_ROWS

    def _output_device(self, device) -> torch.device:
        """Where encoded batches go: the model's device, or the host."""
        if device is None:
            return self.device
        device = available_device(device)
        if device.type == "cuda" and device.index is None and self.device.type == "cuda":
            device = self.device  # "cuda": the model's GPU
        if device not in (self.device, torch.device("cpu")):
            raise ValueError(f"output_device must be the model's device ({self.device}) or 'cpu', got '{device}'")
        return device

    def _encode(self, texts, kind: str, batch_size: int, packed: bool, show_progress, pooling=(1, 0, 0),
                output_device: torch.device | None = None):
        batch_size = scoring.checked_int(batch_size, "batch_size")
        texts = check_texts(texts, kind)  # all of them, before anything is encoded
        if not texts:
            raise ValueError("nothing to encode: the list of texts is empty")
        tokenize = functools.partial(  # the texts were checked above, once
            self.tokenizer.queries if kind == "queries" else self.tokenizer.documents, checked=True)
        # Longest first, so each batch holds similar lengths and the first batch shows the peak
        # memory: by characters across chunks (known before tokenizing), by tokens within one.
        by_chars = np.argsort([-len(t) for t in texts], kind="stable")
        chunk = batch_size * _TOKENIZE_AHEAD_BATCHES
        chunks = [by_chars[i : i + chunk] for i in range(0, len(texts), chunk)]
        if show_progress is None:
            show_progress = -(-len(texts) // batch_size) > _PROGRESS_MIN_BATCHES
        progress = nullcontext()
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(texts), desc="Encoding", unit="text", file=sys.stderr)
        batches, lengths = [], np.zeros(len(texts), dtype=np.int64)

        def keep(finished):
            for values, part_lengths, index in finished:  # index: the batch's texts, as input positions
                batches.append((values, index, part_lengths))
                lengths[index] = part_lengths
                if show_progress:
                    progress.update(len(index))

        pool_factor, protected_tokens, processes = pooling
        on_device = self._pools_on_device(protected_tokens)
        if isinstance(processes, PoolingProcesses):  # the caller's: left running
            workers = nullcontext(processes)
        elif pool_factor > 1 and processes and not on_device:  # for this call alone
            workers = PoolingProcesses(processes)
        else:
            workers = nullcontext()
        # The bar is closed on an error too, so the terminal is not left with a half-drawn line
        # (and the pooling processes stopped).
        with (torch.inference_mode(), progress, workers as pooling_workers,
              BatchPipeline(pool_factor, protected_tokens, pooling_workers, output_device=output_device,
                            on_device=on_device) as pipeline,
              closing(_tokenized_ahead(tokenize, texts, chunks)) as tokenized):
            for chunk_index, tokens in zip(chunks, tokenized):
                by_tokens = np.argsort([-len(s) for s in tokens.sequences], kind="stable")
                for i in range(0, len(by_tokens), batch_size):
                    part = by_tokens[i : i + batch_size]
                    keep(pipeline.put(*self._encode_batch(tokens.subset(part)), chunk_index[part]))
            keep(pipeline.finish())
        if not packed:  # each text's rows as a view of its batch's output: no copy at all
            items = [None] * len(texts)
            for values, index, part_lengths in batches:
                for i, item in zip(index.tolist(), torch.split(values, part_lengths.tolist(), 0)):
                    items[i] = item
            return items
        values, index, _ = batches[0]
        if len(batches) == 1 and np.array_equal(index, np.arange(len(texts))):
            return PackedEmbeddings.from_lengths(values, lengths.tolist())
        # Rows in input order: each batch's rows copied to their places in one output, and let go
        # (the batches and the output, not a concatenation and a gather of it besides).
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        packed_values = values.new_empty((int(offsets[-1]), values.shape[1]))
        while batches:
            values, index, part_lengths = batches.pop()
            batch_starts = np.concatenate([[0], np.cumsum(part_lengths)[:-1]])
            rows = np.arange(int(part_lengths.sum())) + np.repeat(offsets[index] - batch_starts, part_lengths)
            packed_values.index_copy_(0, torch.from_numpy(rows).to(values.device), values)
        return PackedEmbeddings.from_lengths(packed_values, lengths.tolist())

    def _encode_batch(self, part: TokenizedBatch) -> tuple[torch.Tensor, np.ndarray]:
        seq_lens = np.fromiter((len(s) for s in part.sequences), dtype=np.int64, count=len(part))
        rows_host = None
        if part.keep is None:
            lengths = seq_lens
        else:
            starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]])
            lengths = np.array([len(k) for k in part.keep], dtype=np.int64)
            rows_host = np.concatenate([s + k for s, k in zip(starts, part.keep)])
        if self._graphs is not None:
            values = self._graphs.run(part.sequences, part.key_lens, rows_host)
            if values is not None:
                return values, lengths
        batch = PackedBatch.from_sequences(part.sequences, part.key_lens, self.device)
        rows = None if rows_host is None else host_to_device(rows_host, torch.int64, self.device)
        return encode_packed(self.weights, batch, self.ops, rows=rows), lengths

    # -----------------------------------------------------------------------------------------
    # Embeddings on disk: encode a corpus once, search it later

    def save_embeddings(self, path, embeddings: PackedEmbeddings | list[torch.Tensor], *, ids=None,
                        kind: str = "documents", metadata: dict[str, str] | None = None) -> None:
        """Write embeddings (``encode_documents(..., packed=True)``, or the list it returns
        unpacked: written item by item, never joined) to a safetensors file with their ids and
        this model's identity, for `load_embeddings` or the CLI. ``metadata``: extra string
        entries (such as how the documents were pooled: the CLI writes ``pool_factor`` and
        ``protected_tokens``); the model's own keys are reserved."""
        _check_kind(kind)
        if isinstance(embeddings, PackedEmbeddings):
            dim = embeddings.dim
        elif isinstance(embeddings, (list, tuple)) and embeddings and isinstance(embeddings[0], torch.Tensor):
            dim = embeddings[0].shape[-1]
        else:  # not embeddings at all: save_embeddings says what is wrong
            dim = self.dim
        if dim != self.dim:
            raise ValueError(f"these are {dim}-d embeddings; this model makes {self.dim}-d ones")
        identity = {"kind": kind, "model": self.source, "fingerprint": self.fingerprint,
                    "fingerprint_method": FINGERPRINT_METHOD, "dim": str(self.dim)}
        reserved = sorted(set(metadata or {}) & set(identity))
        if reserved:
            raise ValueError(f"metadata keys {reserved} are reserved: the model writes them")
        save_embeddings(path, embeddings, ids=ids, metadata={**(metadata or {}), **identity})

    def load_embeddings(self, path, *, kind: str = "documents", device=None) -> EmbeddingsFile:
        """Read a file of `save_embeddings` in this model's dtype, onto its device (or onto
        ``device``: "cpu" keeps a corpus larger than the GPU in host memory, which `search`
        streams), refusing one made by another model (fingerprint), of another dim, or of the
        other kind."""
        _check_kind(kind)
        device = self.device if device is None else pick_device(device)
        # The header is checked before the values are read, in the same file.
        saved = load_embeddings(path, check=lambda info: self._check_header(info, path, kind))
        return saved._replace(embeddings=saved.embeddings.to(device=device, dtype=self.dtype))

    def _check_header(self, info, path, kind: str) -> None:
        meta = info.metadata
        if meta.get("kind", kind) != kind:
            raise ValueError(f"{path} holds {meta['kind']}, not {kind}")
        if info.dim != self.dim:
            raise ValueError(f"{path} holds {info.dim}-d embeddings; this model makes {self.dim}-d ones")
        method = meta.get("fingerprint_method")
        if "fingerprint" in meta and method != FINGERPRINT_METHOD:
            raise ValueError(f"{path} was written by another version of colbert-triton (fingerprint "
                             f"method {method or 'unnamed'}, this one uses {FINGERPRINT_METHOD}): "
                             f"encode it again")
        if meta.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"{path} was encoded by another model ({meta.get('model', 'unnamed')}, "
                             f"fingerprint {meta['fingerprint']}) than {self.source} "
                             f"(fingerprint {self.fingerprint}): its scores would mean nothing")

    # -----------------------------------------------------------------------------------------
    # Scoring

    def _embed(self, items, is_query: bool, batch_size: int):
        if isinstance(items, str):
            items = [items]
        if isinstance(items, np.ndarray) and items.dtype.kind in "UO":
            items = items.tolist()
        if isinstance(items, (list, tuple)) and items and isinstance(items[0], str):
            # Texts, to encode (a non-text among them is named by check_texts).
            encode = self.encode_queries if is_query else self.encode_documents
            return encode(list(items), batch_size, packed=not is_query)
        return items

    def score(self, queries, documents, *, batch_size: int = 64, check_inputs: bool = True) -> torch.Tensor:
        """All-pairs scores ``[Q, N]``; texts are encoded first, embeddings are used as given.

        ``check_inputs`` (here, in `rerank` and in `search`) rejects NaN/inf embeddings: one
        read of both inputs and a device sync, worth skipping for a trusted corpus."""
        return scoring.score(self._embed(queries, True, batch_size),
                             self._embed(documents, False, batch_size), backend=self._score_backend(),
                             check_inputs=check_inputs)

    def rerank(self, query, documents, k: int | None = None, *, batch_size: int = 64,
               check_inputs: bool = True):
        """Rank documents for one query: ``[(index, score), ...]``, best first, ties by index."""
        if k is not None:
            scoring.checked_int(k, "k")  # before any encoding
        queries = self._embed(query, True, batch_size)
        if isinstance(queries, list) and len(queries) != 1:
            raise ValueError(f"rerank takes one query, got {len(queries)}")
        return scoring.rerank(queries, self._embed(documents, False, batch_size), k,
                              backend=self._score_backend(), check_inputs=check_inputs)

    def search(self, queries, corpus, k: int = 10, *, batch_size: int = 64, chunk_size: int = 32768,
               check_inputs: bool = True):
        """Exact top-k of a corpus per query: ``(scores [Q, k'], indices [Q, k'])``, k' = min(k, N)."""
        scoring.checked_int(k, "k")  # before any encoding
        scoring.checked_int(chunk_size, "chunk_size")
        return scoring.search(self._embed(queries, True, batch_size), self._embed(corpus, False, batch_size),
                              k, chunk_size=chunk_size, backend=self._score_backend(),
                              check_inputs=check_inputs)

    def _score_backend(self) -> str | None:
        return self.backend if self.backend == "triton" else None


def _check_kind(kind) -> None:
    if kind not in ("documents", "queries"):
        raise ValueError(f"kind must be 'documents' or 'queries', got {kind!r}")
