"""`sparsescale bench tokenize`: throughput and peak memory of the sharded preparation's jobs.

Features:
- Builds corpora of the requested token counts from the builtin corpus repeated with a perturbation
  (copy r > 0: every document rotated at a word boundary and tagged with r, so no two copies share a hash),
  written as JSONL (the `files` source).
- Runs the real steps as separate processes, exactly as the Snakemake jobs do (`sparsescale prepare
  encode` / `shard`), one CPU thread each (RAYON_NUM_THREADS=1), and reads each process's own peak RSS and
  CPU time from `os.wait4`: tokens per CPU-second is tokens/s per core, whatever else loads the machine.
- Bounded memory: the peak RSS of the encode job and of the largest shard job at every corpus size;
  a 10x larger corpus should leave them flat (README "Preparing data at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from sparsescale.data import bucket_names, build_tokenizer, builtin_corpus, source_spec
from sparsescale.io import versions, write_json


def perturbed_corpus(docs: list[str], path: Path, target_bytes: int) -> tuple[int, int]:
    """Write copies of `docs` (copy 0 verbatim, copy r rotated and tagged) until `target_bytes`; (docs, bytes)."""
    n, size, r = 0, 0, 0
    with open(path, "w") as f:
        while size < target_bytes:
            for i, doc in enumerate(docs):
                if r:
                    cut = doc.find(" ", (i * 7919 + r * 104729) % max(1, len(doc)))
                    doc = f"[{r}] " + (doc[cut + 1 :] + " " + doc[:cut] if cut > 0 else doc)
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                size += len(doc.encode("utf-8"))
                n += 1
                if size >= target_bytes:
                    break
            r += 1
    return n, size


def run_job(argv: list[str]) -> dict:
    """One `sparsescale` process, single-threaded: its wall time, CPU time and peak RSS (its own, not ours)."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparsescale", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"`sparsescale {' '.join(argv[:3])}` failed: {err[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def bench_tokenize(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale bench tokenize", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="5000000,50000000", help="corpus sizes in tokens, comma-separated")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (trained once, on a sample)")
    p.add_argument("--sample-docs", type=int, default=2000, help="tokenizer sample (documents)")
    p.add_argument("--shards", type=int, default=4, help="training shards of each corpus")
    p.add_argument("--workdir", help="where the corpora and outputs go (default: a temporary directory, removed)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    sizes = [int(float(t)) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        docs = builtin_corpus().documents
        tok = tmp / "tokenizer"
        t0 = time.perf_counter()
        info = build_tokenizer(source_spec("builtin"), tok, vocab_size=args.vocab_size, val_fraction=0.04, seed=0,
                               sample_docs=args.sample_docs)
        tok_s = time.perf_counter() - t0
        backend = Tokenizer.from_file(str(tok / "tokenizer.json"))
        probe = docs[:: max(1, len(docs) // 500)]
        ratio = sum(len(d.encode()) for d in probe) / sum(len(e.ids) + 1 for e in backend.encode_batch(probe))
        rows = []
        for target in sizes:
            d = tmp / f"c{target}"
            d.mkdir()
            n_docs, n_bytes = perturbed_corpus(docs, d / "corpus.jsonl", int(target * ratio))
            src = ["--files", str(d / "corpus.jsonl"), "--val-fraction", "0.04"]
            enc = run_job(["prepare", "encode", *src, "--tokenizer-dir", str(tok), "--part", "0", "--parts", "1",
                           "--shards", str(args.shards), "--out", str(d / "part0")])
            record = json.loads((d / "part0" / "part.json").read_text())
            n_tokens = sum(b["n_tokens"] for b in record["buckets"].values())
            shard_jobs = [run_job(["prepare", "shard", "--shard", b, "--out", str(d / f"{b}.bin"), str(d / "part0")])
                          for b in bucket_names(args.shards)]
            row = {"target_tokens": target, "tokens": n_tokens, "docs": n_docs, "text_mb": n_bytes / 1e6,
                   "encode": enc, "encode_tokens_per_cpu_s": n_tokens / enc["cpu_s"],
                   "shard_peak_rss_mb": max(j["peak_rss_mb"] for j in shard_jobs),
                   "shard_cpu_s": sum(j["cpu_s"] for j in shard_jobs),
                   "shard_tokens_per_cpu_s": n_tokens / sum(j["cpu_s"] for j in shard_jobs)}
            rows.append(row)
            print(f"{n_tokens / 1e6:7.1f}M tokens ({n_bytes / 1e6:6.0f} MB text, {n_docs:,} docs): encode "
                  f"{row['encode_tokens_per_cpu_s'] / 1e6:.2f}M tokens/CPU-s, peak RSS {enc['peak_rss_mb']:.0f} MB | "
                  f"{args.shards}+1 shard jobs {row['shard_tokens_per_cpu_s'] / 1e6:.1f}M tokens/CPU-s, "
                  f"peak RSS {row['shard_peak_rss_mb']:.0f} MB", flush=True)
            for f in d.iterdir():  # free the disk before the next size
                if f.is_file():
                    f.unlink()
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        marginal = (b["tokens"] - a["tokens"]) / (b["encode"]["cpu_s"] - a["encode"]["cpu_s"])
        print(f"corpus x{b['tokens'] / a['tokens']:.1f}: encode peak RSS x{b['encode']['peak_rss_mb'] / a['encode']['peak_rss_mb']:.2f}, "
              f"shard peak RSS x{b['shard_peak_rss_mb'] / a['shard_peak_rss_mb']:.2f}; encode {marginal / 1e6:.3f}M tokens/s "
              "per core (the larger corpus minus the smaller: process start-up cancels)")
        rows[-1]["encode_marginal_tokens_per_cpu_s"] = marginal
    if args.out:
        write_json(args.out, {"rows": rows, "tokenizer": {"vocab_size": info["vocab_size"], "train_s": tok_s,
                                                          "sample": info["tokenizer"]["sample"]},
                              "shards": args.shards, "bytes_per_token": ratio, "versions": versions()})
    return 0
