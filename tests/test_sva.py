"""The subject-verb agreement task: templates, number-flip corruption, verb tokens, metric,
readout, normalisation, held-out pairs, a BPE tokenizer, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from eap.tasks import sample_table, sva
from eap.tasks.sva import NOUNS, VERBS, generate

from bpe_tokenizer import byte_level_bpe
from test_ioi import ToyLM, assert_normalized, gathered, model, tok  # noqa: F401  (shared fixtures: word-level tokenizer, toy LM)

SINGULAR = {sg for sg, _ in NOUNS}
PLURAL = {pl for _, pl in NOUNS}
FLIP = {**{sg: pl for sg, pl in NOUNS}, **{pl: sg for sg, pl in NOUNS}}


def test_prompts_corruption_and_verbs(model, tok):
    n = 120
    task = sva(model, n, seed=3)
    info, pp = task.info, task.per_prompt
    assert set(info["templates"]) == {"simple", "pp", "rc"}
    for i in range(n):
        clean, corrupt = info["clean_texts"][i].split(), info["corrupted_texts"][i].split()
        subject = clean[1]
        assert clean[0] == "The" and subject == info["subjects"][i]
        assert corrupt == [clean[0], FLIP[subject], *clean[2:]]  # only the subject's number flips
        plural = subject in PLURAL
        assert int(pp["plural"][i]) == int(plural)
        pair = next(p for p in VERBS if tok.convert_ids_to_tokens([int(pp["correct"][i])])[0] in p)
        assert tok.convert_ids_to_tokens([int(pp["correct"][i]), int(pp["wrong"][i])]) == [pair[plural], pair[not plural]]
        diff = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert diff == [1]
        if info["templates"][i] != "simple":
            assert info["attractors"][i] in clean and info["attractors"][i] != subject
    # the attractor's number is independent of the subject's: both agreeing and not occur
    disagree = [(s in PLURAL) != (a in PLURAL) for s, a in zip(info["subjects"], info["attractors"]) if a]
    assert any(disagree) and not all(disagree)


def test_metric_readout_and_sign(model, tok):
    task = sva(model, 30, seed=1)
    logits = torch.randn(30, task.seq_len, len(tok), generator=torch.Generator().manual_seed(0))
    want = torch.tensor([
        logits[i, int(task.per_prompt["end"][i]), int(task.per_prompt["correct"][i])]
        - logits[i, int(task.per_prompt["end"][i]), int(task.per_prompt["wrong"][i])]
        for i in range(30)
    ])
    got = task.metric(logits)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(task.readout(gathered(task, logits)), got, rtol=0, atol=0)
    # a model that always says the plural forms: positive exactly on plural subjects
    plural_ids = [tok.convert_tokens_to_ids(pl) for _, pl in VERBS]
    says_plural = torch.zeros_like(logits)
    says_plural[:, :, plural_ids] = 1.0
    assert torch.equal(task.metric(says_plural) > 0, task.per_prompt["plural"].bool())


def test_normalized(model):
    assert_normalized(sva(model, 40, seed=4, metric="normalized"), model)


def test_padding_subset_reproducible(model, tok):
    task = sva(model, 25, seed=7)
    lengths = [len(t.split()) for t in task.info["clean_texts"]]
    assert len(set(lengths)) > 1 and task.seq_len == max(lengths)
    for i, n in enumerate(lengths):
        assert int(task.per_prompt["end"][i]) == n - 1
        assert (task.clean[i, n:] == tok.pad_token_id).all()
    with torch.no_grad():
        logits = model(task.clean)
    torch.testing.assert_close(torch.cat([b.metric(model(b.clean)) for b in task.batches(6)]), task.metric(logits))
    assert sva(model, 25, seed=7).info["clean_texts"] == task.info["clean_texts"]
    assert sva(model, 25, seed=8).info["clean_texts"] != task.info["clean_texts"]


def test_pairs_templates_and_exclusion(model, tok):
    pairs = [["key", "cabinet"], ["dog", "tower"]]
    task = sva(model, 30, seed=0, pairs=pairs, templates=["pp", "rc"])
    assert set(task.info["templates"]) <= {"pp", "rc"}
    for s, a in zip(task.info["subjects"], task.info["attractors"]):
        sg_s = s if s in SINGULAR else FLIP[s]
        sg_a = a if a in SINGULAR else FLIP[a]
        assert [sg_s, sg_a] in pairs
    excluded = [["key", "cabinet"]] + [["dog", a] for a in SINGULAR if a != "dog"]
    p = generate(tok, 300, seed=1, exclude_pairs=excluded)
    sg = [(s if s in SINGULAR else FLIP[s], a if a in SINGULAR or not a else FLIP[a])
          for s, a in zip(p.info["subjects"], p.info["attractors"])]
    assert "dog" not in {s for s, _ in sg}  # every pair with subject dog is excluded
    assert ("key", "cabinet") not in sg and any(s == "key" for s, _ in sg)


def test_sample_table(model):
    task = sva(model, 8, seed=0)
    table = sample_table(task, k=3)
    assert all(task.info["clean_texts"][i] in table for i in range(3))


def test_errors(model):
    with pytest.raises(ValueError, match="n must be"):
        sva(model, 0)
    with pytest.raises(ValueError, match="templates"):
        sva(model, 3, templates=["passive"])
    with pytest.raises(ValueError, match="unknown nouns"):
        sva(model, 3, nouns=["keys"])  # plural forms are not noun names
    with pytest.raises(ValueError, match="pairs"):
        sva(model, 3, pairs=[["key", "key"]])
    with pytest.raises(ValueError, match="metric"):
        sva(model, 3, metric="prob_diff")


def test_bpe_keeps_only_single_token_number_pairs():
    """Nouns whose plural BPE splits are dropped; verbs must be single tokens."""
    known = NOUNS[::2]
    words = ["The", "the", "that", "near", "behind", "beside", "by", "of", "with", "to", "from",
             "liked", "saw", "found", "helped", "met", "knew"] + [w for p in VERBS for w in p]
    corpus = [" " + " ".join(words)] * 30 + [" " + " ".join(f"{sg} {pl}" for sg, pl in known)] * 30
    corpus += [" " + " ".join(sg for sg, _ in NOUNS[1::2])] * 30  # singular only: plural gets split
    bpe = byte_level_bpe(corpus, vocab_size=700)
    task = sva(ToyLM(bpe), 60, seed=0)
    kept = {sg for sg, _ in known}
    for s, text in zip(task.info["subjects"], task.info["clean_texts"]):
        assert (s if s in SINGULAR else FLIP[s]) in kept
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split())  # every word one token
    verb_ids = {bpe(" " + v, add_special_tokens=False)["input_ids"][0] for p in VERBS for v in p}
    assert set(task.per_prompt["correct"].tolist()) | set(task.per_prompt["wrong"].tolist()) <= verb_ids
    no_verbs = byte_level_bpe([" " + " ".join(f"{sg} {pl}" for sg, pl in NOUNS)] * 30, vocab_size=700)
    with pytest.raises(ValueError, match="single tokens"):
        generate(no_verbs, 3)
