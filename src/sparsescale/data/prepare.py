"""The single-file dataset: the whole corpus in memory, one `train.bin` (what `sparsescale prepare` writes).

Features:
- `prepare(corpus, out)`: split by document hash, train the BPE on the whole training split (or use an HF
  tokenizer), encode, and write one directory atomically (a killed prepare leaves nothing):
  `train.bin`/`val.bin` (raw uint16, uint32 if the vocabulary needs it; every document is preceded by the
  separator token), the tokenizer files, and `meta.json` (source, inputs with sha256, licences, versions,
  token and document counts, split settings, sha256 of every file written). For corpora that fit in memory.
- For corpora that do not fit in memory: the sharded pipeline (shards.py); its datasets read the same way.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from sparsescale.data.sources import Corpus
from sparsescale.data.tokenizer import (DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE,
                                        check_vocab_size, encode_documents, load_hf_tokenizer, split_documents,
                                        token_dtype, train_bpe)
from sparsescale.errors import UserError
from sparsescale.io import atomic_dir, command_line, sha256_file, versions, write_json

META_FORMAT = 1

# prepare


def prepare(corpus: Corpus, out: str | os.PathLike, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
            tokenizer: str | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = DEFAULT_SPLIT_SEED, max_train_tokens: int | None = None) -> dict:
    """Split, tokenize and write the dataset directory `out` atomically; returns its meta.json."""
    t0 = time.time()
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be in (0, 1): got {val_fraction} (--val-fraction)")
    if max_train_tokens is not None and max_train_tokens < 1:
        raise UserError(f"max train tokens must be a positive integer: got {max_train_tokens} (--max-train-tokens)")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    hf_tok = load_hf_tokenizer(tokenizer) if tokenizer is not None else None
    if not corpus.documents:
        raise UserError(f"corpus is empty ({corpus.source}): give a source with text")
    train_docs, val_docs = split_documents(corpus.documents, val_fraction, seed)
    if not val_docs:
        raise UserError(f"validation split is empty: none of {len(corpus.documents)} documents fell into it "
                        f"with val fraction {val_fraction}; raise --val-fraction or add documents")
    if not train_docs:
        raise UserError(f"training split is empty: all {len(corpus.documents)} documents fell into validation "
                        f"with val fraction {val_fraction}; lower --val-fraction or add documents")
    # The tokenizer sees the whole training split, never validation, and not the budget: datasets that
    # differ only in --max-train-tokens share one tokenizer, so their validation losses compare.
    tok = hf_tok if hf_tok is not None else train_bpe(train_docs, vocab_size)
    dtype = token_dtype(len(tok))
    train, train_starts = encode_documents(tok, train_docs, dtype)
    val, _ = encode_documents(tok, val_docs, dtype)
    n_train_full = len(train)
    if max_train_tokens is not None:
        train = train[:max_train_tokens]  # whole documents in key order, the last one cut
    n_docs_train = int(np.count_nonzero(train_starts < len(train)))
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta = {
            "format": META_FORMAT,
            "source": corpus.source,
            "inputs": corpus.inputs,
            "corpus_sha256": corpus_sha256(corpus.documents),
            "licences": corpus.licences,
            "tokenizer": {"kind": "bpe" if tokenizer is None else "hf", "name": tokenizer or "byte-level BPE",
                          "vocab_size_requested": vocab_size if tokenizer is None else None},
            "vocab_size": len(tok),
            "dtype": dtype.name,
            "bos_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
            "eos_id": tok.eos_token_id,
            "sep_id": tok.eos_token_id,
            "sep_token": tok.eos_token,
            "layout": "every document is preceded by sep_id (its BOS; the previous document's EOS)",
            "n_tokens_train": len(train),
            "n_tokens_val": len(val),
            "n_tokens_train_full": n_train_full,
            "n_docs_train": n_docs_train,
            "n_docs_val": len(val_docs),
            "n_docs_train_full": len(train_docs),
            "split": {"method": "by document: val iff sha256(f'{seed}\\0' + text)[:8] / 2^64 < val_fraction; "
                                "each split in key order; train truncated to max_train_tokens",
                      "val_fraction": val_fraction, "seed": seed, "max_train_tokens": max_train_tokens},
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        write_record(tmp / "meta.json", meta, t0)
    return meta


def write_record(path: str | os.PathLike, record: dict, t0: float) -> dict:
    """Write a preparation step's JSON record (meta.json of either layout, tokenizer_meta.json, part.json) with
    the provenance every one of them ends with: the command line, the seconds since `t0`, the library versions.
    Adds those keys to `record` (last, in that order) and returns it."""
    record.update(command=command_line(), elapsed_s=round(time.time() - t0, 3), versions=versions())
    write_json(path, record)
    return record


def corpus_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    return h.hexdigest()
