# Fit L(N,S) = E + A(S)/N^alpha per precision, bootstrap intervals, and the inference-optimal sparsity S*.


rule fit:
    input:
        runs=f"{R}/tables/runs.csv",
    output:
        fits=expand(f"{R}/fit/fit_{{p}}.json", p=precisions()),
        optimal=f"{R}/fit/optimal_sparsity.json",
    log:
        f"{R}/logs/fit.log",
    benchmark:
        f"{R}/logs/benchmarks/fit.tsv"
    conda:
        ENV
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        form=config["fit"]["form"],
        bootstrap=config["fit"]["bootstrap"],
        seed=config["fit"]["seed"],
        multistart=config["fit"].get("multistart", 16),
        out=lambda wc, output: os.path.dirname(output.optimal),
    shell:
        "sparsescale fit {input.runs} --out {params.out} --form {params.form} --bootstrap {params.bootstrap} "
        "--seed {params.seed} --multistart {params.multistart} --jobs {threads} > {log} 2>&1"
