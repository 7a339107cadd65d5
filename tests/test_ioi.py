"""The IOI task: prompts, corruption, padding, metrics, readout, batching, errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from eap.task import Task, TaskError
from eap.tasks import ioi, logit_diff, sample_table, word_level_tokenizer
from eap.tasks.ioi import NAMES, generate, single_token_names


class ToyLM(nn.Module):
    """A tiny deterministic stand-in model: embeddings + a causal running mean + unembedding."""

    def __init__(self, tokenizer, d: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tokenizer = tokenizer
        v = len(tokenizer)
        self.emb = nn.Parameter(torch.randn(v, d, generator=g))
        self.unemb = nn.Parameter(torch.randn(d, v, generator=g))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb[tokens]
        x = x.cumsum(1) / torch.arange(1, tokens.shape[1] + 1)[None, :, None]
        return x @ self.unemb


def gathered(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """The logits a task's readout reads: ``readout_tokens`` at ``readout_pos``, [n, k]."""
    rows = torch.arange(task.n_prompts)[:, None]
    return logits[rows, task.per_prompt["readout_pos"][:, None], task.per_prompt["readout_tokens"]]


def assert_normalized(task: Task, model: nn.Module) -> None:
    """A normalised task averages to 1 on the model's clean logits and 0 on its corrupted ones,
    and its readout (if any) agrees with its metric."""
    with torch.no_grad():
        clean, corrupt = model(task.clean), model(task.corrupted)
    assert task.metric(clean).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert task.metric(corrupt).mean().item() == pytest.approx(0.0, abs=1e-4)
    if task.has_readout:
        torch.testing.assert_close(task.readout(gathered(task, clean)), task.metric(clean))


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return ToyLM(tok)


def test_tokenizer_reads_natural_and_spaced_text(tok):
    a = tok("Then, John and Mary went to the store. John gave a ring to")["input_ids"]
    b = tok("Then , John and Mary went to the store . John gave a ring to")["input_ids"]
    assert a == b and tok.unk_token_id not in a
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert len(single_token_names(tok)) == len(NAMES)
    assert word_level_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


@pytest.mark.parametrize("prompt_type", ["BABA", "ABBA", "mixed"])
def test_names_and_corruption(model, tok, prompt_type):
    task = ioi(model, 60, seed=3, prompt_type=prompt_type)
    info = task.info
    for i in range(60):
        io, s = info["io_names"][i], info["s_names"][i]
        clean, corrupt = info["clean_texts"][i], info["corrupted_texts"][i]
        assert io != s
        words = clean.replace(",", " ").replace(".", " ").split()
        assert words.count(s) == 2 and words.count(io) == 1
        x, y, z = info["corrupted_names"][i]
        assert len({x, y, z}) == 3 and not {x, y, z} & {io, s}
        cwords = corrupt.replace(",", " ").replace(".", " ").split()
        assert io not in cwords and s not in cwords
    assert (task.per_prompt["io"] != task.per_prompt["s"]).all()
    assert task.per_prompt["io"].tolist() == [tok.convert_tokens_to_ids(n) for n in info["io_names"]]
    if prompt_type != "mixed":
        first = [info["clean_texts"][i].replace(",", " ").split() for i in range(60)]
        # BABA: S comes first among the two names of the first clause; ABBA: IO first
        for w, io, s in zip(first, info["io_names"], info["s_names"]):
            names = [x for x in w if x in (io, s)]
            assert names[0] == (s if prompt_type == "BABA" else io)


def test_end_and_padding(model, tok):
    task = ioi(model, 50, seed=1)
    pad = tok.pad_token_id
    lengths = [len(tok(t)["input_ids"]) for t in task.info["clean_texts"]]
    assert len(set(lengths)) > 1  # prompts of different lengths are in the batch
    assert task.clean.shape == task.corrupted.shape
    assert task.seq_len == max(lengths)
    for i, n in enumerate(lengths):
        e = int(task.per_prompt["end"][i])
        assert e == n - 1
        assert task.clean[i, e] != pad and task.corrupted[i, e] != pad
        assert (task.clean[i, e + 1 :] == pad).all() and (task.corrupted[i, e + 1 :] == pad).all()
        assert (task.clean[i, : e + 1] != pad).all()
        # same template: only the name positions differ
        diff = (task.clean[i, : e + 1] != task.corrupted[i, : e + 1]).sum().item()
        assert diff == 3
    assert torch.equal(task.per_prompt["readout_pos"], task.per_prompt["end"])
    assert torch.equal(
        task.per_prompt["readout_tokens"],
        torch.stack([task.per_prompt["io"], task.per_prompt["s"]], 1),
    )


def test_reproducible(model):
    a, b, c = ioi(model, 20, seed=5), ioi(model, 20, seed=5), ioi(model, 20, seed=6)
    assert a.info["clean_texts"] == b.info["clean_texts"]
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupted, b.corrupted)
    assert a.info["clean_texts"] != c.info["clean_texts"]
    # no global RNG state is used or consumed
    torch.manual_seed(0)
    r = torch.rand(3)
    torch.manual_seed(0)
    ioi(model, 5, seed=1)
    assert torch.equal(torch.rand(3), r)
    assert ioi(model, 1).n_prompts == 1 and ioi(model, 7).n_prompts == 7


def test_logit_diff_metric_and_readout(model):
    task = ioi(model, 30, seed=2)
    logits = torch.randn(30, task.seq_len, len(model.tokenizer), generator=torch.Generator().manual_seed(0))
    got = task.metric(logits)
    want = torch.tensor([
        logits[i, task.per_prompt["end"][i], task.per_prompt["io"][i]]
        - logits[i, task.per_prompt["end"][i], task.per_prompt["s"][i]]
        for i in range(30)
    ])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(task.readout(gathered(task, logits)), got, rtol=0, atol=0)
    torch.testing.assert_close(logit_diff(logits, **task.per_prompt), got)


def test_normalized_metric(model):
    task = ioi(model, 40, seed=4, metric="normalized")
    assert_normalized(task, model)
    with torch.no_grad():
        ld = logit_diff(model(task.clean), **task.per_prompt)
    assert task.info["metric_clean"] == pytest.approx(ld.mean().item(), abs=1e-6)


@pytest.mark.parametrize("metric", ["logit_diff", "normalized"])
def test_subset_and_batches(model, metric):
    task = ioi(model, 23, seed=7, metric=metric)
    with torch.no_grad():
        logits = model(task.clean)
    full = task.metric(logits)
    parts = [b.metric(model(b.clean)) for b in task.batches(5)]
    torch.testing.assert_close(torch.cat(parts), full)
    idx = [3, 0, 22, 11]
    sub = task.subset(idx)
    torch.testing.assert_close(sub.metric(logits[idx]), full[idx])
    assert sum(len(b) for b in task.batches(5)) == 23


def test_sample_table(model):
    task = ioi(model, 10, seed=0)
    table = sample_table(task, k=3)
    assert "IOI prompt" in table and "ABC prompt" in table
    for i in range(3):
        assert task.info["clean_texts"][i] in table and task.info["corrupted_texts"][i] in table
    assert task.info["clean_texts"][3] not in table


def test_pairs_restrict_clean_names(model):
    pairs = [["John", "Mary"], ["Mary", "John"]]
    task = ioi(model, 12, seed=0, pairs=pairs)
    assert all([a, b] in pairs for a, b in zip(task.info["io_names"], task.info["s_names"]))


def test_errors(model, tok):
    with pytest.raises(ValueError, match="n must be"):
        ioi(model, 0)
    with pytest.raises(ValueError, match="prompt_type"):
        ioi(model, 3, prompt_type="CABA")
    with pytest.raises(ValueError, match="metric"):
        ioi(model, 3, metric="kl")
    with pytest.raises(ValueError, match="single token"):
        ioi(model, 3, names=["John", "Mary", "Zzyzxquux", "Qwxqw"])
    with pytest.raises(ValueError, match="single token"):
        generate(tok, 3, names=NAMES[:4])


def test_task_errors(model):
    task = ioi(model, 4, seed=0)
    with pytest.raises(TaskError, match="same shape"):
        Task(task.clean, task.corrupted[:, :-1], logit_diff, per_prompt=task.per_prompt)
    logits = torch.zeros(4, task.seq_len, len(model.tokenizer))
    bad_shape = Task(task.clean, task.corrupted, lambda lg, **_: lg[:, -1, :2])
    with pytest.raises(TaskError, match="one value per prompt"):
        bad_shape.metric(logits)
    nan = Task(task.clean, task.corrupted, lambda lg, **_: torch.full((lg.shape[0],), float("nan")))
    with pytest.raises(TaskError, match="NaN"):
        nan.metric(logits)
    with pytest.raises(TaskError, match="readout"):
        Task(task.clean, task.corrupted, logit_diff, readout=lambda x, **_: x[:, 0])
    with pytest.raises(TaskError, match="first dimension"):
        Task(task.clean, task.corrupted, logit_diff, per_prompt={"end": task.per_prompt["end"][:2]})
