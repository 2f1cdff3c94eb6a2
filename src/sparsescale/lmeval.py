"""lm-evaluation-harness as the evaluation client of sparsescale checkpoints, offline, on local tasks.

Features
- `SparseScaleLM`: an lm-eval model type registered as `sparsescale` (`--model sparsescale --model_args
  pretrained=DIR` once this module is imported). It loads the checkpoint with `sparsescale.model.load`, so the
  sparse / ternary model is evaluated as trained (plain `hf` evaluates the dense network unless
  `trust_remote_code=True`). Requests are batched with right padding (causal, per-token top-K and
  quantization: padding never changes a real position); contexts longer than the training's context keep
  their last tokens; the tokenizer's BOS (our document separator) goes first, as in training.
- Local tasks written from the held-out split of a prepared dataset (`write_tasks`), YAML + JSONL, no hub:
  `sparsescale_lastword` (LAMBADA-style: the last word of a held-out paragraph; acc = greedy reproduces the
  word, perplexity of the word), `sparsescale_stopword` (the super-weight probe: mean probability of " the",
  "." and "," after the same contexts) and `sparsescale_heldout` (rolling loglikelihood of held-out
  documents: word perplexity, bits per byte). Prompts come from `superweight.probes` (same split rules).
- `evaluate(model_dir, data_dir, ...)` -> lmeval.json content: `scores` (flat names that `sparsescale
  aggregate` adds to runs.csv as `lmeval_*`), per-task lm-eval results, counts, lm-eval version.
- `plot_accuracy(runs)`: last-word accuracy against N, one line per S, one panel per precision (the lmeval
  rule's figure).
- CLI: `sparsescale lm-eval --model DIR --data DATA --out lmeval.json [--limit N]` and
  `sparsescale lm-eval figure RUNS_CSV --out fig.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from sparsescale import data as D
from sparsescale import model as M
from sparsescale.errors import UserError
from sparsescale.io import atomic_path, versions, write_json
from sparsescale.superweight.probes import STOPWORDS, documents_from_tokens, paragraphs, split_last_word

TASKS = ("sparsescale_lastword", "sparsescale_stopword", "sparsescale_heldout")
# lm-eval result key -> column name in lmeval.json's scores (and runs.csv as lmeval_<name>)
SCORES = {("sparsescale_lastword", "acc,none"): "lastword_acc",
          ("sparsescale_lastword", "perplexity,none"): "lastword_perplexity",
          ("sparsescale_stopword", "stopword_prob,none"): "stopword_prob",
          ("sparsescale_heldout", "word_perplexity,none"): "heldout_word_perplexity",
          ("sparsescale_heldout", "bits_per_byte,none"): "heldout_bits_per_byte"}


# ----------------------------------------------------------------------------------------------------------
# the model type

@register_model("sparsescale")
class SparseScaleLM(LM):
    """A sparsescale checkpoint (or any local causal LM) loaded with `sparsescale.model.load`."""

    def __init__(self, pretrained: str, batch_size: int | str = 16, device: str = "cpu", max_length=None,
                 tokenizer: str | None = None, **_):
        super().__init__()
        from transformers import AutoTokenizer  # deferred: transformers costs seconds

        self.model = M.load(pretrained, dtype=torch.float32, device=device).eval()
        self.tok = AutoTokenizer.from_pretrained(tokenizer or pretrained)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        sep = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.prefix = [] if sep is None else [sep]

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _logprobs(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at every position of each sequence: (len(seq), V) each."""
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i : i + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in chunk], device=self._device)  # (B, T)
            logp = F.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)  # (B, T, V)
            out += [logp[b, : len(s)].cpu() for b, s in enumerate(chunk)]
        return out

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS, continuation ids): the continuation as the tokenizer splits context+continuation
        (trailing spaces of the context move to the continuation, as lm-eval's HF model does)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.prefix + self.encode(context)
        whole = self.prefix + self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        seqs = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in pairs]
        res = []
        for (ctx, cont), seq, logp in zip(pairs, seqs, self._logprobs([s[:-1] for s in seqs])):
            n = len(cont)
            lp = logp[-n:]  # (n, V): the positions that predict the continuation
            target = torch.tensor(seq[-n:])
            ll = float(lp.gather(-1, target[:, None]).sum())
            res.append((ll, bool((lp.argmax(-1) == target).all())))
        return res

    def loglikelihood_rolling(self, requests) -> list[float]:
        res = []
        for r in requests:
            toks = self.prefix + self.encode(r.args[0])
            windows = [toks[i : i + self.max_length + 1] for i in range(0, len(toks) - 1, self.max_length)]
            total = 0.0
            for w, logp in zip(windows, self._logprobs([w[:-1] for w in windows])):
                total += float(logp.gather(-1, torch.tensor(w[1:])[:, None]).sum())
            res.append(total)
        return res

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding until one of `until` or `max_gen_toks` tokens (no sampling)."""
        res = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = self.prefix + self.encode(context)
            new: list[int] = []
            for _ in range(int(kw.get("max_gen_toks", 32))):
                logits = self.model(input_ids=torch.tensor([(ids + new)[-self.max_length :]], device=self._device)).logits
                new.append(int(logits[0, -1].argmax()))
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            text = self.tok.decode(new)
            for u in until:
                text = text.split(u)[0]
            res.append(text)
        return res


# ----------------------------------------------------------------------------------------------------------
# local tasks from the held-out split

_STOPWORD_UTILS = '''import math


def stopword_prob(doc, results):  # results: [(loglikelihood, is_greedy)] of the one request
    return {"stopword_prob": math.exp(results[0][0])}
'''


def _task_yaml(name: str, data_file: Path, output_type: str, text: str, target: str, metrics: list[str],
               extra: str = "") -> str:
    metric_list = "\n".join(f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: {hib}"
                            for m, agg, hib in (METRICS[m] for m in metrics))
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
            f"output_type: {output_type}\ntest_split: test\ndoc_to_text: {json.dumps(text)}\n"
            f"doc_to_target: {json.dumps(target)}\n{extra}metric_list:\n{metric_list}\nmetadata:\n  version: 1.0\n")


METRICS = {"acc": ("acc", "mean", "true"), "perplexity": ("perplexity", "perplexity", "false"),
           "stopword_prob": ("stopword_prob", "mean", "false"),
           "word_perplexity": ("word_perplexity", "weighted_perplexity", "false"),
           "bits_per_byte": ("bits_per_byte", "bits_per_byte", "false")}


def heldout_texts(data_dir: str) -> list[str]:
    """The documents of a prepared dataset's validation split, decoded with its tokenizer."""
    meta = D.load_meta(data_dir)
    return documents_from_tokens(D.load_tokenizer(data_dir), np.asarray(D.load_tokens(data_dir, "val")),
                                 meta["sep_id"])


def write_tasks(data_dir: str, out: Path, n_prompts: int = 200, n_docs: int = 20, min_words: int = 20) -> dict:
    """The three task YAMLs and their JSONL data under `out`; returns the number of documents of each."""
    texts = heldout_texts(data_dir)
    prompts = []
    for para in paragraphs(texts, min_words):
        split = split_last_word(para)
        if split is not None:
            prompts.append({"context": split[0], "target": f" {split[1]}"})
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise UserError(f"{data_dir}: no held-out paragraph of >= {min_words} words ends in a word, so there is no "
                        "last-word prompt; use a larger validation split (data.val_fraction)")
    stop = [{"context": p["context"], "target": f" {w}" if w.isalpha() else w} for p in prompts for w in STOPWORDS]
    docs = [{"text": t} for t in texts[:n_docs]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("lastword", prompts), ("stopword", stop), ("heldout", docs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "utils.py").write_text(_STOPWORD_UTILS)
    (out / "sparsescale_lastword.yaml").write_text(_task_yaml(
        "sparsescale_lastword", out / "lastword.jsonl", "loglikelihood", "{{context}}", "{{target}}",
        ["perplexity", "acc"]))
    (out / "sparsescale_stopword.yaml").write_text(_task_yaml(
        "sparsescale_stopword", out / "stopword.jsonl", "loglikelihood", "{{context}}", "{{target}}",
        ["stopword_prob"], "process_results: !function utils.stopword_prob\n"))
    (out / "sparsescale_heldout.yaml").write_text(_task_yaml(
        "sparsescale_heldout", out / "heldout.jsonl", "loglikelihood_rolling", "", "{{text}}",
        ["word_perplexity", "bits_per_byte"]))
    return {"lastword": len(prompts), "stopword": len(stop), "heldout": len(docs)}


# ----------------------------------------------------------------------------------------------------------

def evaluate(model_dir: str, data_dir: str, n_prompts: int = 200, n_docs: int = 20, batch_size: int = 16,
             device: str = "cpu", limit: int | None = None) -> dict:
    """lm-eval's simple_evaluate on the three local tasks; the content of lmeval.json."""
    import lm_eval  # deferred on purpose: optional (the dev extra) and slow to import

    if not (Path(data_dir) / "meta.json").is_file():
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json): pass the folder `sparsescale "
                        "prepare` wrote (results/data/NAME)")
    lm = SparseScaleLM(model_dir, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="sparsescale-lmeval-") as tmp:
        counts = write_tasks(data_dir, Path(tmp), n_prompts, n_docs)
        res = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=TaskManager(include_path=tmp),
                              num_fewshot=0, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    results = res["results"]
    scores = {col: results[task].get(key) for (task, key), col in SCORES.items()}
    scores["lastword_n"] = min(counts["lastword"], limit or counts["lastword"])
    bad = [k for k, v in scores.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise UserError(f"lm-eval gave no finite {', '.join(bad)} for {model_dir}: {json.dumps(results)[:500]}")
    return {"model": str(model_dir), "data": str(data_dir), "scores": scores, "tasks": counts,
            "lm_eval_results": results, "qsparse": getattr(lm.model.config, "qsparse", None),
            "training": M.training_info(model_dir), **M.param_counts(lm.model),
            "versions": {**versions(), "lm_eval": lm_eval.__version__}}


# ----------------------------------------------------------------------------------------------------------
# figure

def plot_accuracy(runs: pd.DataFrame):
    """Last-word accuracy against N (log axis), one line per S, one panel per precision."""
    from matplotlib.ticker import NullFormatter  # deferred: matplotlib only for the figure

    from sparsescale.plots import N_LABEL, figure_grid, s_colors, s_label  # deferred: matplotlib

    col = "lmeval_lastword_acc"
    if col not in runs.columns or runs[col].isna().all():
        raise UserError("runs.csv has no lmeval_lastword_acc column: run `sparsescale lm-eval` on the runs "
                        "(lmeval.enabled: true in the config) and aggregate again")
    ok = runs[runs[col].notna() & (runs.get("mode", "scratch") == "scratch")]
    precs = sorted(ok["precision"].astype(str).unique())
    fig, axes = figure_grid(1, len(precs), (4.2 * len(precs), 3.4))
    colors = s_colors(sorted(ok["sparsity"].unique()))
    for ax, prec in zip(axes[0], precs):
        sub = ok[ok["precision"].astype(str) == prec]
        for s, g in sub.groupby("sparsity"):
            g = g.groupby("n_params", as_index=False)[col].mean().sort_values("n_params")
            ax.plot(g["n_params"], g[col], "o-", color=colors[s], label=s_label(s))
        ax.set_xscale("log")
        ns = sorted(sub["n_params"].unique())
        ax.set_xticks(ns, [f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" for n in ns])  # the sizes run
        ax.xaxis.set_minor_formatter(NullFormatter())
        top = max(0.05, 1.15 * float(ok[col].max()))  # accuracy: from 0 (points at 0 stay visible), room above
        ax.set_ylim(-0.03 * top, top)
        ax.set_xlabel(N_LABEL)
        ax.set_title("full precision" if prec == "fp" else "BitNet b1.58")
    axes[0][0].set_ylabel("last-word accuracy (lm-eval, held-out)")
    axes[0][-1].legend(fontsize=8)
    return fig


def save_accuracy_figure(runs_csv: str, out: str) -> None:
    """plot_accuracy of a runs.csv, built and saved under the figures' theme, written atomically."""
    from sparsescale.plots import PNG_METADATA, theme  # deferred: matplotlib only for the figure

    with theme():
        fig = plot_accuracy(pd.read_csv(runs_csv))
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=150, metadata=PNG_METADATA)


# ----------------------------------------------------------------------------------------------------------
# CLI

def cli_lmeval(argv: list[str]) -> int:
    if argv[:1] == ["figure"]:
        p = argparse.ArgumentParser(prog="sparsescale lm-eval figure", description=plot_accuracy.__doc__)
        p.add_argument("runs", help="runs.csv from `sparsescale aggregate` (with lmeval_* columns)")
        p.add_argument("--out", required=True, help="PNG to write")
        a = p.parse_args(argv[1:])
        if not Path(a.runs).is_file():
            raise UserError(f"{a.runs} does not exist: run `sparsescale aggregate` first")
        save_accuracy_figure(a.runs, a.out)
        print(f"wrote {a.out}")
        return 0
    p = argparse.ArgumentParser(prog="sparsescale lm-eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (results/runs/{run_id}/model)")
    p.add_argument("--data", required=True, help="prepared dataset (results/data/NAME): its held-out split")
    p.add_argument("--out", required=True, help="lmeval.json to write")
    p.add_argument("--prompts", type=int, default=200, help="last-word prompts (and stopword contexts)")
    p.add_argument("--docs", type=int, default=20, help="held-out documents for the rolling loglikelihood")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task (lm-eval --limit)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = evaluate(a.model, a.data, a.prompts, a.docs, a.batch_size,
                   device="cuda" if torch.cuda.is_available() else "cpu", limit=a.limit)
    write_json(a.out, res)
    s = res["scores"]
    print(f"{a.model}: last-word acc {s['lastword_acc']:.3f} ({s['lastword_n']} prompts), stopword prob "
          f"{s['stopword_prob']:.3f}, held-out word perplexity {s['heldout_word_perplexity']:.1f}", file=sys.stderr)
    return 0
