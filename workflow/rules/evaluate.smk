# Re-measure every saved checkpoint (loaded from disk) and collect all runs into the tables the fit reads.


rule evaluate:
    input:
        final=f"{R}/runs/{{run}}/final.json",
        model=f"{R}/runs/{{run}}/model",
        data=DATA,
    output:
        f"{R}/runs/{{run}}/eval.json",
    log:
        "logs/evaluate/{run}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        tokens=config["train"]["eval_tokens"],
        seq_len=config["train"]["seq_len"],
    shell:
        "sparsescale eval --model {input.model} --data {input.data} --eval-tokens {params.tokens} "
        "--seq-len {params.seq_len} --threads {threads} --out {output} > {log} 2>&1"


rule aggregate:
    input:
        finished_or_pending,
        lmeval_scores,
    output:
        runs=f"{R}/tables/runs.csv",
        curves=f"{R}/tables/curves.csv",
    log:
        "logs/aggregate.log",
    conda:
        ENV
    params:
        out=lambda wc, output: os.path.dirname(output.runs),
        dirs=lambda wc, input: " ".join(
            sorted({os.path.dirname(f) for f in input}) + skipped_runs()
        ),
    shell:
        "sparsescale aggregate {params.dirs} --out {params.out} > {log} 2>&1"
