"""Sharded, bounded-memory preparation: the steps of the Snakemake scatter/gather in workflow/rules/data.smk.

Features:
- One rule per step, every step one plain CLI call (`sparsescale prepare STEP`), so the SLURM profile runs
  them as ordinary jobs:
    tokenizer  train a byte-level BPE on a bounded sample (the training documents with the lowest keys,
               up to `--sample-docs` documents / `--sample-bytes` bytes), or copy a given HF tokenizer;
               records the sample, the split settings and the tokenizer's sha256 (`tokenizer_meta.json`).
    encode     part p of P of the source (sources.stream_source), streamed: every document is hashed
               (the split's key), encoded and appended to its bucket: `val` (key < val_fraction) or the
               training shard whose key range holds it. Memory: one batch of documents + a bounded buffer.
    shard      one bucket from all P parts, written in key order (an index sort of 16 bytes per document,
               then a streamed copy): `{shard}.bin` + `{shard}.json` (tokens, documents, sha256, tokenizer).
    gather     checks every shard against its record and the tokenizer, then writes the dataset directory
               atomically: the shards (hard links), `val.bin`, the tokenizer, and `meta.json` whose
               `shards` list is the manifest (file, tokens, documents, sha256).
- Shard i of N holds the training keys in [v + i(1-v)/N, v + (i+1)(1-v)/N) (v = val_fraction), each in key
  order, so the concatenation of the shards is the single-file `train.bin` for every N: the batch stream,
  and so every result, does not depend on N (or on P); with N = 1 the shard is named `train.bin`.
- Bad input (a missing or empty shard, parts or shards from another tokenizer, a file that does not match
  its record) stops with one message naming the file and the fix, and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sparsescale.data.prepare import write_record
from sparsescale.data.sources import stream_source
from sparsescale.data.tokenizer import (check_vocab_size, document_key, load_hf_tokenizer, sample_documents,
                                        token_dtype, train_bpe)
from sparsescale.errors import UserError
from sparsescale.io import atomic_dir, atomic_path, read_json, sha256_file, write_json

SHARDED_FORMAT = 2  # meta.json of a sharded dataset (the single-file one is format 1)
INDEX_DTYPE = np.dtype([("key", "<f8"), ("n_tokens", "<i8")])  # one record per document of a bucket
BATCH_DOCS = 256  # documents per encode_batch call
BATCH_CHARS = 8 << 20  # ... or fewer, so a batch of long documents stays ~8 MB of text
FLUSH_TOKENS = 1 << 20  # buffered tokens (all buckets) before an encode job appends them to its files


def bucket_names(n_shards: int) -> list[str]:
    return ["val"] + [f"{i:05d}" for i in range(n_shards)]


def bucket_of(key: float, val_fraction: float, n_shards: int) -> int:
    """0 = validation, 1 + i = training shard i (a contiguous key range, so shard order = key order)."""
    if key < val_fraction:
        return 0
    return 1 + min(n_shards - 1, int((key - val_fraction) / (1.0 - val_fraction) * n_shards))


# ---------------------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(spec: dict, out: str | os.PathLike, *, vocab_size: int | None = None, tokenizer: str | None = None,
                    val_fraction: float, seed: int, sample_docs: int | None = None,
                    sample_bytes: int | None = None) -> dict:
    """Write the tokenizer directory `out` (atomically); returns its tokenizer_meta.json."""
    t0 = time.time()
    for name, value in (("--sample-docs", sample_docs), ("--sample-bytes", sample_bytes)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive integer or left out (no limit): got {value}")
    sample = None
    if tokenizer is not None:
        tok = load_hf_tokenizer(tokenizer)
    else:
        check_vocab_size(vocab_size)
        stream = stream_source(spec)
        docs, sample = sample_documents(stream.documents, val_fraction, seed, sample_docs, sample_bytes)
        if not docs:
            raise UserError(f"the tokenizer sample is empty ({sample['n_docs_train_seen']} training documents seen, "
                            f"limits {sample_docs} documents / {sample_bytes} bytes): raise the sample limits "
                            "(data.tokenizer_sample) or add documents")
        tok = train_bpe(docs, vocab_size)
        del docs
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
        info = {
            "tokenizer": {"kind": "hf" if tokenizer else "bpe", "name": tokenizer or "byte-level BPE",
                          "vocab_size_requested": None if tokenizer else vocab_size, "sample": sample},
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "vocab_size": len(tok),
            "dtype": token_dtype(len(tok)).name,
            "bos_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
            "eos_id": tok.eos_token_id,
            "sep_id": tok.eos_token_id,
            "sep_token": tok.eos_token,
            "val_fraction": val_fraction,
            "seed": seed,
            "source": spec,
        }
        write_record(tmp / "tokenizer_meta.json", info, t0)
    return info


def load_tokenizer_info(tokenizer_dir: str | os.PathLike) -> dict:
    path = Path(tokenizer_dir) / "tokenizer_meta.json"
    if not path.exists() or not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise UserError(f"{tokenizer_dir} is not a tokenizer made by `sparsescale prepare tokenizer` "
                        "(no tokenizer_meta.json / tokenizer.json): run that step first")
    info = read_json(path)
    got = sha256_file(Path(tokenizer_dir) / "tokenizer.json")
    if got != info["tokenizer_sha256"]:
        raise UserError(f"{tokenizer_dir}/tokenizer.json changed after it was made (sha256 {got[:12]}, recorded "
                        f"{info['tokenizer_sha256'][:12]}): run `sparsescale prepare tokenizer` again")
    return info


# ---------------------------------------------------------------------------------------------------------
# encode (one job per input part)


def encode_part(spec: dict, tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *, part: int, n_parts: int,
                n_shards: int) -> dict:
    """Encode part `part` of `n_parts` into the bucket files of directory `out` (atomically); returns part.json."""
    t0 = time.time()
    if n_shards < 1:
        raise UserError(f"the number of shards must be at least 1: got {n_shards} (data.shards)")
    info = load_tokenizer_info(tokenizer_dir)
    backend = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets (~30% less CPU)
    dtype, sep = np.dtype(info["dtype"]), info["sep_id"]
    val_fraction, seed = info["val_fraction"], info["seed"]
    names = bucket_names(n_shards)
    stream = stream_source(spec, part, n_parts)
    n_docs, n_tokens = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    with atomic_dir(out) as tmp:
        tokens: list[list[np.ndarray]] = [[] for _ in names]
        index: list[list[tuple[float, int]]] = [[] for _ in names]
        for name in names:  # every bucket exists, possibly empty: the shard step reads all of them
            (tmp / f"{name}.bin").touch()
            (tmp / f"{name}.idx").touch()
        pending = 0

        def flush() -> None:
            for b, name in enumerate(names):
                if index[b]:
                    with open(tmp / f"{name}.bin", "ab") as f:
                        f.write(np.concatenate(tokens[b]).tobytes())
                    with open(tmp / f"{name}.idx", "ab") as f:
                        f.write(np.asarray(index[b], dtype=INDEX_DTYPE).tobytes())
                    tokens[b].clear()
                    index[b].clear()

        def encode(batch: list[str]) -> int:
            added = 0
            for text, enc in zip(batch, encode_batch(batch, add_special_tokens=False)):
                key = document_key(text, seed)
                b = bucket_of(key, val_fraction, n_shards)
                ids = np.empty(len(enc.ids) + 1, dtype=dtype)
                ids[0], ids[1:] = sep, enc.ids
                tokens[b].append(ids)
                index[b].append((key, len(ids)))
                n_docs[b] += 1
                n_tokens[b] += len(ids)
                added += len(ids)
            return added

        batch, chars = [], 0
        for text in stream.documents:
            batch.append(text)
            chars += len(text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                pending += encode(batch)
                batch, chars = [], 0
                if pending >= FLUSH_TOKENS:
                    flush()
                    pending = 0
        if batch:
            encode(batch)
        flush()
        record = {"part": part, "n_parts": n_parts, "n_shards": n_shards, "dtype": dtype.name,
                  "tokenizer_sha256": info["tokenizer_sha256"], "val_fraction": val_fraction, "seed": seed,
                  "buckets": {name: {"n_docs": int(n_docs[b]), "n_tokens": int(n_tokens[b])} for b, name in enumerate(names)},
                  "source": stream.source, "inputs": stream.inputs, "licences": stream.licences}
        write_record(tmp / "part.json", record, t0)
    return record


# ---------------------------------------------------------------------------------------------------------
# shard (one job per training shard, plus one for validation)


def build_shard(part_dirs: list[str | os.PathLike], shard: str, out: str | os.PathLike,
                info_out: str | os.PathLike | None = None) -> dict:
    """Bucket `shard` of every part, in key order, into the token file `out` (+ its record, `info_out`)."""
    t0 = time.time()
    out = Path(out)
    info_out = Path(info_out) if info_out is not None else out.with_suffix(".json")
    if not part_dirs:
        raise UserError("no encoded parts given: run `sparsescale prepare encode` first")
    records = []
    for d in map(Path, part_dirs):
        if not (d / "part.json").exists() or not (d / f"{shard}.idx").exists():
            raise UserError(f"{d} is not a complete encoded part (no part.json or {shard}.idx): run its encode job again")
        records.append(read_json(d / "part.json"))
    first = records[0]
    for d, r in zip(part_dirs, records):
        if r["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise UserError(f"{d} was encoded with another tokenizer (sha256 {r['tokenizer_sha256'][:12]}) than "
                            f"{part_dirs[0]} ({first['tokenizer_sha256'][:12]}): run the encode jobs again")
        if (r["n_shards"], r["n_parts"], r["val_fraction"], r["seed"]) != (first["n_shards"], first["n_parts"],
                                                                         first["val_fraction"], first["seed"]):
            raise UserError(f"{d} was encoded for another layout than {part_dirs[0]} (shards, parts, val_fraction, "
                            "seed differ): run the encode jobs again")
    if shard not in bucket_names(first["n_shards"]):
        raise UserError(f"shard {shard!r} does not exist: the parts were encoded for {first['n_shards']} shards")
    if sorted(r["part"] for r in records) != list(range(first["n_parts"])):
        raise UserError(f"got parts {sorted(r['part'] for r in records)}, need all of 0..{first['n_parts'] - 1}: "
                        "pass every encoded part")
    dtype = np.dtype(first["dtype"])
    keys, part_of, starts, lengths = [], [], [], []
    for p, d in enumerate(map(Path, part_dirs)):
        idx = np.fromfile(d / f"{shard}.idx", dtype=INDEX_DTYPE)
        size = (d / f"{shard}.bin").stat().st_size
        if int(idx["n_tokens"].sum()) * dtype.itemsize != size:
            raise UserError(f"{d}/{shard}.bin ({size} bytes) does not match its index: run that encode job again")
        keys.append(idx["key"])
        lengths.append(idx["n_tokens"])
        starts.append(np.cumsum(idx["n_tokens"]) - idx["n_tokens"])
        part_of.append(np.full(len(idx), p, dtype=np.int32))
    keys, part_of = np.concatenate(keys), np.concatenate(part_of)
    starts, lengths = np.concatenate(starts), np.concatenate(lengths)
    if len(keys) == 0:
        raise UserError(f"shard {shard} received no documents from the {len(part_dirs)} parts: the corpus is too "
                        f"small for {first['n_shards']} shards; lower data.shards (--shards)")
    order = np.argsort(keys, kind="stable")  # key order; equal keys are equal texts, so equal tokens
    files = [open(Path(d) / f"{shard}.bin", "rb") for d in part_dirs]
    h = hashlib.sha256()
    try:
        with atomic_path(out) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
            for j in order:
                src = files[part_of[j]]
                src.seek(int(starts[j]) * dtype.itemsize)
                chunk = src.read(int(lengths[j]) * dtype.itemsize)
                f.write(chunk)
                h.update(chunk)
    finally:
        for src in files:
            src.close()
    record = {"shard": shard, "file": out.name, "n_tokens": int(lengths.sum()), "n_docs": len(keys),
              "sha256": h.hexdigest(), "dtype": dtype.name, "tokenizer_sha256": first["tokenizer_sha256"],
              "n_shards": first["n_shards"], "n_parts": first["n_parts"],
              "key_range": [float(keys.min()), float(keys.max())], "elapsed_s": round(time.time() - t0, 3)}
    write_json(info_out, record)
    return record


# ---------------------------------------------------------------------------------------------------------
# gather


def gather(tokenizer_dir: str | os.PathLike, part_records: list[str | os.PathLike],
           shard_files: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Check every shard and write the dataset directory `out` atomically; returns its meta.json."""
    t0 = time.time()
    info = load_tokenizer_info(tokenizer_dir)
    parts = [read_json(p) for p in part_records]
    if not parts:
        raise UserError("no part records given: run `sparsescale prepare encode` first")
    n_shards = parts[0]["n_shards"]
    by_name = {Path(f).stem: Path(f) for f in shard_files}
    shards = []
    for name in bucket_names(n_shards):
        path = by_name.get(name)
        if path is None or not path.exists() or not path.with_suffix(".json").exists():
            raise UserError(f"shard {name} of {n_shards} is missing ({path or 'not given'} or its .json): "
                            "run its shard job again (snakemake reruns it)")
        rec = read_json(path.with_suffix(".json"))
        if rec["tokenizer_sha256"] != info["tokenizer_sha256"]:
            raise UserError(f"shard {path} was encoded with another tokenizer (sha256 {rec['tokenizer_sha256'][:12]}) "
                            f"than {tokenizer_dir} ({info['tokenizer_sha256'][:12]}): delete the shards and parts and "
                            "run the encode and shard jobs again")
        size = path.stat().st_size
        if size == 0 or rec["n_tokens"] == 0:
            raise UserError(f"shard {path} is empty: the corpus is too small for {n_shards} shards; lower data.shards")
        if size != rec["n_tokens"] * np.dtype(info["dtype"]).itemsize or sha256_file(path) != rec["sha256"]:
            raise UserError(f"shard {path} does not match its record {path.with_suffix('.json')} "
                            f"({size} bytes, recorded {rec['n_tokens']} tokens and sha256 {rec['sha256'][:12]}): "
                            "run its shard job again")
        shards.append((path, rec))
    val_path, val = shards[0]
    train = shards[1:]
    names = ["train.bin"] if n_shards == 1 else [f"train-{r['shard']}.bin" for _, r in train]
    with atomic_dir(out) as tmp:
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        for (path, _), name in zip([shards[0], *train], ["val.bin", *names]):
            _link_or_copy(path, tmp / name)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        hashes = {name: rec["sha256"] for name, (_, rec) in zip(["val.bin", *names], [shards[0], *train])}
        meta = {
            "format": SHARDED_FORMAT,
            "source": parts[0]["source"],
            "inputs": _union_inputs(parts),
            "licences": parts[0]["licences"],
            "tokenizer": info["tokenizer"],
            "vocab_size": info["vocab_size"],
            "dtype": info["dtype"],
            "bos_id": info["bos_id"], "eos_id": info["eos_id"], "sep_id": info["sep_id"], "sep_token": info["sep_token"],
            "layout": "every document is preceded by sep_id (its BOS; the previous document's EOS); "
                      "train = the shards concatenated in order",
            "shards": [{"file": name, "n_tokens": r["n_tokens"], "n_docs": r["n_docs"], "sha256": r["sha256"],
                        "key_range": r["key_range"]} for name, (_, r) in zip(names, train)],
            "n_shards": n_shards,
            "n_parts": parts[0]["n_parts"],
            "n_tokens_train": sum(r["n_tokens"] for _, r in train),
            "n_tokens_val": val["n_tokens"],
            "n_tokens_train_full": sum(r["n_tokens"] for _, r in train),
            "n_docs_train": sum(r["n_docs"] for _, r in train),
            "n_docs_val": val["n_docs"],
            "n_docs_train_full": sum(r["n_docs"] for _, r in train),
            "split": {"method": "by document: val iff sha256(f'{seed}\\0' + text)[:8] / 2^64 < val_fraction; "
                                "shard i of N holds the training keys in the i-th of N equal ranges; each in key order",
                      "val_fraction": info["val_fraction"], "seed": info["seed"], "max_train_tokens": None},
            "sha256": {name: hashes.get(name) or sha256_file(tmp / name) for name in files},
        }
        write_record(tmp / "meta.json", meta, t0)
    return meta


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of the tokens) where the filesystem allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _union_inputs(parts: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for p in parts:
        for entry in p["inputs"]:
            seen.setdefault(entry["name"], entry)
    return [seen[k] for k in sorted(seen)]
