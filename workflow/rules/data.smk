# The dataset {R}/data/{name}. data.shards null: one job reads the whole corpus and writes one train.bin
# (rule prepare). data.shards N: a scatter/gather of ordinary jobs (README "Preparing data at scale"):
#   data_tokenizer (1)  ->  data_encode (P parts of the source)  ->  data_shard (N shards + val)  ->  data_gather
# The concatenated shards equal the single-file train.bin for every N and P (the split's hash orders both).
include: "data_common.smk"


if SHARDS and DATA_CFG.get("max_train_tokens"):
    raise ValueError(
        "config: data.max_train_tokens applies to the single-file layout only; set data.shards: null or drop it"
    )


if SHARDS:

    rule data_tokenizer:
        output:
            directory(f"{WORK}/tokenizer"),
        log:
            f"{R}/logs/data/tokenizer.log",
        benchmark:
            f"{R}/logs/benchmarks/data/tokenizer.tsv"
        conda:
            ENV
        threads: data_resources("tokenizer", "threads", 1)
        resources:
            mem_mb=data_resources("tokenizer", "mem_mb", 4000),
            runtime=data_resources("tokenizer", "runtime", 60),
        params:
            source=lambda wc: data_source_args(),
            args=lambda wc: data_tokenizer_args(),
        shell:
            "RAYON_NUM_THREADS={threads} sparsescale prepare tokenizer {params.source} {params.args} "
            "--out {output} > {log} 2>&1"

    rule data_encode:
        input:
            f"{WORK}/tokenizer",
        output:
            temp(directory(f"{WORK}/parts/{{part}}")),
        log:
            f"{R}/logs/data/encode/{{part}}.log",
        benchmark:
            f"{R}/logs/benchmarks/data/encode/{{part}}.tsv"
        wildcard_constraints:
            part="[0-9]+",
        conda:
            ENV
        threads: data_resources("encode", "threads", 1)
        resources:
            mem_mb=data_resources("encode", "mem_mb", 2000),
            runtime=data_resources("encode", "runtime", 60),
        params:
            source=lambda wc: data_source_args(),
            layout=f"--parts {PARTS} --shards {SHARDS}",
        shell:
            "RAYON_NUM_THREADS={threads} sparsescale prepare encode {params.source} --tokenizer-dir {input} "
            "--part {wildcards.part} {params.layout} --out {output} > {log} 2>&1"

    rule data_shard:
        input:
            expand(f"{WORK}/parts/{{part}}", part=range(PARTS)),
        output:
            bin=temp(f"{WORK}/shards/{{shard}}.bin"),
            record=f"{WORK}/shards/{{shard}}.json",
        log:
            f"{R}/logs/data/shard/{{shard}}.log",
        benchmark:
            f"{R}/logs/benchmarks/data/shard/{{shard}}.tsv"
        wildcard_constraints:
            shard="val|[0-9]{5}",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=data_resources("shard", "mem_mb", 2000),
            runtime=data_resources("shard", "runtime", 60),
        shell:
            "sparsescale prepare shard --shard {wildcards.shard} --out {output.bin} {input} > {log} 2>&1"

    rule data_gather:
        input:
            tokenizer=f"{WORK}/tokenizer",
            parts=expand(f"{WORK}/parts/{{part}}", part=range(PARTS)),
            bins=expand(f"{WORK}/shards/{{shard}}.bin", shard=shard_names()),
            records=expand(f"{WORK}/shards/{{shard}}.json", shard=shard_names()),
        output:
            directory(DATA),
        log:
            f"{R}/logs/data/gather.log",
        benchmark:
            f"{R}/logs/benchmarks/data/gather.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=data_resources("shard", "mem_mb", 2000),
            runtime=data_resources("shard", "runtime", 60),
        params:
            parts=lambda wc, input: " ".join(f"{p}/part.json" for p in input.parts),
        shell:
            "sparsescale prepare gather --tokenizer-dir {input.tokenizer} --parts {params.parts} "
            "--shards {input.bins} --out {output} > {log} 2>&1"

else:

    rule prepare:
        output:
            directory(DATA),
        log:
            f"{R}/logs/prepare.log",
        benchmark:
            f"{R}/logs/benchmarks/prepare.tsv"
        conda:
            ENV
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            args=lambda wc: prepare_args(),
        shell:
            "sparsescale prepare {params.args} --out {output} > {log} 2>&1"
