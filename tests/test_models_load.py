"""Loading is quiet, counts the checkpoint's parameters, and works without a tokenizer
(issue 23 item 3 and 4; issue 20: quieting restores the process's settings)."""

from __future__ import annotations

import shutil

import pytest
import torch

import eap
from eap.models import EMBEDDED_DIR, describe, from_portable, load_model, portable, random_model
from eap.task import Task, TaskError

# a 2-layer Llama, 8 query heads over 2 key/value heads
LLAMA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
             intermediate_size=128, max_position_embeddings=32, tie_word_embeddings=True, vocab_size=375)


def test_load_model_prints_nothing(capfd):
    for name in ("toy-gpt2-2l", "toy-llama-4l", "random:llama-tiny"):
        load_model(name, device="cpu")
    out, err = capfd.readouterr()
    assert "Moving model" not in out + err
    assert out == "" and err == ""


def test_quieting_restores_the_process_settings():
    import os

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    env = dict(os.environ)
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    load_model("toy-gpt2-2l", device="cpu")
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == before
    assert dict(os.environ) == env
    hf_logging.disable_progress_bar()  # a user's own setting survives a load
    try:
        load_model("toy-gpt2-2l", device="cpu")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def naive_llama_params(c: dict, kv: int) -> int:
    """Parameters of a Llama checkpoint from the definition: embeddings (tied: once), per layer
    q/o (d x H*dh), k/v (d x kv*dh), gate/up/down (3 d x d_mlp), two RMSNorms; a final norm."""
    d, h, dh, m, v = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    layer = 2 * d * h * dh + 2 * d * kv * dh + 3 * d * m + 2 * d
    return v * d + c["num_hidden_layers"] * layer + d


def test_n_params_is_the_checkpoints_count():
    model = random_model(LLAMA, arch="llama", device="cpu")
    info = describe(model)
    assert info["n_key_value_heads"] == 2
    assert info["n_params"] == naive_llama_params(LLAMA, kv=2)
    assert info["n_params_ungrouped"] == naive_llama_params(LLAMA, kv=8)
    assert info["n_params_ungrouped"] - info["n_params"] == 2 * 2 * (8 - 2) * 8 * 64  # the k/v copies
    gpt2 = describe(load_model("toy-gpt2-2l", device="cpu"))  # never grouped: one count
    assert gpt2["n_params"] == gpt2["n_params_ungrouped"]


def test_embedded_cards_and_sample_results_carry_the_checkpoint_count():
    import json
    import math
    from pathlib import Path

    from safetensors import safe_open

    sample = json.loads((Path(__file__).resolve().parents[1] / "docs" / "sample" / "results.json").read_text())
    for name in ("toy-gpt2-2l", "toy-llama-4l"):
        with safe_open(str(EMBEDDED_DIR / name / "model.safetensors"), "pt") as f:
            in_file = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        card = json.loads((EMBEDDED_DIR / name / "card.json").read_text())
        assert card["config"]["n_params"] == in_file == describe(load_model(name, device="cpu"))["n_params"]
        assert {c["model_info"]["n_params"] for c in sample["cells"] if c["model"] == name} == {in_file}


def test_no_private_transformer_lens_attributes():
    """Issue 20: eap.models reads the bridge's public ``original_component``, never the private
    ``_original_component`` (a checked-in source scan; the round trip is tested below)."""
    import eap.models

    source = open(eap.models.__file__).read()
    assert "._original_component" not in source and '"_original_component"' not in source


@pytest.fixture
def no_tokenizer_dir(tmp_path):
    shutil.copytree(EMBEDDED_DIR / "toy-gpt2-2l", tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / f).unlink()
    return tmp_path / "m"


def test_directory_without_tokenizer_loads(no_tokenizer_dir):
    model = load_model(no_tokenizer_dir, device="cpu")
    assert model.tokenizer is None
    ref = load_model("toy-gpt2-2l", device="cpu")
    toks = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(toks), ref(toks), rtol=0, atol=0)
    with pytest.raises(TaskError, match="model has no tokenizer; IOI .* needs one"):
        eap.tasks.ioi(model, 4)
    # a task from token ids needs none: attribution runs and equals the tokenizer-holding model's
    clean, corrupted = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 6, 7, 8]])
    task = Task(clean, corrupted, lambda logits: logits[:, -1, 5] - logits[:, -1, 6])
    got = eap.attribute(model, eap.Graph.from_model(model), task, progress=False)
    want = eap.attribute(ref, eap.Graph.from_model(ref), task, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and it travels to another process's form and back
    again = from_portable(portable(model), device="cpu")
    assert again.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(again(toks), ref(toks), rtol=0, atol=0)


def test_wrap_documents_in_place_ungrouping():
    assert "in place" in eap.models.wrap_hf_model.__doc__
