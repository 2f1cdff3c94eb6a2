rule prepare:
    output:
        directory(DATA),
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmarks/prepare.tsv"
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
