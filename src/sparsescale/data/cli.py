"""`sparsescale prepare`: the single-file dataset, and the sharded pipeline's steps as subcommands.

Features:
- `sparsescale prepare --out DIR [source]`: the whole corpus in memory, one `train.bin` (prepare.py).
- `sparsescale prepare tokenizer|encode|shard|gather ...`: one step of the sharded pipeline (shards.py),
  each a Snakemake job in workflow/rules/data.smk. The source options are the same everywhere.
"""

from __future__ import annotations

import argparse

from sparsescale.data.prepare import prepare
from sparsescale.data.shards import build_shard, build_tokenizer, encode_part, gather
from sparsescale.data.sources import corpus_from_spec, source_spec
from sparsescale.data.tokenizer import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE
from sparsescale.errors import UserError


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("builtin", "files", "hf"), help="default: files if --files, hf if --hf, else builtin")
    p.add_argument("--files", action="append", metavar="GLOB", help="local files (repeatable); .jsonl: one doc per line")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (files source)")
    p.add_argument("--hf", metavar="NAME_OR_PATH", help="HF dataset name, save_to_disk directory, or local data files")
    p.add_argument("--hf-config", help="HF dataset configuration")
    p.add_argument("--hf-split", default="train", help="HF split to read (our own train/val split is made from it)")
    p.add_argument("--hf-text-field", default="text", help="HF column holding the text")
    p.add_argument("--hf-max-docs", type=int, help="read at most this many documents (streamed datasets)")
    p.add_argument("--cache", help="download cache for builtin (default $SPARSESCALE_CACHE or ~/.cache/sparsescale)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="fraction of documents held out")
    p.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="split seed")


def spec_from_args(args: argparse.Namespace) -> dict:
    if args.files and args.hf:
        raise UserError("give either --files or --hf, not both")
    source = args.source or ("files" if args.files else "hf" if args.hf else "builtin")
    if (args.files and source != "files") or (args.hf and source != "hf"):
        raise UserError(f"--source {source} does not read --files/--hf: drop them or set --source accordingly")
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(f"val fraction must be in (0, 1): got {args.val_fraction} (--val-fraction)")
    return source_spec(source, files=args.files, text_field=args.text_field, hf=args.hf, hf_config=args.hf_config,
                       hf_split=args.hf_split, hf_text_field=args.hf_text_field, hf_max_docs=args.hf_max_docs,
                       cache=args.cache)


def cli_prepare(argv: list[str]) -> int:
    if argv and argv[0] in ("tokenizer", "encode", "shard", "gather"):
        return cli_step(argv[0], argv[1:])
    p = argparse.ArgumentParser(prog="sparsescale prepare", description=(
        "Build a tokenized dataset directory (whole corpus in memory). For corpora that do not fit, the "
        "sharded steps: sparsescale prepare {tokenizer,encode,shard,gather} --help."))
    p.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
    add_source_args(p)
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="use this HF fast tokenizer instead of training a BPE")
    p.add_argument("--max-train-tokens", type=int, help="truncate train.bin to this many tokens (val untouched)")
    args = p.parse_args(argv)

    spec = spec_from_args(args)
    if args.tokenizer and args.vocab_size is not None:
        raise UserError("--vocab-size trains a BPE, --tokenizer uses an existing one: give only one")
    corpus = corpus_from_spec(spec)
    meta = prepare(corpus, args.out, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, seed=args.seed, max_train_tokens=args.max_train_tokens)
    print(f"wrote {args.out}: train {meta['n_tokens_train']:,} tokens ({meta['n_docs_train']:,} docs), "
          f"val {meta['n_tokens_val']:,} tokens ({meta['n_docs_val']:,} docs), vocab {meta['vocab_size']} "
          f"({meta['dtype']}), {meta['elapsed_s']:.1f} s")
    return 0


def cli_step(step: str, argv: list[str]) -> int:
    """One step of the sharded pipeline (see shards.py and workflow/rules/data.smk)."""
    p = argparse.ArgumentParser(prog=f"sparsescale prepare {step}", description=_STEP_HELP[step])
    if step in ("tokenizer", "encode"):
        add_source_args(p)
    if step == "tokenizer":
        p.add_argument("--out", required=True, help="tokenizer directory to write")
        p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
        p.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="use this HF fast tokenizer instead of training a BPE")
        p.add_argument("--sample-docs", type=int, help="train the BPE on at most this many documents (default: all)")
        p.add_argument("--sample-bytes", type=int, help="... and at most this many bytes of text (default: all)")
        args = p.parse_args(argv)
        spec = spec_from_args(args)
        if args.tokenizer and args.vocab_size is not None:
            raise UserError("--vocab-size trains a BPE, --tokenizer uses an existing one: give only one")
        info = build_tokenizer(spec, args.out, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE,
                               tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                               sample_docs=args.sample_docs, sample_bytes=args.sample_bytes)
        sample = info["tokenizer"]["sample"]
        print(f"wrote {args.out}: vocab {info['vocab_size']}"
              + (f", trained on {sample['n_docs']:,} documents ({sample['n_bytes']:,} bytes)" if sample else ""))
    elif step == "encode":
        p.add_argument("--tokenizer-dir", required=True, help="the directory `prepare tokenizer` wrote")
        p.add_argument("--out", required=True, help="part directory to write (bucket files + part.json)")
        p.add_argument("--part", type=int, required=True, help="which part of the source, 0..parts-1")
        p.add_argument("--parts", type=int, required=True, help="number of parts (encode jobs)")
        p.add_argument("--shards", type=int, required=True, help="number of training shards")
        args = p.parse_args(argv)
        rec = encode_part(spec_from_args(args), args.tokenizer_dir, args.out, part=args.part, n_parts=args.parts,
                          n_shards=args.shards)
        total = sum(b["n_tokens"] for b in rec["buckets"].values())
        print(f"wrote {args.out}: {total:,} tokens in {rec['elapsed_s']:.1f} s")
    elif step == "shard":
        p.add_argument("--shard", required=True, help="'val' or a training shard number (00000, 00001, ...)")
        p.add_argument("--out", required=True, help="token file to write; its record goes beside it (.json)")
        p.add_argument("parts", nargs="+", help="every encoded part directory")
        args = p.parse_args(argv)
        rec = build_shard(args.parts, args.shard, args.out)
        print(f"wrote {args.out}: {rec['n_tokens']:,} tokens, {rec['n_docs']:,} documents")
    else:
        p.add_argument("--tokenizer-dir", required=True, help="the directory `prepare tokenizer` wrote")
        p.add_argument("--parts", nargs="+", required=True, help="every part record (part.json)")
        p.add_argument("--shards", nargs="+", required=True, help="every shard token file (val.bin and the rest)")
        p.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
        args = p.parse_args(argv)
        meta = gather(args.tokenizer_dir, args.parts, args.shards, args.out)
        print(f"wrote {args.out}: train {meta['n_tokens_train']:,} tokens in {meta['n_shards']} shard(s), "
              f"val {meta['n_tokens_val']:,} tokens, vocab {meta['vocab_size']}")
    return 0


_STEP_HELP = {
    "tokenizer": "Train the BPE on a bounded sample of the training documents, or copy an HF tokenizer.",
    "encode": "Encode one part of the source into per-shard buckets (bounded memory).",
    "shard": "Write one shard: its bucket from every part, in key order.",
    "gather": "Check the shards and write the dataset directory with its manifest (meta.json).",
}
