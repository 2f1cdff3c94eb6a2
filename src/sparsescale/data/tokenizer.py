"""Split, tokenizer and encoding: the rules every preparation path (single file or shards) shares.

Features:
- `document_key`: a uniform number in [0, 1) fixed by (seed, text). A document goes to validation iff
  key < val_fraction; each split is stored in key order (a fixed shuffle); shards cut the training keys
  into N contiguous ranges, so their concatenation is the same stream for every N.
- Tokenizer: byte-level BPE (`tokenizers`) trained on training documents only, with `<|endoftext|>` as
  BOS/EOS; or any HF fast tokenizer by name/path. `sample_documents` draws a bounded training sample
  (the lowest keys, up to a number of documents and/or bytes) from a stream in bounded memory.
- `PortableTokenizerFast`: saves `tokenizer_class: PreTrainedTokenizerFast` in `tokenizer_config.json`
  (transformers 5 writes `TokenizersBackend`, which transformers 4.x cannot load), so every transformers
  version that pyproject allows loads the dataset's and every checkpoint's tokenizer.
- `encode_documents`: documents -> one flat token array, each document preceded by the separator.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sparsescale.errors import UserError
from sparsescale.io import write_json

SEP_TOKEN = "<|endoftext|>"  # BOS/EOS of the builtin BPE; separates documents in the .bin files
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.04  # about 150k validation tokens on builtin (>= 100k asked for)
DEFAULT_SPLIT_SEED = 0
PORTABLE_CLASS = "PreTrainedTokenizerFast"  # a name transformers 4.x and 5.x both resolve
_BACKEND_NAMES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class PortableTokenizerFast(PreTrainedTokenizerFast):
    """A generic fast tokenizer whose saved `tokenizer_config.json` every transformers version loads."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        make_portable(save_directory)
        return files


def portable(tok):
    """`tok` itself; a generic fast tokenizer becomes a `PortableTokenizerFast` (same state, same behaviour)."""
    if type(tok).__name__ in _BACKEND_NAMES:
        tok.__class__ = PortableTokenizerFast  # a subclass that adds no state: only save_pretrained differs
    return tok


def make_portable(directory) -> None:
    """Rewrite a saved generic tokenizer's class name to one that transformers 4.x and 5.x both load."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") in (*_BACKEND_NAMES, "PortableTokenizer", "PortableTokenizerFast"):
        cfg["tokenizer_class"] = PORTABLE_CLASS
        write_json(path, cfg)


def document_key_int(text: str, seed: int) -> int:
    """The first 8 bytes of sha256(f"{seed}\\0" + text), an integer in [0, 2^64)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()[:8], "big")


def document_key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, text): the document's place in the split and the shuffle."""
    return document_key_int(text, seed) / 2.0**64


def sample_documents(docs: Iterable[str], val_fraction: float, seed: int, max_docs: int | None = None,
                     max_bytes: int | None = None) -> tuple[list[str], dict]:
    """The training documents (key >= val_fraction) with the lowest keys, as many as fit in `max_docs`
    documents and `max_bytes` UTF-8 bytes (None: no limit), in key order; and a record of the sample.

    One pass over a stream, memory bounded by the sample: a max-heap keeps the current prefix in key order;
    once a document was dropped for the budget, nothing with a larger key can enter again.
    """
    heap: list[tuple[float, int, str, int]] = []  # (-key, -i, text, bytes): the largest key on top
    total, seen, cut = 0, 0, 1.0
    for i, text in enumerate(docs):
        key = document_key(text, seed)
        if key < val_fraction:
            continue
        seen += 1
        if key >= cut:
            continue
        size = len(text.encode("utf-8"))
        heapq.heappush(heap, (-key, -i, text, size))
        total += size
        while heap and ((max_docs is not None and len(heap) > max_docs) or (max_bytes is not None and total > max_bytes)):
            neg_key, _, _, dropped = heapq.heappop(heap)
            total -= dropped
            cut = -neg_key
    sample = [t for _, _, t, _ in sorted(heap, key=lambda e: (-e[0], -e[1]))]
    record = {"method": "the training documents with the lowest keys (the split's hash) that fit the limits",
              "max_docs": max_docs, "max_bytes": max_bytes, "n_docs": len(sample), "n_bytes": total,
              "n_docs_train_seen": seen, "key_below": cut, "complete": len(sample) == seen}
    return sample, record




def split_documents(docs: list[str], val_fraction: float, seed: int = DEFAULT_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(train, val): validation iff key < val_fraction; each split sorted by key (a fixed shuffle)."""
    keyed = sorted((document_key(d, seed), i) for i, d in enumerate(docs))
    train = [docs[i] for k, i in keyed if k >= val_fraction]
    val = [docs[i] for k, i in keyed if k < val_fraction]
    return train, val


def train_bpe(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalizer: decode(encode(t)) == t)."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEP_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PortableTokenizerFast(tokenizer_object=tok, bos_token=SEP_TOKEN, eos_token=SEP_TOKEN)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 257 "
                        "(256 bytes + <|endoftext|>); use e.g. --vocab-size 8192")


def load_hf_tokenizer(name_or_path: str):
    try:
        tok = portable(AutoTokenizer.from_pretrained(name_or_path))
    except Exception as err:
        raise UserError(f"could not load tokenizer {name_or_path!r} ({type(err).__name__}: {err}): "
                        "pass a local tokenizer directory or a hub name") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise UserError(f"tokenizer {name_or_path!r} is not a fast (tokenizers-backed) tokenizer: use one with tokenizer.json")
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name_or_path!r} has no EOS token to separate documents: use another tokenizer")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def encode_documents(tokenizer, docs: list[str], dtype: np.dtype, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts): one flat array [sep, doc0..., sep, doc1..., ...] (the separator is each
    document's BOS) and the offset where each document's separator sits."""
    sep = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batched, parallel, no length warnings
    parts = [np.zeros(0, dtype=dtype)]
    for i in range(0, len(docs), batch):
        for enc in backend.encode_batch(docs[i : i + batch], add_special_tokens=False):
            parts.append(np.asarray([sep, *enc.ids], dtype=dtype))
    starts = np.cumsum([0] + [len(part) for part in parts[1:]])[:-1]
    return np.concatenate(parts), starts
