# Paths, run ids and per-run parameters, computed from the validated config. No business logic: every
# rule calls one `sparsescale ...` command.
import json
import os

ENV = "../envs/sparsescale.yaml"  # conda environment of every rule (--use-conda), relative to workflow/rules

R = config["results"]
DATA = f"{R}/data/{config['data']['name']}"
PRECISION_TAG = {"fp": "fp", "1.58": "1.58"}


wildcard_constraints:
    size="[A-Za-z0-9.]+",
    s="[0-9]\\.[0-9]{2}",
    prec="fp|1\\.58",
    seed="[0-9]+",
    run="[^/]+",


def run_id(size, s, prec, seed, mode="scratch"):
    rid = f"{size}-s{float(s):.2f}-b{prec}-seed{seed}"
    return rid if mode == "scratch" else f"{rid}-{mode}"


def scratch_runs():
    sw = config["sweep"]
    return [
        run_id(n, s, p, seed)
        for n in sw["sizes"]
        for s in sw["sparsity"]
        for p in sw["precision"]
        for seed in sw["seeds"]
    ]


def continue_runs():
    c = config.get("continue", {})
    if not c.get("enabled"):
        return []
    return [
        run_id(c["size"], s, p, seed, "continue")
        for s in c["sparsity"]
        for p in c["precision"]
        for seed in config["sweep"]["seeds"]
    ]


def finetune_runs():
    f = config.get("finetune", {})
    if not f.get("enabled"):
        return []
    return [
        run_id(f["size"], s, p, seed, "finetune")
        for s in f["sparsity"]
        for p in f["precision"]
        for seed in config["sweep"]["seeds"]
    ]


def failed(rid):
    """A run that diverged before (results/runs/{id}/failed.json) is left out of the tables, not retried;
    delete that file to try it again."""
    return config.get("skip_failed", True) and os.path.exists(
        f"{R}/runs/{rid}/failed.json"
    )


def all_runs():
    return scratch_runs() + continue_runs() + finetune_runs()


def finished_or_pending(wildcards=None):
    return [f"{R}/runs/{rid}/eval.json" for rid in all_runs() if not failed(rid)]


def skipped_runs():
    return [f"{R}/runs/{rid}" for rid in all_runs() if failed(rid)]


def precisions():
    return sorted(set(config["sweep"]["precision"]))


def per_size(table, size, what):
    """A per-size setting: a scalar for every size, or a {size: value} mapping with an optional 'default'."""
    if not isinstance(table, dict):
        return table
    if size in table:
        return table[size]
    if "default" in table:
        return table["default"]
    raise ValueError(
        f"config: {what} has no entry for size {size!r} and no 'default'; add one"
    )


def train_args(size, s, prec, seed):
    t = config["train"]
    lr = per_size(
        t["lr"][prec] if isinstance(t["lr"], dict) and prec in t["lr"] else t["lr"],
        size,
        "train.lr",
    )
    tokens = per_size(t["tokens"], size, "train.tokens")
    args = {
        "size": size,
        "sparsity": s,
        "precision": prec,
        "seed": seed,
        "lr": lr,
        "seq-len": t["seq_len"],
        "batch-size": per_size(t["batch_size"], size, "train.batch_size"),
        "eval-tokens": t["eval_tokens"],
        "threads": t.get("threads"),
        "device": t.get("device", "auto"),
        "warmup-frac": t.get("warmup_frac"),
        "min-lr-ratio": t.get("min_lr_ratio"),
        "weight-decay": t.get("weight_decay"),
        "eval-every": t.get("eval_every"),
        "checkpoint-every": t.get("checkpoint_every"),
        "micro-batch-size": t.get("micro_batch_size"),
        "distributed": t.get("distributed"),
        "compile": t.get("compile"),
    }
    if tokens is None:
        args["tokens-per-param"] = t["tokens_per_param"]
    else:
        args["tokens"] = int(tokens)
    return " ".join(f"--{k} {v}" for k, v in args.items() if v is not None)


def train_resources(size, key, attempt=1):
    res = config["resources"]["train"]
    value = per_size(res[key], size, f"resources.train.{key}")
    if key in (
        "mem_mb",
        "runtime",
    ):  # grows with the attempt number (retries after OOM / timeouts)
        value = int(value * (1 + 0.5 * (attempt - 1)))
    return value


def figure_names():
    return [
        "fig1_scaling",
        "fig2_loss_vs_sparsity",
        "fig3_optimal_sparsity",
        "fig4_activated",
        "fig5_curves",
        "fig6_measured_sparsity",
        "fig7_residuals",
    ]


def table_names():
    return ["fit_constants", "losses", "sparsity"]


def all_targets():
    targets = [f"{R}/tables/runs.csv", f"{R}/fit/optimal_sparsity.json"]
    # every run's final.json and eval.json by name: Snakemake >= 9 reruns a job whose output was deleted only
    # if a target asks for that file (downstream files that are present and newer do not)
    targets += [f"{R}/runs/{rid}/final.json" for rid in all_runs() if not failed(rid)]
    targets += finished_or_pending()
    targets += expand(f"{R}/fit/fit_{{p}}.json", p=precisions())
    if config["figures"].get("enabled", True):
        targets += expand(f"{R}/figures/{{name}}.png", name=figure_names())
        targets += expand(f"{R}/tables/{{name}}.md", name=table_names())
    if config.get("superweight", {}).get("enabled"):
        targets += superweight_targets()
    return targets


def prepare_args():
    d = config["data"]
    args = [
        f"--source {d['source']}",
        f"--vocab-size {d['vocab_size']}",
        f"--val-fraction {d['val_fraction']}",
    ]
    if d["source"] == "files":
        args += [f"--files {g!r}" for g in d["files"]]
    if d["source"] == "hf":
        args += [
            f"--hf {d['hf']['name']}",
            f"--hf-split {d['hf'].get('split', 'train')}",
            f"--hf-text-field {d['hf'].get('text_field', 'text')}",
        ]
        if d["hf"].get("config"):
            args += [f"--hf-config {d['hf']['config']}"]
    if d.get("tokenizer"):
        args += [f"--tokenizer {d['tokenizer']}"]
    if d.get("max_train_tokens"):
        args += [f"--max-train-tokens {d['max_train_tokens']}"]
    if d.get("cache"):
        args += [f"--cache {d['cache']}"]
    return " ".join(args)


def stage_args(stage):
    """Overrides of a continue/finetune stage (its own lr and token budget), later flags win."""
    c = config[stage]
    return " ".join(
        f"--{k} {c[k2]}"
        for k, k2 in (("lr", "lr"), ("tokens", "tokens"))
        if c.get(k2) is not None
    )


def launch_args(resources):
    """Several GPUs or nodes: `sparsescale train` relaunches itself through torchrun (see distributed.py)."""
    gpus, nodes = int(resources.get("gpu", 0) or 0), int(resources.get("nodes", 1) or 1)
    if gpus > 1 or nodes > 1:
        return f"--nproc-per-node {max(gpus, 1)} --nnodes {nodes}"
    return ""
