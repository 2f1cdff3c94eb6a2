# Benchmarks (not part of `all`): `snakemake --cores all bench_inference`. Batch-1 sparse GEMV and decode
# on this machine; the GEMV rows are the results table (inference.csv), drawn as speedup vs S against the
# ideal 1/(1-S). Both dense baselines (framework matmul and the own kernel at S=0, weights in huge pages on
# both sides) are in gemv.csv/inference.csv and decode.csv; speedups are against the faster one. Machine and
# versions go next to each CSV (gemv.json, decode.json, inference.json). The GPU check is `make gpu-check`.


rule bench_inference:
    output:
        gemv=f"{R}/bench/gemv.csv",
        decode=f"{R}/bench/decode.csv",
        csv=f"{R}/bench/inference.csv",
        png=report(
            f"{R}/bench/figures/fig9_speedup.png",
            caption="../report/fig9_speedup.rst",
            category="Sparse inference",
        ),
        pdf=f"{R}/bench/figures/fig9_speedup.pdf",
    log:
        f"{R}/logs/bench_inference.log",
    conda:
        ENV
    threads: workflow.cores
    params:
        gemv=config.get("bench", {}).get("gemv_args", ""),
        decode=config.get("bench", {}).get("decode_args", ""),
        figures=lambda wc, output: os.path.dirname(output.png),
        meta=lambda wc, output: " ".join(
            os.path.splitext(f)[0] + ".json" for f in (output.gemv, output.csv)
        ),
    shell:
        "(sparsescale bench gemv {params.gemv} --out {output.gemv} && "
        "sparsescale bench decode {params.decode} --out {output.decode} && "
        "cp {output.gemv} {output.csv} && cp {params.meta} && "
        "sparsescale figures --only fig9_speedup --bench {output.csv} --out {params.figures}) > {log} 2>&1"
