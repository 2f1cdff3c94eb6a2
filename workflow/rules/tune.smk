# Learning rates chosen by the pipeline (tune.enabled): every size x precision at a few rates (tune.factors x
# train.lr) at S = 0 and the largest S, on the sweep's own budget; `sparsescale tune select` keeps one rate per
# size x precision (tune.select "mean": lowest validation loss averaged over the tuned sparsities) or the winner
# per tuned sparsity ("interpolate": log-linear in S between them), and the train rule reads it.
# A diverged tune run is a result (that rate is too high), not a failure: exit code 3 with failed.json.


rule tune_run:
    input:
        data=DATA,
    output:
        done=f"{R}/tune/runs/{RUN_ID_PATTERN}-lr{{lr}}/done",
    log:
        f"{R}/logs/tune/{RUN_ID_PATTERN}-lr{{lr}}.log",
    benchmark:
        f"{R}/logs/benchmarks/tune/{RUN_ID_PATTERN}-lr{{lr}}.tsv"
    conda:
        ENV
    threads: lambda wc: train_resources(wc.size, "threads")
    resources:
        gpu=lambda wc: train_resources(wc.size, "gpu"),
        mem_mb=lambda wc, attempt: train_resources(wc.size, "mem_mb", attempt),
        runtime=lambda wc, attempt: train_resources(wc.size, "runtime", attempt),
    params:
        args=tune_args,
        out=lambda wc, output: os.path.dirname(output.done),
        warm=warm_flag,
        bank=bank_cmd("tune"),
    shell:
        "( sparsescale train {params.warm} --data {input.data} --out {params.out} {params.args} || [ $? -eq 3 ] ) > {log} 2>&1 "
        "&& touch {output.done} {params.bank}"


rule tune_select:
    input:
        tune_inputs,
    output:
        lr=TUNE_LR,
        table=report(
            f"{R}/tune/lr.md",
            caption="../report/tune_lr.rst",
            category="Learning rates",
        ),
    log:
        f"{R}/logs/tune/select.log",
    conda:
        ENV
    params:
        dirs=lambda wc: " ".join(tune_dirs()),
        out=lambda wc, output: os.path.dirname(output.lr),
        rule=config.get("tune", {}).get("select", "mean"),
    shell:
        "sparsescale tune select {params.dirs} --out {params.out} --rule {params.rule} > {log} 2>&1"
