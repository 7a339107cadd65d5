"""The embedded toy models load offline and reproduce every number on their cards, and the
cards meet the requirements: per task, held-out accuracy >= 95% and a mean clean metric inside
the stated non-saturated range; under 5 MB per model."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from eap.arch import arch_spec
from eap.models import DEFAULT_MODEL, load_model
from eap.tasks import TASKS

EMBEDDED = Path(__file__).resolve().parents[1] / "eap" / "embedded"
REQUIRED = ["toy-gpt2-2l", "toy-gpt2-4l", "toy-llama-4l", "toy-gemma2-4l"]  # the last: a post-norm family
NAMES = sorted(p.parent.name for p in EMBEDDED.glob("*/card.json"))
# What each card must state, per task: (lowest, highest) mean clean metric.
RANGES = {"ioi": (2.5, 6.0), "greater-than": (0.4, 0.9), "induction": (2.5, 6.0), "sva": (2.5, 6.0)}


@pytest.fixture(scope="module", params=NAMES)
def embedded(request):
    name = request.param
    card = json.loads((EMBEDDED / name / "card.json").read_text())
    return name, card, load_model(name, device="cpu")


def test_required_models_present():
    assert set(REQUIRED) <= set(NAMES) and DEFAULT_MODEL in NAMES
    cards = {n: json.loads((EMBEDDED / n / "card.json").read_text()) for n in REQUIRED}
    assert len({c["config"]["n_heads"] for c in cards.values()}) > 1  # different head counts
    llama = cards["toy-llama-4l"]["config"]
    assert llama["architecture"] == "LlamaForCausalLM" and llama["n_kv_heads"] < llama["n_heads"]


def test_files_and_config(embedded):
    name, card, model = embedded
    d = EMBEDDED / name
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    assert (d / "MODEL_CARD.md").exists()
    assert sum(f.stat().st_size for f in d.iterdir()) < 5 * 1024 * 1024
    c = card["config"]
    assert c["d_mlp"] != c["d_model"]  # TL 4.3 mishandles square MLPs
    hf = json.loads((d / "config.json").read_text())
    assert hf["architectures"] == [c["architecture"]]
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (
        c["n_layers"], c["n_heads"], c["d_model"], c["d_mlp"], c["d_vocab"]
    )
    # GQA models are ungrouped on load (one k/v copy per query head); the adapter remembers the grouping
    assert hf.get("num_key_value_heads", cfg.n_heads) == c["n_kv_heads"]
    assert (arch_spec(model).grouped_kv_heads or cfg.n_heads) == c["n_kv_heads"]
    assert card["training"]["threads"] == 1 and "train_embedded.py" in card["training"]["command"]


def test_held_out_sets_are_disjoint(embedded):
    _, card, _ = embedded
    val, test = card["training"]["val"], card["eval"]["tasks"]
    assert not {frozenset(p) for p in val["ioi"]["pairs"]} & {frozenset(p) for p in test["ioi"]["pairs"]}
    assert not set(val["greater-than"]["nouns"]) & set(test["greater-than"]["nouns"])
    assert not {tuple(c) for c in val["greater-than"]["combinations"]} & {tuple(c) for c in test["greater-than"]["combinations"]}
    assert not {tuple(p) for p in val["sva"]["pairs"]} & {tuple(p) for p in test["sva"]["pairs"]}
    assert val["induction"]["seed"] != test["induction"]["seed"]


@torch.no_grad()
def test_card_numbers_reproduce(embedded):
    name, card, model = embedded
    e = card["eval"]
    assert set(card["results"]) == set(TASKS) and e["card_ranges"] == {k: list(v) for k, v in RANGES.items()}
    for task_name, kwargs in e["tasks"].items():
        r = card["results"][task_name]
        task = TASKS[task_name](model, e["n"], **kwargs)
        logits = model(task.clean)
        m = task.metric(logits)
        if task_name == "induction":  # the answer is the top-1 token over the whole vocabulary
            final = logits[torch.arange(task.n_prompts), task.per_prompt["end"]]
            correct = final.argmax(-1) == task.per_prompt["answer"]
        else:  # the metric's sign: IO over S, later years over earlier, the agreeing verb
            correct = m > 0
        m_corrupt = task.metric(model(task.corrupted))
        where = f"{name} {task_name}"
        assert abs(int(correct.sum()) - r["n_correct"]) <= 1, where
        assert r["n"] == task.n_prompts == e["n"] and r["accuracy"] == pytest.approx(r["n_correct"] / r["n"])
        assert m.mean().item() == pytest.approx(r["metric_clean"], abs=1e-3), where
        assert m_corrupt.mean().item() == pytest.approx(r["metric_corrupted"], abs=1e-3), where
        assert (m > 0).float().mean().item() == pytest.approx(r["frac_metric_positive"], abs=2.5 / e["n"]), where
        # the card's requirements
        assert correct.float().mean().item() >= 0.95, where
        lo, hi = RANGES[task_name]
        assert lo <= m.mean().item() <= hi, where
        # the corruption removes the behaviour: the corrupted metric is far below the clean one
        assert m_corrupt.mean().item() < 0.5 * m.mean().item(), where
