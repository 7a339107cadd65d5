"""The family registry: honest refusals of undescribed families, a user's own description
(``eap.arch.register_family`` and the ``eap_bench.families`` entry points), and ``Arch.verify``
refusing a wrong description, naming where it diverges.

The worked example of docs/architectures.md: OLMo (v1, HF ``model_type`` 'olmo'), which eap-bench
does not describe, is Llama with a LayerNorm that has no weight or bias. TransformerLens 4 bridges
it with per-head hooks, so the bridge's own hook-based EAP and one-edge-per-forward patching are
the references here.
"""

from __future__ import annotations

import pytest
import torch

import eap
import validation
from eap import Graph, attribute
from eap.arch import Arch, Family, UnsupportedModel, family_of, register_family, unregister_family

from conftest import random_task
from test_attribute import reference_scores
from test_validation import naive_edges

pytestmark = pytest.mark.usefixtures("one_thread")

OLMO = Family("olmo", ("olmo",), norm="layernorm")  # the docs' worked example


def _saved_olmo(path, kv_heads: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from eap.models import _word_tokenizer

    tok = _word_tokenizer()
    cfg = AutoConfig.for_model("olmo", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def olmo_registered():
    register_family(OLMO)
    try:
        yield OLMO
    finally:
        unregister_family("olmo")


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA alike
def test_undescribed_family_gets_one_clear_refusal(tmp_path, kv_heads):
    model = eap.load_model(_saved_olmo(tmp_path, kv_heads), device="cpu", dtype=torch.float64)
    g = Graph(eap.GraphSpec(2, 4))
    task = random_task(model, n=2, seq=5)
    msg = r"model family 'olmo' is not described in eap.arch.*register_family"
    calls = [lambda: attribute(model, g, task, progress=False),
             lambda: attribute(model, g, task, engine="bridge", progress=False),
             lambda: validation.patch_edges(model, g, task, [0, 1], progress=False),
             lambda: validation.patch_edges(model, g, task, [0, 1], engine="bridge", progress=False),
             lambda: validation.evaluate_circuit(model, g, task, [0, 1])]
    for call in calls:
        with pytest.raises(UnsupportedModel, match=msg) as err:
            call()
        assert "ungroup" not in str(err.value)  # never advice to do what the user already did


def test_register_family_refuses_clashes():
    with pytest.raises(ValueError, match="'llama'.*already registered"):
        register_family(Family("my-llama", ("llama",)))
    with pytest.raises(TypeError):
        register_family({"name": "x"})
    with pytest.raises(ValueError, match="model_type"):
        Family("x", ())
    assert family_of("llama").name == "llama"


# ------------------------------------------------------------------------------ a user's family
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_registered_family_works_end_to_end(tmp_path, olmo_registered, kv_heads):
    """Registered before loading: GQA is ungrouped, the adapter verifies, fast EAP equals the
    independent directional derivatives through the bridge's hooks, fast exact patching equals
    one edge per forward, circuits run on the fast path."""
    model = eap.load_model(_saved_olmo(tmp_path, kv_heads), device="cpu", dtype=torch.float64)
    assert model.blocks[0].attn.W_K.shape[0] == 4
    Arch(model).verify(model)
    g = Graph.from_model(model)
    task = random_task(model, n=2, seq=6, seed=1)
    ref = reference_scores(model, g, task)[g.edge_sender, g.edge_receiver]
    fast = attribute(model, g, task, engine="fast", progress=False)
    # HF's OLMo LayerNorm runs in float32 even in float64: ~1e-7 relative apart
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6 * ref.abs().max())
    stats = {}
    exact = validation.patch_edges(model, g, task, progress=False, stats=stats)
    assert stats["path"] == "fast"
    want = naive_edges(model, g, task, range(g.n_edges))
    torch.testing.assert_close(exact, want, atol=3e-6 * want.abs().max(), rtol=0)
    stats = {}
    res = validation.evaluate_circuit(model, g, task, g.select_edges("stratified:10", seed=0), stats=stats)
    assert stats["path"] == "fast" and torch.isfinite(res.per_prompt).all()


def test_wrong_description_is_refused_where_it_diverges(tmp_path):
    """A description that does not reproduce the HF model is refused by ``verify`` on first
    use, naming the first block that differs (or the read-out); the engine falls back to the
    bridge's hooks with a warning, and ``engine='fast'`` refuses."""
    model_dir = _saved_olmo(tmp_path, 4)
    for wrong, where in [(Family("olmo", ("olmo",)), "block 0"),  # RMSNorm instead of OLMo's LayerNorm
                         (Family("olmo", ("olmo",), norm="layernorm", final_softcap="num_attention_heads"),
                          "read-out")]:
        register_family(wrong)
        try:
            model = eap.load_model(model_dir, device="cpu", dtype=torch.float64)
            with pytest.raises(UnsupportedModel, match=f"{where}.*description 'olmo'"):
                Arch(model).verify(model)
            g = Graph.from_model(model)
            task = random_task(model, n=2, seq=5)
            with pytest.warns(UserWarning, match=where):
                attribute(model, g, task, progress=False)
            with pytest.raises(UnsupportedModel, match=where):
                attribute(model, g, task, engine="fast", progress=False)
        finally:
            unregister_family("olmo")


def test_entry_point_family_is_found(tmp_path, monkeypatch):
    """An installed distribution with an ``eap_bench.families`` entry point describes 'olmo'."""
    from eap.arch import load_entry_points

    dist = tmp_path / "olmo_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: olmo-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[eap_bench.families]\nolmo = olmo_family:OLMO\n")
    (tmp_path / "olmo_family.py").write_text(
        "from eap.arch import Family\nOLMO = Family('olmo', ('olmo',), norm='layernorm')\n")
    with pytest.raises(UnsupportedModel, match="'olmo' is not described"):
        family_of("olmo")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        load_entry_points(reload=True)
        assert family_of("olmo") == OLMO
    finally:
        unregister_family("olmo")
    # negative control: an entry point naming something else is refused by name
    (tmp_path / "olmo_family.py").write_text("OLMO = 42\n")
    import importlib
    import sys

    sys.modules.pop("olmo_family", None)
    importlib.invalidate_caches()
    with pytest.raises(UnsupportedModel, match="entry point 'olmo'.*not an eap.arch.Family"):
        load_entry_points(reload=True)
