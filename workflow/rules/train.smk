# One job per N x S x precision x seed. final.json is written last by `sparsescale train`, so its presence
# marks a complete run; checkpoints under results/runs/{id}/checkpoints are not declared outputs, so a rerun
# of a killed job resumes from them.


rule train:
    input:
        data=DATA,
    output:
        final=f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}/final.json",
        model=directory(f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}/model"),
    log:
        "logs/train/{size}-s{s}-b{prec}-seed{seed}.log",
    benchmark:
        "logs/benchmarks/train/{size}-s{s}-b{prec}-seed{seed}.tsv"
    conda:
        ENV
    threads: lambda wc: train_resources(wc.size, "threads")
    resources:
        gpu=lambda wc: train_resources(wc.size, "gpu"),
        nodes=lambda wc: train_resources(wc.size, "nodes"),
        mem_mb=lambda wc, attempt: train_resources(wc.size, "mem_mb", attempt),
        runtime=lambda wc, attempt: train_resources(wc.size, "runtime", attempt),
    params:
        args=lambda wc: train_args(wc.size, wc.s, wc.prec, wc.seed),
        out=lambda wc, output: os.path.dirname(output.final),
        launch=lambda wc, resources: launch_args(resources),
    shell:
        "sparsescale train {params.launch} --data {input.data} --out {params.out} {params.args} > {log} 2>&1"


rule train_continue:
    # continue-training: convert the dense scratch run of the same size and keep training (Mistral in miniature)
    input:
        data=DATA,
        base=f"{R}/runs/{{size}}-s0.00-b{{prec}}-seed{{seed}}/final.json",
    output:
        final=f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}-continue/final.json",
        model=directory(
            f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}-continue/model"
        ),
    log:
        "logs/train/{size}-s{s}-b{prec}-seed{seed}-continue.log",
    conda:
        ENV
    threads: lambda wc: train_resources(wc.size, "threads")
    resources:
        gpu=lambda wc: train_resources(wc.size, "gpu"),
        mem_mb=lambda wc, attempt: train_resources(wc.size, "mem_mb", attempt),
        runtime=lambda wc, attempt: train_resources(wc.size, "runtime", attempt),
    params:
        args=lambda wc: train_args(wc.size, wc.s, wc.prec, wc.seed),
        extra=lambda wc: stage_args("continue"),
        base=lambda wc, input: os.path.join(os.path.dirname(input.base), "model"),
        out=lambda wc, output: os.path.dirname(output.final),
    shell:
        "sparsescale train --data {input.data} --out {params.out} {params.args} --mode continue "
        "--init-from {params.base} {params.extra} > {log} 2>&1"


rule train_finetune:
    # finetuning: start from the dense scratch run with a small learning rate on another dataset
    input:
        data=lambda wc: config["finetune"].get("data") or DATA,
        base=f"{R}/runs/{{size}}-s0.00-b{{prec}}-seed{{seed}}/final.json",
    output:
        final=f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}-finetune/final.json",
        model=directory(
            f"{R}/runs/{{size}}-s{{s}}-b{{prec}}-seed{{seed}}-finetune/model"
        ),
    log:
        "logs/train/{size}-s{s}-b{prec}-seed{seed}-finetune.log",
    conda:
        ENV
    threads: lambda wc: train_resources(wc.size, "threads")
    resources:
        gpu=lambda wc: train_resources(wc.size, "gpu"),
        mem_mb=lambda wc, attempt: train_resources(wc.size, "mem_mb", attempt),
        runtime=lambda wc, attempt: train_resources(wc.size, "runtime", attempt),
    params:
        args=lambda wc: train_args(wc.size, wc.s, wc.prec, wc.seed),
        extra=lambda wc: stage_args("finetune"),
        base=lambda wc, input: os.path.join(os.path.dirname(input.base), "model"),
        out=lambda wc, output: os.path.dirname(output.final),
    shell:
        "sparsescale train --data {input.data} --out {params.out} {params.args} --mode finetune "
        "--init-from {params.base} {params.extra} > {log} 2>&1"
