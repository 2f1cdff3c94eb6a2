# Optional (lmeval.enabled): lm-evaluation-harness on every run's checkpoint, offline, on local tasks made from
# the held-out split (last word, stopword probability, held-out perplexity). `sparsescale aggregate` adds the
# scores to runs.csv (lmeval_*); a figure shows last-word accuracy against N by S.


rule lmeval:
    input:
        final=f"{R}/runs/{{run}}/final.json",
        model=f"{R}/runs/{{run}}/model",
        data=DATA,
    output:
        f"{R}/runs/{{run}}/lmeval.json",
    log:
        f"{R}/logs/lmeval/{{run}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        prompts=config.get("lmeval", {}).get("prompts", 200),
        docs=config.get("lmeval", {}).get("docs", 20),
    shell:
        "sparsescale lm-eval --model {input.model} --data {input.data} --prompts {params.prompts} "
        "--docs {params.docs} --threads {threads} --out {output} > {log} 2>&1"


rule lmeval_figure:
    input:
        runs=f"{R}/tables/runs.csv",
    output:
        report(
            f"{R}/figures/fig_lmeval_accuracy.png",
            caption="../report/fig_lmeval_accuracy.rst",
            category="Evaluation",
        ),
    log:
        f"{R}/logs/lmeval_figure.log",
    conda:
        ENV
    shell:
        "sparsescale lm-eval figure {input.runs} --out {output} > {log} 2>&1"
