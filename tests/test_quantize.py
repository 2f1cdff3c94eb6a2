"""Blockwise asymmetric RTN, z-clipping, super-weight restore, activation fake-quant, the sweep and its CLI."""

import json

import numpy as np
import pytest
import torch

import planted
from sparsescale.superweight import probes, quantize as qz
from sparsescale import superweight as sw
from sparsescale.errors import UserError
from sparsescale.model import save

SW = sw.SuperWeight(planted.PLANT_LAYER, planted.ROW_J, planted.COL_K, planted.SUPER, 0, 0, 0)


@pytest.fixture(scope="module")
def tok():
    return planted.tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return planted.planted_model(tok)


def randw(rows=24, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("block", [32, 7, "channel", "tensor"])
def test_rtn_error_is_at_most_half_a_step_and_the_grid_has_2_to_the_b_levels(bits, block):
    w = randw()
    w_hat, stats = qz.quantize_tensor(w, bits, block)
    size = {"tensor": w.numel(), "channel": w.shape[1]}.get(block, block)
    flat, flat_hat = w.reshape(-1), w_hat.reshape(-1)
    n_blocks = 0
    for start in range(0, w.numel(), size):
        b, b_hat = flat[start : start + size], flat_hat[start : start + size]
        step = (b.max() - b.min()) / (2**bits - 1)
        assert (b - b_hat).abs().max() <= step / 2 + 1e-6
        assert len(torch.unique(b_hat)) <= 2**bits
        assert b_hat.min() == pytest.approx(float(b.min()), abs=1e-6)  # the range ends are grid points
        assert b_hat.max() == pytest.approx(float(b.max()), abs=1e-5)
        n_blocks += 1
    assert stats["n_blocks"] == n_blocks
    assert stats["n_short_blocks"] == int(w.numel() % size != 0)
    assert stats["n_whole_tensor"] == int(block == "tensor")


def test_constant_block_is_exact_and_dtype_is_kept():
    w = torch.full((4, 8), 0.3, dtype=torch.bfloat16)
    w_hat, _ = qz.quantize_tensor(w, 3, 8)
    assert w_hat.dtype == torch.bfloat16 and torch.equal(w_hat, w)


def test_short_last_block_uses_its_own_range_or_is_refused():
    w = randw(10, 10)  # 100 elements, blocks of 32: 3 full + one of 4
    w_hat, stats = qz.quantize_tensor(w, 4, 32)
    assert (stats["n_blocks"], stats["n_short_blocks"], stats["n_whole_tensor"]) == (4, 1, 0)
    tail = w.reshape(-1)[96:].view(1, 4)
    assert torch.equal(w_hat.reshape(-1)[96:], qz.rtn_rows(tail, 4)[0].reshape(-1))
    with pytest.raises(UserError, match="block size 32 does not divide the \\(10, 10\\) weight"):
        qz.quantize_tensor(w, 4, 32, partial="refuse")
    assert qz.quantize_tensor(w, 4, 25, partial="refuse")[1]["n_short_blocks"] == 0
    assert qz.quantize_tensor(w, 4, 1000)[1]["n_whole_tensor"] == 1  # a block larger than the tensor: counted


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5, True, "4"])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(UserError, match="bits must be an integer in 2..8"):
        qz.quantize_tensor(randw(), bits, 32)


@pytest.mark.parametrize("block", [0, -4, "abc", 2.5])
def test_bad_block_sizes_are_refused(block):
    with pytest.raises(UserError, match="block"):
        qz.quantize_tensor(randw(), 4, block)


def test_block_granularities_are_what_they_say():
    w = randw()
    per_row = torch.cat([qz.rtn_rows(r[None], 3)[0] for r in w])
    assert torch.equal(qz.quantize_tensor(w, 3, "channel")[0], per_row)
    assert torch.equal(qz.quantize_tensor(w, 3, 40)[0], per_row)  # one row = 40 contiguous elements
    assert torch.equal(qz.quantize_tensor(w, 3, "tensor")[0], qz.rtn_rows(w.reshape(1, -1), 3)[0].view_as(w))
    assert qz.check_block("256") == 256 and qz.check_block("channel") == "channel"


def test_super_weight_is_restored_exactly_and_stops_ruining_its_block():
    w = randw(16, 64) * 0.02
    w[3, 5] = 1.5  # a super weight: 75 sigma
    plain, _ = qz.quantize_tensor(w, 4, "tensor")
    aware, stats = qz.quantize_tensor(w, 4, "tensor", z=3.0, keep=[(3, 5)])
    assert aware[3, 5] == w[3, 5] and stats["n_restored"] == 1
    assert plain[3, 5] == pytest.approx(1.5, abs=1e-6)  # the max is a grid point, but the rest is crushed:
    others = torch.ones_like(w, dtype=torch.bool)
    others[3, 5] = False
    mse_plain = float(((plain - w)[others] ** 2).mean())
    mse_aware = float(((aware - w)[others] ** 2).mean())
    assert mse_aware < mse_plain / 20


def test_zclip_reduces_the_error_of_a_heavy_tailed_block():
    w = torch.tensor(np.random.default_rng(0).standard_t(4, (4, 256)), dtype=torch.float32)  # Student t, 4 dof
    mse = {z: float(((qz.quantize_tensor(w, 3, 256, z=z)[0] - w) ** 2).mean()) for z in (None, 1.0, 2.0, 3.0, 6.0)}
    assert mse[3.0] < 0.8 * mse[None]  # a narrower grid for the bulk is worth the clipped tail
    assert mse[1.0] > mse[None]  # clipping too hard is not
    clipped = qz.zclip_rows(w, 2.0)
    a = w.abs()
    thr = 2.0 * a.std(dim=1, unbiased=False, keepdim=True) + a.mean(dim=1, keepdim=True)
    inside = a <= thr
    assert bool((clipped.abs() <= thr + 1e-6).all()) and torch.equal(clipped[inside], w[inside])
    assert 0 < int((~inside).sum()) < 0.1 * w.numel()  # only the tail is clipped


def test_quantized_model_touches_only_decoder_linears_and_restores(model):
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with qz.quantized(model, 3, 64, z=4.0, super_weights=[SW]) as stats:
        now = model.state_dict()
        changed = {k for k in ref if not torch.equal(now[k], ref[k])}
        assert len(changed) == stats["n_tensors"] == 3 * 7
        assert all(k.startswith("model.layers.") and "_proj" in k for k in changed)
        assert model.model.layers[1].mlp.down_proj.weight[planted.ROW_J, planted.COL_K].item() == pytest.approx(planted.SUPER)
        assert stats["n_restored"] == 1 and stats["weight_mse"] > 0
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def _capture_down_input(model, layer, store):
    return model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: store.append(a[0].detach().clone()))


def _down_input_before_and_after_fake_quant(model, ids, super_activations):
    """(x, x_hat): the down_proj input of the planted layer, raw and after 8-bit per-tensor fake quantization."""
    seen = []  # pre-hooks run in registration order: the raw input, then (after fake quant) the quantized one
    first = _capture_down_input(model, planted.PLANT_LAYER, seen)
    with qz.fake_quant_activations(model, 8, "tensor", super_activations):
        last = _capture_down_input(model, planted.PLANT_LAYER, seen)
        with torch.no_grad():
            model(input_ids=ids)
    first.remove(), last.remove()
    return seen


def test_activation_fake_quant_replaces_and_restores_the_super_activation(model, tok):
    ids = torch.tensor([probes.encode(tok, "Summer is hot. Winter is cold.")])
    sa = [(planted.PLANT_LAYER, planted.COL_K)]
    errs = {}
    for aware in (False, True):
        x, xq = _down_input_before_and_after_fake_quant(model, ids, sa if aware else ())
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[0, 0, planted.COL_K] = False
        errs[aware] = float(((xq - x)[mask] ** 2).mean())
        assert x[0, 0, planted.COL_K] > 15  # the super activation
        if aware:
            assert xq[0, 0, planted.COL_K] == x[0, 0, planted.COL_K]  # restored in full precision
    assert errs[True] < errs[False] / 100  # the ~18 spike no longer sets the range of the other ~0.01 values
    assert not model.model.layers[1].mlp.down_proj._forward_pre_hooks


def test_activation_fake_quant_finds_the_super_activation_in_each_sequence(model, tok):
    """BOS at positions 0, 4 and 9 of three sequences (windows cut from a stream): each sequence's super
    activation is kept in full precision where it is, and no longer sets the range of the rest."""
    ids = planted.self_generated(model, tok, n_seq=3, prompt_len=1, length=12)
    ids = torch.stack([torch.roll(r, s) for r, s in zip(ids, (0, 4, 9))])
    where = [(0, 0), (1, 4), (2, 9)]
    errs = {}
    for aware in (False, True):
        x, xq = _down_input_before_and_after_fake_quant(model, ids, [(planted.PLANT_LAYER, planted.COL_K)] if aware else ())
        mask = torch.ones_like(x, dtype=torch.bool)
        for b, t in where:
            assert x[b, t, planted.COL_K] > 15  # the super activation sits on each sequence's BOS
            mask[b, t, planted.COL_K] = False
            if aware:
                assert xq[b, t, planted.COL_K] == x[b, t, planted.COL_K]  # restored in full precision
        errs[aware] = float(((xq - x)[mask] ** 2).mean())
    assert errs[True] < errs[False] / 100


def test_sweep_points_and_super_weight_awareness(model, tok):
    ids = planted.self_generated(model, tok, n_seq=8, length=33).reshape(-1).numpy()
    res = qz.sweep(model, ids, ids, [SW], bits=[3], blocks=[64, "tensor"], z_grid=(2.0, 4.0, 8.0),
                   methods=("rtn", "clip", "sw_aware"), seq_len=32, n_eval=128, n_calib=64, batch_size=4,
                   act_granularities=("tensor",), log=lambda *_: None)
    assert [(p["block"], p["method"]) for p in res["points"]] == [
        (64, "rtn"), (64, "clip"), (64, "sw_aware"), ("tensor", "rtn"), ("tensor", "clip"), ("tensor", "sw_aware")]
    pts = {(p["block"], p["method"]): p for p in res["points"]}
    assert pts[("tensor", "rtn")]["z"] is None and pts[("tensor", "sw_aware")]["z"] in (2.0, 4.0, 8.0)
    z_err = dict(map(tuple, pts[("tensor", "sw_aware")]["z_errors"]))
    assert pts[("tensor", "sw_aware")]["calib_mse"] == pytest.approx(min(z_err.values()))
    # per tensor at 3 bits, the 0.4 super weight sets the range of its matrix: keeping it is much better
    assert pts[("tensor", "sw_aware")]["calib_mse"] < pts[("tensor", "rtn")]["calib_mse"] / 2
    assert pts[("tensor", "sw_aware")]["quant"]["n_restored"] == 1 and pts[("tensor", "clip")]["quant"]["n_restored"] == 0
    assert [(a["act_granularity"], a["method"]) for a in res["act_points"]] == [("tensor", "naive"), ("tensor", "sa_aware")]
    assert res["baseline"]["n_tokens"] == 128


def test_cli_quantize(model, tok, tmp_path):
    ckpt, data = tmp_path / "planted", tmp_path / "data"
    save(model, ckpt, tokenizer=tok)
    planted.write_dataset(data, tok, tmp_path / "tok")
    det = tmp_path / "detect.json"
    sw.cli_superweight(["detect", "--model", str(ckpt), "--out", str(det)])
    out = tmp_path / "quantize.json"
    args = ["quantize", "--model", str(ckpt), "--data", str(data), "--detect", str(det), "--out", str(out),
            "--val-tokens", "64", "--seq-len", "32", "--calib-tokens", "64", "--z-grid", "none", "4"]
    assert sw.cli_superweight(args + ["--bits", "4", "--blocks", "256", "channel", "--act-granularity", "token"]) == 0
    res = json.loads(out.read_text())
    assert [(p["bits"], p["block"], p["method"]) for p in res["points"]] == [
        (4, 256, "rtn"), (4, 256, "sw_aware"), (4, "channel", "rtn"), (4, "channel", "sw_aware")]
    assert [s["row"] for s in res["super_weights"]] == [planted.ROW_J]
    assert len(res["act_points"]) == 2 and "versions" in res
    assert res["settings"]["z_grid"] == [None, 4.0] and res["points"][1]["z"] in (None, 4.0)
    with pytest.raises(UserError, match="--z-grid values must be positive numbers or 'none'"):
        sw.cli_superweight(args[:-3] + ["--z-grid", "0"])
    with pytest.raises(UserError, match="bits must be an integer in 2..8"):
        sw.cli_superweight(args + ["--bits", "9"])
    with pytest.raises(UserError, match="block size must be a positive integer"):
        sw.cli_superweight(args + ["--blocks", "0"])
    with pytest.raises(UserError, match="does not divide"):
        sw.cli_superweight(args + ["--blocks", "100", "--partial", "refuse", "--act-bits", "0"])
