"""Sparse GEMV kernels and the sparse decode path (CPU; the Triton interpreter tests: test_kernels_triton.py)."""

import pytest
import torch
import torch.nn.functional as F

from sparsescale import kernels as K, model as M, qsparse as Q
from sparsescale.config import kept
from sparsescale.errors import UserError

VOCAB = 61
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() and K.HAVE_TRITON), reason="needs CUDA and triton")


def _dense_masked(w, x, mask):
    """The reference: the dense product of the masked input, in fp64."""
    return F.linear((x.double() * mask), w.double())


def _case(d_in, d_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    x = torch.randn(d_in, generator=g).to(dtype)
    return w, x


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (300, 1100)])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95])
def test_sparse_gemv_equals_dense_of_masked_input(backend, dtype, shape, s):
    d_in, d_out = shape
    w, x = _case(d_in, d_out, dtype)
    k = kept(d_in, s)
    sw = K.SparseWeight(w, backend)
    y, n = sw(x, k=k)
    assert n == k
    assert y.dtype == torch.float32 and y.shape == (d_out,)
    mask = Q.topk_sparsify(x.float(), k) != 0  # the same inputs as the Q-Sparse forward keeps
    ref = _dense_masked(w, x, mask)
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale + 1e-6


@pytest.mark.parametrize("tiles", [(1, 1), (2, 1), (3, 1), (1, 3), (2, 2), (5, 1)])
def test_numba_tilings_agree(tiles):
    """Column blocks (odd widths, empty blocks) and active-list slices all give the same product."""
    w, x = _case(53, 37, torch.float32, seed=1)
    ref = _dense_masked(w, x, Q.topk_sparsify(x, 20) != 0)
    for threads in (1, 2):  # the serial kernel and the parallel one (numba's thread pool)
        y, n = K.SparseWeight(w, "numba", threads=threads, tiles=tiles)(x, k=20)
        assert n == 20
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_parallel_kernel_default_tiles():
    # fp32 only: bf16 shares every line but the widening, tested with the serial kernel (one compile less)
    w, x = _case(301, 1500, torch.float32, seed=4)
    sw = K.SparseWeight(w, "numba", threads=2)
    assert K.column_tiles(1500, 2) == (2, 1) and K.column_tiles(700, 2) == (1, 2)
    y, n = sw(x, k=150)
    ref = _dense_masked(w, x, Q.topk_sparsify(x.float(), 150) != 0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_selection_ties_match_qsparse():
    """Ties at the K-th magnitude are broken by position, exactly as qsparse.topk_sparsify does."""
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 3.0, 2.0, 0.25, 1.0])
    w = torch.eye(9)  # y = masked x
    for k in range(1, 10):
        y, n = K.SparseWeight(w, "numba")(x, k=k)
        expected = Q.topk_sparsify(x, k)
        assert n == k
        assert torch.equal(y, expected), k
        assert torch.equal(K.select_mask(x, k=k), expected != 0), k


def test_threshold_and_presparsified_selection():
    w, x = _case(64, 40, torch.float32, seed=2)
    for backend in ("numba", "torch"):
        sw = K.SparseWeight(w, backend)
        y, n = sw(x, threshold=0.7)
        mask = x.abs() > 0.7
        assert n == int(mask.sum())
        torch.testing.assert_close(y.double(), _dense_masked(w, x, mask), rtol=1e-5, atol=1e-5)
        xs = x * (torch.arange(64) % 3 == 0)
        y, n = sw(xs, presparsified=True)
        assert n == 22
        torch.testing.assert_close(y.double(), F.linear(xs.double(), w.double()), rtol=1e-5, atol=1e-5)


def test_union_gemm_reads_the_union():
    w, _ = _case(40, 24, torch.float32, seed=3)
    xs = torch.zeros(3, 40)
    xs[0, [1, 5, 7]] = 1.0
    xs[1, [5, 9]] = -2.0
    xs[2, 30] = 0.5
    y, n = K.union_gemm(K.SparseWeight(w, "numba"), xs)
    assert n == 5
    torch.testing.assert_close(y.double(), F.linear(xs.double(), w.double()), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    w, x = _case(8, 4, torch.float32)
    with pytest.raises(UserError, match="backend must be one of"):
        K.SparseWeight(w, "cuda")
    with pytest.raises(UserError, match="exactly one of"):
        K.SparseWeight(w)(x, k=2, threshold=0.1)
    with pytest.raises(UserError, match="one token of 8 inputs"):
        K.SparseWeight(w)(torch.zeros(2, 8), k=2)
    with pytest.raises(UserError, match="fp32/bf16"):
        K.SparseWeight(w.half(), "numba")
    with pytest.raises(UserError, match="converted model"):
        K.enable_sparse_decode(M.build("d1", VOCAB))
    m = Q.convert(M.build("d1", VOCAB), 0.5)
    with pytest.raises(UserError, match="needs thresholds"):
        K.enable_sparse_decode(m, mode="threshold")
    with pytest.raises(UserError, match="mode must be one of"):
        K.enable_sparse_decode(m, mode="fast")


# ----------------------------------------------------------------------------------------------------------
# the decode path

def _model(s=0.5, dtype=torch.float32, size="d2", **kw):
    m = M.build(size, VOCAB, seed=0).to(dtype).eval()
    return Q.convert(m, s, **kw)


def _decode_logits(m, ids, steps):
    """Logits of `steps` single-token steps with a KV cache after a prefill of ids."""
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=True)
        past, tok, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            out = m(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("kw", [{}, {"weight_bits": "1.58", "act_bits": 8}, {"block": 8}, {"rescale": True}])
def test_model_logits_equal_normal_forward(kw):
    m = _model(**kw)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = _decode_logits(m, ids, 5)
    d = K.enable_sparse_decode(m)
    got = _decode_logits(m, ids, 5)
    # 2 layers x 4 groups (qkv, o, gate_up, down) x 5 steps; the prefill fell back to the normal forward
    assert d.stats()["calls"] == 2 * 4 * 5
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bf16_model_logits_close():
    m = _model(dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = _decode_logits(m, ids, 4).float()
    d = K.enable_sparse_decode(m)
    got = _decode_logits(m, ids, 4).float()
    assert d.backend == "numba" and d.stats()["calls"] == 2 * 4 * 4
    # the same kept sets (one tie rule) and the same fp32 sums, rounded to bf16 after another summation order:
    # at most one bf16 ulp of the largest logit apart, the same argmax everywhere
    assert (got - ref).abs().max().item() <= 2.0 ** -7 * ref.abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_generate_tokens_equal():
    m = _model(size="d4")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        d = K.enable_sparse_decode(m)
        got = m.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    assert d.stats()["calls"] == 4 * 4 * 11  # 4 layers x 4 groups x 11 single-token steps
    assert d.stats()["sparsity_measured"] == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(torch.cat(got.logits), torch.cat(ref.logits), rtol=1e-4, atol=1e-4)


def test_batch_and_prefill_fall_back_to_the_normal_forward():
    m = _model()
    ids = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(3))
    long = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_b, ref_t = m(input_ids=ids).logits, m(input_ids=long).logits
        d = K.enable_sparse_decode(m)
        got_b, got_t = m(input_ids=ids).logits, m(input_ids=long).logits
        assert d.stats()["calls"] == 0
        # the normal forward ran, now reading the weights in the kernel's W^T layout (same values, the BLAS
        # sums in another order: fp32 rounding only)
        torch.testing.assert_close(got_b, ref_b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-5)
        one = ids[:1]
        with d.paused():
            paused = m(input_ids=one).logits
        assert d.stats()["calls"] == 0
        sparse = m(input_ids=one).logits
        assert d.stats()["calls"] == 8
        torch.testing.assert_close(sparse, paused, rtol=1e-4, atol=1e-4)
        K.disable_sparse_decode(m)
        assert torch.equal(m(input_ids=one).logits, paused)  # the same weights, the same normal forward
    assert not hasattr(m, "_sparse_decode")
    assert all("forward" not in mod.__dict__ for _, mod in Q.qsparse_linears(m))


def test_gradients_fall_back():
    m = _model()
    K.enable_sparse_decode(m)
    out = m(input_ids=torch.tensor([[3]]), labels=torch.tensor([[3]]))
    out.loss.backward()  # the training path never sees the numba kernel
    assert m._sparse_decode.stats()["calls"] == 0
    assert m.model.layers[0].mlp.down_proj.weight.grad is not None


def test_fused_groups_and_memory():
    m = _model()
    n_linear = sum(mod.weight.numel() for _, mod in Q.qsparse_linears(m))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    d = K.enable_sparse_decode(m)
    sizes = sorted((g.sw.d_in, g.sw.d_out, len(g.members)) for g in d.groups)
    dm, f = m.config.hidden_size, m.config.intermediate_size
    assert sizes == sorted([(dm, 3 * dm, 3), (dm, dm, 1), (dm, 2 * f, 2), (f, dm, 1)] * 2)
    # one layout: every weight is a transposed view of its group's W^T, same values, no second copy
    assert d.extra_bytes == 0 and d.stats()["extra_bytes"] == 0
    assert d.weight_bytes == 4 * sum(p.numel() for p in m.parameters())
    for g in d.groups:
        for mod, sl in zip(g.members, g.slices):
            assert mod.weight.data_ptr() == g.sw.wt[:, sl].data_ptr() and mod.weight.stride() == (1, g.sw.d_out)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert sum(g.sw.nbytes for g in d.groups) == 4 * n_linear
    # enabling again (or on a model sharing the parameters) reuses the layout
    ptrs = [g.sw.wt.data_ptr() for g in d.groups]
    d2 = K.enable_sparse_decode(m)
    assert [g.sw.wt.data_ptr() for g in d2.groups] == ptrs
    # a training step on the dense path changes what the kernel reads (no snapshot)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    opt.step()
    m.eval()
    ids = torch.tensor([[7]])
    with torch.no_grad():
        with d2.paused():
            ref = m(input_ids=ids).logits
        got = m(input_ids=ids).logits
    assert d2.stats()["calls"] == 8
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # ternary weights keep their latent fp weights: the kernel reads a snapshot of the ternary values
    t = _model(weight_bits="1.58")
    dt = K.enable_sparse_decode(t)
    assert dt.extra_bytes == 4 * sum(mod.weight.numel() for _, mod in Q.qsparse_linears(t))


def test_small_groups_stay_on_the_calling_thread(monkeypatch):
    from sparsescale.kernels import decode

    m = _model(size="d4")
    d = K.enable_sparse_decode(m)  # threads=None: every d4 group reads far below PARALLEL_MIN_BYTES a call
    assert {g.sw.threads for g in d.groups} == {1}
    assert {g.sw.threads for g in K.enable_sparse_decode(m, threads=2).groups} == {2}  # asked for: kept
    # at the threshold: gate/up of d4 reads 128 x 704 x 4 bytes x (1 - 0.5) = 180,224 bytes a call
    monkeypatch.setattr(decode, "PARALLEL_MIN_BYTES", 180_224)
    by_width = {g.sw.d_out: g.sw.threads for g in K.enable_sparse_decode(m).groups}
    assert by_width == {704: None, 384: 1, 128: 1}  # gate/up follows torch's threads; q/k/v, o, down stay


def test_moved_weights_are_caught():
    m = _model()
    K.enable_sparse_decode(m)
    m.to(torch.float64).to(torch.float32)  # replaces every parameter's storage
    with torch.no_grad(), pytest.raises(UserError, match="enable_sparse_decode"):
        m(input_ids=torch.tensor([[3]]))


def test_threshold_mode_is_labelled_and_close():
    m = _model(size="d4")
    g = torch.Generator().manual_seed(5)
    thr = K.calibrate_thresholds(m, torch.randint(0, VOCAB, (4, 32), generator=g))
    assert len(thr) == 4 * 7 and all(v > 0 for n, v in thr.items() if "down_proj" not in n)
    ids = torch.randint(0, VOCAB, (1, 6), generator=g)
    ref = _decode_logits(m, ids, 6)
    d = K.enable_sparse_decode(m, mode="threshold", thresholds=thr)
    assert "approximation" in d.label and d.stats()["mode"] == "threshold"
    got = _decode_logits(m, ids, 6)
    s = d.stats()["sparsity_measured"]
    assert 0.35 < s < 0.65, s  # K varies per token around the calibrated 50%
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 0.9, cos


def test_threshold_mode_rejects_exotic_settings():
    m = _model(block=8)
    thr = K.calibrate_thresholds(m, torch.randint(0, VOCAB, (1, 8)))
    with pytest.raises(UserError, match="plain top-K"):
        K.enable_sparse_decode(m, mode="threshold", thresholds=thr)


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95])
def test_triton_kernel_equals_dense_of_masked_input(dtype, s):
    w, x = _case(300, 1100, dtype)
    w, x = w.cuda(), x.cuda()
    k = kept(300, s)
    sw = K.SparseWeight(w, "triton")
    y, n = sw(x, k=k)
    assert int(n) == k
    ref = _dense_masked(w, x, K.select_mask(x, k=k))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    y, n = sw(x, threshold=0.5)
    torch.testing.assert_close(y.double(), _dense_masked(w, x, x.abs() > 0.5), rtol=1e-4,
                               atol=1e-4 * ref.abs().max().item())


@needs_triton
@pytest.mark.gpu
def test_triton_generate_tokens_equal():
    m = _model(size="d4").cuda()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=12, do_sample=False)
        d = K.enable_sparse_decode(m)
        got = m.generate(ids, max_new_tokens=12, do_sample=False)
    assert d.backend == "triton"
    assert torch.equal(got, ref)


@cuda
def test_auto_picks_a_gpu_backend():
    w, _ = _case(16, 8, torch.float32)
    assert K.SparseWeight(w.cuda()).backend == ("triton" if K.HAVE_TRITON else "torch")

# The Triton kernel through Triton's CPU interpreter (every machine): tests/test_kernels_triton.py


# ----------------------------------------------------------------------------------------------------------
# benchmark bookkeeping (no timing)

def test_gemv_row_fair_baseline_and_bug_flag():
    from sparsescale.bench.gemv import gemv_row

    r = gemv_row(64, 32, "fp32", 0.5, dense_ms=4.0, kernel_s0_ms=2.0, sparse_ms=1.25)
    assert r["baseline"] == "kernel_s0" and r["baseline_ms"] == 2.0
    assert r["speedup"] == 1.6 and r["speedup_vs_dense"] == 3.2 and r["fraction_of_ideal"] == 0.8
    assert r["above_ideal"] is False
    r = gemv_row(64, 32, "fp32", 0.5, dense_ms=4.0, kernel_s0_ms=5.0, sparse_ms=1.6)
    assert r["baseline"] == "dense" and r["speedup"] == 2.5
    assert r["above_ideal"] is True and r["fraction_of_ideal"] != r["fraction_of_ideal"]  # NaN: not reported


def test_interleaved_timing_order_and_rewarm():
    from sparsescale.bench.timing import interleaved_median_ms

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    ms = interleaved_median_ms(fns, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3 and set(ms) == {"a", "b"}
    calls.clear()
    interleaved_median_ms(fns, repeats=2, warmup=1, rewarm=True)  # an untimed call right before each timed one
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2


def test_bench_train_step_rows_and_threads(tmp_path):
    """`bench train-step` writes one row per sparse variant (each precision at S = 0 is the baseline of its
    `ratio_vs_s0`) and runs at the thread count it is given; a bad count is one clear error."""
    import json

    from sparsescale.bench.train_step import bench_train_step

    before = torch.get_num_threads()
    try:
        out = tmp_path / "rows.json"
        assert bench_train_step(["--shapes", "32x1x8x2", "--sparsity", "0.5", "--vocab-size", "17", "--repeats", "1",
                                 "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp/S=0.5", "1.58/S=0.5"]
    for r in rows:
        assert r["ratio"] == r["qsparse_ms"] / r["dense_ms"] and r["ratio_vs_s0"] == r["qsparse_ms"] / r["s0_ms"]
    assert rows[0]["s0_ms"] == rows[0]["dense_ms"] and rows[1]["s0_ms"] != rows[1]["dense_ms"]
    with pytest.raises(UserError, match="--threads must be >= 1: got 0"):
        bench_train_step(["--threads", "0"])


def test_hugepage_linears_keeps_values_and_layout():
    m = M.build("d2", VOCAB, seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    moved = K.hugepage_linears(m)
    n_linear = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and ".layers." in n)
    assert moved == 4 * n_linear
    assert all(torch.equal(p, before[n]) and p.is_contiguous() for n, p in m.named_parameters())
