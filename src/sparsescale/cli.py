"""The `sparsescale` command line: one subcommand per pipeline stage.

Each subcommand lives in the module that owns its idea and parses its own arguments
(`<module>.<function>(argv) -> int`); this file only dispatches, so `sparsescale --help` and
`sparsescale fit` never import torch. Bad input raises `UserError`: one message, exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sparsescale import __version__, warm
from sparsescale.errors import TrainingDiverged, UserError

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sizes": ("sparsescale.config", "cli_sizes", "print the model size table (N = non-embedding parameters)"),
    "prepare": ("sparsescale.data", "cli_prepare", "build a tokenized dataset (builtin corpus, local files or a HF dataset)"),
    "train": ("sparsescale.train", "cli_train", "train one model (scratch, continue or finetune) and write its results"),
    "eval": ("sparsescale.evaluate", "cli_eval", "recompute validation loss / measured sparsity of a checkpoint"),
    "aggregate": ("sparsescale.aggregate", "cli_aggregate", "collect final.json files into results/tables/runs.csv"),
    "tune": ("sparsescale.tune", "cli_tune", "learning rates from a grid of tune runs (select; lr of one size)"),
    "fit": ("sparsescale.fit", "cli_fit", "fit L(N,S) per precision with bootstrap intervals"),
    "compare-fits": ("sparsescale.compare", "cli_compare_fits", "S* of two fits (e.g. two token budgets) and their difference"),
    "optimal-sparsity": ("sparsescale.fit", "cli_optimal_sparsity", "S* and N/N_a for given law constants"),
    "figures": ("sparsescale.plots", "cli_figures", "draw the figures from runs.csv and the fit JSONs"),
    "tables": ("sparsescale.tables", "cli_tables", "write Markdown/LaTeX/CSV tables from runs.csv and the fit JSONs"),
    "probe": ("sparsescale.probe", "cli_probe", "train a banked sweep cell again with one setting changed, and bank it"),
    "reference": ("sparsescale.reference", "cli_reference", "export a sweep's result files (no checkpoints) as results/reference"),
    "superweight": ("sparsescale.superweight.cli", "cli_superweight", "detect / ablate / scale super weights; quantize"),
    "bench": ("sparsescale.bench", "cli_bench", "benchmarks that print ratios measured side by side"),
    "lm-eval": ("sparsescale.lmeval", "cli_lmeval", "lm-evaluation-harness on a checkpoint as trained (local tasks)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sparsescale COMMAND [ARGS...]   (sparsescale COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: a mistake in a script, not a request for help
        print(_usage(), file=sys.stderr)
        print("sparsescale: error: no command given", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name == warm.SERVER_COMMAND and len(rest) == 1:  # internal: started by `train --warm-start` (warm.py)
        return warm.serve(Path(rest[0]), main)
    if name not in COMMANDS:
        print(f"sparsescale: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    if name == "train" and warm.requested(rest):  # forked from a server that has imported torch (warm.py)
        code = warm.run_client(name, rest)
        if code is not None:
            return code
    try:
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except UserError as err:
        print(f"sparsescale {name}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"sparsescale {name}: diverged: {err}", file=sys.stderr)
        return 3
