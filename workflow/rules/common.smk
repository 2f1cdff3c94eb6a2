# Paths, run ids and per-run parameters, computed from the validated config. No business logic: every
# rule calls one `sparsescale ...` command. The run id is sparsescale's own (config.RUN_ID_PATTERN / run_id).
import json
import os

from sparsescale.config import (
    MODES,
    RUN_ID_PATTERN,
    lr_factor,
    run_id,
    run_id_suffix,
    sweep_seeds,
)

ENV = "../envs/sparsescale.yaml"  # conda environment of every rule (--use-conda), relative to workflow/rules

R = config["results"]
DATA = f"{R}/data/{config['data']['name']}"


wildcard_constraints:
    size="[A-Za-z0-9.]+",
    s="[0-9]\\.[0-9]{2}",
    prec="fp|1\\.58",
    seed="[0-9]+",
    run="[^/]+",
    lr="[0-9.e+-]+",


def run_path(mode, name=""):
    """A file of a training run with the rules' wildcards: run_path("continue", "final.json")."""
    return f"{R}/runs/{RUN_ID_PATTERN}{run_id_suffix(mode)}/{name}".rstrip("/")


def scratch_runs():
    sw = config["sweep"]
    return [
        run_id(n, s, p, seed)
        for n in sw["sizes"]
        for s in sw["sparsity"]
        for p in sw["precision"]
        for seed in sweep_seeds(sw, s, p)
    ]


def stage_runs(mode):
    """The runs of a continue/finetune stage (none unless it is enabled)."""
    c = config.get(mode, {})
    if not c.get("enabled"):
        return []
    return [
        run_id(c["size"], s, p, seed, mode)
        for s in c["sparsity"]
        for p in c["precision"]
        for seed in config["sweep"]["seeds"]
    ]


BANK = config.get("bank")


def banked(rel, name=None):
    """The committed copy of a finished run (rel: "runs/{id}" or "tune/runs/{id}") under config `bank`, or None;
    finished means it holds `name`, or by default final.json or failed.json. A banked run is done: it is not
    trained again, and aggregate / tune select read it from the bank."""
    if not BANK:
        return None
    d = f"{BANK}/{rel}"
    names = [name] if name else ["final.json", "failed.json"]
    return d if any(os.path.exists(f"{d}/{n}") for n in names) else None


def bank_cmd(stage, mode="scratch"):
    """The shell tail of a train (stage "train") or tune run ("tune") that banks it (`sparsescale reference
    bank`, output appended to the job's log); empty without config `bank`. A train run is banked whether it
    finished or diverged (failed.json; the job still fails with the run's exit code); a killed one is skipped.
    """
    parent = {"train": "runs", "tune": "tune/runs"}[stage]

    def cmd(wildcards, output):
        if not BANK or mode != "scratch":
            return ""
        run = os.path.dirname(output[0])
        log = f"{R}/logs/{stage}/{os.path.basename(run)}.log"
        bank = f"sparsescale reference bank {run} --out {BANK}/{parent} >> {log} 2>&1"
        # under Snakemake's `set -euo pipefail`: keep the run's exit code, bank, then exit with it
        return (
            f"|| rc=$?; {bank}; exit ${{rc:-0}}" if stage == "train" else f"&& {bank}"
        )

    return cmd


def failed(rid):
    """A run that diverged before (results/runs/{id}/failed.json, or a banked failed.json) is left out of the
    tables, not retried; delete that file to try it again."""
    if not config.get("skip_failed", True):
        return False
    if os.path.exists(f"{R}/runs/{rid}/failed.json"):
        return True
    rel = f"runs/{rid}"
    return bool(banked(rel, "failed.json")) and not banked(rel, "final.json")


def all_runs():
    return scratch_runs() + stage_runs("continue") + stage_runs("finetune")


def finished_or_pending(wildcards=None):
    """What aggregate reads of every run: its eval.json (trained here) or the banked final.json."""
    return [
        (
            f"{banked(f'runs/{rid}', 'final.json')}/final.json"
            if banked(f"runs/{rid}", "final.json")
            else f"{R}/runs/{rid}/eval.json"
        )
        for rid in all_runs()
        if not failed(rid)
    ]


def skipped_runs():
    return [
        (
            f"{R}/runs/{rid}"
            if os.path.exists(f"{R}/runs/{rid}/failed.json")
            else banked(f"runs/{rid}", "failed.json")
        )
        for rid in all_runs()
        if failed(rid)
    ]


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


def run_lr(size, prec, mode="scratch", s=None):
    """The peak learning rate of one run, from one place: a continue/finetune stage's own `lr` when it sets
    one, else train.lr (a number, {precision: ...} and/or {size: ..., default: ...}) times the train.lr_factor
    of the run's sparsity `s` and precision (none given: the table's rate, the tune grid's centre).
    """
    stage = config.get(mode, {}) if mode != "scratch" else {}
    if stage.get("lr") is not None:
        return stage["lr"]
    lr = config["train"]["lr"]
    if isinstance(lr, dict) and prec in lr:
        lr = lr[prec]
    lr = per_size(lr, size, "train.lr")
    return lr if s is None else lr * lr_factor(config["train"], s, prec)


def tuned():
    """Learning rates come from the tune stage (results/tune/lr.json) instead of the train.lr table."""
    return bool(config.get("tune", {}).get("enabled"))


TUNE_LR = f"{R}/tune/lr.json"


def tune_runs():
    """Run directories of the tune stage: every size x precision at factor x train.lr, at the tuned sparsities
    (default: 0 and the largest S of the sweep) and tune seeds, on the sweep's budget unless tune.tokens says
    otherwise.
    """
    if not tuned():
        return []
    t, sw = config["tune"], config["sweep"]
    sparsities = t.get("sparsity") or sorted({0.0, max(sw["sparsity"])})
    seeds = t.get("seed", 0)
    seeds = seeds if isinstance(seeds, list) else [seeds]
    return [
        f"{R}/tune/runs/{run_id(n, s, p, seed)}-lr{f * run_lr(n, p):.3g}"
        for n in sw["sizes"]
        for p in sw["precision"]
        for s in sparsities
        for f in t["factors"]
        for seed in seeds
    ]


def tune_dirs():
    """Where tune select reads each tune run: its banked copy (config `bank`) or the run directory."""
    return [banked(os.path.relpath(d, R)) or d for d in tune_runs()]


def tune_inputs(wildcards=None):
    """tune select's inputs: a banked run's final.json (or failed.json: a diverged rate), else the run's done
    marker (which the tune_run rule makes)."""
    return [
        (
            (
                f"{d}/final.json"
                if os.path.exists(f"{d}/final.json")
                else f"{d}/failed.json"
            )
            if d != own
            else f"{d}/done"
        )
        for d, own in zip(tune_dirs(), tune_runs())
    ]


def tune_args(wc):
    """Flags of a tune run: the sweep's own run at the grid's rate (and tune.tokens, if set)."""
    override = {"lr": wc.lr}
    if config["tune"].get("tokens") is not None:
        override["tokens"] = int(config["tune"]["tokens"])
    return train_args(wc.size, wc.s, wc.prec, wc.seed, **override)


def run_tokens(size, mode="scratch"):
    """Token budget of one run: a stage's own `tokens`, else train.tokens (one D for every size)."""
    stage = config.get(mode, {}) if mode != "scratch" else {}
    if stage.get("tokens") is not None:
        return stage["tokens"]
    return config["train"]["tokens"]


def train_args(size, s, prec, seed, mode="scratch", **override):
    """The `sparsescale train` flags of one run; `override` replaces flags by name (the tune stage's lr)."""
    t = config["train"]
    tokens = run_tokens(size, mode)
    args = {
        "size": size,
        "sparsity": s,
        "precision": prec,
        "seed": seed,
        "lr": (
            f"$(sparsescale tune lr {TUNE_LR} --size {size} --precision {prec} --sparsity {s})"
            if tuned() and mode == "scratch"
            else run_lr(size, prec, mode, s)
        ),
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
    args["tokens"] = int(tokens)
    if mode != "scratch":
        args["mode"] = mode
    args.update(override)
    return " ".join(f"--{k} {v}" for k, v in args.items() if v is not None)


def train_params(mode):
    """The `sparsescale train` flags of a run of this mode, as a function of the rule's wildcards."""

    def args(wildcards):
        return train_args(
            wildcards.size, wildcards.s, wildcards.prec, wildcards.seed, mode
        )

    return args


def train_input(mode):
    """Inputs of a train rule: the dataset (finetune: its own, if set), and for continue/finetune the dense
    scratch run of the same size, precision and seed."""
    data = (
        (config.get("finetune", {}).get("data") or DATA) if mode == "finetune" else DATA
    )
    if mode == "scratch":
        return {"data": data, "lr": TUNE_LR} if tuned() else {"data": data}
    base = f"{R}/runs/{run_id('{size}', 0, '{prec}', '{seed}')}/final.json"
    return {"data": data, "base": base}


def init_from(mode):
    """--init-from of a continue/finetune run: the base run's saved model (nothing for scratch)."""

    def flag(wildcards, input):
        if mode == "scratch":
            return ""
        return f"--init-from {os.path.join(os.path.dirname(input.base), 'model')}"

    return flag


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
        "fig10_stability",
    ]


def table_names():
    return ["fit_constants", "losses", "matched_active", "sparsity", "fit_diagnostics"]


def all_targets():
    targets = [f"{R}/tables/runs.csv", f"{R}/fit/optimal_sparsity.json"]
    if tuned():
        targets += [TUNE_LR]
    # every run's final.json and eval.json by name: Snakemake >= 9 reruns a job whose output was deleted only
    # if a target asks for that file (downstream files that are present and newer do not)
    targets += [
        f"{R}/runs/{rid}/final.json"
        for rid in all_runs()
        if not failed(rid) and not banked(f"runs/{rid}", "final.json")
    ]
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


def launch_args(resources):
    """Several GPUs or nodes: `sparsescale train` relaunches itself through torchrun (distributed.py); one
    process: with train.warm_start, it forks from a server that has imported torch already (warm.py)
    """
    gpus, nodes = int(resources.get("gpu", 0) or 0), int(resources.get("nodes", 1) or 1)
    if gpus > 1 or nodes > 1:
        return f"--nproc-per-node {max(gpus, 1)} --nnodes {nodes}"
    return warm_flag()


def warm_flag(*_):
    """`--warm-start` when train.warm_start is on (every run and tune run skips ~7 s of imports; warm.py)."""
    return "--warm-start" if config["train"].get("warm_start", False) else ""
