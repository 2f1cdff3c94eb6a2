import pytest
import torch

from sparsescale import config, model as M, qsparse as Q
from sparsescale.errors import UserError

VOCAB = 97


@pytest.mark.parametrize("size", list(config.SIZES))
def test_param_formula_equals_numel(size):
    args = config.get_size(size)
    counts = config.count_params(args, VOCAB)
    if counts["n_params"] > 30_000_000:  # paper sizes: check the formula on the meta device (no memory)
        with torch.device("meta"):
            m = M.build(size, VOCAB)
    else:
        m = M.build(size, VOCAB)
    got = M.param_counts(m)
    assert got["n_params"] == counts["n_params"]
    assert got["n_params_total"] == counts["n_params_total"]
    assert counts["n_params"] == M.expected_counts(m)["n_params"]


def test_paper_sizes_match_paper_shapes():
    # 300M: 24 x (4 x 1024^2 + 3 x 1024 x 2730) ~ 302M non-embedding parameters
    assert config.count_params("300M", 32000)["n_params"] == 24 * (4 * 1024**2 + 3 * 1024 * 2730 + 2 * 1024) + 1024
    assert 6.4e9 < config.count_params("7B", 32000)["n_params"] < 6.6e9


def test_tiny_sizes_span_cpu_range():
    ns = [config.count_params(f"d{d}", 2048)["n_params"] for d in range(1, 13)]
    assert ns == sorted(ns) and ns[1] < 2e5 and ns[-1] > 2e7


def test_n_active_counts_kept_inputs():
    args = config.get_size("d2")  # d_model 64, ffn 192
    c0, c5 = config.count_params(args, VOCAB, 0.0), config.count_params(args, VOCAB, 0.5)
    assert c0["n_active"] == c0["n_params"]
    # every projection reads exactly half of its inputs (64 and 192 are even)
    linear = sum(i * o for _, i, o in config.linear_shapes(args)) * args.n_layers
    assert c5["n_params"] - c5["n_active"] == linear // 2


def test_relu2_glu_is_default():
    m = M.build("d1", VOCAB)
    assert m.config.hidden_act == "relu2"
    x = torch.randn(3, 32)
    mlp = m.model.layers[0].mlp
    want = mlp.down_proj(torch.relu(mlp.gate_proj(x)) ** 2 * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want)


def test_unknown_size():
    with pytest.raises(UserError, match="unknown model size 'd99'"):
        M.build("d99", VOCAB)


@pytest.mark.parametrize("settings", [dict(sparsity=0.0), dict(sparsity=0.6),
                                      dict(sparsity=0.5, weight_bits="1.58", act_bits=8),
                                      dict(sparsity=0.5, block=16)])
def test_save_load_roundtrip_identical_logits(tmp_path, settings):
    m = M.build("d2", VOCAB, seed=1)
    Q.convert(m, **settings)
    ids = torch.randint(0, VOCAB, (2, 12))
    m.eval()
    ref = m(ids).logits
    M.save(m, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    back = M.load(tmp_path / "ckpt")
    back.eval()
    assert back.config.qsparse == m.config.qsparse
    assert len(Q.qsparse_linears(back)) == 2 * 7
    assert torch.equal(back(ids).logits, ref)


def test_plain_hf_checkpoint_loads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, hidden_act="silu")
    plain = LlamaForCausalLM(cfg)
    plain.save_pretrained(tmp_path / "plain")
    m = M.load(tmp_path / "plain")
    assert not Q.qsparse_linears(m)
    ids = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(m(ids).logits, plain(ids).logits)


def test_load_bad_path(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint"):
        M.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        M.load(tmp_path / "missing")
