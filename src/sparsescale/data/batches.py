"""Reading a prepared dataset: what the training loop, evaluation and the probes call.

Features:
- `load_meta`, `load_tokens` (a read-only memory map; a sharded dataset reads as the concatenation of its
  shards through `ShardedTokens`, checked against its manifest), `load_tokenizer`, `verify` (sha256 of
  every file).
- `get_batch` is a pure function of (seed, step): a run resumed at any step sees the same stream, and
  DDP rank r of W takes rows r::W of the global batch. The stream is the same for 1 or N shards.
- `val_batches` walks fixed contiguous windows of the validation split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sparsescale.data.sources import check_sha256
from sparsescale.data.tokenizer import portable
from sparsescale.errors import UserError
from sparsescale.io import read_json

def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json): run `sparsescale prepare --out {data_dir}`")
    return read_json(path)


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.memmap | ShardedTokens:
    """The token ids of `split` ("train" or "val"), read-only and memory-mapped, shape (n_tokens,).

    A single file (the single-file layout, or a sharded dataset with one shard) is a plain `np.memmap`;
    several shards (meta.json "shards") are a `ShardedTokens` that reads like their concatenation.
    """
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val': got {split!r}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    entries = meta.get("shards") if split == "train" else None
    entries = entries or [{"file": f"{split}.bin", "n_tokens": meta[f"n_tokens_{split}"]}]
    maps = []
    for entry in entries:
        path = Path(data_dir) / entry["file"]
        if not path.exists():
            raise UserError(f"{path} is missing (listed in {data_dir}/meta.json): the dataset is damaged, prepare it again")
        size = path.stat().st_size
        if size != entry["n_tokens"] * dtype.itemsize or size == 0:
            raise UserError(f"{path} holds {size // dtype.itemsize} tokens, meta.json says {entry['n_tokens']}: "
                            "the dataset does not match its manifest, prepare it again")
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    total = sum(len(m) for m in maps)
    if total != meta[f"n_tokens_{split}"]:
        raise UserError(f"{data_dir}: the {split} files hold {total} tokens, meta.json says "
                        f"{meta[f'n_tokens_{split}']}: the dataset is damaged, prepare it again")
    return maps[0] if len(maps) == 1 else ShardedTokens(maps)


class ShardedTokens:
    """Several token files read as one array (their concatenation in shard order), without copying.

    Supports what the training loop does with a token array: len(), a slice, and integer-array indexing
    (any shape; a window may straddle two shards). Results equal those on the concatenated array.
    """

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.dtype = shards[0].dtype
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self[np.arange(start, stop, step)]
        if np.isscalar(index):
            return self[np.asarray([index])][0]
        index = np.asarray(index)
        flat = index.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        which = np.searchsorted(self.offsets, flat, side="right") - 1  # the shard of every position
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][flat[mask] - self.offsets[s]]
        return out.reshape(index.shape)


def load_tokenizer(data_dir: str | os.PathLike):
    """The dataset's tokenizer as a `transformers.PreTrainedTokenizerFast` (saved portably, see tokenizer.py)."""
    from transformers import AutoTokenizer  # here, not at the top: resolving it costs ~1 s that training never needs

    load_meta(data_dir)
    return portable(AutoTokenizer.from_pretrained(str(data_dir)))


def verify(data_dir: str | os.PathLike) -> dict:
    """Recompute the sha256 of every file listed in meta.json; UserError on the first mismatch."""
    meta = load_meta(data_dir)
    for name, expected in meta["sha256"].items():
        path = Path(data_dir) / name
        if not path.exists():
            raise UserError(f"{path} is missing: prepare the dataset again")
        check_sha256(path, expected, what="dataset file; prepare the dataset again")
    return meta


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows rank::world_size of global batch `step`: x (B/W, T) and y = x shifted by one, int64.

    The batch is a pure function of (seed, step): `batch_size` window starts drawn uniformly with
    np.random.default_rng([seed, step]), so a resumed run reads the identical stream and ranks read
    disjoint rows of one global batch.
    """
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} is not divisible by world size {world_size}: change the batch size")
    if len(tokens) < seq_len + 1:
        raise UserError(f"{len(tokens)} tokens are too few for one sequence of {seq_len}+1: shorten seq_len or prepare more data")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)[rank::world_size]  # (B/W,)
    window = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # (B/W, T+1)
    return window[:, :-1], window[:, 1:]


def val_batches(tokens: np.ndarray, n_tokens: int, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous non-overlapping windows from the start of val: n_tokens // seq_len windows of
    seq_len predicted tokens each, in batches of up to `batch_size` rows, x and y of shape (b, T)."""
    n_windows = n_tokens // seq_len
    if n_windows < 1:
        raise UserError(f"validation needs at least one window: n_tokens {n_tokens} < seq_len {seq_len}")
    if n_windows * seq_len + 1 > len(tokens):
        raise UserError(f"validation set has {len(tokens)} tokens, fewer than the {n_windows * seq_len + 1} asked "
                        "for: lower the validation tokens or prepare with a larger --val-fraction")
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        start = first * seq_len
        flat = torch.from_numpy(tokens[start : start + rows * seq_len + 1].astype(np.int64))  # (rows*T + 1,)
        yield flat[:-1].view(rows, seq_len), flat[1:].view(rows, seq_len)
