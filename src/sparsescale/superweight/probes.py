"""Evaluation probes of the super-weight paper, generic over any causal LM that maps input_ids to `.logits`.

Features
- `encode(tokenizer, text)`: token ids of a prompt, BOS first where the tokenizer defines one (our datasets
  put the separator/BOS before every document, and HF Llama tokenizers add BOS themselves); a prompt that
  tokenizes to nothing is a UserError.
- `perplexity(model, tokens, seq_len, n_tokens)`: validation loss (nats/token) and perplexity on a 1-D token
  stream, over the same contiguous windows as the training loop's validation (`data.val_batches`).
  `sequence_loss(model, ids, skip)`: the same on a fixed (B, T) batch of ids (the first `skip` targets unscored).
- Last-word (LAMBADA-style) prompts built from held-out paragraphs: context = the paragraph up to its last
  word (final punctuation dropped), target = " word"; a prompt counts as correct when the greedy
  (argmax) prediction reproduces every token of the target (teacher forcing on the target tokens, which
  equals greedy decoding of the whole word).
- Averaged next-token probability of stopwords ("the", ".", ",") at the end of those contexts.
- `top_tokens(model, tokenizer, "Summer is hot. Winter is")`: the k most likely next tokens.
- `run_probes(...)`: all of the above in one dict (what each ablation condition records).
- `eval_data(tokenizer, data_dir, n_val)`: the validation stream and texts of a prepared dataset in the model's
  tokenizer (the stored tokens when it is the dataset's tokenizer, else the documents decoded and re-encoded),
  and a train stream for calibration.

Nothing here modifies the model; inputs go to the model's device; everything runs under no_grad in eval mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsescale import data as d
from sparsescale.errors import UserError

SUMMER_PROMPT = "Summer is hot. Winter is"
STOPWORDS = ("the", ".", ",")
# final word of a paragraph: letters only (LAMBADA targets are words), then optional closing punctuation
_LAST_WORD = re.compile(r"(\s)([A-Za-z]{2,})([.!?,;:'\")\]]*)\s*$")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) float32 logits of a causal LM for (B, T) ids (no cache, model's device)."""
    out = model(input_ids=ids.to(model_device(model)), use_cache=False)
    return out.logits.float()


def encode(tokenizer, text: str, bos: bool = True) -> list[int]:
    """Token ids of `text`, BOS prepended if the tokenizer has one and did not add it; UserError if empty."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not [i for i in ids if i not in special]:
        raise UserError(f"prompt {text!r} tokenizes to nothing: give a prompt with some text in it")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None and ids[0] != bos_id:
        ids = [bos_id] + ids
    return ids


def bos_added(tokenizer, text: str) -> bool:
    """Whether `encode` prepended a BOS that the tokenizer itself did not add (recorded in results)."""
    return encode(tokenizer, text) != list(tokenizer(text, add_special_tokens=True)["input_ids"])


# ---------------------------------------------------------------------------------------------------------
# perplexity

@torch.no_grad()
def _mean_nll(model: nn.Module, batches) -> tuple[float, int]:
    """(mean cross-entropy in nats/token, number of predicted tokens) over (x, y) batches of shape (b, T)."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for x, y in batches:
        logits = logits_of(model, x)  # (b, T, V)
        y = y.to(logits.device)
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))  # -100: not scored
        n += int((y != -100).sum())
    model.train(was_training)
    return nll / n, n


def sequence_loss(model: nn.Module, ids, batch_size: int = 16, skip: int = 0) -> dict:
    """Loss and perplexity of fixed (B, T) ids: predicts ids[:, 1 + skip:] from the tokens before them."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 2 or ids.shape[1] < 2 + skip:
        raise UserError(f"sequence_loss needs (batch, >= {2 + skip} tokens) ids: got shape {tuple(ids.shape)}")

    def batches():
        for c in ids.split(batch_size):
            y = c[:, 1:].clone()
            y[:, :skip] = -100
            yield c[:, :-1], y

    loss, n = _mean_nll(model, batches())
    return {"loss": loss, "ppl": float(np.exp(loss)), "n_tokens": n}


def perplexity(model: nn.Module, tokens, seq_len: int, n_tokens: int, batch_size: int = 8) -> dict:
    """Loss and perplexity on n_tokens // seq_len contiguous windows from the start of a 1-D token stream."""
    loss, n = _mean_nll(model, d.val_batches(np.asarray(tokens), n_tokens, seq_len, batch_size))
    return {"loss": loss, "ppl": float(np.exp(loss)), "n_tokens": n, "seq_len": seq_len}


# ---------------------------------------------------------------------------------------------------------
# last-word prompts

@dataclass(frozen=True)
class Prompt:
    context: list[int]  # BOS + context tokens
    target: list[int]  # tokens of " word"
    word: str


def split_last_word(paragraph: str) -> tuple[str, str] | None:
    """(context, word) with the final punctuation dropped, or None if the paragraph does not end in a word."""
    m = _LAST_WORD.search(paragraph)
    if m is None:
        return None
    return paragraph[: m.start()].rstrip(), m.group(2)


def paragraphs(texts: list[str], min_words: int = 20) -> list[str]:
    """Paragraphs (blank-line separated blocks, their lines joined: verse keeps its stanzas) with at least
    min_words words, in input order."""
    out = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split())
            if len(block.split()) >= min_words:
                out.append(block)
    return out


def last_word_prompts(tokenizer, texts: list[str], n: int = 200, max_context_tokens: int = 256,
                      min_words: int = 20) -> list[Prompt]:
    """Up to n prompts from the paragraphs of `texts` (held-out text): context ids and target ids.

    The target is tokenized as the continuation of the context (" word"), and a paragraph is skipped when
    encode(context) is not a prefix of encode(context + " word") (the tokenizer merged across the boundary).
    Long contexts keep BOS and their last max_context_tokens tokens.
    """
    prompts = []
    for para in paragraphs(texts, min_words):
        split = split_last_word(para)
        if split is None:
            continue
        context, word = split
        ctx = encode(tokenizer, context)
        full = encode(tokenizer, f"{context} {word}")
        if full[: len(ctx)] != ctx or len(full) == len(ctx):
            continue
        target = full[len(ctx) :]
        if len(ctx) > max_context_tokens:
            ctx = ctx[:1] + ctx[len(ctx) - max_context_tokens + 1 :]
        prompts.append(Prompt(ctx, target, word))
        if len(prompts) == n:
            break
    return prompts


def _padded(prompts: list[Prompt]) -> tuple[torch.Tensor, list[int]]:
    """(B, T) ids of context + target, right-padded (causal: padding never changes earlier positions)."""
    seqs = [p.context + p.target for p in prompts]
    width = max(map(len, seqs))
    pad = seqs[0][0]
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, [len(p.context) for p in prompts]


@torch.no_grad()
def prompt_probes(model: nn.Module, prompts: list[Prompt], stop_ids: dict[str, int] | None = None,
                  batch_size: int = 16) -> dict:
    """Last-word accuracy and the mean next-token probability of each stopword after the contexts."""
    if not prompts:
        raise UserError("no last-word prompts: the held-out text has no paragraph of enough words ending in a word; "
                        "lower min_words or use a larger validation split")
    stop_ids = stop_ids or {}
    was_training = model.training
    model.eval()
    correct = 0
    stop_sum = {w: 0.0 for w in stop_ids}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids, n_ctx = _padded(chunk)
        logits = logits_of(model, ids)  # (b, T, V)
        for b, p in enumerate(chunk):
            c = n_ctx[b]
            # the logits at position c-1+i predict target token i
            pred = logits[b, c - 1 : c - 1 + len(p.target)].argmax(-1).tolist()
            correct += pred == p.target
            probs = logits[b, c - 1].softmax(-1)
            for w, tid in stop_ids.items():
                stop_sum[w] += float(probs[tid])
    model.train(was_training)
    n = len(prompts)
    return {"last_word_accuracy": correct / n, "n_prompts": n, "n_correct": correct,
            "stopword_prob": {w: s / n for w, s in stop_sum.items()}}


def stopword_ids(tokenizer, words=STOPWORDS) -> dict[str, int]:
    """The single token each stopword is predicted as: " the" (after a space) else "the"; "." and ",".

    A word that is never a single token is left out (and so absent from the results).
    """
    out = {}
    for w in words:
        for variant in ((f" {w}", w) if w.isalpha() else (w,)):
            ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out[w] = ids[0]
                break
    return out


@torch.no_grad()
def top_tokens(model: nn.Module, tokenizer, prompt: str = SUMMER_PROMPT, k: int = 10) -> list[dict]:
    """The k most likely next tokens after `prompt`: [{"token", "id", "prob"}], most likely first."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    was_training = model.training
    model.eval()
    probs = logits_of(model, ids)[0, -1].softmax(-1)
    model.train(was_training)
    p, idx = probs.topk(min(k, probs.numel()))
    return [{"token": tokenizer.decode([i]), "id": i, "prob": float(q)} for q, i in zip(p.tolist(), idx.tolist())]


def run_probes(model: nn.Module, tokenizer, eval_tokens, prompts: list[Prompt], seq_len: int, n_tokens: int,
               batch_size: int = 8, summer_prompt: str = SUMMER_PROMPT) -> dict:
    """Every probe in one dict: validation loss/perplexity, last-word accuracy, stopword probabilities, top tokens."""
    out = {"val": perplexity(model, eval_tokens, seq_len, n_tokens, batch_size)}
    out.update(prompt_probes(model, prompts, stopword_ids(tokenizer), batch_size))
    out["top_tokens"] = top_tokens(model, tokenizer, summer_prompt)
    return out


# ---------------------------------------------------------------------------------------------------------
# evaluation inputs from a prepared dataset

def documents_from_tokens(tok, tokens: np.ndarray, sep_id: int) -> list[str]:
    """Decode a separator-delimited token stream into its documents' texts."""
    pieces = np.split(tokens, np.flatnonzero(tokens == sep_id))
    texts = (tok.decode(p[p != sep_id].tolist()) for p in pieces)
    return [t for t in texts if t.strip()]


def encode_stream(tok, texts: list[str], n: int) -> np.ndarray:
    """[sep] + ids of each text with the model's tokenizer, until n tokens (sep = its BOS, else EOS)."""
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out: list[int] = []
    for t in texts:
        out += ([sep] if sep is not None else []) + tok(t, add_special_tokens=False)["input_ids"]
        if len(out) >= n:
            break
    return np.asarray(out[:n], dtype=np.int64)


def eval_data(tok, data_dir: str, n_val: int, n_calib: int = 0) -> dict:
    """Validation stream + texts (and a train stream for calibration) in the model's tokenizer.

    With the dataset's own tokenizer the stored token files are used as they are; with another tokenizer
    (a hub model evaluated on our corpus) the documents are decoded and encoded again.
    """
    meta = d.load_meta(data_dir)
    data_tok = d.load_tokenizer(data_dir)
    val = d.load_tokens(data_dir, "val")
    out = {"val_texts": documents_from_tokens(data_tok, np.asarray(val), meta["sep_id"]), "train": None}
    out["same_tokenizer"] = tok.get_vocab() == data_tok.get_vocab()
    if out["same_tokenizer"]:
        out["val"] = val
        out["train"] = d.load_tokens(data_dir, "train") if n_calib else None
    else:
        out["val"] = encode_stream(tok, out["val_texts"], n_val + 1)
        if n_calib:
            train = np.asarray(d.load_tokens(data_dir, "train")[: 4 * n_calib + 1024])
            out["train"] = encode_stream(tok, documents_from_tokens(data_tok, train, meta["sep_id"]), n_calib + 1)
    return out
