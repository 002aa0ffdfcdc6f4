"""CUDA graphs of the whole Triton forward for small packed batches (one query, a few documents).

A forward is ~5 kernel launches per layer plus embeddings and head (~62 for 12 layers); for one
32-token query their CPU launch cost exceeds the GPU time. Each bucket (up to ``T_b`` tokens
and ``S_b`` sequences) owns static input buffers and a graph captured once at load; a batch
that fits is written into the buffers and the graph replayed.

Filling a bucket with a smaller batch, without changing any kernel's grid:
- the real sequences come first; the unused sequence slots are empty (length 0, no keys);
- one last dummy sequence takes the remaining tokens (id 0, position 0, one key), so
  ``cu_seqlens[-1] == T_b`` as every kernel expects; its rows are computed and ignored;
- ``max_seqlen`` is ``T_b``, an upper bound for any sequence, so attention's grid is fixed;
- the head gathers the kept rows through a static row index padded with row 0.
Attention never mixes sequences and every other op is row-wise, so the padding cannot change
the real rows.

The buckets' buffers and the graphs' shared memory pool are one set per model: a call holds the
model's lock from filling a bucket until its output's copy is queued, and runs on the model's
own stream (ordered after the caller's stream, which then waits for it), so callers on other
threads or other streams cannot overwrite each other's inputs or outputs.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..kernels._device import on_device
from ..kernels.attention import (
    AttentionTiles,
    attention_config,
    attention_tile_table,
    query_tile_bound,
)
from .encoder import EncoderWeights, encode_packed
from .ops import PackedBatch

# (tokens, sequences) per bucket: a single query needs 32 tokens, a 300-token document 300.
DEFAULT_BUCKETS = ((64, 2), (128, 4), (256, 8), (512, 16), (1024, 32), (2048, 64))

# CUDA supports one stream capture at a time in a process: models loading on several threads
# capture in turn.
_CAPTURE_LOCK = threading.Lock()


class _Bucket:
    def __init__(self, num_tokens: int, num_seqs: int, device: torch.device, head_dim: int,
                 dtype: torch.dtype):
        self.num_tokens, self.num_seqs = num_tokens, num_seqs
        # int64: ids | positions | rows ; int32: cu_seqlens | key_lens | attention tile table.
        # One copy each per call.
        pin = device.type == "cuda"
        self.host_long = torch.zeros(3 * num_tokens, dtype=torch.int64, pin_memory=pin)
        # The attention tile table: a static buffer of the bound on the tile count (unused rows
        # have seq_len 0 and return at once), rewritten by every fill.
        self.block_m = attention_config(head_dim, num_tokens, dtype)["BLOCK_M"]
        num_tiles = query_tile_bound(num_tokens, num_seqs + 1, num_tokens, self.block_m)
        # Every int32 part starts on a 16-byte boundary, as a fresh tensor would: Triton
        # specialises pointers on that alignment, so a misaligned one would compile extra variants.
        parts = [num_seqs + 2, num_seqs + 1, 4 * num_tiles]
        slots = [-(-n // 4) * 4 for n in parts]
        self.host_int = torch.zeros(sum(slots), dtype=torch.int32, pin_memory=pin)
        # Set once the asynchronous copies out of the host buffers have run: the next fill waits
        # for it before overwriting them.
        self.copied = torch.cuda.Event() if pin else None
        self.dev_long = torch.zeros_like(self.host_long, device=device)
        self.dev_int = torch.zeros_like(self.host_int, device=device)
        ids, positions, self.rows = self.dev_long.split(num_tokens)
        cu_seqlens, key_lens, tiles = (part[:n] for part, n in zip(self.dev_int.split(slots), parts))
        self._host_parts = [part[:n].numpy() for part, n in zip(self.host_int.split(slots), parts)]
        self.batch = PackedBatch(
            input_ids=ids, position_ids=positions, cu_seqlens=cu_seqlens, key_lens=key_lens,
            seq_lens_host=np.zeros(num_seqs + 1, dtype=np.int64),
            key_lens_host=np.zeros(num_seqs + 1, dtype=np.int64), max_seqlen=num_tokens,
        )
        self.batch._attention_tiles[(head_dim, dtype)] = AttentionTiles(tiles.view(num_tiles, 4),
                                                                        self.block_m)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.num_tokens and num_seqs <= self.num_seqs

    def fill(self, sequences: list[np.ndarray], key_lens: np.ndarray, rows: np.ndarray) -> None:
        """Write a batch into the pinned host buffers (layout in the module docstring)."""
        t_b, s_b = self.num_tokens, self.num_seqs
        if self.copied is not None:
            self.copied.synchronize()
        lens = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        total, n = int(lens.sum()), len(sequences)
        long = self.host_long.numpy()
        long[:] = 0
        if n:
            long[:total] = np.concatenate(sequences)
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            long[t_b : t_b + total] = np.arange(total) - np.repeat(starts, lens)
        long[2 * t_b : 2 * t_b + len(rows)] = rows
        cu, keys, tiles = self._host_parts
        cu[0] = 0
        cu[1 : n + 1] = np.cumsum(lens)
        cu[n + 1 : s_b + 1] = total  # empty sequence slots
        cu[s_b + 1] = t_b  # the dummy sequence takes the remaining tokens
        keys[:] = 0
        keys[:n] = key_lens
        keys[s_b] = 1 if t_b > total else 0
        tiles[:] = attention_tile_table(np.diff(cu), keys, self.block_m,
                                        num_tiles=len(tiles) // 4).reshape(-1)
        self.dev_long.copy_(self.host_long, non_blocking=True)
        self.dev_int.copy_(self.host_int, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def forward(self, weights: EncoderWeights, ops) -> torch.Tensor:
        return encode_packed(weights, self.batch, ops, rows=self.rows)


class GraphedEncoder:
    """Captured forwards for small batches; `run` returns None when no bucket fits."""

    def __init__(self, weights: EncoderWeights, ops, device: torch.device,
                 buckets=DEFAULT_BUCKETS, capture: bool = True):
        if ops.name != "triton":  # the buckets fill only what the Triton ops read (not the host lengths)
            raise ValueError(f"CUDA-graph buckets run the Triton ops, got {ops.name!r}")
        self.weights, self.ops, self.device = weights, ops, torch.device(device)
        self._lock = threading.Lock()
        max_len = weights.config.max_position_embeddings
        # Events, streams, captures and replays belong to the current device: make it ours.
        head_dim, dtype = weights.config.head_dim, weights.word.dtype
        with on_device(self.device):
            self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            self.buckets = [_Bucket(t, s, self.device, head_dim, dtype) for t, s in sorted(buckets)]
            for bucket in self.buckets:
                # A filler batch that uses every slot, so warm-up runs touch realistic shapes.
                length = max(1, min(max_len, bucket.num_tokens // bucket.num_seqs))
                filler = [np.full(length, 101, dtype=np.int64)] * bucket.num_seqs
                bucket.fill(filler, np.full(bucket.num_seqs, length), np.arange(bucket.num_tokens))
            if capture:
                self._capture()

    def _capture(self) -> None:
        with _CAPTURE_LOCK:
            caller = torch.cuda.current_stream(self.device)
            try:
                self._capture_buckets()
            finally:
                # A capture that fails inside torch.cuda.graph's exit leaves its stream current.
                torch.cuda.set_stream(caller)

    def _capture_buckets(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for bucket in self.buckets:  # compile every kernel variant outside the capture
                bucket.forward(self.weights, self.ops)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            for bucket in self.buckets:
                graph = torch.cuda.CUDAGraph()
                # Our own stream: torch's default capture stream is made once per process, on
                # whichever GPU captured first, so a model on another GPU would launch its
                # kernels outside the capture (an empty graph). Thread-local capture: another
                # thread's CUDA work (a server encoding with another model) is not an error.
                with torch.cuda.graph(graph, pool=pool, stream=stream,
                                      capture_error_mode="thread_local"):
                    bucket.out = bucket.forward(self.weights, self.ops)
                bucket.graph = graph

    def bucket_for(self, num_tokens: int, num_seqs: int) -> _Bucket | None:
        return next((b for b in self.buckets if b.fits(num_tokens, num_seqs)), None)

    def run(self, sequences: list[np.ndarray], key_lens: np.ndarray, rows: np.ndarray | None):
        """The head's output for the kept ``rows`` (all tokens if None), or None if too large."""
        total = int(sum(len(s) for s in sequences))
        bucket = self.bucket_for(total, len(sequences))
        if bucket is None:
            return None
        rows = np.arange(total) if rows is None else rows
        with self._lock, on_device(self.device):
            if self._stream is None:
                return self._replay(bucket, sequences, key_lens, rows)
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                out = self._replay(bucket, sequences, key_lens, rows)
            caller.wait_stream(self._stream)
            out.record_stream(caller)  # made on our stream, used on the caller's
            return out

    def _replay(self, bucket: _Bucket, sequences, key_lens, rows) -> torch.Tensor:
        bucket.fill(sequences, key_lens, rows)
        if bucket.graph is None:  # capture disabled: run the same padded batch eagerly
            out = bucket.forward(self.weights, self.ops)
        else:
            bucket.graph.replay()
            out = bucket.out
        # The static output is overwritten by the next replay: hand back a copy.
        return out[: len(rows)].clone()
