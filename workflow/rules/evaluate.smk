# Collect all runs into the tables the fit reads. Every run's eval.json (its saved checkpoint re-measured,
# loaded from disk) is written by its train job (train.smk: `sparsescale train --eval-out`).


rule aggregate:
    input:
        finished_or_pending,
        lmeval_scores,
    output:
        runs=f"{R}/tables/runs.csv",
        curves=f"{R}/tables/curves.csv",
    log:
        f"{R}/logs/aggregate.log",
    conda:
        ENV
    params:
        out=lambda wc, output: os.path.dirname(output.runs),
        dirs=lambda wc, input: " ".join(
            sorted({os.path.dirname(f) for f in input}) + skipped_runs()
        ),
    shell:
        "sparsescale aggregate {params.dirs} --out {params.out} > {log} 2>&1"
