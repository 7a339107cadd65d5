"""Model loading: names, local directories, random shapes, and clear errors."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from eap.models import EMBEDDED_DIR, ModelLoadError, embedded_names, load_model, random_model

SMALL = dict(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=32)


def test_embedded_names():
    assert {"toy-gpt2-2l", "toy-gpt2-4l"} <= set(embedded_names())


def test_loaded_model_is_ready_for_edges():
    m = load_model("toy-gpt2-2l", device="cpu")
    assert m.cfg.use_split_qkv_input and m.cfg.use_attn_result and m.cfg.use_hook_mlp_in
    assert not any(p.requires_grad for p in m.parameters())
    assert not m.training
    assert next(m.parameters()).device.type == "cpu"


def test_local_directory_and_dtype(tmp_path):
    shutil.copytree(EMBEDDED_DIR / "toy-gpt2-2l", tmp_path / "m")
    a = load_model(tmp_path / "m", device="cpu", dtype=torch.float64)
    b = load_model("toy-gpt2-2l", device="cpu")
    assert next(a.parameters()).dtype == torch.float64
    toks = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(a(toks).float(), b(toks), rtol=1e-4, atol=1e-4)


def test_directory_without_tokenizer(tmp_path):
    shutil.copytree(EMBEDDED_DIR / "toy-gpt2-2l", tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / f).unlink()
    # issue 23: loads (tasks from token ids need no tokenizer); tests/test_models_load.py
    assert load_model(tmp_path / "m", device="cpu").tokenizer is None


def test_directory_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path / "empty", device="cpu")


def test_unknown_name_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="toy-gpt2-2l") as info:
        load_model("nobody/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - start < 10
    assert "offline" in str(info.value)


def test_random_models_are_seeded():
    a = random_model(SMALL, seed=3, device="cpu")
    b = random_model(SMALL, seed=3, device="cpu")
    c = random_model(SMALL, seed=4, device="cpu")
    assert torch.equal(a.W_Q, b.W_Q) and not torch.equal(a.W_Q, c.W_Q)
    assert a.cfg.d_mlp == 4 * a.cfg.d_model


def test_random_shape_by_name():
    m = load_model("random:gpt2-tiny@1", device="cpu")
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.n_heads) == (2, 32, 4)
    with pytest.raises(ModelLoadError, match="unknown random shape"):
        load_model("random:gpt9-huge", device="cpu")


def test_square_mlp_refused():
    with pytest.raises(ModelLoadError, match="square MLP"):
        random_model(dict(SMALL, n_inner=8), device="cpu")
