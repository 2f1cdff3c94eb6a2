# Super-weight paths and helpers, computed from the validated config (used by superweight.smk and by
# all_targets() in common.smk). No business logic: the rules call `sparsescale superweight ...`.
import re
import shlex

SW = f"{R}/superweight"
SW_FIGURES = [
    "sw_spike_profile",
    "sw_ablation",
    "sw_scale",
    "sw_quantize",
    "sw_emergence",
]
SW_TABLES = [
    "superweight_summary",
    "superweight_ablation",
    "superweight_quantize",
    "superweight_w8a8",
    "superweight_emergence",
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
