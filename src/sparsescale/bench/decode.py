"""`sparsescale bench decode`: batch-1 decode tokens/s through HF `generate` (greedy, KV cache), side by side:

    dense        the unconverted model (plain matmuls), its decoder-layer weights in huge pages like the
                 sparse side's (`kernels.hugepage_linears`): the framework baseline
    kernel_s0    the sparse GEMV reading every row (a model converted at S = 0): the own-kernel baseline
    topk_dense   the Q-Sparse model at S, normal forward (top-K, then a dense matmul): what training runs
    sparse       the same model with `kernels.enable_sparse_decode` (exact top-K + sparse GEMV)
    threshold    (--threshold) calibrated magnitude thresholds instead of top-K: an approximation
    fused        the sparse model through `kernels.fused_generate`: each decoder layer one compiled call
                 (fp32, numba; the HF path spends about half of a token outside the GEMVs)
    fused_s0     the same step on the S = 0 model (the own kernel reading every row)
    fused_blas   the same step with every projection dense by BLAS: the dense baseline without HF's overhead

`speedup` is sparse against the faster of the two baselines (`baseline` names it); `speedup_vs_dense` against
the framework. `fused_speedup` is fused against the fastest of all four dense baselines (dense, kernel_s0,
fused_s0, fused_blas; `fused_baseline` names it): the like-for-like number, since the fused step removes the
same overhead from its dense baselines. The dense model has its own weights; every converted model shares one set, which the sparse
path owns in its W^T layout (no second copy for fp/bf16: `extra_bytes` 0), so prefill and the top-K + dense
variant multiply by the same memory. Weight memory per variant and the process's peak RSS are reported next
to the speed.

Decode time per token = (t(generate N new tokens) - t(generate 1)) / (N - 1), so the prefill is excluded;
all variants are timed interleaved in one run (medians). Random weights: speed does not depend on them.
The LM head and embeddings stay dense (Q-Sparse does not sparsify them), which caps the end-to-end gain
below 1/(1-S); the `dense_share_head` column says how much of the weight bytes they are.
Goal (issue 17): >= 1.6x the faster baseline at S = 0.5 on CPU for the 300M flavor, at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource

import torch

from sparsescale.bench.gemv import DTYPES, write_csv, machine
from sparsescale.bench.timing import interleaved_median_ms
from sparsescale.config import check_sparsity
from sparsescale.io import versions, write_json

COLUMNS = ("sparsity", "dense_tok_s", "sparse_tok_s", "speedup",  # the four the issue asks for, then extras
           "baseline", "baseline_tok_s", "speedup_vs_dense",
           "topk_dense_tok_s", "topk_dense_speedup", "kernel_s0_tok_s", "sparse_vs_kernel_s0", "ideal",
           "threshold_tok_s", "threshold_speedup", "threshold_sparsity_measured", "sparse_sparsity_measured",
           "tokens_equal", "tokens_equal_prefix", "size", "dtype", "threads", "kernel_threads", "new_tokens",
           "vocab_size", "dense_share_head", "extra_bytes", "dense_weight_bytes", "sparse_weight_bytes",
           "peak_rss_bytes", "fused_tok_s", "fused_s0_tok_s", "fused_blas_tok_s", "fused_speedup", "fused_baseline",
           "fused_tokens_equal")
FUSED = ("fused", "fused_s0", "fused_blas")


def _generate(model, ids, n):
    def run():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=0)
    return run


def bench_decode(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="300M", help="model size from the size table (default 300M)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed call (>= 2)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threshold", action="store_true", help="also time calibrated-threshold mode (an approximation)")
    p.add_argument("--backend", default="auto", help="kernels backend: auto, numba, torch, triton")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernel vs cuBLAS)")
    p.add_argument("--threads", type=int, help="torch threads for every variant (default: torch's current)")
    p.add_argument("--kernel-threads", type=int, help="numba threads of the sparse GEMV (default: = torch's)")
    p.add_argument("--quick", action="store_true", help="size d12, 8 new tokens, 2 repeats: a short run")
    p.add_argument("--out", help="write the rows here (CSV); machine and versions go to the same name + .json")
    a = p.parse_args(argv)

    from sparsescale import kernels as K, model as M, qsparse as Q  # deferred: numba thread settings after --threads

    if a.threads:
        torch.set_num_threads(a.threads)
    size, n_new, repeats = ("d12", 8, 2) if a.quick else (a.size, max(2, a.new_tokens), a.repeats)
    sparsities = [check_sparsity(s, "--sparsity") for s in a.sparsity]
    dtype = DTYPES[a.dtype]
    info = machine()
    print(f"cpu: {info['cpu_model']} ({info['cpu_count']} cores), torch threads {info['torch_threads']}, "
          f"kernel threads {a.kernel_threads or info['torch_threads']}, load average {info['loadavg'][0]:.1f} "
          "(a shared machine: other jobs run alongside)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (1, a.prompt_len), generator=g).to(a.device)
    dense = M.build(size, a.vocab_size, seed=0).to(dtype).to(a.device).eval()
    counts = M.param_counts(dense)
    head_share = 1.0 - counts["n_params"] / counts["n_params_total"]
    print(f"size {size}: N = {counts['n_params']:,} non-embedding parameters, {a.dtype}; embeddings + LM head "
          f"{head_share:.1%} of the weights (dense in every variant); {n_new} new tokens per call, batch 1")

    base = copy.deepcopy(dense)  # the converted models' own weights (the sparse path moves them to W^T)
    if a.device == "cpu":
        K.hugepage_linears(dense)  # the dense baseline's weights in huge pages, as the sparse side's W^T

    def converted(s):  # new modules sharing `base`'s parameters (no copy)
        return Q.convert(copy.deepcopy(base, memo={id(p): p for p in base.parameters()}), s)

    s0 = converted(0.0)
    K.enable_sparse_decode(s0, backend=a.backend, threads=a.kernel_threads)
    # the fused step runs fp32 on numba; elsewhere its columns are empty
    fused = a.dtype == "fp32" and a.device == "cpu" and s0._sparse_decode.backend == "numba"
    rows = []
    for s in sparsities:
        sparse = converted(s)
        decode = K.enable_sparse_decode(sparse, backend=a.backend, threads=a.kernel_threads)
        fns = {}
        variants = {"dense": (dense, None), "topk_dense": (sparse, decode.paused), "sparse": (sparse, None),
                    "kernel_s0": (s0, None)}
        if fused:
            variants.update({"fused": (sparse, "sparse"), "fused_s0": (s0, "sparse"), "fused_blas": (s0, "blas")})
        if a.threshold:
            thr_model = converted(s)
            calib = torch.randint(0, a.vocab_size, (4, 64), generator=g).to(a.device)
            thr = K.enable_sparse_decode(thr_model, "threshold", a.backend, K.calibrate_thresholds(thr_model, calib),
                                         threads=a.kernel_threads)
            variants["threshold"] = (thr_model, None)
        for name, (model, ctx) in variants.items():
            for n in (1, n_new):
                if name in FUSED:
                    fns[(name, n)] = (lambda m=model, n=n, how=ctx: K.fused_generate(m, ids, n, a.kernel_threads, how))
                    continue
                run = _generate(model, ids, n)
                if ctx is not None:
                    run = (lambda r=run, c=ctx: _in(c, r))
                fns[(name, n)] = run
        outs = {name: fns[(name, n_new)]() for name in variants}  # also the warm-up / compile
        ms = interleaved_median_ms(fns, repeats=repeats, warmup=1, device=a.device, rewarm=True)
        tok_s = {name: (n_new - 1) / max(1e-9, (ms[(name, n_new)] - ms[(name, 1)]) / 1e3) for name in variants}
        decode_stats = decode.stats()
        base_name = "dense" if tok_s["dense"] >= tok_s["kernel_s0"] else "kernel_s0"
        row = {"sparsity": s, "dense_tok_s": tok_s["dense"], "sparse_tok_s": tok_s["sparse"],
               "speedup": tok_s["sparse"] / tok_s[base_name], "baseline": base_name,
               "baseline_tok_s": tok_s[base_name], "speedup_vs_dense": tok_s["sparse"] / tok_s["dense"],
               "topk_dense_tok_s": tok_s["topk_dense"],
               "topk_dense_speedup": tok_s["topk_dense"] / tok_s["dense"], "kernel_s0_tok_s": tok_s["kernel_s0"],
               "sparse_vs_kernel_s0": tok_s["sparse"] / tok_s["kernel_s0"], "ideal": 1.0 / (1.0 - s),
               "threshold_tok_s": tok_s.get("threshold", float("nan")),
               "threshold_speedup": tok_s.get("threshold", float("nan")) / tok_s["dense"],
               "threshold_sparsity_measured": thr.stats()["sparsity_measured"] if a.threshold else float("nan"),
               "sparse_sparsity_measured": decode_stats["sparsity_measured"],
               "tokens_equal": bool(torch.equal(outs["sparse"], outs["topk_dense"])),
               "tokens_equal_prefix": _equal_prefix(outs["sparse"], outs["topk_dense"], ids.shape[1]),
               "size": size, "dtype": a.dtype, "threads": torch.get_num_threads(),
               "kernel_threads": a.kernel_threads or torch.get_num_threads(), "new_tokens": n_new,
               "vocab_size": a.vocab_size, "dense_share_head": head_share, "extra_bytes": decode.extra_bytes,
               "dense_weight_bytes": _param_bytes(dense), "sparse_weight_bytes": decode.weight_bytes,
               "peak_rss_bytes": _peak_rss(), **_fused_columns(tok_s, outs)}
        rows.append(row)
        print(f"S={s:.2f}  sparse {tok_s['sparse']:.2f} tok/s = {row['speedup']:.2f}x the faster baseline "
              f"({base_name} {row['baseline_tok_s']:.2f} tok/s); weights: dense {_mib(row['dense_weight_bytes'])}, "
              f"sparse {_mib(row['sparse_weight_bytes'])} (extra {_mib(decode.extra_bytes)}); process peak RSS "
              f"{_mib(row['peak_rss_bytes'])}")
        print(f"        dense {tok_s['dense']:.2f} tok/s | top-K + dense matmul {tok_s['topk_dense']:.2f} tok/s "
              f"({row['topk_dense_speedup']:.2f}x) | sparse GEMV ({decode.backend}) {tok_s['sparse']:.2f} tok/s "
              f"({row['speedup']:.2f}x)" + (f" | threshold {row['threshold_tok_s']:.2f} tok/s "
                                            f"({row['threshold_speedup']:.2f}x, measured S "
                                            f"{row['threshold_sparsity_measured']:.2f})" if a.threshold else ""))
        print(f"        sparse GEMV at S=0 {tok_s['kernel_s0']:.2f} tok/s: sparse / S=0 = "
              f"{row['sparse_vs_kernel_s0']:.2f}x "
              f"(ideal {row['ideal']:.2f}x for the sparsified weights; embeddings, LM head, attention stay)")
        print(f"        tokens equal (sparse vs top-K dense): {row['tokens_equal']} (first "
              f"{row['tokens_equal_prefix']} of {n_new} new tokens agree)")
        if fused:
            print(f"        fused step: sparse {row['fused_tok_s']:.2f} tok/s = {row['fused_speedup']:.2f}x the fastest "
                  f"dense ({row['fused_baseline']}); own kernel at S=0 {row['fused_s0_tok_s']:.2f}, BLAS "
                  f"{row['fused_blas_tok_s']:.2f} tok/s; tokens equal to top-K dense: {row['fused_tokens_equal']}")
        del sparse, decode, fns, variants, outs
    if a.out:
        write_csv(a.out, rows, COLUMNS)
        write_json(f"{os.path.splitext(a.out)[0]}.json", {
            "benchmark": "decode", "backend": a.backend, "device": a.device, "repeats": repeats,
            "prompt_len": a.prompt_len,
            "machine": info, "loadavg_end": os.getloadavg(), "rows": rows, "versions": versions()})
        print(f"wrote {a.out}")
    return 0


def _fused_columns(tok_s: dict, outs: dict) -> dict:
    """The fused step's columns: its speed against the fastest dense baseline, HF's or its own."""
    if "fused" not in tok_s:
        return {"fused_tok_s": float("nan"), "fused_s0_tok_s": float("nan"), "fused_blas_tok_s": float("nan"),
                "fused_speedup": float("nan"), "fused_baseline": "", "fused_tokens_equal": ""}
    base = max(("dense", "kernel_s0", "fused_s0", "fused_blas"), key=lambda n: tok_s[n])
    return {"fused_tok_s": tok_s["fused"], "fused_s0_tok_s": tok_s["fused_s0"], "fused_blas_tok_s": tok_s["fused_blas"],
            "fused_speedup": tok_s["fused"] / tok_s[base], "fused_baseline": base,
            "fused_tokens_equal": bool(torch.equal(outs["fused"], outs["topk_dense"]))}


def _equal_prefix(a: torch.Tensor, b: torch.Tensor, start: int) -> int:
    """How many generated tokens (after the prompt) agree before the first difference."""
    diff = (a[0, start:] != b[0, start:]).nonzero()
    return int(diff[0, 0]) if len(diff) else a.shape[1] - start


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def _peak_rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _in(ctx, run):
    with ctx():
        return run()
