"""Corpora, tokenizer and token streams: `sparsescale prepare` and what the training loop reads.

Features (one module each):
- sources.py    builtin / files / hf corpora, read whole (`Corpus`) or streamed in parts (`stream_source`).
- tokenizer.py  the split rule (`document_key`), the BPE and HF tokenizers (saved loadable by every
                supported transformers version), a bounded tokenizer sample, encoding.
- prepare.py    the single-file dataset: the whole corpus in memory, one train.bin / val.bin.
- shards.py     the sharded, bounded-memory pipeline (tokenizer -> encode parts -> shards -> gather),
                one Snakemake job per step; its concatenated shards equal the single-file train.bin.
- batches.py    reading a dataset (one file or a manifest of shards), batches as a pure function of step.
- cli.py        `sparsescale prepare` and its steps.
`from sparsescale import data as D` gives every public name below.
"""

from __future__ import annotations

import subprocess  # noqa: F401  (tests patch data.subprocess.run: the pip call of the builtin source)

from sparsescale.data.batches import ShardedTokens, get_batch, load_meta, load_tokenizer, load_tokens, val_batches, verify
from sparsescale.data.cli import cli_prepare, cli_step
from sparsescale.data.prepare import META_FORMAT, corpus_sha256, prepare
from sparsescale.data.shards import (SHARDED_FORMAT, bucket_names, bucket_of, build_shard, build_tokenizer, encode_part,
                                     gather)
from sparsescale.data.sources import (BUILTIN, SECTION_CHARS, Archive, Corpus, Stream, builtin_corpus, cache_dir,
                                      corpus_from_spec, fetch_archive, files_corpus, hf_corpus, source_spec,
                                      split_sections, stream_source, strip_gutenberg)
from sparsescale.data.tokenizer import (DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, SEP_TOKEN,
                                        PortableTokenizerFast, document_key, encode_documents, load_hf_tokenizer,
                                        make_portable, portable, sample_documents, split_documents, token_dtype,
                                        train_bpe)
