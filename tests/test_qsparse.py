import numpy as np
import pytest
import torch

from sparsescale import model as M, qsparse as Q
from sparsescale.config import kept
from sparsescale.errors import UserError

VOCAB = 53


def _capture_inputs(model):
    """Record the transformed input of every QSparseLinear (what its matmul actually reads)."""
    seen = {}
    for name, m in Q.qsparse_linears(model):
        orig = m.sparsify_input

        def wrapped(x, _orig=orig, _name=name):
            out = _orig(x)
            seen[_name] = out.detach()
            return out

        m.sparsify_input = wrapped
    return seen


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_exactly_k_nonzeros_per_token_every_projection(s):
    torch.manual_seed(0)
    m = M.build("d2", VOCAB, hidden_act="silu", seed=0)  # silu: no natural zeros
    Q.convert(m, s)
    seen = _capture_inputs(m)
    m(torch.randint(0, VOCAB, (2, 9)))
    names = {n.rsplit(".", 1)[-1] for n, _ in Q.qsparse_linears(m)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # q/k/v share one input and so one sparsified tensor (computed once); likewise gate/up
    assert {n.rsplit(".", 1)[-1] for n in seen} == {"q_proj", "o_proj", "gate_proj", "down_proj"}
    for name, xs in seen.items():
        d = xs.shape[-1]
        nnz = (xs != 0).sum(-1)
        assert torch.all(nnz == kept(d, s)), (name, nnz.unique())


def test_kept_entries_are_the_largest():
    torch.manual_seed(0)
    x = torch.randn(5, 11, 64)
    y = Q.topk_sparsify(x, 20)
    kept_min = torch.where(y != 0, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(y == 0, x.abs(), -torch.inf).amax(-1)
    assert torch.all(kept_min > dropped_max)
    assert torch.equal(y[y != 0], x[y != 0])


def test_numba_and_torch_paths_agree_with_ties():
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5, -2.0, 1.0]])
    y = Q.topk_sparsify(x, 3)
    assert y.tolist() == [[1.0, -1.0, 0.0, 0.0, -2.0, 0.0]]  # the first ties by position are kept
    z = torch.randn(64, 100)
    assert torch.equal(Q.topk_sparsify(z, 37), Q._topk_torch(z, 37))
    w = torch.round(torch.randn(64, 100) * 2) / 2  # many ties at the threshold
    w[:8, :70] = 0.0  # rows where the threshold is 0
    for parallel in (False, True):
        keys_kernel, select_kernel = Q._get_numba_kernels(parallel)
        keys, nnz = np.empty((64, 100), np.int32), np.empty(64, np.int64)
        keys_kernel(w.numpy(), keys, nnz)
        assert nnz.tolist() == (w != 0).sum(-1).tolist()
        bits = w.abs().numpy().view(np.int32)
        assert np.array_equal(keys[bits != 0], bits[bits != 0])  # real magnitudes keep their bits
        assert np.array_equal(keys[:8, :70], np.tile(np.arange(1, 71, dtype=np.int32), (8, 1)))  # zeros: j + 1
        out = torch.empty_like(w)
        thr = torch.from_numpy(np.partition(np.abs(w.numpy()), 100 - 37, axis=1)[:, 100 - 37].copy())
        select_kernel(w.numpy(), thr.numpy().view(np.int32), nnz, 37, out.numpy())
        assert torch.all((out != 0).sum(-1) <= 37) and torch.all((out[8:] != 0).sum(-1) == 37)
        ref = w.clone()  # reference rule written out: keep |w| > t, then the first ties up to k
        for r in range(64):
            ties = 37 - int((w[r].abs() > thr[r]).sum())
            for j in range(100):
                if w[r, j].abs() < thr[r] or (w[r, j].abs() == thr[r] and (ties := ties - 1) < 0):
                    ref[r, j] = 0.0
        assert torch.equal(out, ref)


def test_zero_heavy_rows_select_by_the_same_rule():
    """ReLU^2's mostly-zero inputs (the down projection): zeros are keyed by position + 1, so the kept set is the
    torch rule's, ties, all-zero rows and rows with fewer than k non-zeros included, serial and parallel builds;
    a row whose k-th largest magnitude is a denormal as small as a stand-in takes the exact quickselect."""
    g = torch.Generator().manual_seed(0)
    for zeros in (0.0, 0.3, 0.75, 1.0):
        x = torch.round(torch.randn(96, 100, generator=g) * 2) / 2  # many ties at the threshold
        x[torch.rand(96, 100, generator=g) < zeros] = 0.0
        x[:4, 5:] = 0.0  # rows with fewer non-zeros than k
        x[4:8] = torch.from_numpy(np.arange(1, 101, dtype=np.int32).view(np.float32))  # denormals: bits 1..100
        x[5, 40:] = 0.0  # a denormal row with zeros: its k-th key is a stand-in or a real bit pattern <= D
        x[6, ::3] *= -1
        for k in (3, 37, 50, 80):
            ref = Q._topk_torch(x, k)
            assert torch.all((ref != 0).sum(-1) <= k)
            assert torch.equal(Q.topk_sparsify(x, k), ref), (zeros, k)
            for parallel in (False, True):
                keys_kernel, select_kernel = Q._get_numba_kernels(parallel)
                keys, nnz = np.empty((96, 100), np.int32), np.empty(96, np.int64)
                keys_kernel(x.numpy(), keys, nnz)
                thr = np.zeros(96, np.int32)
                rows = np.flatnonzero(nnz > k)
                thr[rows] = np.partition(keys[rows], 100 - k, axis=1)[:, 100 - k]
                assert np.all(thr[4:8][nnz[4:8] > k] <= 100)  # the denormal rows take the fallback
                out = torch.full_like(x, float("nan"))
                select_kernel(x.numpy(), thr, nnz, k, out.numpy())
                assert torch.equal(out, ref), (zeros, k, parallel)
    big = torch.randn(64, 1000, generator=g)
    big[torch.rand(64, 1000, generator=g) < 0.5] = 0.0  # quickselect rounds beyond the insertion-sort tail
    big[:8] = torch.from_numpy(np.random.default_rng(0).permutation(1000).astype(np.int32).view(np.float32))
    assert torch.equal(Q.topk_sparsify(big, 300), Q._topk_torch(big, 300))
    assert (Q.topk_sparsify(big, 300) != 0).sum().item() == 64 * 300  # denormal rows too (999 non-zeros each)


def test_block_nm_structure():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    y = Q.block_topk_sparsify(x, 16, kept(16, 0.5))
    assert torch.all((y.view(4, 4, 16) != 0).sum(-1) == 8)
    with pytest.raises(UserError, match="block=24 does not divide"):
        Q.block_topk_sparsify(x, 24, 12)


def test_ste_gradient_equals_upstream():
    lin = torch.nn.Linear(32, 8, bias=False)
    q = Q.QSparseLinear.from_linear(lin, Q.QSparseSettings(0.75), Q._SharedInputCache())
    x = torch.randn(6, 32, requires_grad=True)
    q(x).backward(torch.ones(6, 8))
    # dY/dX with the STE: upstream grad through W, unmasked: every input gets grad = sum_j W[j, i]
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(6, 32))


def test_ternary_weights_three_values():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    qw = Q.quant_weight_ternary(w)
    alpha = w.abs().mean()
    vals = set((qw / alpha).round().unique().tolist())
    assert vals == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(qw.abs().unique(), torch.tensor([0.0, float(alpha)]))


def test_int8_roundtrip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(16, 128) * torch.logspace(-3, 2, 16)[:, None]
    qx = Q.quant_act_int8(x)
    gamma = x.abs().amax(-1, keepdim=True)
    assert torch.all((qx - x).abs() <= gamma / 254 + 1e-6)
    assert (qx * 127 / gamma).round().unique().numel() <= 256


def test_quantized_forward_uses_ternary_weight_and_int8_acts():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4, bias=False)
    q = Q.QSparseLinear.from_linear(lin, Q.QSparseSettings(0.5, "1.58", 8), Q._SharedInputCache())
    x = torch.randn(3, 16)
    want = Q.quant_act_int8(Q.topk_sparsify(x, 8)) @ Q.quant_weight_ternary(lin.weight).t()
    torch.testing.assert_close(q(x), want)
    # latent weights stay full precision and receive gradients through the STE
    q(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.weight.unique().numel() > 3


def test_sparsity_zero_is_identity():
    m = M.build("d2", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (2, 10))
    ref = m(ids).logits
    Q.convert(m, 0.0)
    assert torch.equal(m(ids).logits, ref)


def test_rescale_keeps_l2_norm():
    lin = torch.nn.Linear(32, 8, bias=False)
    q = Q.QSparseLinear.from_linear(lin, Q.QSparseSettings(0.5, rescale=True), Q._SharedInputCache())
    x = torch.randn(4, 32)
    torch.testing.assert_close(q.sparsify_input(x).norm(dim=-1), x.norm(dim=-1))


def test_embeddings_and_head_not_converted():
    m = Q.convert(M.build("d1", VOCAB), 0.5)
    assert type(m.lm_head) is torch.nn.Linear
    assert type(m.model.embed_tokens) is torch.nn.Embedding


def test_measured_sparsity_weighted():
    m = M.build("d2", VOCAB, hidden_act="silu", seed=0)
    Q.convert(m, 0.5)
    got = Q.measured_sparsity(m, torch.randint(0, VOCAB, (2, 16)))
    for g in ("qkv", "o", "gate_up", "down"):
        assert got[g] == pytest.approx(0.5)
    assert got["overall"] == pytest.approx(0.5)
    # relu2: the down_proj input has natural zeros on top of top-K, so measured > target there
    m2 = Q.convert(M.build("d2", VOCAB, seed=0), 0.5)
    got2 = Q.measured_sparsity(m2, torch.randint(0, VOCAB, (2, 16)))
    assert got2["down"] > 0.5 and got2["qkv"] == pytest.approx(0.5)
    assert got2["overall"] > 0.5


@pytest.mark.parametrize("kwargs,msg", [
    (dict(sparsity=1.2), r"sparsity must be in \[0, 1\): got 1.2"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\): got -0.1"),
    (dict(sparsity=0.5, weight_bits="2"), "weight_bits must be one of"),
    (dict(sparsity=0.5, act_bits=4), "act_bits must be None"),
    (dict(sparsity=0.5, block=1), "block must be None or an integer >= 2"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        Q.convert(M.build("d1", VOCAB), **kwargs)


_THREADS_PROBE = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from numba.np.ufunc import parallel
from sparsescale.qsparse import topk_sparsify
y = topk_sparsify(torch.randn(32, 96), 40)
assert int((y != 0).sum()) == 32 * 40
print(torch.get_num_threads(), int(parallel._is_initialized))
"""


def test_one_thread_never_starts_numba_pool_even_with_parallel_build_cached(tmp_path):
    """A sweep job with --threads 1 must stay on one core: no thread pool, torch's thread count untouched,
    also when the disk cache already holds the parallel build (a 2-thread job compiled it first)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}

    def probe(threads):
        p = subprocess.run([sys.executable, "-c", _THREADS_PROBE, str(threads)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split()

    assert probe(2) == ["2", "1"]  # two threads: the parallel build, its pool started
    assert probe(1) == ["1", "0"]  # then one thread: the serial build from the cache, no pool
    assert probe(1) == ["1", "0"]
