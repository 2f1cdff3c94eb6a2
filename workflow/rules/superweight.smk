# Super weights: detection, ablation and super-outlier-aware quantization over trained models of the sweep
# and an optional list of HF checkpoints (config: superweight); one folder per model under
# {results}/superweight/, a summary across models, and figures/tables made only from those files (and from
# curves.csv: the spike statistic each training run logs at its evaluations).
# Paths and helpers (superweight_models, superweight_targets, ...) live in superweight_common.smk.


include: "superweight_common.smk"


rule superweight_detect:
    input:
        sw_model_input,
        data=DATA,
    output:
        f"{SW}/{{name}}/detect.json",
    log:
        f"{R}/logs/superweight/{{name}}/detect.log",
    wildcard_constraints:
        name=SW_NAME,
    conda:
        ENV
    threads: 1
    resources:
        **SW_RESOURCES,
    params:
        model=lambda wc: superweight_models()[wc.name],
        args=sw_args("device", "prompt"),
    shell:
        "OMP_NUM_THREADS={threads} sparsescale superweight detect --model {params.model} --data {input.data} "
        "{params.args} --out {output} > {log} 2>&1"


rule superweight_ablate:
    input:
        sw_model_input,
        data=DATA,
        detect=f"{SW}/{{name}}/detect.json",
    output:
        ablation=f"{SW}/{{name}}/ablation.json",
        scale=f"{SW}/{{name}}/scale.json",
    log:
        f"{R}/logs/superweight/{{name}}/ablate.log",
    wildcard_constraints:
        name=SW_NAME,
    conda:
        ENV
    threads: 1
    resources:
        **SW_RESOURCES,
    params:
        model=lambda wc: superweight_models()[wc.name],
        args=sw_args("device", "val_tokens", "seq_len", "prompts", "scales", "n_others"),
        out=lambda wc, output: os.path.dirname(output.ablation),
    shell:
        "OMP_NUM_THREADS={threads} sparsescale superweight ablate --model {params.model} --data {input.data} "
        "--detect {input.detect} --out {params.out} {params.args} > {log} 2>&1"


rule quantize_sweep:
    input:
        sw_model_input,
        data=DATA,
        detect=f"{SW}/{{name}}/detect.json",
    output:
        f"{SW}/{{name}}/quantize.json",
    log:
        f"{R}/logs/superweight/{{name}}/quantize.log",
    wildcard_constraints:
        name=SW_NAME,
    conda:
        ENV
    threads: 1
    resources:
        **SW_RESOURCES,
    params:
        model=lambda wc: superweight_models()[wc.name],
        args=sw_args(
            "device",
            "bits",
            "blocks",
            "val_tokens",
            "seq_len",
            "calib_tokens",
            "act_bits",
        ),
    shell:
        "OMP_NUM_THREADS={threads} sparsescale superweight quantize --model {params.model} --data {input.data} "
        "--detect {input.detect} --out {output} {params.args} > {log} 2>&1"


rule superweight_summary:
    input:
        detect=expand(f"{SW}/{{name}}/detect.json", name=superweight_models()),
    output:
        f"{SW}/summary.csv",
    log:
        f"{R}/logs/superweight/summary.log",
    conda:
        ENV
    shell:
        "sparsescale superweight summarize --detect {input.detect} --out {output} > {log} 2>&1"


rule superweight_figures:
    input:
        summary=f"{SW}/summary.csv",
        curves=f"{R}/tables/curves.csv",
        results=expand(
            f"{SW}/{{name}}/{{kind}}.json",
            name=superweight_models(),
            kind=["detect", "ablation", "scale", "quantize"],
        ),
    output:
        pngs=[
            report(
                f"{SW}/figures/{fig}.png",
                caption=f"../report/{fig}.rst",
                category="Super weights",
            )
            for fig in SW_FIGURES
        ],
        pdfs=expand(f"{SW}/figures/{{fig}}.pdf", fig=SW_FIGURES),
    log:
        f"{R}/logs/superweight/figures.log",
    conda:
        ENV
    params:
        dirs=sw_dirs(),
        out=lambda wc, output: os.path.dirname(output.pngs[0]),
        dpi=config["figures"].get("dpi", 200),
    shell:
        "sparsescale superweight report --summary {input.summary} --dirs {params.dirs} --curves {input.curves} "
        "--figures {params.out} --dpi {params.dpi} > {log} 2>&1"


rule superweight_tables:
    input:
        summary=f"{SW}/summary.csv",
        curves=f"{R}/tables/curves.csv",
        results=expand(
            f"{SW}/{{name}}/{{kind}}.json",
            name=superweight_models(),
            kind=["detect", "ablation", "scale", "quantize"],
        ),
    output:
        md=[
            report(
                f"{SW}/tables/{table}.md",
                caption=f"../report/{table}.rst",
                category="Super weights",
            )
            for table in SW_TABLES
        ],
        tex=expand(f"{SW}/tables/{{table}}.tex", table=SW_TABLES),
        csv=expand(f"{SW}/tables/{{table}}.csv", table=SW_TABLES),
    log:
        f"{R}/logs/superweight/tables.log",
    conda:
        ENV
    params:
        dirs=sw_dirs(),
        out=lambda wc, output: os.path.dirname(output.md[0]),
    shell:
        "sparsescale superweight report --summary {input.summary} --dirs {params.dirs} --curves {input.curves} "
        "--tables {params.out} > {log} 2>&1"
