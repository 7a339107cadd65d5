"""The greater-than task: prompts, corruption, the probability-difference metric (both
softmaxes), readout, normalisation, batching, a BPE tokenizer, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from eap.tasks import greater_than, sample_table, word_level_tokenizer
from eap.tasks.greater_than import CENTURIES, NOUNS, generate, year_token_ids

from bpe_tokenizer import byte_level_bpe
from test_ioi import ToyLM, assert_normalized, gathered, model, tok  # noqa: F401  (shared fixtures: word-level tokenizer, toy LM)


def random_logits(task, vocab, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(task.n_prompts, task.seq_len, vocab, generator=g, dtype=dtype) * 3


def reference_pd(logits, task, over_years: bool):
    """Independent loop: probabilities of the 100 year tokens "00".."99" at the last token."""
    tok = word_level_tokenizer()
    ids = [tok.convert_tokens_to_ids(f"{y:02d}") for y in range(100)]
    out = []
    for i in range(task.n_prompts):
        e, yy = int(task.per_prompt["end"][i]), task.info["years"][i]
        row = logits[i, e].double()
        p = row[ids].softmax(0) if over_years else row.softmax(0)[ids]
        out.append(sum(p[y] for y in range(yy + 1, 100)) - sum(p[y] for y in range(yy + 1)))
    return torch.stack(out)


def test_prompts_and_corruption(model, tok):
    task = greater_than(model, 80, seed=3)
    info, pp = task.info, task.per_prompt
    year_ids = year_token_ids(tok)
    for i in range(80):
        yy, cc, noun = info["years"][i], info["centuries"][i], info["nouns"][i]
        assert 2 <= yy <= 98 and cc in CENTURIES and noun in NOUNS
        assert info["clean_texts"][i] == f"The {noun} lasted from the year {cc}{yy:02d} to the year {cc}"
        assert info["corrupted_texts"][i] == f"The {noun} lasted from the year {cc}01 to the year {cc}"
        e = int(pp["end"][i])
        assert tok.convert_ids_to_tokens([int(task.clean[i, e])]) == [cc]  # answer read after " CC"
        diff = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert len(diff) == 1  # only the start year differs
        assert task.clean[i, diff[0]] == year_ids[yy] and task.corrupted[i, diff[0]] == year_ids[1]
        assert int(pp["yy"][i]) == yy
    assert pp["year_tokens"].shape == (80, 100) and (pp["year_tokens"] == torch.tensor(year_ids)).all()
    assert not task.has_readout  # the full-vocabulary softmax cannot come from k logits


def test_prob_diff_matches_independent_computation(model, tok):
    task = greater_than(model, 30, seed=1)
    logits = random_logits(task, len(tok))
    torch.testing.assert_close(task.metric(logits), reference_pd(logits, task, over_years=False))


def test_prob_diff_sign_and_range(model, tok):
    task = greater_than(model, 20, seed=2)
    year_ids = year_token_ids(tok)
    logits = torch.zeros(20, task.seq_len, len(tok))
    later = logits.clone()
    for i, yy in enumerate(task.info["years"]):
        e = int(task.per_prompt["end"][i])
        logits[i, e, year_ids[yy]] = 50.0  # all mass on YY itself: not later
        later[i, e, year_ids[yy + 1]] = 50.0  # all mass on YY + 1
    torch.testing.assert_close(task.metric(logits), torch.full((20,), -1.0))
    torch.testing.assert_close(task.metric(later), torch.full((20,), 1.0))
    # uniform logits: PD = (#later - #earlier) / vocab, mass off the years counts for nothing
    flat = torch.zeros(20, task.seq_len, len(tok))
    want = torch.tensor([((99 - y) - (y + 1)) / len(tok) for y in task.info["years"]])
    torch.testing.assert_close(task.metric(flat), want)


def test_year_softmax_readout(model, tok):
    task = greater_than(model, 30, seed=4, softmax="years")
    assert task.has_readout
    logits = random_logits(task, len(tok), seed=1)
    got = task.metric(logits)
    torch.testing.assert_close(got, reference_pd(logits, task, over_years=True))
    torch.testing.assert_close(task.readout(gathered(task, logits)), got, rtol=0, atol=1e-12)
    # PD over years = PD over the vocabulary / total probability of the year tokens
    full = greater_than(model, 30, seed=4).metric(logits)
    ends = task.per_prompt["end"]
    mass = logits[torch.arange(30), ends].softmax(-1).gather(1, task.per_prompt["year_tokens"]).sum(1)
    torch.testing.assert_close(full / mass, got)


@pytest.mark.parametrize("softmax", ["vocab", "years"])
def test_normalized(model, softmax):
    task = greater_than(model, 40, seed=5, metric="normalized", softmax=softmax)
    assert_normalized(task, model)
    raw = greater_than(model, 40, seed=5, softmax=softmax)
    with torch.no_grad():
        assert task.info["metric_clean"] == pytest.approx(raw.metric(model(raw.clean)).mean().item(), abs=1e-6)


def test_subset_batches_and_reproducible(model):
    task = greater_than(model, 23, seed=7)
    with torch.no_grad():
        logits = model(task.clean)
    full = task.metric(logits)
    torch.testing.assert_close(torch.cat([b.metric(model(b.clean)) for b in task.batches(5)]), full)
    again, other = greater_than(model, 23, seed=7), greater_than(model, 23, seed=8)
    assert torch.equal(again.clean, task.clean) and again.info["clean_texts"] == task.info["clean_texts"]
    assert other.info["clean_texts"] != task.info["clean_texts"]
    torch.manual_seed(0)
    r = torch.rand(3)
    torch.manual_seed(0)
    greater_than(model, 5, seed=1)
    assert torch.equal(torch.rand(3), r)  # no global RNG state consumed


def test_restrictions(model, tok):
    task = greater_than(model, 40, seed=0, nouns=["war", "siege"], years=[10, 50], centuries=["13"])
    assert set(task.info["nouns"]) <= {"war", "siege"} and set(task.info["years"]) <= {10, 50}
    assert set(task.info["centuries"]) == {"13"}
    combos = [["12", 40], ["16", 7]]
    task = greater_than(model, 30, seed=0, combinations=combos)
    assert set(zip(task.info["centuries"], task.info["years"])) == {("12", 40), ("16", 7)}
    p = generate(tok, 300, seed=0, centuries=["12"], exclude_combinations=combos)
    assert 40 not in p.info["years"] and len(set(p.info["years"])) > 50
    with pytest.raises(ValueError, match="no \\(century, start year\\)"):
        generate(tok, 3, combinations=[["19", 40]])


def test_sample_table(model):
    task = greater_than(model, 10, seed=0)
    table = sample_table(task, k=2)
    assert task.info["clean_texts"][1] in table and task.info["corrupted_texts"][0] in table
    assert task.info["clean_texts"][2] not in table


def test_errors(model, tok):
    with pytest.raises(ValueError, match="n must be"):
        greater_than(model, 0)
    with pytest.raises(ValueError, match="metric"):
        greater_than(model, 3, metric="logit_diff")
    with pytest.raises(ValueError, match="softmax"):
        greater_than(model, 3, softmax="nope")
    with pytest.raises(ValueError, match="2..98"):
        greater_than(model, 3, years=[1, 50])
    with pytest.raises(ValueError, match="single token"):
        greater_than(model, 3, nouns=["Zzyzx"])
    words_only = byte_level_bpe(["The war lasted from the year to"] * 20, vocab_size=300)
    with pytest.raises(ValueError, match="two-digit year"):
        generate(words_only, 3)


# ------------------------------------------------------------------------- byte-level BPE
@pytest.fixture(scope="module")
def bpe():
    """Learns the template, the centuries with a leading space (" 17") and the two-digit years
    without one ("32"), so " 1732" reads [" 17", "32"] as in GPT-2; some years merge otherwise."""
    template = "The lasted from the year to " + " ".join(NOUNS)
    centuries = " ".join(f" {c}" for c in CENTURIES)
    years = " ".join(f"-{y:02d}" for y in range(100))
    return byte_level_bpe([template] * 20 + [centuries] * 50 + [years] * 50, vocab_size=1000)


def test_bpe_prompts(bpe):
    year_ids = year_token_ids(bpe)
    assert bpe(" 1732", add_special_tokens=False)["input_ids"] == [bpe(" 17")["input_ids"][0], year_ids[32]]
    task = greater_than(ToyLM(bpe), 40, seed=0)
    for i, text in enumerate(task.info["clean_texts"]):
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        end = int(task.per_prompt["end"][i])
        assert task.clean[i, : end + 1].tolist() == ids and end == len(ids) - 1
        yy, cc = task.info["years"][i], task.info["centuries"][i]
        assert bpe(f" {cc}{yy:02d}", add_special_tokens=False)["input_ids"][1] == year_ids[yy]
    assert (task.clean[:, 0] != bpe.eos_token_id).all()
    # the filter drops (century, year) pairs that BPE does not split as [" CC", "YY"]
    dropped = [
        (c, y) for c in CENTURIES for y in range(2, 99)
        if len(bpe(f" {c}{y:02d}", add_special_tokens=False)["input_ids"]) != 2
    ]
    assert dropped  # this tokenizer really splits some years otherwise...
    used = set(zip(task.info["centuries"], task.info["years"]))
    assert not used & set(dropped)  # ...and none of them is used
