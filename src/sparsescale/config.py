"""Model sizes ("flavors") and the parameter-count convention, written once.

Features
- A named size table: tiny CPU sizes `d1`..`d12` derived from one depth knob (nanochat style:
  n_layers = depth, d_model = 32 * depth, head_dim = 32, GLU width = 8/3 d_model rounded up to 32),
  and the Q-Sparse paper's shapes `300M`, `700M`, `1.3B`, `7B` (hidden 1024/1536/2048/4096,
  GLU 2730/4096/5460/11008, 24/24/24/32 layers).
- `count_params(size, vocab_size)`: the convention used everywhere —
    n_params       = N = non-embedding parameters (attention + GLU + RMSNorm weights; no embedding, no LM head)
    n_params_total = N + input embedding + LM head (untied)
    n_active       = parameters touched per token at sparsity S: every projection reads only
                     K = round((1 - S) D_in) of its D_in input columns.
  It is checked against `numel()` of the built model for every entry of the table (tests).
- `cli_sizes`: `sparsescale sizes` prints the table.
- `TrainConfig`: everything that defines one training run, one docstring per field (`field_docs` reads them:
  they are the `sparsescale train --help` text); `MODES`, `PRECISIONS` (the one definition of the precisions).
- The run id, defined once: `RUN_ID_PATTERN` (with wildcards, for the workflow's paths), `run_id(...)` and
  `run_id_suffix(mode, block)`; `TrainConfig.run_id` and the Snakemake rules both use them.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import textwrap
from dataclasses import dataclass, fields

from sparsescale.errors import UserError


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama-style decoder; everything else about the model is standard HF Llama."""

    d_model: int
    """hidden size (residual stream width)"""
    n_layers: int
    """number of decoder layers"""
    n_heads: int
    """attention heads; head_dim = d_model / n_heads"""
    ffn_dim: int
    """GLU intermediate size (gate/up output, down input)"""
    n_kv_heads: int | None = None
    """key/value heads (grouped-query attention); None = n_heads"""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


def flavor_from_depth(depth: int, aspect: int = 32, head_dim: int = 32) -> ModelArgs:
    """The depth knob: one integer sets width, layers, heads and GLU width."""
    d_model = aspect * depth
    return ModelArgs(d_model=d_model, n_layers=depth, n_heads=max(1, d_model // head_dim),
                     ffn_dim=_round_up(8 * d_model / 3, 32))


SIZES: dict[str, ModelArgs] = {f"d{depth}": flavor_from_depth(depth) for depth in range(1, 13)}
SIZES.update({
    # the Q-Sparse paper's shapes (head_dim 128)
    "300M": ModelArgs(d_model=1024, n_layers=24, n_heads=8, ffn_dim=2730),
    "700M": ModelArgs(d_model=1536, n_layers=24, n_heads=12, ffn_dim=4096),
    "1.3B": ModelArgs(d_model=2048, n_layers=24, n_heads=16, ffn_dim=5460),
    "7B": ModelArgs(d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008),
})


def get_size(name: str) -> ModelArgs:
    if name not in SIZES:
        raise UserError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)} (sparsescale sizes)")
    return SIZES[name]


def check_sparsity(sparsity: float, where: str = "sparsity") -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be a number in [0, 1): got {sparsity!r}") from None
    if not 0.0 <= s < 1.0:
        raise UserError(f"{where} must be in [0, 1): got {sparsity!r}; use e.g. 0.5 for 50% of inputs zeroed")
    return s


def kept(d_in: int, sparsity: float) -> int:
    """K = round((1 - S) D_in), at least 1: the number of inputs a projection keeps per token."""
    return max(1, min(d_in, int(round((1.0 - sparsity) * d_in))))


def linear_shapes(args: ModelArgs) -> list[tuple[str, int, int]]:
    """(role, d_in, d_out) of every projection of one decoder layer."""
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    d, f = args.d_model, args.ffn_dim
    return [("q", d, q), ("k", d, kv), ("v", d, kv), ("o", q, d), ("gate", d, f), ("up", d, f), ("down", f, d)]


def count_params(args: ModelArgs | str, vocab_size: int, sparsity: float = 0.0) -> dict[str, int]:
    """The parameter-count convention (see the module docstring)."""
    if isinstance(args, str):
        args = get_size(args)
    shapes = linear_shapes(args)
    per_layer_linear = sum(i * o for _, i, o in shapes)
    per_layer_active = sum(kept(i, sparsity) * o for _, i, o in shapes)
    norms_per_layer = 2 * args.d_model  # input_layernorm + post_attention_layernorm (RMSNorm weights)
    n_params = args.n_layers * (per_layer_linear + norms_per_layer) + args.d_model  # + final norm
    n_active = args.n_layers * (per_layer_active + norms_per_layer) + args.d_model
    embedding = 2 * vocab_size * args.d_model  # input embedding + untied LM head
    return {"n_params": n_params, "n_params_total": n_params + embedding, "n_active": n_active,
            "n_embedding": embedding}


def cli_sizes(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale sizes", description=__doc__.split("\n")[0])
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary for n_params_total (default 8192)")
    a = p.parse_args(argv)
    print(f"{'size':>6} {'d_model':>7} {'layers':>6} {'heads':>5} {'ffn':>6} {'N (non-emb)':>14} {'N total':>14}")
    for name, args in SIZES.items():
        c = count_params(args, a.vocab_size)
        print(f"{name:>6} {args.d_model:>7} {args.n_layers:>6} {args.n_heads:>5} {args.ffn_dim:>6} "
              f"{c['n_params']:>14,} {c['n_params_total']:>14,}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# One training run

MODES = ("scratch", "continue", "finetune")
PRECISIONS = ("fp", "1.58")  # the one definition: weight precisions of the sweep (fp, BitNet b1.58)

RUN_ID_PATTERN = "{size}-s{s}-b{prec}-seed{seed}"
"""The run id with Snakemake-style wildcards ({s}: the sparsity with two decimals); `run_id` fills it in and
`run_id_suffix` appends the N:M block and the mode. The workflow's rules build their paths from these."""


def run_id_suffix(mode: str = "scratch", block: int | None = None) -> str:
    """What follows RUN_ID_PATTERN: `-nm{block}` for Block Q-Sparse, then `-{mode}` unless scratch."""
    return (f"-nm{block}" if block else "") + ("" if mode == "scratch" else f"-{mode}")


def run_id(size: str, sparsity: float | str, precision: str, seed: int | str, mode: str = "scratch",
           block: int | None = None) -> str:
    """Readable and stable, e.g. d4-s0.60-b1.58-seed0, d4-s0.50-bfp-seed0-nm8-continue."""
    return RUN_ID_PATTERN.format(size=size, s=f"{float(sparsity):.2f}", prec=precision, seed=seed) \
        + run_id_suffix(mode, block)


def same_sparsity(a: float | str, b: float | str) -> bool:
    """Whether two sparsities of a config are the same grid value (floats from YAML, strings from wildcards)."""
    return abs(float(a) - float(b)) < 1e-9


def sweep_seeds(sweep: dict, sparsity: float, precision: str) -> list[int]:
    """The seeds a sweep (config `sweep`) runs at one sparsity and precision: sweep.seeds, then those of every
    sweep.extra_seeds entry at that sparsity whose `precision` (default: every precision of the sweep) names it.
    A seed listed twice is returned twice: the workflow's config check refuses such a config."""
    extra = [
        seed
        for e in sweep.get("extra_seeds") or []
        if same_sparsity(e["sparsity"], sparsity) and precision in (e.get("precision") or sweep["precision"])
        for seed in e["seeds"]
    ]
    return list(sweep["seeds"]) + extra


def lr_factor(train: dict, sparsity: float, precision: str) -> float:
    """The factor on train.lr of the runs at one sparsity and precision (config `train.lr_factor`): the `factor` of
    the entry that names this sparsity and (by its optional `precision`, default every precision) this precision,
    else 1. The workflow's config check refuses two entries for the same sparsity and precision."""
    for e in train.get("lr_factor") or []:
        if same_sparsity(e["sparsity"], sparsity) and precision in (e.get("precision") or [precision]):
            return float(e["factor"])
    return 1.0


@dataclass
class TrainConfig:
    """Everything that defines one run; `config.json` of the run is this, verbatim."""

    data: str = "results/data/builtin"
    """dataset directory written by `sparsescale prepare`"""
    out: str | None = None
    """run directory; default results/runs/{run_id}"""
    size: str = "d2"
    """model size name from the size table (`sparsescale sizes`)"""
    sparsity: float = 0.0
    """target sparsity S of every projection input (top-K keeps round((1-S) D_in))"""
    precision: str = "fp"
    """"fp" (full precision) or "1.58" (BitNet b1.58 ternary weights + 8-bit activations)"""
    block: int | None = None
    """N:M block size for Block Q-Sparse (None = per-token top-K over the whole input)"""
    rescale: bool = False
    """L2 re-scaling of the sparsified input (paper text; off in the official code)"""
    seed: int = 0
    """seed of initialisation and of the batch stream"""
    mode: str = "scratch"
    """scratch | continue (convert a dense checkpoint, keep training) | finetune (small lr from a checkpoint)"""
    init_from: str | None = None
    """checkpoint (ours or any HF Llama-style path) for continue / finetune"""
    hidden_act: str = "relu2"
    """FFN activation for models built from scratch (squared-ReLU GLU)"""
    seq_len: int = 256
    """tokens per sequence"""
    batch_size: int = 16
    """sequences per optimizer step (global, over all processes)"""
    micro_batch_size: int | None = None
    """sequences per forward/backward per process (gradient accumulation fills the batch); None = whole batch"""
    tokens: int | None = None
    """token budget; None = tokens_per_param x n_params"""
    tokens_per_param: float = 20.0
    """budget proportional to N (non-embedding parameters) when `tokens` is None"""
    lr: float = 3e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """cosine decay ends at lr x min_lr_ratio"""
    warmup_frac: float = 0.05
    """fraction of the steps used for linear warm-up"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """global gradient-norm clipping (0 = off)"""
    eval_every: int = 0
    """validation every this many steps (0 = 10 evaluations over the run)"""
    eval_tokens: int = 65536
    """validation tokens (fixed set from the start of the validation split)"""
    checkpoint_every: int = 0
    """checkpoint every this many steps (0 = 10 checkpoints over the run); always at the end"""
    keep_checkpoints: int = 2
    """checkpoints kept on disk (the previous one is the fallback for a corrupted latest)"""
    log_every: int = 10
    """train-loss logging interval in steps"""
    device: str = "auto"
    """auto | cpu | cuda"""
    compile: bool = False
    """torch.compile the model (CUDA only)"""
    threads: int | None = None
    """CPU threads for torch (None = torch default)"""
    distributed: str = "ddp"
    """ddp | fsdp when launched with torchrun on several processes"""
    debug_nan_at_step: int | None = None
    """fault injection for tests: force a NaN loss at this step"""

    def validate(self) -> "TrainConfig":
        get_size(self.size)
        check_sparsity(self.sparsity)
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}: got {self.precision!r}")
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}: got {self.mode!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise UserError(f"distributed must be 'ddp' or 'fsdp': got {self.distributed!r}")
        if self.mode != "scratch" and not self.init_from:
            raise UserError(f"mode={self.mode!r} needs init_from=PATH (a checkpoint to start from)")
        for name in ("seq_len", "batch_size", "eval_tokens", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer: got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0: got {self.lr}")
        if self.micro_batch_size is not None and (self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size):
            raise UserError(f"micro_batch_size must divide batch_size={self.batch_size}: got {self.micro_batch_size}")
        return self

    @property
    def run_id(self) -> str:
        """`run_id(size, sparsity, precision, seed, mode, block)`, e.g. d4-s0.60-b1.58-seed0."""
        return run_id(self.size, self.sparsity, self.precision, self.seed, self.mode, self.block)

    @property
    def out_dir(self) -> str:
        return self.out or f"results/runs/{self.run_id}"


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each field of a dataclass (`name: type = default` then a string), read from its source:
    the one source of the `sparsescale train` flags' --help text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    missing = [f.name for f in fields(cls) if f.name not in docs]
    if missing:
        raise AssertionError(f"{cls.__name__} fields without a docstring: {missing}")  # a programming error
    return docs
