"""The compiled decode step (`kernels.step`): the same tokens and, to fp32 rounding, the same logits as the model."""

import pytest
import torch

from sparsescale import kernels as K, model as M, qsparse as Q
from sparsescale.config import ModelArgs
from sparsescale.errors import UserError

VOCAB = 97
MHA = ModelArgs(d_model=64, n_layers=2, n_heads=4, ffn_dim=96)
GQA = ModelArgs(d_model=64, n_layers=3, n_heads=4, ffn_dim=128, n_kv_heads=2)


def _model(args=MHA, act="relu2", s=0.5, **kw):
    m = M.build(args, VOCAB, seed=0, hidden_act=act).eval()
    return Q.convert(m, s, **kw) if s is not None else m


def _ids(seed, n=5):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf(m, ids, n):
    with torch.no_grad():
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("args,act", [(MHA, "relu2"), (GQA, "silu"), (GQA, "relu2")])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.8])
def test_tokens_and_logits_equal_the_model(args, act, s):
    m = _model(args, act, s)
    ids = _ids(int(s * 10))
    ref = _hf(m, ids, 12)  # the normal Q-Sparse forward
    K.enable_sparse_decode(m)
    out = K.fused_generate(m, ids, 12)
    assert out.shape == (1, 17) and out.dtype == ids.dtype
    assert torch.equal(out, ref)
    # every position's logits against one full forward of the converted model over the same sequence
    step = m._sparse_decode.fused
    with torch.no_grad(), m._sparse_decode.paused():
        full = m(out).logits[0]
    got = torch.stack([step.step(int(t), i) for i, t in enumerate(out[0])])
    assert (got - full).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_ternary_weights_and_two_threads():
    m = _model(GQA, s=0.6, weight_bits="1.58")
    ids = _ids(3)
    ref = _hf(m, ids, 10)
    K.enable_sparse_decode(m)
    assert torch.equal(K.fused_generate(m, ids, 10), ref)
    one = m._sparse_decode.fused
    assert one.threads == 1
    assert torch.equal(K.fused_generate(m, ids, 10, threads=2), ref)
    two = m._sparse_decode.fused
    assert two is not one and two.threads == 2 and two.par


def test_threads_change_no_bit():
    # S = 0.6: an odd active count (K = 51 of 128 for down); column blocks of 16 leave thread 1 a short one
    m = _model(GQA, s=0.6)
    ids = _ids(4, 6)
    K.enable_sparse_decode(m)
    one = K.fused_generate(m, ids, 8)
    step1 = m._sparse_decode.fused
    two = K.fused_generate(m, ids, 8, threads=2)
    step2 = m._sparse_decode.fused
    assert step2.threads == 2 and step2.par and torch.equal(two, one)
    assert step2.sync[0] == 2 * 4 * GQA.n_layers  # both threads passed the 4 barriers of every layer
    a = torch.stack([step1.step(int(t), i) for i, t in enumerate(one[0])])
    b = torch.stack([step2.step(int(t), i) for i, t in enumerate(one[0])])
    assert torch.equal(a, b)


def test_blas_gemv_is_the_dense_model():
    dense = _model(s=None)
    ids = _ids(4)
    ref = _hf(dense, ids, 10)
    m = Q.convert(dense, 0.0)  # S = 0: outputs identical to the unconverted model
    K.enable_sparse_decode(m)
    assert torch.equal(K.fused_generate(m, ids, 10, gemv="blas"), ref)
    assert m._sparse_decode.fused.gemv == "blas"
    assert torch.equal(K.fused_generate(m, ids, 10), ref)  # the own kernel reading every row
    assert m._sparse_decode.fused.gemv == "sparse"


def test_cache_is_reused_and_prompt_only():
    m = _model()
    K.enable_sparse_decode(m)
    ids = _ids(5, 7)
    a = K.fused_generate(m, ids, 6)
    step = m._sparse_decode.fused
    assert step.max_len == 13
    assert torch.equal(K.fused_generate(m, ids[:, :3], 4), _hf(m, ids[:, :3], 4))
    assert m._sparse_decode.fused is step  # shorter: the same step, its cache overwritten from position 0
    assert torch.equal(K.fused_generate(m, ids, 6), a)
    assert torch.equal(K.fused_generate(m, ids, 0), ids)
    assert torch.equal(K.fused_generate(m, ids[0], 2)[:, :7], ids)  # 1-D prompt


def test_bad_input_is_refused():
    m = _model()
    with pytest.raises(UserError, match="enable_sparse_decode"):
        K.fused_generate(m, _ids(0), 3)
    K.enable_sparse_decode(m)
    with pytest.raises(UserError, match="one sequence"):
        K.fused_generate(m, torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(UserError, match="max_new_tokens"):
        K.fused_generate(m, _ids(0), -1)
    with pytest.raises(UserError, match="gemv must be one of"):
        K.fused_generate(m, _ids(0), 2, gemv="dense")
    with pytest.raises(UserError, match="larger max_len"):
        K.FusedStep(m, 4).step(1, 4)
    m.to(torch.float64).to(torch.float32)  # replaces every parameter's storage
    with pytest.raises(UserError, match="enable_sparse_decode"):
        K.fused_generate(m, _ids(0), 2)
    for kw, match in (({"act_bits": 8}, "plain top-K"), ({"block": 8}, "plain top-K")):
        other = _model(**kw)
        K.enable_sparse_decode(other)
        with pytest.raises(UserError, match=match):
            K.fused_generate(other, _ids(0), 2)
    b16 = _model().to(torch.bfloat16)
    K.enable_sparse_decode(b16)
    with pytest.raises(UserError, match="fp32"):
        K.fused_generate(b16, _ids(0), 2)
    thr = _model()
    K.enable_sparse_decode(thr, "threshold", thresholds=K.calibrate_thresholds(thr, _ids(1, 16)))
    with pytest.raises(UserError, match="plain top-K"):
        K.fused_generate(thr, _ids(0), 2)
    with pytest.raises(UserError, match="hidden_act"):
        K.enable_sparse_decode(gelu := _model(act="gelu"))
        K.fused_generate(gelu, _ids(0), 2)


def test_bench_fused_columns():
    from sparsescale.bench.decode import _fused_columns

    tok_s = {"dense": 5.0, "kernel_s0": 6.0, "fused_s0": 10.0, "fused_blas": 9.0, "fused": 17.0}
    outs = {"fused": torch.tensor([[1, 2]]), "topk_dense": torch.tensor([[1, 2]])}
    r = _fused_columns(tok_s, outs)
    assert r["fused_baseline"] == "fused_s0" and r["fused_speedup"] == 1.7 and r["fused_tokens_equal"] is True
    r = _fused_columns({"dense": 5.0, "kernel_s0": 6.0}, outs)
    assert r["fused_baseline"] == "" and r["fused_speedup"] != r["fused_speedup"]  # NaN when not run
