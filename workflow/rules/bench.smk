# Benchmarks (not part of `all`): `snakemake --cores all bench_inference`.


rule bench_inference:
    output:
        gemv=f"{R}/bench/gemv.csv",
        decode=f"{R}/bench/decode.csv",
        csv=f"{R}/bench/inference.csv",
    log:
        "logs/bench_inference.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        gemv=config.get("bench", {}).get("gemv_args", ""),
        decode=config.get("bench", {}).get("decode_args", ""),
    shell:
        "(sparsescale bench gemv {params.gemv} --out {output.gemv} && "
        "sparsescale bench decode {params.decode} --out {output.decode} && "
        "cp {output.gemv} {output.csv}) > {log} 2>&1"
