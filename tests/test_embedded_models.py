"""The embedded toy IOI models load offline and reproduce the numbers on their cards."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from eap.tasks.ioi import ioi, logit_diff

EMBEDDED = Path(__file__).resolve().parents[1] / "eap" / "embedded"
REQUIRED = ["toy-ioi-2l", "toy-ioi-4l"]
NAMES = sorted(p.parent.name for p in EMBEDDED.glob("*/card.json"))


def load(name: str):
    """Through eap.load_model when it exists, else the TransformerLens bridge directly."""
    try:
        from eap.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(name, device="cpu")
    from transformer_lens.model_bridge import TransformerBridge

    m = TransformerBridge.boot_transformers(str(EMBEDDED / name), device="cpu")
    m.enable_compatibility_mode(no_processing=True)
    m.set_use_split_qkv_input(True)
    m.set_use_attn_result(True)
    m.set_use_hook_mlp_in(True)
    return m


@pytest.fixture(scope="module", params=NAMES)
def embedded(request):
    name = request.param
    card = json.loads((EMBEDDED / name / "card.json").read_text())
    return name, card, load(name)


def test_required_models_present():
    assert set(REQUIRED) <= set(NAMES)
    heads = {json.loads((EMBEDDED / n / "card.json").read_text())["config"]["n_heads"] for n in REQUIRED}
    assert len(heads) == len(REQUIRED)  # different head counts


def test_files_and_config(embedded):
    name, card, model = embedded
    d = EMBEDDED / name
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    assert (d / "MODEL_CARD.md").exists()
    assert sum(f.stat().st_size for f in d.iterdir()) < 5 * 1024 * 1024
    c = card["config"]
    assert c["d_mlp"] != c["d_model"]  # TL 4.3 mishandles square MLPs
    hf = json.loads((d / "config.json").read_text())
    assert (hf["n_layer"], hf["n_embd"], hf["n_head"], hf["n_inner"]) == (
        c["n_layer"], c["d_model"], c["n_heads"], c["d_mlp"]
    )
    assert model.cfg.n_layers == c["n_layer"] and model.cfg.n_heads == c["n_heads"]
    # held-out pairs: validation and test pairs are disjoint
    val = {frozenset(p) for p in card["training"]["val_pairs"]}
    test = {frozenset(p) for p in card["eval"]["pairs"]}
    assert val and test and not val & test


@torch.no_grad()
def test_card_numbers_reproduce(embedded):
    name, card, model = embedded
    r, e = card["results"], card["eval"]
    task = ioi(model, e["n"], seed=e["seed"], prompt_type=e["prompt_type"], pairs=e["pairs"])
    heldout = {tuple(p) for p in e["pairs"]}
    assert all((a, b) in heldout for a, b in zip(task.info["io_names"], task.info["s_names"]))
    ld = task.metric(model(task.clean))
    ld_corrupt = logit_diff(model(task.corrupted), **task.per_prompt)
    n_correct = int((ld > 0).sum())
    assert abs(n_correct - r["n_correct"]) <= 1
    assert ld.mean().item() == pytest.approx(r["mean_logit_diff_clean"], abs=1e-3)
    assert ld_corrupt.mean().item() == pytest.approx(r["mean_logit_diff_corrupted"], abs=1e-3)
    assert n_correct / e["n"] >= 0.95
