"""lm-evaluation-harness as the evaluation client: the registered `sparsescale` model type on local tasks made
from the held-out split gives the numbers the super-weight probes compute by hand on the sparse/ternary model
as trained (not the dense network); aggregate adds the scores to runs.csv; the accuracy figure is drawn."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsescale import aggregate as A
from sparsescale import data as D
from sparsescale import lmeval as L
from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.superweight import probes as P

CORPUS = Path(__file__).parent / "fixtures" / "english.jsonl"
N_PROMPTS, N_DOCS = 24, 3


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A prepared fixture corpus, a ternary S=0.6 model (random weights, context 4096 so nothing is truncated)
    and lm-eval's results on it."""
    base = tmp_path_factory.mktemp("lmeval")
    data = base / "data"
    D.prepare(D.files_corpus([str(CORPUS)]), data, vocab_size=512, val_fraction=0.1)
    tok = D.load_tokenizer(data)
    model = Q.convert(M.build("d1", len(tok), max_seq_len=4096, seed=0), 0.6, weight_bits="1.58", act_bits=8)
    M.save(model, base / "model", tokenizer=tok)
    res = L.evaluate(str(base / "model"), str(data), n_prompts=N_PROMPTS, n_docs=N_DOCS, batch_size=8)
    return {"base": base, "data": data, "res": res, "tok": tok}


def by_hand(model_dir, data, tok) -> dict:
    """The probes of the super-weight code (another implementation) on the same held-out paragraphs."""
    model = M.load(model_dir, dtype=torch.float32).eval()
    texts = L.heldout_texts(str(data))
    prompts = P.last_word_prompts(tok, texts, n=N_PROMPTS, max_context_tokens=100_000)
    probes = P.prompt_probes(model, prompts, P.stopword_ids(tok))
    lls = []
    with torch.no_grad():
        for p in prompts:
            logp = model(input_ids=torch.tensor([p.context + p.target])).logits.float().log_softmax(-1)[0]
            c = len(p.context)
            lls.append(sum(float(logp[c - 1 + i, t]) for i, t in enumerate(p.target)))
    return {"n": len(prompts), "acc": probes["last_word_accuracy"], "perplexity": math.exp(-np.mean(lls)),
            "stopword_prob": float(np.mean(list(probes["stopword_prob"].values()))), "n_stop": len(probes["stopword_prob"])}


def test_harness_scores_equal_the_probes_on_the_sparse_model(evaluated):
    res, s = evaluated["res"], evaluated["res"]["scores"]
    ref = by_hand(evaluated["base"] / "model", evaluated["data"], evaluated["tok"])
    assert res["tasks"] == {"lastword": N_PROMPTS, "stopword": 3 * N_PROMPTS, "heldout": N_DOCS}
    assert ref["n"] == N_PROMPTS and ref["n_stop"] == 3  # every stopword is one token: same quantity
    assert s["lastword_n"] == N_PROMPTS
    assert s["lastword_acc"] == ref["acc"]
    assert s["lastword_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert s["stopword_prob"] == pytest.approx(ref["stopword_prob"], rel=1e-5)
    assert res["qsparse"]["sparsity"] == 0.6 and res["qsparse"]["weight_bits"] == "1.58"
    assert 0 < s["heldout_bits_per_byte"] < 20 and s["heldout_word_perplexity"] > 1
    assert res["versions"]["lm_eval"].startswith("0.4.")


def test_the_dense_network_scores_differently(evaluated):
    """What plain `hf` loading would evaluate: the same weights without Q-Sparse give another perplexity."""
    base = evaluated["base"]
    dense = AutoModelForCausalLM.from_pretrained(str(base / "model"), dtype=torch.float32).eval()
    prompts = P.last_word_prompts(evaluated["tok"], L.heldout_texts(str(evaluated["data"])), n=N_PROMPTS,
                                  max_context_tokens=100_000)
    with torch.no_grad():
        lls = [float(dense(input_ids=torch.tensor([p.context + p.target])).logits.log_softmax(-1)[0][
            torch.arange(len(p.context) - 1, len(p.context) - 1 + len(p.target)), torch.tensor(p.target)].sum())
            for p in prompts]
    assert abs(math.exp(-np.mean(lls)) / evaluated["res"]["scores"]["lastword_perplexity"] - 1) > 1e-3


def test_aggregate_adds_the_scores_and_the_figure_draws_them(evaluated, tmp_path):
    run = tmp_path / "runs" / "d1-s0.60-b1.58-seed0"
    run.mkdir(parents=True)
    (run / "final.json").write_text(json.dumps({"run_id": run.name, "n_params": 13408, "sparsity": 0.6,
                                                "precision": "1.58", "val_loss": 5.0, "mode": "scratch"}))
    (run / "lmeval.json").write_text(json.dumps(evaluated["res"]))
    runs, _ = A.aggregate([run])
    assert runs.loc[0, "lmeval_lastword_acc"] == evaluated["res"]["scores"]["lastword_acc"]
    assert runs.loc[0, "lmeval_stopword_prob"] == evaluated["res"]["scores"]["stopword_prob"]
    # the figure: a 2 x 2 x 2 grid (N x S x precision) of accuracies
    grid = pd.DataFrame([{"run_id": f"{n}-{s}-{p}", "n_params": n, "sparsity": s, "precision": p, "mode": "scratch",
                          "lmeval_lastword_acc": 0.1 + 0.05 * i} for i, (n, s, p) in
                         enumerate((n, s, p) for n in (1e4, 1e5) for s in (0.0, 0.5) for p in ("fp", "1.58"))])
    grid.to_csv(tmp_path / "runs.csv", index=False)
    L.save_accuracy_figure(str(tmp_path / "runs.csv"), str(tmp_path / "fig.png"))
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    fig = L.plot_accuracy(grid)
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]  # one line per S in each precision's panel
