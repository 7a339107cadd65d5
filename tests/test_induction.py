"""The induction task: repeated random sequences, corruption, metric, readout, normalisation,
special tokens, a BPE tokenizer, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from eap.tasks import induction, sample_table
from eap.tasks.induction import eligible_tokens

from bpe_tokenizer import byte_level_bpe
from test_ioi import ToyLM, assert_normalized, gathered, model, tok  # noqa: F401  (shared fixtures: word-level tokenizer, toy LM)


@pytest.mark.parametrize("length", [2, 7, 10])
def test_sequences_and_corruption(model, tok, length):
    n = 50
    task = induction(model, n, seed=3, length=length)
    assert task.clean.shape == task.corrupted.shape == (n, 2 * length - 1)
    special = set(tok.all_special_ids)
    pp = task.per_prompt
    for i in range(n):
        c, x = task.clean[i].tolist(), task.corrupted[i].tolist()
        seq, fresh = c[:length], x[:length]
        assert len(set(seq)) == length and len(set(fresh)) == length  # distinct tokens
        assert not set(seq) & set(fresh)  # the corruption shares no token with the sequence
        assert c[length:] == seq[:-1] and x[length:] == seq[:-1]  # same repeat in both
        assert not (set(c) | set(x)) & special
        assert int(pp["answer"][i]) == seq[-1] and pp["others"][i].tolist() == seq[:-1]
        assert int(pp["end"][i]) == 2 * length - 2
    assert torch.equal(pp["readout_tokens"], torch.cat([pp["answer"][:, None], pp["others"]], 1))
    assert torch.equal(pp["readout_pos"], pp["end"])


def test_metric_matches_independent_computation(model, tok):
    task = induction(model, 20, seed=1, length=6)
    logits = torch.randn(20, task.seq_len, len(tok), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = []
    for i in range(20):
        c = task.clean[i].tolist()
        row = logits[i, -1]
        want.append(row[c[5]] - sum(row[t] for t in c[:5]) / 5)
    got = task.metric(logits)
    torch.testing.assert_close(got, torch.stack(want))
    torch.testing.assert_close(task.readout(gathered(task, logits)), got, rtol=0, atol=1e-12)
    # sign: raising the answer's logit raises the metric by exactly that much
    bumped = logits.clone()
    bumped[torch.arange(20), -1, task.per_prompt["answer"]] += 2.0
    torch.testing.assert_close(task.metric(bumped) - got, torch.full((20,), 2.0, dtype=torch.float64))


def test_normalized(model):
    assert_normalized(induction(model, 40, seed=4, metric="normalized"), model)


def test_reproducible_subset_and_pool(model, tok):
    a, b, c = induction(model, 12, seed=5), induction(model, 12, seed=5), induction(model, 12, seed=6)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert not torch.equal(a.clean, c.clean)
    torch.manual_seed(0)
    r = torch.rand(3)
    torch.manual_seed(0)
    induction(model, 5, seed=1)
    assert torch.equal(torch.rand(3), r)
    with torch.no_grad():
        logits = model(a.clean)
    torch.testing.assert_close(torch.cat([s.metric(model(s.clean)) for s in a.batches(5)]), a.metric(logits))
    pool = list(range(40, 70))
    restricted = induction(model, 10, seed=0, length=5, tokens=pool)
    assert set(restricted.clean.flatten().tolist()) | set(restricted.corrupted.flatten().tolist()) <= set(pool)


def test_sample_table(model):
    task = induction(model, 6, seed=0, length=4)
    table = sample_table(task, k=2)
    assert task.info["clean_texts"][0] in table and task.info["answers"][1] in table


def test_errors(model):
    with pytest.raises(ValueError, match="n must be"):
        induction(model, -1)
    with pytest.raises(ValueError, match="length"):
        induction(model, 3, length=1)
    with pytest.raises(ValueError, match="distinct tokens"):
        induction(model, 3, length=5, tokens=range(3, 10))
    with pytest.raises(ValueError, match="metric"):
        induction(model, 3, metric="logprob")


def test_bpe_tokenizer_and_model_vocab():
    """Any tokenizer: a byte-level BPE's ids, without its special token, below the model's d_vocab."""
    bpe = byte_level_bpe(["the cat sat on the mat and then the dog ran"] * 20, vocab_size=320)
    pool = eligible_tokens(bpe)
    assert bpe.eos_token_id not in pool.tolist() and pool.numel() == len(bpe) - 1
    task = induction(ToyLM(bpe), 30, seed=2, length=8)
    used = set(task.clean.flatten().tolist()) | set(task.corrupted.flatten().tolist())
    assert bpe.eos_token_id not in used and max(used) < len(bpe)
    assert eligible_tokens(bpe, d_vocab=100).max() < 100
