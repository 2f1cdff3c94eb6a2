"""`sparsescale bench train-step`: time of one training step (forward + backward + AdamW) of a Q-Sparse model
divided by the dense model of the same shape, measured side by side (interleaved) in one run.

Shapes: `--shapes d_model x layers x seq x batch` (heads d_model/64), or `--sizes d1,d2,...` (the size table's
own widths, heads and FFN: the sweep's models) with `--seq`/`--batch`. Each precision also runs at S = 0
(`ratio_vs_s0`: the cost of top-K alone; for 1.58-bit that separates it from the quantizers' cost).
Goals: issue 2, <= 1.15x at S = 0.5 for d_model=512, seq 256, batch 8; issue 19, <= 1.10x at the sweep's
widths (d1-d4) on one thread.
"""

from __future__ import annotations

import argparse

import torch

from sparsescale.bench.timing import interleaved_median_ms
from sparsescale.config import PRECISIONS, ModelArgs
from sparsescale.errors import UserError
from sparsescale.validation import autocast
from sparsescale.io import write_json


def _step_fn(model, ids, opt, device):
    def step():
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train_step(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale bench train-step", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="512x4x256x8,256x4x256x8",
                   help="comma list of d_model x n_layers x seq x batch (default 512x4x256x8,256x4x256x8)")
    p.add_argument("--sizes", help="comma list of size names (e.g. d1,d2,d3,d4) instead of --shapes")
    p.add_argument("--seq", type=int, default=128, help="sequence length with --sizes (default 128)")
    p.add_argument("--batch", type=int, default=8, help="batch with --sizes (default 8)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, all cores); the sweep trains "
                   "on 1 (train.threads), so its goal is measured with --threads 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be >= 1: got {a.threads}")

    from sparsescale import model as M, qsparse as Q  # deferred: transformers costs seconds; --help stays fast
    from sparsescale.config import get_size

    if a.sizes:
        shapes = [(get_size(n.strip()), a.seq, a.batch) for n in a.sizes.split(",")]
    else:
        shapes = []
        for shape in a.shapes.split(","):
            d, nl, seq, bs = (int(v) for v in shape.lower().split("x"))
            shapes.append((ModelArgs(d_model=d, n_layers=nl, n_heads=max(1, d // 64),
                                     ffn_dim=int(32 * -(-8 * d // 3 // 32))), seq, bs))
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    rows = []
    print(f"device={a.device} threads={torch.get_num_threads()}")
    print(f"{'d_model':>7} {'layers':>6} {'seq':>4} {'batch':>5} {'variant':>14} {'dense ms':>9} {'qsparse ms':>10} "
          f"{'ratio':>6} {'vs S=0':>6}")
    for args, seq, bs in shapes:
        d, nl = args.d_model, args.n_layers
        ids = torch.randint(0, a.vocab_size, (bs, seq), device=a.device)
        variants = [(wb, s) for wb in PRECISIONS for s in [0.0, *a.sparsity]]
        fns = {}
        dense = M.build(args, a.vocab_size, max_seq_len=seq, seed=0).to(a.device)
        fns["dense"] = _step_fn(dense, ids, torch.optim.AdamW(dense.parameters(), lr=1e-4), a.device)
        for wb, s in variants:
            if wb == "fp" and s == 0.0:
                continue  # = dense
            m = M.build(args, a.vocab_size, max_seq_len=seq, seed=0).to(a.device)
            Q.convert(m, s, weight_bits=wb, act_bits=8 if wb == "1.58" else None)
            fns[f"{wb}/S={s}"] = _step_fn(m, ids, torch.optim.AdamW(m.parameters(), lr=1e-4), a.device)
        ms = interleaved_median_ms(fns, repeats=a.repeats, device=a.device)
        for name in fns:
            wb, s = name.split("/S=") if "/S=" in name else ("fp", "0.0")
            if name == "dense" or float(s) == 0.0:
                continue
            s0 = ms["dense"] if wb == "fp" else ms[f"{wb}/S=0.0"]
            row = {"d_model": d, "n_layers": nl, "seq": seq, "batch": bs, "variant": name, "device": a.device,
                   "dense_ms": ms["dense"], "qsparse_ms": ms[name], "ratio": ms[name] / ms["dense"],
                   "s0_ms": s0, "ratio_vs_s0": ms[name] / s0}
            rows.append(row)
            print(f"{d:>7} {nl:>6} {seq:>4} {bs:>5} {name:>14} {row['dense_ms']:>9.1f} {row['qsparse_ms']:>10.1f} "
                  f"{row['ratio']:>6.2f} {row['ratio_vs_s0']:>6.2f}")
    if a.out:
        write_json(a.out, {"rows": rows})
    return 0
