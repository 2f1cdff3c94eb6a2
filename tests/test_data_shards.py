"""Tests of the sharded preparation (sparsescale.data.shards): equal to the single-file layout for every
number of shards and parts, a bounded tokenizer sample, the manifest, bad input, a portable tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsescale import data
from sparsescale.cli import main as cli_main
from sparsescale.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TXT = str(FIXTURES / "corpus" / "*.txt")
JSONL = str(FIXTURES / "docs.jsonl")
VOCAB = 320
VAL = 0.25
SPEC = data.source_spec("files", files=[TXT, JSONL])


def _sharded(tmp: Path, n_shards: int, n_parts: int, name: str = "ds", **tok_kw) -> tuple[Path, dict]:
    """The four steps as the Snakemake rules run them, through the Python API."""
    tok = tmp / f"{name}.work" / "tokenizer"
    data.build_tokenizer(SPEC, tok, vocab_size=VOCAB, val_fraction=VAL, seed=0, **tok_kw)
    parts = [tmp / f"{name}.work" / "parts" / f"{p}" for p in range(n_parts)]
    for p, d in enumerate(parts):
        data.encode_part(SPEC, tok, d, part=p, n_parts=n_parts, n_shards=n_shards)
    shards = [tmp / f"{name}.work" / "shards" / f"{b}.bin" for b in data.bucket_names(n_shards)]
    for b, f in zip(data.bucket_names(n_shards), shards):
        data.build_shard(parts, b, f)
    out = tmp / name
    return out, data.gather(tok, [d / "part.json" for d in parts], shards, out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "ds"
    data.prepare(data.files_corpus([TXT, JSONL]), out, vocab_size=VOCAB, val_fraction=VAL)
    return out


@pytest.mark.parametrize("n_shards,n_parts", [(1, 1), (3, 2), (4, 5)])
def test_sharded_dataset_is_the_single_file_dataset_for_every_layout(tmp_path, single, n_shards, n_parts):
    out, meta = _sharded(tmp_path, n_shards, n_parts)
    ref = data.load_meta(single)
    assert [len(s) for s in [meta["shards"]]] == [n_shards]
    for key in ("n_tokens_train", "n_tokens_val", "n_docs_train", "n_docs_val", "vocab_size", "dtype", "sep_id"):
        assert meta[key] == ref[key], key
    assert (out / "tokenizer.json").read_bytes() == (single / "tokenizer.json").read_bytes()  # sample = all
    assert (out / "val.bin").read_bytes() == (single / "val.bin").read_bytes()
    train, ref_train = data.load_tokens(out, "train"), data.load_tokens(single, "train")
    if n_shards == 1:  # N = 1 is the single-file layout, byte for byte
        assert isinstance(train, np.memmap) and (out / "train.bin").read_bytes() == (single / "train.bin").read_bytes()
    else:
        assert isinstance(train, data.ShardedTokens) and len(train.shards) == n_shards
        assert sorted(p.name for p in out.glob("train-*.bin")) == [f"train-{i:05d}.bin" for i in range(n_shards)]
    assert np.array_equal(train[:], np.asarray(ref_train))
    for step in range(5):  # the batch stream, for one process and for each rank of two
        for rank, world in ((0, 1), (0, 2), (1, 2)):
            x, y = data.get_batch(train, step, 8, 16, seed=3, rank=rank, world_size=world)
            rx, ry = data.get_batch(ref_train, step, 8, 16, seed=3, rank=rank, world_size=world)
            assert x.dtype == rx.dtype and bool((x == rx).all()) and bool((y == ry).all())
    data.verify(out)  # every file matches the sha256 in its manifest


# sha256 of train.bin, val.bin and of the first batches, computed with data.py as it was before the sharded
# pipeline (commit d0c5615; tokenizers 0.23.3): the single-file layout and its batch stream are unchanged, and
# a sharded dataset gives the same batches.
BEFORE = {"batches": "04a4ba05b1e9d31c387e85bc006d7f48e0c94acac851c582958d72695f877a9b",
          "train.bin": "651e484fa08eb56d0772cd008374f9aa68bcd66ee1ec2da026b86b104786b8c3",
          "val.bin": "9c137cbe6663b3e1a627e11f0fe524a299ebf144a5a623b8036e7438aa5abb1c"}


def _batches_sha256(tokens) -> str:
    h = hashlib.sha256()
    for step in range(5):
        for rank, world in ((0, 1), (1, 2)):
            x, y = data.get_batch(tokens, step, 8, 16, seed=3, rank=rank, world_size=world)
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
    return h.hexdigest()


def test_single_file_layout_and_batches_are_unchanged(tmp_path, single):
    assert {n: hashlib.sha256((single / n).read_bytes()).hexdigest() for n in ("train.bin", "val.bin")} == \
        {n: BEFORE[n] for n in ("train.bin", "val.bin")}
    assert _batches_sha256(data.load_tokens(single, "train")) == BEFORE["batches"]
    out, _ = _sharded(tmp_path, 3, 2)
    assert _batches_sha256(data.load_tokens(out, "train")) == BEFORE["batches"]


def test_sharded_tokens_read_like_their_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, size=n).astype(np.uint16) for n in (7, 1, 30, 12)]
    whole, sharded = np.concatenate(parts), data.ShardedTokens(parts)
    assert len(sharded) == 50 and sharded.shape == (50,)
    idx = rng.integers(0, 33, size=(6, 1))[:, None] + np.arange(18)  # (6, 1, 18) windows, most straddle shards
    assert sharded[idx].shape == idx.shape and np.array_equal(sharded[idx], whole[idx])
    assert np.array_equal(sharded[5:40], whole[5:40]) and np.array_equal(sharded[::7], whole[::7])
    assert sharded[8] == whole[8] and sharded[49] == whole[49]
    with pytest.raises(IndexError):
        sharded[np.asarray([50])]


def test_tokenizer_sample_is_the_lowest_key_training_documents_within_the_limits(tmp_path):
    train, _ = data.split_documents(data.files_corpus([TXT, JSONL]).documents, VAL)
    sample, rec = data.sample_documents(iter(data.files_corpus([TXT, JSONL]).documents), VAL, 0, max_docs=5)
    assert sample == train[:5] and rec["n_docs"] == 5 and rec["n_docs_train_seen"] == len(train) == 28
    sizes = np.cumsum([len(t.encode()) for t in train])
    budget = int(sizes[9]) + 1  # room for exactly the first 10 documents
    sample, rec = data.sample_documents(reversed(data.files_corpus([TXT, JSONL]).documents), VAL, 0, max_bytes=budget)
    assert sample == train[:10] and rec["n_bytes"] == sizes[9] and not rec["complete"]
    info = data.build_tokenizer(SPEC, tmp_path / "tok", vocab_size=VOCAB, val_fraction=VAL, seed=0, sample_docs=5)
    assert info["tokenizer"]["sample"]["n_docs"] == 5 and info["tokenizer"]["sample"]["max_docs"] == 5
    out, meta = _sharded(tmp_path, 2, 2, name="sampled", sample_docs=5)
    assert meta["tokenizer"]["sample"]["n_docs"] == 5  # recorded in the dataset's meta.json


def test_cli_steps_write_the_same_dataset(tmp_path, single):
    w = tmp_path / "work"
    src = ["--files", TXT, "--files", JSONL, "--val-fraction", str(VAL)]
    assert cli_main(["prepare", "tokenizer", *src, "--vocab-size", str(VOCAB), "--out", str(w / "tok")]) == 0
    for p in range(2):
        assert cli_main(["prepare", "encode", *src, "--tokenizer-dir", str(w / "tok"), "--part", str(p),
                         "--parts", "2", "--shards", "2", "--out", str(w / f"p{p}")]) == 0
    for b in data.bucket_names(2):
        assert cli_main(["prepare", "shard", "--shard", b, "--out", str(w / f"{b}.bin"), str(w / "p0"), str(w / "p1")]) == 0
    assert cli_main(["prepare", "gather", "--tokenizer-dir", str(w / "tok"), "--parts", str(w / "p0/part.json"),
                     str(w / "p1/part.json"), "--shards", *[str(w / f"{b}.bin") for b in data.bucket_names(2)],
                     "--out", str(tmp_path / "ds")]) == 0
    assert np.array_equal(data.load_tokens(tmp_path / "ds", "train")[:], np.asarray(data.load_tokens(single, "train")))


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_shard_stops_gather_with_no_output(tmp_path):
    out, _ = _sharded(tmp_path, 3, 2)
    shards = sorted((tmp_path / "ds.work" / "shards").glob("*.bin"))
    (tmp_path / "ds.work" / "shards" / "00001.bin").unlink()
    with pytest.raises(UserError, match=r"shard 00001 of 3 is missing .*run its shard job again"):
        data.gather(tmp_path / "ds.work" / "tokenizer", sorted((tmp_path / "ds.work" / "parts").glob("*/part.json")),
                    shards, tmp_path / "again")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))


def test_empty_shard_stops_with_the_fix(tmp_path):
    tok = tmp_path / "tok"
    data.build_tokenizer(SPEC, tok, vocab_size=VOCAB, val_fraction=VAL, seed=0)
    data.encode_part(SPEC, tok, tmp_path / "p0", part=0, n_parts=1, n_shards=200)  # 28 training documents, 200 shards
    empty = next(b for b in data.bucket_names(200)[1:] if not (tmp_path / "p0" / f"{b}.bin").stat().st_size)
    with pytest.raises(UserError, match=rf"shard {empty} received no documents .*lower data.shards"):
        data.build_shard([tmp_path / "p0"], empty, tmp_path / f"{empty}.bin")
    assert not (tmp_path / f"{empty}.bin").exists() and not (tmp_path / f"{empty}.json").exists()
    out, _ = _sharded(tmp_path, 2, 1, name="ds")  # an empty shard file handed to gather
    shards = [tmp_path / "ds.work" / "shards" / f"{b}.bin" for b in data.bucket_names(2)]
    shards[2].write_bytes(b"")
    with pytest.raises(UserError, match=r"00001.bin is empty"):
        data.gather(tmp_path / "ds.work" / "tokenizer", [tmp_path / "ds.work" / "parts" / "0" / "part.json"], shards,
                    tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_changed_tokenizer_between_shards_stops(tmp_path):
    out, _ = _sharded(tmp_path, 2, 2)
    w = tmp_path / "ds.work"
    parts = [w / "parts" / "0", w / "parts" / "1"]
    # part 1 encoded again with another tokenizer: the shard step refuses to mix them
    data.build_tokenizer(SPEC, tmp_path / "tok2", vocab_size=VOCAB + 40, val_fraction=VAL, seed=0)
    data.encode_part(SPEC, tmp_path / "tok2", parts[1], part=1, n_parts=2, n_shards=2)
    with pytest.raises(UserError, match=r"parts/1 was encoded with another tokenizer .*run the encode jobs again"):
        data.build_shard(parts, "00000", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()
    # shards made with the first tokenizer, gathered with the second: refused, nothing written
    shards = [w / "shards" / f"{b}.bin" for b in data.bucket_names(2)]
    with pytest.raises(UserError, match=r"was encoded with another tokenizer .* than .*tok2"):
        data.gather(tmp_path / "tok2", [p / "part.json" for p in parts], shards, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_manifest_that_does_not_match_its_files_stops(tmp_path):
    out, meta = _sharded(tmp_path, 3, 1)
    shard = out / meta["shards"][1]["file"]
    os.chmod(shard, 0o644)
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 1  # same size, other content: verify (sha256) catches it
    shard.unlink()  # a hard link: replace it, do not write through to the work copy
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"checksum mismatch for .*train-00001.bin"):
        data.verify(out)
    shard.write_bytes(bytes(raw[:-2]))  # one token short: load_tokens catches it before training starts
    with pytest.raises(UserError, match=r"train-00001.bin holds \d+ tokens, meta.json says \d+: .*does not match"):
        data.load_tokens(out, "train")
    shard.unlink()
    with pytest.raises(UserError, match=r"train-00001.bin is missing"):
        data.load_tokens(out, "train")
    # a record that does not match its shard file: gather refuses
    w = tmp_path / "ds.work"
    rec = json.loads((w / "shards" / "00002.json").read_text())
    rec["n_tokens"] += 1
    (w / "shards" / "00002.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"00002.bin does not match its record"):
        data.gather(w / "tokenizer", [w / "parts" / "0" / "part.json"],
                    [w / "shards" / f"{b}.bin" for b in data.bucket_names(3)], tmp_path / "again")
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------------------ tokenizer


def test_saved_tokenizer_names_a_class_every_transformers_version_loads(tmp_path, single):
    cfg = json.loads((single / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 5 alone would write TokenizersBackend
    tok = data.load_tokenizer(single)
    tok.save_pretrained(tmp_path / "ckpt")  # what a checkpoint does with it (model.save)
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Shall I compare thee to a summer's day?"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt")(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.skipif(not os.environ.get("SPARSESCALE_TRANSFORMERS4"),
                    reason="set SPARSESCALE_TRANSFORMERS4 to a directory holding transformers 4.x (pip install --target)")
def test_saved_tokenizer_loads_with_transformers_4(single):
    code = ("import sys, transformers; from transformers import AutoTokenizer; assert transformers.__version__[0] == '4'; "
            "print(AutoTokenizer.from_pretrained(sys.argv[1])('Shall I compare')['input_ids'])")
    env = {**os.environ, "PYTHONPATH": os.environ["SPARSESCALE_TRANSFORMERS4"]}
    proc = subprocess.run([sys.executable, "-c", code, str(single)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == data.load_tokenizer(single)("Shall I compare")["input_ids"]


# ------------------------------------------------------------------------------------------------ workflow


@pytest.mark.slow
def test_snakemake_scatter_gather_writes_the_single_file_dataset(tmp_path):
    """The rules (tokenizer -> 2 encode parts -> 3 + 1 shards -> gather) on the smoke config's corpus give the
    tokens of the single-file `prepare`; the temporary parts and work copies of the shards are gone."""
    import shutil

    import yaml

    root, bin_ = Path(__file__).resolve().parents[1], Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for name in ("Snakefile", "workflow", "profiles", "config"):
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, tmp_path / name)
    shutil.copytree(FIXTURES, tmp_path / "tests" / "fixtures")
    cfg = yaml.safe_load((root / "config" / "smoke.yaml").read_text())
    cfg["data"].update(shards=3, parts=2)
    (tmp_path / "sharded.yaml").write_text(yaml.safe_dump(cfg))
    target = f"{cfg['results']}/data/{cfg['data']['name']}"
    cmd = [str(bin_ / "snakemake"), target, "--cores", "2", "--configfile", "sharded.yaml"]
    dry = subprocess.run([*cmd, "-n"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    table = dry.stdout.split("Job stats:")[1].split("total")[0]  # the first job table of the dry run
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in table.splitlines() if len(ln.split()) == 2
              and ln.split()[1].isdigit()}
    counts["total"] = int(dry.stdout.split("Job stats:")[1].split("total")[1].split()[0])
    assert counts == {"data_tokenizer": 1, "data_encode": 2, "data_shard": 4, "data_gather": 1, "total": 8}, dry.stdout
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded, one = tmp_path / target, tmp_path / "one"
    d = cfg["data"]
    data.prepare(data.files_corpus([str(tmp_path / f) for f in d["files"]]), one, vocab_size=d["vocab_size"],
                 val_fraction=d["val_fraction"])
    assert np.array_equal(data.load_tokens(sharded, "train")[:], np.asarray(data.load_tokens(one, "train")))
    assert (sharded / "val.bin").read_bytes() == (one / "val.bin").read_bytes()
    meta = data.verify(sharded)
    assert [s["file"] for s in meta["shards"]] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    work = sharded.with_name(sharded.name + ".work")
    assert not (work / "parts").exists() or not any((work / "parts").iterdir())  # temp(): removed after use
    assert sorted(p.name for p in (work / "shards").iterdir()) == sorted(f"{b}.json" for b in data.bucket_names(3))


def test_training_on_shards_equals_training_on_one_file(tmp_path, single, monkeypatch):
    """train.py is untouched: it reads the shards through load_tokens/get_batch and logs the same losses,
    and a run on the shards killed at step 9 and resumed from its step-8 checkpoint ends the same."""
    from sparsescale import train as T
    from sparsescale.config import TrainConfig

    out, _ = _sharded(tmp_path, 3, 2)

    def run(data_dir, name, **kw):
        cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / name), size="d1", sparsity=0.5, seq_len=32,
                          batch_size=4, tokens=4 * 32 * 12, lr=3e-3, eval_tokens=256, eval_every=6,
                          checkpoint_every=4, log_every=1, threads=1, **kw)
        return T.train(cfg)

    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s" and "second" not in k}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = run(single, "one"), run(out, "sharded")
    assert rows("one") == rows("sharded") and a["val_loss"] == b["val_loss"]
    real_get_batch = data.get_batch

    def dying(tokens, step, *args, **kw):
        if step == 9:
            raise KeyboardInterrupt("simulated kill at step 9")
        return real_get_batch(tokens, step, *args, **kw)

    monkeypatch.setattr(data, "get_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(out, "resumed")
    monkeypatch.setattr(data, "get_batch", real_get_batch)
    resumed = run(out, "resumed")
    assert resumed["resumed_from_step"] == 8 and resumed["val_loss"] == a["val_loss"]
    assert rows("resumed") == rows("one")


def test_hf_source_streams_in_parts_like_the_files_source(tmp_path):
    """Local JSONL read through `datasets` (streamed) and a save_to_disk folder: the same parts as the files source."""
    import datasets

    files = data.source_spec("files", files=[JSONL])
    hf = data.source_spec("hf", hf=JSONL)
    docs = data.files_corpus(JSONL).documents
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "disk"))
    disk = data.source_spec("hf", hf=str(tmp_path / "disk"))
    for n_parts in (1, 3):
        want = [list(data.stream_source(files, p, n_parts).documents) for p in range(n_parts)]
        assert sorted(sum(want, [])) == sorted(docs) and all(want)
        assert [list(data.stream_source(hf, p, n_parts).documents) for p in range(n_parts)] == want
        got = [list(data.stream_source(disk, p, n_parts).documents) for p in range(n_parts)]
        assert sorted(sum(got, [])) == sorted(docs) and all(got)  # split by stream shard: other parts, same union
