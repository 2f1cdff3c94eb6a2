"""The layer rule and the echo filter on real published activations: Llama-7B's per-layer maxima as the Super
Weight authors' figures notebook prints them (tests/fixtures/published/llama7b_down_proj_maxima.json, with its
source: repository, path, commit, cells, and what each array means).

Layers are 0-based, as in the authors' code and the paper (Llama-7B's super weight: layers[2].mlp.down_proj).
What the data allows: the layer rule sees exactly what it needs (per-layer max |input| and max |output| of
down_proj). The echo filter needs h[t, j], the residual stream after the layer at the spike's token and channel;
the notebook prints only the max over all tokens and channels (Fig. 4), an upper bound on |h[t, j]|: it proves
layer 30 an echo, and it is consistent with layer 2 persisting without proving it. The concentration test (the
spike standing out within its own token) needs per-channel values the notebook does not give.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsescale.superweight.detect import ABS_THRESHOLD, DEFAULT_THRESHOLD, PERSIST, is_echo, layer_rule

FIXTURE = Path(__file__).parent / "fixtures" / "published" / "llama7b_down_proj_maxima.json"
DATA = json.loads(FIXTURE.read_text())
N = DATA["n_layers"]
IN, OUT = DATA["down_proj_input_max"], DATA["down_proj_output_max"]
# Fig. 4 prints the hidden state entering layer i (entry 0: embeddings): the output of layer L is entry L + 1.
RESIDUAL_AFTER = {layer: DATA["residual_max_as_printed"][layer + 1] for layer in range(N - 1)}


def selected(rule: str) -> list[int]:
    """Layers kept by the layer rule, then by the echo filter (each fired layer alone: one detection pass)."""
    fires, _, _ = layer_rule(IN, OUT, rule)
    return [i for i in range(N) if fires[i] and not is_echo(i, N, OUT[i], RESIDUAL_AFTER.get(i, 0.0))]


def test_fixture_is_the_published_table_with_its_source():
    src = DATA["source"]
    assert src["repository"] == "cyita/LLMSuperWeight" and src["fork_of"] == "mengxiayu/LLMSuperWeight"
    assert src["path"] == "figures.ipynb" and len(src["commit"]) == 40 and set(src["cells"]) == {"3", "4", "6"}
    assert N == 32 and all(len(DATA[k]) == N for k in (
        "down_proj_input_max", "down_proj_output_max", "residual_max_as_printed",
        "residual_max_super_weight_removed_as_printed"))
    # the spikes as printed (signed: the element of largest |.|)
    assert (IN[2], OUT[2], IN[30], OUT[30]) == (-560.5, 1313.0, -73.5, -1474.0)


def test_residual_entries_are_the_stream_entering_each_layer():
    """Why entry L + 1 is layer L's output: zeroing layer 2's super weight first changes entry 3."""
    orig, removed = DATA["residual_max_as_printed"], DATA["residual_max_super_weight_removed_as_printed"]
    first_changed = next(i for i in range(N) if orig[i] != removed[i])
    assert first_changed == 3
    # entry 3 is layer 2's down_proj spike on top of a residual of at most entry 2
    assert abs(orig[3] - abs(OUT[2])) <= orig[2]


def test_relative_layer_rule_fires_on_layers_2_and_30_only():
    fires, r_in, r_out = layer_rule(IN, OUT)
    assert [i for i in range(N) if fires[i]] == [2, 30]
    assert r_in[2] == pytest.approx(86.08, abs=0.01) and r_out[2] == pytest.approx(304.74, abs=0.01)
    # layer 30 passes on its input by a thin margin (11.29 against 10): the rule alone does not reject it
    assert r_in[30] == pytest.approx(11.29, abs=0.01) and r_out[30] == pytest.approx(342.11, abs=0.01)
    both = [min(a, b) for a, b in zip(r_in, r_out)]
    others = [both[i] for i in range(N) if i not in (2, 30)]
    # every other layer stays below the threshold: the closest is layer 31 (input 5.41, output 27.05), then 4
    assert max(others) == pytest.approx(5.41, abs=0.01) and both.index(max(others)) == 31
    assert max(others) < DEFAULT_THRESHOLD / 1.8
    # layer 2 against the largest other layer, 30 included: input 560.5 / 73.5 = 7.6x; output 1313 < 1474
    assert abs(IN[2]) / max(abs(v) for i, v in enumerate(IN) if i != 2) == pytest.approx(7.63, abs=0.01)
    assert abs(OUT[2]) < abs(OUT[30])


def test_echo_filter_rejects_layer_30_on_the_published_residual():
    """Layer 30's output (-1474) cancels the massive activation (1336 entering it) instead of creating one: the
    stream leaving it is at most 145 anywhere, below 0.5 x 1474 = 737 (ratio 0.098): an echo, whatever h[t, j]."""
    assert 30 != N - 1  # not caught as the last layer: by persistence alone
    bound = RESIDUAL_AFTER[30]
    assert bound == 145 and bound < PERSIST * abs(OUT[30])
    assert bound / abs(OUT[30]) == pytest.approx(0.098, abs=0.001)
    assert is_echo(30, N, OUT[30], bound)
    # consistent with cancellation in one channel: 1336 - 1474 = -138, against a max of 145 after the layer
    assert abs(DATA["residual_max_as_printed"][30] + OUT[30]) <= bound


def test_echo_filter_keeps_layer_2_as_far_as_the_data_shows():
    """Layer 2's spike (1313) leaves a stream of max 1320 >= 0.5 x 1313: persistence is possible, not proven (the
    notebook does not say that the max sits at the spike's token and channel)."""
    assert RESIDUAL_AFTER[2] == 1320
    assert not is_echo(2, N, OUT[2], RESIDUAL_AFTER[2])


def test_relative_rule_with_echo_filter_selects_exactly_layer_2():
    assert selected("relative") == [2]


def test_official_absolute_rule_on_the_same_data():
    """Both maxima > 50: layers 2 and 30 (31 has output 116.6 but input 35.2); the echo filter leaves layer 2."""
    fires, _, _ = layer_rule(IN, OUT, "absolute")
    assert [i for i in range(N) if fires[i]] == [2, 30]
    assert selected("absolute") == [2]
    # what the authors' code prints as spikes, one array at a time (|value| > 50)
    assert [i for i, v in enumerate(IN) if abs(v) > ABS_THRESHOLD] == [2, 30]
    assert [i for i, v in enumerate(OUT) if abs(v) > ABS_THRESHOLD] == [2, 30, 31]


def test_echo_filter_other_branches():
    assert is_echo(N - 1, N, 100.0, 1000.0)  # last layer: nothing downstream
    assert is_echo(5, N, 100.0, 1000.0, echo_layers={5})  # seen echoing before
    assert not is_echo(5, N, -100.0, 50.0) and is_echo(5, N, -100.0, 49.9)  # the bar: persist x |Y|
