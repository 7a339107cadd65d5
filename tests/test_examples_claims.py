"""What examples/README says about the embedded models is true (issue 23 item 12d): they were
trained on all four built-in tasks (their cards record it), and the object-recall example's
logit differences are the ones quoted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import eap
from eap.models import EMBEDDED_DIR
from eap.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_cards_and_readmes_agree_on_the_training_tasks():
    for name in eap.embedded_names():
        card = json.loads((EMBEDDED_DIR / name / "card.json").read_text())
        assert set(card["training"]["deltas"]) == set(TASKS), name
    text = (ROOT / "examples" / "README.md").read_text()
    assert "IOI only" not in text and "all four built-in" in text
    assert "trained on all four built-in" in (ROOT / "README.md").read_text().replace("\n  ", " ")


def test_object_recall_logit_differences_are_as_quoted(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    from custom_task import object_recall

    text = " ".join((ROOT / "examples" / "README.md").read_text().split())
    clean, corrupt = (float(x.replace("−", "-")) for x in re.search(r"\(seed 0\) ([\d.]+) clean / (−[\d.]+) corrupted "
                                                                     r"for `toy-gpt2-2l`", text).groups())
    model = eap.load_model("toy-gpt2-2l", device="cpu")
    task = object_recall(model, 64, seed=0)
    with torch.no_grad():
        got = float(task.metric(model(task.clean)).mean()), float(task.metric(model(task.corrupted)).mean())
    assert got == pytest.approx((clean, corrupt), abs=0.01)
