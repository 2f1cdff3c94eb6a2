# Config checks run while the Snakefile is parsed (so `snakemake -n` catches them): the schema, reported as one
# short message (the bad key or value, where it is, a close key name), and paths the config names.
import difflib
import os
import glob

from snakemake.exceptions import WorkflowError

from sparsescale.config import same_sparsity, sweep_seeds


def _where(path):
    out = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return out or "the top level"


def config_error_message(err):
    """A schema error as three lines: what is wrong, where, how to fix it (not the schema and the config)."""
    # snakemake raises its WorkflowError while handling jsonschema's ValidationError
    cause = err.__context__
    if not hasattr(cause, "validator"):
        return str(err)
    lines = [
        f"ValidationError: {cause.message}",
        f"  at: {_where(cause.absolute_path)}",
    ]
    if cause.validator == "additionalProperties" and isinstance(cause.instance, dict):
        known = list(cause.schema.get("properties", {}))
        for key in cause.instance:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                lines.append(
                    f"  fix: {key!r} is not a config key; {hint}known keys: {', '.join(known)}"
                )
    lines.append(
        "  every key is documented in config/default.yaml (schema: workflow/schemas/config.schema.yaml)"
    )
    return "Error validating config file.\n" + "\n".join(lines)


def check_config(config, schema):
    try:
        validate(config, schema)
    except WorkflowError as err:
        raise WorkflowError(config_error_message(err)) from None
    check_data_files(config)
    check_extra_seeds(config["sweep"])
    check_lr_factor(config)


def check_lr_factor(config):
    """train.lr_factor: each names a sparsity of the grid and precisions of the sweep (optional); no sparsity and
    precision twice; not with a tune stage (which picks every rate itself)."""
    sweep, entries = config["sweep"], config["train"].get("lr_factor") or []
    if entries and config.get("tune", {}).get("enabled"):
        raise WorkflowError(
            "config train.lr_factor is set but tune.enabled is true: the tune stage picks each rate itself; "
            "remove train.lr_factor or set tune.enabled: false"
        )
    seen = {}
    for i, e in enumerate(entries):
        check_cell_entry(f"train.lr_factor[{i}]", e, sweep)
        for p in e.get("precision") or sweep["precision"]:
            key = (round(e["sparsity"], 9), p)
            if key in seen:
                raise WorkflowError(
                    f"config train.lr_factor[{i}]: S = {e['sparsity']}, precision {p} has a factor already "
                    f"(train.lr_factor[{seen[key]}]); give each sparsity and precision one factor"
                )
            seen[key] = i


def check_extra_seeds(sweep):
    """sweep.extra_seeds: each names a sparsity of the grid, precisions of the sweep (optional), and seeds that
    sweep.seeds and the other entries do not run already at that sparsity and precision.
    """
    for i, e in enumerate(sweep.get("extra_seeds") or []):
        check_cell_entry(f"sweep.extra_seeds[{i}]", e, sweep)
        for p in e.get("precision") or sweep["precision"]:
            at_s = sweep_seeds(sweep, e["sparsity"], p)
            twice = sorted({x for x in at_s if at_s.count(x) > 1})
            if twice:
                raise WorkflowError(
                    f"config sweep.extra_seeds[{i}].seeds: seed {twice[0]} runs twice at S = {e['sparsity']}, "
                    f"precision {p} (sweep.seeds is {sweep['seeds']}); list only seeds beyond sweep.seeds, once each"
                )


def check_cell_entry(where, e, sweep):
    """An entry that names a sparsity of the grid and, optionally, precisions of the sweep (sweep.extra_seeds,
    train.lr_factor)."""
    if not any(same_sparsity(e["sparsity"], s) for s in sweep["sparsity"]):
        raise WorkflowError(
            f"config {where}.sparsity: {e['sparsity']} is not in sweep.sparsity "
            f"{sweep['sparsity']}; name a sparsity of the grid"
        )
    off = [p for p in e.get("precision") or [] if p not in sweep["precision"]]
    if off:
        raise WorkflowError(
            f"config {where}.precision: {off[0]} is not in sweep.precision "
            f"{sweep['precision']}; name a precision of the sweep, or leave the key out for all"
        )


def check_data_files(config):
    """data.source files: every glob of data.files must match a file (checked here, not when `prepare` runs)."""
    d = config["data"]
    if d["source"] != "files":
        return
    if not d.get("files"):
        raise WorkflowError(
            "config data.files is empty but data.source is 'files': list the corpus files "
            "(globs of .txt / .jsonl, e.g. files: ['corpus/*.txt'])"
        )
    missing = [
        g for g in d["files"] if not glob.glob(os.path.expanduser(g), recursive=True)
    ]
    if missing:
        raise WorkflowError(
            f"config data.files: {', '.join(map(repr, missing))} matches no file (relative to the working "
            f"directory {os.getcwd()}); fix the path or the glob in your config file"
        )
