# One job per N x S x precision x seed. final.json is written last by the training, so its presence marks a
# complete run; checkpoints under results/runs/{id}/checkpoints are not declared outputs, so a rerun of a
# killed job resumes from them. The same process then re-measures the saved model, loaded from disk, into
# eval.json (what `sparsescale eval` does; one process per run instead of two: no second start-up).
# One definition for the three modes (rules train, train_continue, train_finetune): continue-training converts
# the dense scratch run of the same size and keeps training (Mistral in miniature); finetuning starts from it
# with a small learning rate, on another dataset if finetune.data says so. Every mode gets the same resources
# and the torchrun launcher when a job has several GPUs or nodes.


for mode in MODES:  # scratch, continue, finetune

    rule:
        name:
            "train" if mode == "scratch" else f"train_{mode}"
        input:
            **train_input(mode),
        output:
            final=run_path(mode, "final.json"),
            model=directory(run_path(mode, "model")),
            eval=run_path(mode, "eval.json"),
        log:
            f"{R}/logs/train/{RUN_ID_PATTERN}{run_id_suffix(mode)}.log",
        benchmark:
            f"{R}/logs/benchmarks/train/{RUN_ID_PATTERN}{run_id_suffix(mode)}.tsv"
        conda:
            ENV
        threads: lambda wc: train_resources(wc.size, "threads")
        resources:
            gpu=lambda wc: train_resources(wc.size, "gpu"),
            nodes=lambda wc: train_resources(wc.size, "nodes"),
            mem_mb=lambda wc, attempt: train_resources(wc.size, "mem_mb", attempt),
            runtime=lambda wc, attempt: train_resources(wc.size, "runtime", attempt),
        params:
            args=train_params(mode),
            init=init_from(mode),
            out=lambda wc, output: os.path.dirname(output.final),
            launch=lambda wc, resources: launch_args(resources),
            bank=bank_cmd("train", mode),
        shell:
            "sparsescale train {params.launch} --data {input.data} --out {params.out} {params.args} "
            "{params.init} --eval-out {output.eval} > {log} 2>&1 {params.bank}"
