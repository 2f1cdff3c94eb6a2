# Super weights: detection, ablation and super-outlier-aware quantization over trained models of the sweep
# and an optional list of HF checkpoints (config: superweight); one folder per model under
# {results}/superweight/, a summary across models, and figures/tables made only from those files.
import re
import shlex

SW = f"{R}/superweight"
SW_FIGURES = ["sw_spike_profile", "sw_ablation", "sw_scale", "sw_quantize"]
SW_TABLES = [
    "superweight_summary",
    "superweight_ablation",
    "superweight_quantize",
    "superweight_w8a8",
]
SW_RESOURCES = dict(
    gpu=config.get("superweight", {}).get("gpu", 0),
    mem_mb=config.get("superweight", {}).get("mem_mb", 4000),
    runtime=config.get("superweight", {}).get("runtime", 60),
)


def superweight_models():
    """{name: checkpoint}: sweep run ids (their saved model) and HF checkpoints (hub name or local path)."""
    sw = config.get("superweight", {})
    models = {rid: f"{R}/runs/{rid}/model" for rid in sw.get("runs", [])}
    models.update(
        {
            re.sub(r"[\\/]+", "__", name.strip("\\/")): name
            for name in sw.get("hf_models", [])
        }
    )
    for name in set(models) & {"figures", "tables"}:
        raise ValueError(
            f"config: superweight model name {name!r} clashes with {SW}/{name}/; rename its folder"
        )
    return models


SW_NAME = (
    "|".join(map(re.escape, superweight_models())) or "(?!)"
)  # only the configured models


def sw_model_input(wc):
    """What a model's jobs wait for: the training run's final.json, or a local checkpoint folder; a hub
    name has nothing to wait for."""
    path = superweight_models()[wc.name]
    if wc.name in config.get("superweight", {}).get("runs", []):
        return [f"{R}/runs/{wc.name}/final.json"]
    return [path] if os.path.exists(path) else []


def sw_args(*keys):
    """Flags from config.superweight (null or absent keys are left to the CLI's defaults), shell-quoted."""
    sw, out = config.get("superweight", {}), []
    for key in keys:
        value = sw.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        out.append(
            f"--{key.replace('_', '-')} "
            + " ".join(shlex.quote(str(v)) for v in values)
        )
    return " ".join(out)


def sw_dirs():
    return [f"{SW}/{name}" for name in superweight_models()]


def superweight_targets():
    targets = [f"{SW}/summary.csv"]
    if config["figures"].get("enabled", True):
        targets += expand(f"{SW}/figures/{{fig}}.png", fig=SW_FIGURES)
        targets += expand(f"{SW}/tables/{{table}}.md", table=SW_TABLES)
    return targets


rule superweight_detect:
    input:
        sw_model_input,
        data=DATA,
    output:
        f"{SW}/{{name}}/detect.json",
    log:
        "logs/superweight/{name}/detect.log",
    wildcard_constraints:
        name=SW_NAME,
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
        "logs/superweight/{name}/ablate.log",
    wildcard_constraints:
        name=SW_NAME,
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
        "logs/superweight/{name}/quantize.log",
    wildcard_constraints:
        name=SW_NAME,
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
        "logs/superweight/summary.log",
    shell:
        "sparsescale superweight summarize --detect {input.detect} --out {output} > {log} 2>&1"


rule superweight_figures:
    input:
        summary=f"{SW}/summary.csv",
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
        "logs/superweight/figures.log",
    params:
        dirs=sw_dirs(),
        out=f"{SW}/figures",
        dpi=config["figures"].get("dpi", 200),
    shell:
        "sparsescale superweight report --summary {input.summary} --dirs {params.dirs} --figures {params.out} "
        "--dpi {params.dpi} > {log} 2>&1"


rule superweight_tables:
    input:
        summary=f"{SW}/summary.csv",
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
        "logs/superweight/tables.log",
    params:
        dirs=sw_dirs(),
        out=f"{SW}/tables",
    shell:
        "sparsescale superweight report --summary {input.summary} --dirs {params.dirs} --tables {params.out} "
        "> {log} 2>&1"
