"""Probes on models whose answers are known: a uniform model, a bigram table, an oracle."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import planted
from sparsescale.superweight import probes
from sparsescale.errors import UserError


class TableLM(nn.Module):
    """logits[b, t] = table[ids[b, t]]: a bigram model (zeros: uniform)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


class OracleLM(nn.Module):
    """Knows the continuation of each of a set of sequences: logits[b, t] = 10 * onehot(seq[t + 1])."""

    def __init__(self, seqs: list[list[int]], vocab: int):
        super().__init__()
        self.next = {tuple(s[: t + 1]): s[t + 1] for s in seqs for t in range(len(s) - 1)}
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            row = input_ids[i].tolist()
            for j in range(t):
                nxt = self.next.get(tuple(row[: j + 1]))
                if nxt is not None:
                    logits[i, j, nxt] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tok():
    return planted.tokenizer()


@pytest.fixture(scope="module")
def bigram(tok):
    g = torch.Generator().manual_seed(0)
    return TableLM(torch.randn(len(tok), len(tok), generator=g) * 3)


def test_encode_prepends_bos_once_and_refuses_empty_prompts(tok):
    ids = probes.encode(tok, "Summer is hot.")
    assert ids[0] == tok.bos_token_id and ids[1:] == tok("Summer is hot.")["input_ids"]
    assert probes.encode(tok, "Summer", bos=False) == tok("Summer")["input_ids"]
    assert probes.bos_added(tok, "Summer")
    with pytest.raises(UserError, match="tokenizes to nothing"):
        probes.encode(tok, "")
    with pytest.raises(UserError, match="tokenizes to nothing"):
        probes.encode(tok, "<|endoftext|>")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok):
    v = len(tok)
    tokens = np.arange(1000) % v
    res = probes.perplexity(TableLM(torch.zeros(v, v)), tokens, seq_len=64, n_tokens=500, batch_size=3)
    assert res["n_tokens"] == 7 * 64  # 500 // 64 windows
    assert res["ppl"] == pytest.approx(v, rel=1e-5) and res["loss"] == pytest.approx(np.log(v), rel=1e-6)


def test_perplexity_and_sequence_loss_match_a_direct_computation(bigram, tok):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, len(tok), (257,), generator=g)
    logp = bigram.table.detach().log_softmax(-1)
    direct = float(-logp[tokens[:-1], tokens[1:]].mean())
    assert probes.perplexity(bigram, tokens.numpy(), 64, 256, batch_size=2)["loss"] == pytest.approx(direct, rel=1e-5)
    ids = tokens[:256].view(4, 64)
    assert probes.sequence_loss(bigram, ids, batch_size=3)["loss"] == pytest.approx(
        float(-logp[ids[:, :-1], ids[:, 1:]].mean()), rel=1e-5)
    skipped = probes.sequence_loss(bigram, ids, skip=5)
    assert skipped["n_tokens"] == 4 * (63 - 5)
    assert skipped["loss"] == pytest.approx(float(-logp[ids[:, 5:-1], ids[:, 6:]].mean()), rel=1e-5)


def test_split_last_word():
    assert probes.split_last_word("He opened the door.") == ("He opened the", "door")
    assert probes.split_last_word("She said goodbye!\") ") == ("She said", "goodbye")
    assert probes.split_last_word('She said "goodbye!"') is None  # the word must follow a space
    assert probes.split_last_word("It cost 42.") is None  # not a word
    assert probes.split_last_word("a") is None


def test_paragraphs_keep_long_blocks_only():
    texts = ["short one\n\n" + "w " * 25 + "end.\nanother short", "x " * 30]
    # the lines of one blank-line separated block are one paragraph: 26 + 2 words
    assert [len(p.split()) for p in probes.paragraphs(texts, min_words=20)] == [28, 30]
    verse = "\n".join(["one two three four five"] * 5) + "\n\n" + "six seven"
    assert [len(p.split()) for p in probes.paragraphs([verse], min_words=20)] == [25]


def test_last_word_prompts_and_context_truncation(tok):
    prompts = probes.last_word_prompts(tok, planted.TEXT, n=100, min_words=10)
    assert len(prompts) == len(planted.TEXT)
    for p, text in zip(prompts, planted.TEXT):
        assert p.context[0] == tok.bos_token_id
        assert tok.decode(p.target) == f" {p.word}" and text.rstrip(".").endswith(p.word)
        assert tok.decode(p.context[1:]) == text[: text.rstrip(".").rfind(" ")]
    short = probes.last_word_prompts(tok, planted.TEXT, n=2, max_context_tokens=8, min_words=10)
    assert len(short) == 2 and all(len(p.context) == 8 and p.context[0] == tok.bos_token_id for p in short)
    assert short[0].context[1:] == prompts[0].context[-7:]


def test_last_word_accuracy_with_an_oracle_and_a_shifted_oracle(tok):
    texts = planted.TEXT + ["The miller watched the river rise in the autumn rain and the wheel turn and"]
    prompts = probes.last_word_prompts(tok, texts, min_words=10)
    seqs = [p.context + p.target for p in prompts]
    res = probes.prompt_probes(OracleLM(seqs, len(tok)), prompts, batch_size=4)
    assert res == {"last_word_accuracy": 1.0, "n_prompts": 7, "n_correct": 7, "stopword_prob": {}}
    # an oracle that knows only the first target token of multi-token words gets exactly the one-token words
    first_only = [p.context + p.target[:1] for p in prompts]
    n_single = sum(len(p.target) == 1 for p in prompts)
    assert 0 < n_single < len(prompts)
    res = probes.prompt_probes(OracleLM(first_only, len(tok)), prompts)
    assert res["n_correct"] == n_single


def test_stopword_probabilities_match_the_bigram_table(bigram, tok):
    stop = probes.stopword_ids(tok)
    assert set(stop) == {"the", ".", ","} and tok.decode([stop["the"]]) == " the"
    prompts = probes.last_word_prompts(tok, planted.TEXT, min_words=10)
    res = probes.prompt_probes(bigram, prompts, stop)
    probs = bigram.table.detach().softmax(-1)
    for w, tid in stop.items():
        want = np.mean([float(probs[p.context[-1], tid]) for p in prompts])
        assert res["stopword_prob"][w] == pytest.approx(want, rel=1e-5)
    uniform = probes.prompt_probes(TableLM(torch.zeros(len(tok), len(tok))), prompts, stop)
    assert uniform["stopword_prob"]["."] == pytest.approx(1 / len(tok))
    with pytest.raises(UserError, match="no last-word prompts"):
        probes.prompt_probes(bigram, [])


def test_top_tokens_follow_the_last_token(bigram, tok):
    top = probes.top_tokens(bigram, tok, k=5)
    last = tok(probes.SUMMER_PROMPT)["input_ids"][-1]
    probs = bigram.table.detach()[last].softmax(-1)
    assert [t["id"] for t in top] == probs.topk(5).indices.tolist()
    assert [t["prob"] for t in top] == pytest.approx(probs.topk(5).values.tolist())
    assert top[0]["token"] == tok.decode([top[0]["id"]])


def test_documents_and_streams_round_trip(tok):
    sep = tok.bos_token_id
    docs = ["One two three.", "Four five."]
    stream = probes.encode_stream(tok, docs, 1000)
    assert stream[0] == sep and (stream == sep).sum() == 2
    assert probes.documents_from_tokens(tok, stream, sep) == docs
    assert len(probes.encode_stream(tok, docs, 5)) == 5


def test_eval_data_uses_stored_tokens_or_re_encodes_for_another_tokenizer(tok, tmp_path):
    planted.write_dataset(tmp_path / "data", tok, tmp_path / "tok")
    own = probes.eval_data(tok, tmp_path / "data", 64, n_calib=32)
    assert own["same_tokenizer"] and len(own["val"]) > 64 and len(own["train"]) > 32
    assert all(t.startswith("Part ") for t in own["val_texts"])
    other_tok = planted.tokenizer(vocab_size=280)  # another vocabulary: the documents are decoded and re-encoded
    other = probes.eval_data(other_tok, tmp_path / "data", 64, n_calib=32)
    assert not other["same_tokenizer"] and len(other["val"]) == 65 and len(other["train"]) == 33
    assert other["val_texts"] == own["val_texts"]
    assert other_tok.decode(other["val"][1:20].tolist()) == other_tok.decode(
        other_tok(own["val_texts"][0])["input_ids"][:19])
