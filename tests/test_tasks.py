"""The task registry, the shared word-level vocabulary, and every built-in task inside the
product: attribution of each task's metric agrees with exact patching at a small scale."""

from __future__ import annotations

import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import eap
import validation
from eap.tasks import TASKS, word_level_tokenizer
from eap.tasks.greater_than import NOUNS as GT_NOUNS
from eap.tasks.ioi import NAMES
from eap.tasks.sva import NOUNS as SVA_NOUNS, VERBS
from eap.tasks.vocab import vocabulary

from test_ioi import ToyLM

SMALL = {"ioi": {}, "greater-than": {}, "induction": {"length": 4}, "sva": {}}


def test_registry_names_and_builders():
    assert set(TASKS) == {"ioi", "greater-than", "induction", "sva"}
    model = ToyLM(word_level_tokenizer())
    for name, builder in TASKS.items():
        task = builder(model, 3, seed=0, **SMALL[name])
        assert isinstance(task, eap.Task) and task.n_prompts == 3
        assert task.info["seed"] == 0
        again = builder(model, 3, seed=0, **SMALL[name])
        assert torch.equal(again.clean, task.clean)  # seeded: the same prompts again
        normalized = builder(model, 3, seed=0, metric="normalized", **SMALL[name])
        assert normalized.info["metric"] == "normalized"
        # picklable (tasks may be sent to worker processes), and the metric keeps its meaning
        logits = torch.randn(3, task.seq_len, len(model.tokenizer), generator=torch.Generator().manual_seed(0))
        for t in (task, normalized):
            copy = pickle.loads(pickle.dumps(t))
            torch.testing.assert_close(copy.metric(logits), t.metric(logits), rtol=0, atol=0)
        assert "Normalized" in normalized.metric_fn.__qualname__


def test_vocabulary_covers_every_task():
    tok = word_level_tokenizer()
    vocab = tok.get_vocab()
    assert len(vocab) == len(vocabulary()) == len(set(vocabulary()))
    assert [vocab[w] for w in ("<pad>", "<unk>", "<eos>")] == [0, 1, 2]
    needed = list(NAMES) + [f"{y:02d}" for y in range(100)] + list(GT_NOUNS)
    needed += [w for pair in SVA_NOUNS + VERBS for w in pair]
    assert set(needed) <= set(vocab)
    assert tok("The war lasted from the year 1732", add_special_tokens=False)["input_ids"][-2:] == [vocab["17"], vocab["32"]]
    model = ToyLM(tok)
    for name, builder in TASKS.items():
        task = builder(model, 40, seed=1, **SMALL[name])
        assert tok.unk_token_id not in task.clean.tolist() and tok.unk_token_id not in task.corrupted.tolist()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_attribution_is_the_first_order_of_exact_patching(tiny_model, name):
    """On a random float64 GPT-2 (word-level tokenizer): EAP = lim exact(scale=eps)/eps for
    each task's own metric, through the readout where the task has one, and the readout path
    of exact patching equals the full-logits path."""
    task = TASKS[name](tiny_model, 4, seed=0, **SMALL[name])
    graph = eap.Graph.from_model(tiny_model)
    scores = eap.attribute(tiny_model, graph, task, progress=False, write_graph=False).double()
    eps = 1e-5
    exact = validation.patch_edges(tiny_model, graph, task, scale=eps, progress=False) / eps
    assert scores.abs().max() > 0
    assert (exact - scores).abs().max() < 1e-3 * scores.abs().max()
    if task.has_readout:
        some = list(range(0, graph.n_edges, 5))
        fast = validation.patch_edges(tiny_model, graph, task, some, progress=False)
        full = validation.patch_edges(tiny_model, graph, task, some, readout=False, progress=False)
        torch.testing.assert_close(full[some], fast[some], atol=1e-12, rtol=1e-9)
