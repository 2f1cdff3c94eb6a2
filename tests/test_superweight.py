"""Super weights on a planted fixture: exact detection, nothing on random models, bit-exact restoration,
ablations that behave as in the paper, known coordinates, bad input, and the CLI on a saved checkpoint."""

import contextlib
import json

import pytest
import torch

import planted
from sparsescale import qsparse
from sparsescale import superweight as sw
from sparsescale.superweight import ablate as swa, detect as swd, probes
from sparsescale.superweight.summary import spike_ratios
from sparsescale.errors import UserError
from sparsescale.model import save

PLANTED = (planted.PLANT_LAYER, planted.ROW_J, planted.COL_K)


@pytest.fixture(scope="module")
def tok():
    return planted.tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return planted.planted_model(tok)


@pytest.fixture(scope="module")
def ids(model, tok):
    return planted.self_generated(model, tok, n_seq=16, prompt_len=1)


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(m, ref):
    now = m.state_dict()
    return now.keys() == ref.keys() and all(torch.equal(now[k], ref[k]) for k in ref)


def loss(m, ids):
    return probes.sequence_loss(m, ids, skip=1)["loss"]  # the random first token is not the model's own


# ---------------------------------------------------------------------------------------------------------
# detection

def test_detect_returns_exactly_the_planted_weight(model, tok):
    det = sw.find_super_weights(model, tok)
    assert [s.coord for s in det.super_weights] == [PLANTED]
    s = det.super_weights[0]
    assert s.value == pytest.approx(planted.SUPER)
    assert s.token_index == 0  # BOS, prepended by encode
    assert det.bos_prepended and det.token_ids[0] == tok.bos_token_id
    assert 15 < s.input_spike < 22 and 6 < s.output_spike < 9  # relu(9.8 a)^2 9.8 a with a = 0.3; x 0.4
    assert s.input_ratio > 100 and s.output_ratio > 100 and s.concentration > 20
    assert s.col_is_max_input and s.kept_by_topk is None
    assert det.echoes == [] and sw.siblings(det.super_weights) == []
    # iteration 2 saw the column's ordinary weights times the spike and called them diffuse
    assert len(det.iterations) == 2
    assert [c["status"] for c in det.iterations[1]["candidates"]] == ["diffuse"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_detect_finds_nothing_in_random_models(tok, seed, act):
    m = planted.random_model(tok, seed=seed, hidden_act=act)
    det = sw.find_super_weights(m, tok)
    assert det.super_weights == [] and det.echoes == []
    assert len(det.iterations) == 1 and det.iterations[0]["candidates"] == []
    ratios = sw.layer_ratios([r["max_abs_input"] for r in det.profile["layers"]])
    assert max(ratios) < 3  # far below the threshold of 10


def test_model_restored_bit_exact_after_detect(tok):
    m = planted.planted_model(tok, sibling=0.3)
    ref = state(m)
    det = sw.find_super_weights(m, tok)
    assert len(det.super_weights) == 2  # two weights were zeroed during the search
    assert same_state(m, ref)


def test_model_restored_when_detection_fails_midway(tok, monkeypatch):
    m = planted.planted_model(tok)
    ref = state(m)
    real, calls = swd._capture, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:  # after the planted weight was zeroed
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(swd, "_capture", failing)
    with pytest.raises(RuntimeError):
        sw.find_super_weights(m, tok)
    assert m.model.layers[1].mlp.down_proj.weight[planted.ROW_J, planted.COL_K].item() == pytest.approx(planted.SUPER)
    assert same_state(m, ref)


def test_sibling_sharing_a_column_found_in_the_next_iteration(tok):
    det = sw.find_super_weights(planted.planted_model(tok, sibling=0.3), tok)
    assert [(s.coord, s.iteration) for s in det.super_weights] == [(PLANTED, 1), ((1, planted.ROW_J2, planted.COL_K), 2)]
    assert sw.siblings(det.super_weights) == [{"layer": 1, "shared": "col", "index": planted.COL_K,
                                               "members": [list(PLANTED), [1, planted.ROW_J2, planted.COL_K]]}]


@pytest.mark.parametrize("echo_layer", [2, 3])  # cancelling in a middle layer (persistence), in the last layer
def test_echo_is_reported_not_kept(tok, echo_layer):
    det = sw.find_super_weights(planted.planted_model(tok, size="d4", echo_layer=echo_layer), tok)
    assert [s.coord for s in det.super_weights] == [PLANTED]
    assert [s.coord for s in det.echoes] == [(echo_layer, planted.ROW_J, planted.COL_ECHO)]
    assert det.echoes[0].output_spike < 0  # it writes back the opposite of the super activation


def test_absolute_rule_is_the_official_one(model, tok):
    assert swd.detect(model, tok, rule="absolute") == []  # input spike ~18 < 50: missed, like SmolLM2-1.7B
    assert [s.coord for s in swd.detect(model, tok, rule="absolute", abs_threshold=5.0)] == [PLANTED]


def test_spike_profile(model, tok):
    prof = sw.spike_profile(model, tok)
    rows = prof["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"layer", "max_abs_input", "max_abs_output", "input_channel", "output_channel",
                            "token_index", "input_token_index"}
    r = rows[1]
    assert (r["input_channel"], r["output_channel"], r["token_index"]) == (planted.COL_K, planted.ROW_J, 0)
    assert r["max_abs_input"] > 100 * rows[0]["max_abs_input"]
    json.dumps(prof)


def test_spike_stats_is_the_detectors_statistic_in_one_forward(model, tok):
    ids = probes.encode(tok, sw.OFFICIAL_PROMPT)
    calls = []
    h = model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    model.train()
    stats = sw.spike_stats(model, ids)
    h.remove()
    assert calls == [1] and model.training  # one forward; the mode is restored
    model.eval()
    assert set(stats) == {"spike_in_ratio", "spike_out_ratio", "spike_layer"} and stats["spike_layer"] == planted.PLANT_LAYER
    _, layer, r_in, r_out = spike_ratios(sw.spike_profile(model, tok))  # what the summary reports from detect.json
    assert (stats["spike_layer"], stats["spike_in_ratio"], stats["spike_out_ratio"]) == (
        layer, pytest.approx(r_in), pytest.approx(r_out))
    assert stats["spike_in_ratio"] > 100 and stats["spike_out_ratio"] > 100
    # a batch: maxima over every sequence (BOS first in each: the same spike)
    batch = planted.self_generated(model, tok, n_seq=4, prompt_len=1, length=12)
    assert sw.spike_stats(model, batch)["spike_layer"] == planted.PLANT_LAYER
    assert all(p.grad is None for p in model.parameters())
    flat = sw.spike_stats(planted.random_model(tok, seed=1), batch)
    assert flat["spike_in_ratio"] < 3 and flat["spike_out_ratio"] < 3  # no super weight: far below 10


def test_qsparse_model_keeps_the_super_activation(tok):
    m = qsparse.convert(planted.planted_model(tok), sparsity=0.5)
    det = sw.find_super_weights(m, tok)
    assert [s.coord for s in det.super_weights] == [PLANTED]
    assert det.super_weights[0].kept_by_topk is True  # top-K keeps the largest magnitudes


# ---------------------------------------------------------------------------------------------------------
# ablations

def test_zeroing_hurts_much_more_than_pruning_other_large_weights(model, ids):
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    ref = state(model)
    base = loss(model, ids)
    with sw.zeroed(model, sws):
        zero = loss(model, ids)
    with sw.pruned_others(model, sws, 1) as pruned:
        other = loss(model, ids)
    assert len(pruned) == 1 and pruned[0][:3] != ("layers.1.mlp.down_proj", planted.ROW_J, planted.COL_K)
    assert zero - base > 0.05
    assert zero - base > 20 * abs(other - base)
    assert same_state(model, ref)


def test_restoring_the_super_activation_recovers_most_of_the_loss(model, ids):
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    ref = state(model)
    base = loss(model, ids)
    with sw.zeroed(model, sws):
        zero = loss(model, ids)
    with sw.restored_activation(model, sws):
        assert model.model.layers[1].mlp.down_proj.weight[planted.ROW_J, planted.COL_K].item() == 0.0
        restored = loss(model, ids)
    # only BOS activates channel K here, so writing back Y[:, 0, J] undoes almost all of the damage
    assert (zero - restored) / (zero - base) > 0.95
    assert same_state(model, ref)
    assert not model.model.layers[1].mlp.down_proj._forward_hooks


@pytest.mark.parametrize("offset", [12, 6])
def test_restoring_per_sequence_works_on_windows_with_bos_mid_window(model, tok, offset):
    """Through the evaluation path (contiguous windows of a stream): every window holds one BOS, at 24 - offset.
    The fixed-index rule writes back position 0 (no super activation there) and recovers nothing; the
    per-sequence rule finds the BOS in each window and recovers all of the loss increase."""
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    stream = planted.self_generated(model, tok, n_seq=17, prompt_len=1, length=24).flatten().numpy()[offset:]
    windows = stream[: 16 * 24].reshape(16, 24)
    assert ((windows == tok.bos_token_id).sum(1) == 1).all() and (windows[:, 24 - offset] == tok.bos_token_id).all()

    def val_loss():
        return probes.perplexity(model, stream, 24, 16 * 24, 8)["loss"]

    base = val_loss()
    with sw.zeroed(model, sws):
        zero = val_loss()
    with sw.restored_activation(model, sws, position=0):
        fixed = val_loss()
    with sw.restored_activation(model, sws):
        per_sequence = val_loss()
    assert zero - base > 0.1
    assert abs((zero - fixed) / (zero - base)) < 0.05  # measured 0.004 (offset 12), -0.002 (offset 6)
    assert 1.0 <= (zero - per_sequence) / (zero - base) < 1.3  # measured 1.09, 1.17


def test_super_positions_are_found_per_sequence(model, tok):
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    ids = planted.self_generated(model, tok, n_seq=3, prompt_len=1, length=12)
    bos = ids[:, :1]
    rolled = torch.stack([torch.roll(r, s) for r, s in zip(ids, (0, 5, 11))])  # BOS at 0, 5, 11
    assert [int((r == bos[0, 0]).nonzero()) for r in rolled] == [0, 5, 11]
    seen = []
    down = model.model.layers[planted.PLANT_LAYER].mlp.down_proj
    with torch.no_grad():
        for restore in (False, True):
            with sw.restored_activation(model, sws) if restore else contextlib.nullcontext():
                # forward hooks run in registration order: this one, registered last, sees the final output
                h = down.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
                model(input_ids=rolled)
                h.remove()
    orig, restored = seen
    assert sw.super_positions(orig[..., planted.ROW_J]).tolist() == [0, 5, 11]
    for b, t in enumerate((0, 5, 11)):  # written back exactly where each sequence has its BOS
        assert restored[b, t, planted.ROW_J] == pytest.approx(float(orig[b, t, planted.ROW_J]), rel=1e-5)
        assert orig[b, t, planted.ROW_J] > 5
    other = torch.ones(3, 12, dtype=torch.bool)
    other[[0, 1, 2], [0, 5, 11]] = False
    assert restored[..., planted.ROW_J][other].abs().max() < 0.1  # elsewhere: zeroed weight, no super activation


def test_zeroing_the_super_weight_raises_stopword_probability(tok):
    """The paper's Fig. 4 on a fixture with the mechanism it implies: an attention sink on BOS held by the super
    activation. Zeroed, the head reads the other tokens and the stopwords take the probability mass; pruning the
    largest other weight changes nothing; without the sink circuit zeroing moves them by almost nothing."""
    prompts = probes.last_word_prompts(tok, planted.documents(48), 48)
    stop = probes.stopword_ids(tok)
    assert len(prompts) == 48 and set(stop) == {"the", ".", ","}
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]

    def probs(m):
        return probes.prompt_probes(m, prompts, stop)["stopword_prob"]

    m = planted.planted_model(tok, stopword_sink=True)
    assert [s.coord for s in sw.find_super_weights(m, tok).super_weights] == [PLANTED]
    before = probs(m)
    with sw.zeroed(m, sws):
        after = probs(m)
        top = probes.top_tokens(m, tok)[0]
    with sw.pruned_others(m, sws, 1):
        control = probs(m)
    # measured: the 0.0000 -> 0.569, "." 0.0000 -> 0.270, "," 0.0000 -> 0.161
    assert sum(before.values()) < 1e-3 and sum(after.values()) > 0.9
    assert all(after[w] > 100 * before[w] for w in stop)
    assert all(control[w] == pytest.approx(before[w], rel=0.05, abs=1e-6) for w in stop)
    assert top["token"] == " the" and top["prob"] > 0.5  # "Summer is hot. Winter is" -> " the" (the paper: 9%)
    plain = planted.planted_model(tok)  # the same super weight without the sink circuit
    base = probs(plain)
    with sw.zeroed(plain, sws):
        moved = sum(probs(plain).values()) - sum(base.values())
    assert abs(moved) < 0.01 < sum(after.values()) - sum(before.values())


def test_scale_factor_one_is_the_original_and_the_curve_has_its_minimum_there(model, ids):
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    ref = state(model)
    x = ids[:2]
    with torch.no_grad():
        logits = model(input_ids=x).logits
        with sw.scaled(model, sws, 1.0):
            assert torch.equal(model(input_ids=x).logits, logits)
    curve = {}
    for f in (0.0, 1.0, 3.0):
        with sw.scaled(model, sws, f):
            curve[f] = loss(model, ids)
    assert curve[0.0] > curve[1.0] + 0.05 and curve[3.0] > curve[1.0] + 0.05
    assert same_state(model, ref)


def test_ternary_model_scales_the_effective_weight_not_the_latent_one(tok):
    """In a 1.58-bit model the latent weight x 0.25..3 rounds to the same ternary value: a flat curve by
    construction (and the planted 0.4 outlier is just alpha x 1 there: a ternary matrix holds no outlier).
    `scaled` scales the effective weight's contribution instead: Y_f[..., J] = Y_1[..., J] + (f - 1) X[..., K] W_eff."""
    m = qsparse.convert(planted.planted_model(tok), sparsity=0.0, weight_bits="1.58")
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    down = m.model.layers[planted.PLANT_LAYER].mlp.down_proj
    x = planted.self_generated(m, tok, n_seq=4, prompt_len=1, length=12)
    ref_state = state(m)
    w_eff = float(sw.effective_weight(down)[planted.ROW_J, planted.COL_K])
    assert 0 < w_eff < 0.05  # alpha (the absmean scale), not 0.4

    def down_io(f=None, latent_x3=False):
        seen = []
        with contextlib.ExitStack() as stack, torch.no_grad():
            if f is not None:
                stack.enter_context(sw.scaled(m, sws, f))
            if latent_x3:
                stack.enter_context(sw.edited([(down, planted.ROW_J, planted.COL_K)]))
                down.weight[planted.ROW_J, planted.COL_K] *= 3
            h = down.register_forward_hook(lambda mod, a, out: seen.append((a[0].clone(), out.clone())))
            m(input_ids=x)  # registered last, the hook sees the final output
            h.remove()
        return seen[0]

    x_in, y1 = down_io()
    x_k = sw.effective_input(down, x_in)[..., planted.COL_K]
    _, y_latent = down_io(latent_x3=True)
    assert torch.allclose(y_latent[..., planted.ROW_J], y1[..., planted.ROW_J], rtol=0.01, atol=1e-4)  # flat
    for f in (0.0, 0.5, 3.0):
        _, yf = down_io(f)
        assert torch.allclose(yf[..., planted.ROW_J], y1[..., planted.ROW_J] + (f - 1) * x_k * w_eff, atol=1e-5)
        other = torch.ones(yf.shape[-1], dtype=torch.bool)
        other[planted.ROW_J] = False
        assert torch.equal(yf[..., other], y1[..., other])  # only channel J moves
    assert torch.equal(down_io(1.0)[1], y1)
    assert same_state(m, ref_state) and not down._forward_hooks
    assert sw.scale_target(m, sws).startswith("effective ternary weight")
    assert sw.scale_target(planted.planted_model(tok), sws) == "weight"


def test_effective_scaling_equals_weight_scaling_in_full_precision(model, tok, monkeypatch):
    """The hook's arithmetic, checked where both ways exist: Y[..., J] + (f - 1) X[..., K] W[J, K] equals the
    output with W[J, K] scaled by f."""
    x = planted.self_generated(model, tok, n_seq=2, prompt_len=1, length=8)
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    with torch.no_grad():
        with sw.scaled(model, sws, 2.5):
            by_weight = model(input_ids=x).logits
        monkeypatch.setattr(swa, "is_ternary", lambda mod: True)  # take the hook path on a full-precision model
        with sw.scaled(model, sws, 2.5):
            assert model.model.layers[planted.PLANT_LAYER].mlp.down_proj._forward_hooks
            by_hook = model(input_ids=x).logits
        with sw.restored_activation(model, sws):  # zeroing by the hook, then restoring: the original BOS output
            restored = model(input_ids=x).logits
        original = model(input_ids=x).logits
    assert torch.allclose(by_hook, by_weight, atol=1e-4) and not torch.allclose(by_weight, original, atol=1e-2)
    assert torch.allclose(restored[:, 0], original[:, 0], atol=1e-4)  # BOS: its super activation written back


def test_largest_other_weights_skip_the_super_weight(model):
    sws = [sw.SuperWeight(*PLANTED, planted.SUPER, 0, 0, 0)]
    others = sw.largest_other_weights(model, sws, 5)
    values = [abs(v) for *_, v in others]
    assert len(others) == 5 and values == sorted(values, reverse=True)
    assert all((name, r, c) != ("layers.1.mlp.down_proj", planted.ROW_J, planted.COL_K) for _, name, r, c, _ in others)
    # without excluding it, the planted weight would be the largest of all down_proj weights
    assert others[0][4] != pytest.approx(planted.SUPER) and abs(others[0][4]) < planted.SUPER
    everywhere = sw.largest_other_weights(model, sws, 5, scope="all")  # a superset of the down_proj pool
    assert all(abs(e[4]) >= abs(o[4]) for e, o in zip(everywhere, others))
    assert all((name, r, c) != ("layers.1.mlp.down_proj", planted.ROW_J, planted.COL_K) for _, name, r, c, _ in everywhere)
    assert abs(everywhere[0][4]) < 0.1  # the planted circuit has no other outlier (gate/up entries are 0.075)


# ---------------------------------------------------------------------------------------------------------
# known coordinates

def test_known_table_gives_every_weight_its_source():
    table = sw.known_table()
    models = table["models"]
    assert len(models) == 11
    weights = [w for e in models.values() for w in e["weights"]]
    assert len(weights) == 26
    assert all(w["status"] in sw.KNOWN_STATUSES and w["sources"] and set(w["sources"]) <= set(table["sources"])
               for w in weights)
    counts = {st: sum(w["status"] == st for w in weights) for st in sw.KNOWN_STATUSES}
    assert counts == {"agreed": 18, "paper_only": 2, "code_only": 3, "disputed": 2, "unverified": 1}
    # the authors' code map holds 8 models, 22 weights (with OLMo-1B's second weight in layer 2)
    code = {h: [w["coord"] for w in e["weights"] if "code_map" in w["sources"]] for h, e in models.items()}
    assert sum(map(len, code.values())) == 22 and sum(bool(c) for c in code.values()) == 8
    assert code["allenai/OLMo-1B-0724-hf"] == [[1, 1764, 1710], [2, 1764, 8041]]
    paper = [w["coord"] for w in models["allenai/OLMo-1B-0724-hf"]["weights"] if "paper_table2" in w["sources"]]
    assert paper == [[1, 1764, 1710], [1, 1764, 8041]]
    assert models["HuggingFaceTB/SmolLM2-1.7B"]["weights"][0]["status"] == "unverified"
    hub, entry = sw.known_entry("meta-llama/Llama-2-7b-hf")
    assert hub == "meta-llama/Llama-2-7b-hf" and [w["coord"] for w in entry["weights"]] == [[1, 2533, 7890]]
    assert sw.known_entry("/models/OLMo-1B-0724-hf/")[0] == "allenai/OLMo-1B-0724-hf"  # a local copy, by its folder
    assert sw.known_entry("mistral-7b")[0] == "mistralai/Mistral-7B-v0.1"
    assert sw.known_entry("runs/d6-s0.5") is None


def test_comparison_scores_each_published_weight_by_its_source():
    def found(*coords):
        return [sw.SuperWeight(*c, 1.0, 0, 0, 0) for c in coords]

    cmp = sw.compare_known(found((2, 2231, 2278), (5, 1, 1)), *sw.known_entry("huggyllama/llama-13b"))
    assert cmp["matched"] == [[2, 2231, 2278]] and cmp["missed"] == [[2, 2231, 6939]]
    assert cmp["extra"] == [[5, 1, 1]] and cmp["agrees"] is False
    assert cmp["by_source"]["code_map"] == {"matched": [[2, 2231, 2278]], "missed": [[2, 2231, 6939]]}
    olmo = sw.known_entry("olmo-1b-0724")
    # the first weight alone agrees: the disputed second one is neither missed nor required
    cmp = sw.compare_known(found((1, 1764, 1710)), *olmo)
    assert cmp["agrees"] is True and cmp["missed"] == [] and cmp["extra"] == []
    assert [(w["coord"], w["detected"]) for w in cmp["disputed"]] == [([2, 1764, 8041], False), ([1, 1764, 8041], False)]
    assert cmp["by_source"]["code_map"]["missed"] == [[2, 1764, 8041]]
    assert cmp["by_source"]["paper_table2"]["missed"] == [[1, 1764, 8041]]
    # the code map's second weight detected: matched (code map), not "extra"
    cmp = sw.compare_known(found((1, 1764, 1710), (2, 1764, 8041)), *olmo)
    assert cmp["matched"] == [[1, 1764, 1710], [2, 1764, 8041]] and cmp["extra"] == [] and cmp["agrees"] is True
    assert cmp["by_source"]["code_map"] == {"matched": [[1, 1764, 1710], [2, 1764, 8041]], "missed": []}


def test_ablation_tells_a_super_weight_from_a_large_weight_that_does_nothing(tok):
    """A planted inert weight as large as the super weight: the detector ignores it, the prune-others control
    picks it first, and zeroing it alone changes the loss by almost nothing."""
    m = planted.planted_model(tok, inert=planted.SUPER)
    det = sw.find_super_weights(m, tok)
    assert [s.coord for s in det.super_weights] == [PLANTED]
    ids = planted.self_generated(m, tok, n_seq=16, prompt_len=1)
    inert = sw.SuperWeight(planted.PLANT_LAYER, planted.ROW_INERT, planted.COL_INERT, planted.SUPER, 0, 0, 0)
    ref = state(m)
    res = sw.single_weight_effects(m, det.super_weights + [inert], lambda: loss(m, ids))
    assert same_state(m, ref)
    (sup, ine), control = res["weights"], res["control"]
    assert sup["coord"] == list(PLANTED) and sup["verdict"] == "super weight" and sup["loss_increase"] > 0.05
    assert ine["value"] == pytest.approx(planted.SUPER) and ine["verdict"] == "inert"
    # measured: +0.099 nats (super weight), -0.0002 (inert), -0.0019 (control)
    assert abs(ine["loss_increase"]) < 0.01 and sup["loss_increase"] > 30 * abs(ine["loss_increase"])
    # the control: the largest down_proj weight outside the list (an ordinary one, |W| < 0.1)
    assert control["name"].endswith("mlp.down_proj") and abs(control["value"]) < 0.1
    assert abs(control["loss_increase"]) < 0.01
    # without the inert weight in the list, the prune-others control picks it first
    assert sw.largest_other_weights(m, det.super_weights, 1)[0][1:4] == ("layers.1.mlp.down_proj", planted.ROW_INERT,
                                                                          planted.COL_INERT)


# ---------------------------------------------------------------------------------------------------------
# bad input

def test_bad_input_is_one_clear_error(model, tok, tmp_path):
    with pytest.raises(UserError, match="no linear module 'mlp.c_proj'"):
        swd.detect(model, tok, module="mlp.c_proj")
    with pytest.raises(UserError, match="tokenizes to nothing"):
        swd.detect(model, tok, prompt="")
    with pytest.raises(UserError, match="threshold must be > 1"):
        swd.detect(model, tok, threshold=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        sw.cli_superweight(["detect", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "d.json")])
    with pytest.raises(UserError, match="cannot read super weights"):
        sw.load_detection(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="unknown superweight subcommand"):
        sw.cli_superweight(["detekt"])


# ---------------------------------------------------------------------------------------------------------
# CLI on saved checkpoints

def test_cli_detect_on_a_saved_checkpoint(model, tok, tmp_path, capsys):
    ckpt = tmp_path / "planted"
    save(model, ckpt, tokenizer=tok)
    out = tmp_path / "detect.json"
    assert sw.cli_superweight(["detect", "--model", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert [[s["layer"], s["row"], s["col"]] for s in res["super_weights"]] == [list(PLANTED)]
    assert res["super_weights"][0]["value"] == pytest.approx(planted.SUPER)
    assert res["dtype"] == "torch.float32" and res["known"] is None and res["qsparse"] is None
    assert len(res["profile"]["layers"]) == 3 and "torch" in res["versions"]
    printed = capsys.readouterr().out
    assert f"<- super weight ({planted.ROW_J}, {planted.COL_K})" in printed and "max|input|" in printed
    with pytest.raises(UserError, match="is not in known_super_weights.json"):
        sw.cli_superweight(["detect", "--model", str(ckpt), "--out", str(out), "--known", "gpt-5"])
    # --known compares with the listed coordinates (here, of course, they disagree)
    sw.cli_superweight(["detect", "--model", str(ckpt), "--out", str(out), "--known", "llama-7b"])
    known = json.loads(out.read_text())["known"]
    assert known["missed"] == [[2, 3968, 7003]] and known["extra"] == [list(PLANTED)] and known["agrees"] is False
    assert known["by_source"]["paper_table2"] == {"matched": [], "missed": [[2, 3968, 7003]]}


def test_cli_ablate_writes_ablation_and_scale(model, tok, tmp_path):
    ckpt, data = tmp_path / "planted", tmp_path / "data"
    save(model, ckpt, tokenizer=tok)
    planted.write_dataset(data, tok, tmp_path / "tok")
    det = tmp_path / "detect.json"
    sw.cli_superweight(["detect", "--model", str(ckpt), "--out", str(det)])
    out = tmp_path / "ablate"
    sw.cli_superweight(["ablate", "--model", str(ckpt), "--data", str(data), "--detect", str(det), "--out", str(out),
                        "--val-tokens", "128", "--seq-len", "32", "--prompts", "8", "--scales", "0", "1", "2",
                        "--n-others", "1", "50"])
    abl = json.loads((out / "ablation.json").read_text())
    names = [c["condition"] for c in abl["conditions"]]
    assert names == ["original", "zero_super_weights", "zero_super_weights_restore_activation",
                     "prune_1_other_weights", "prune_50_other_weights"]
    orig = abl["conditions"][0]
    assert orig["val"]["n_tokens"] == 128 and orig["n_prompts"] == 8
    assert set(orig["stopword_prob"]) == {"the", ".", ","} and orig["stopword_ratio"]["the"] == 1.0
    assert len(orig["top_tokens"]) == 10
    assert abl["settings"]["same_tokenizer"] is True
    assert abl["conditions"][1]["val"]["loss"] != orig["val"]["loss"]
    lo, zero, rest = (abl["conditions"][i]["val"]["loss"] for i in range(3))
    assert abl["summary"]["restore_recovered_fraction"] == pytest.approx((zero - rest) / (zero - lo))
    assert abl["settings"]["restore"].startswith("per sequence")
    per = abl["summary"]["per_weight"]
    assert [w["coord"] for w in per["weights"]] == [list(PLANTED)] and per["base"] == orig["val"]["loss"]
    assert per["weights"][0]["loss_increase"] == pytest.approx(abl["conditions"][1]["val"]["loss"] - per["base"])
    scale = json.loads((out / "scale.json").read_text())
    assert scale["factors"] == [0, 1, 2] and [p["factor"] for p in scale["points"]] == [0, 1, 2]
    assert scale["points"][1]["val"]["loss"] == orig["val"]["loss"]  # factor 1 = the original
    assert scale["points"][0]["val"]["loss"] == abl["conditions"][1]["val"]["loss"]  # factor 0 = zeroed
