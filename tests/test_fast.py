"""The fast attribution engine (eap.fast) against the bridge engine, and how one is chosen.

The bridge engine (TransformerLens hooks) is the independent computation here: it is checked
against per-edge autograd references in test_attribute.py / test_architectures.py, and it shares
no code with eap.fast's blocks. The two must give the same scores for every gradient method, with
and without a logit readout, on every family the adapter covers. GPT-2 and Pythia agree to float64
rounding; the Llama-like families run their softmax in float32 inside HF even in a float64 model
(``eap.arch.ArchSpec.softmax_fp32``), so there the two orders of operations agree to ~1e-7.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from eap import Graph, attribute, random_model
from eap.arch import Arch, UnsupportedModel
from eap.attribute import AttributionError
from eap.fast import FastEngine, engine_for
from eap.tasks import ioi

from conftest import random_task

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)
#: shape -> relative tolerance of fast vs bridge (float32 softmax inside HF for Llama-like models)
SHAPES = {"gpt2-tiny": 1e-12, "pythia-tiny": 1e-12, "llama-tiny": 1e-6, "qwen-tiny": 1e-6}


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request):
    model = random_model(request.param, seed=3, **F64)
    return request.param, model, Graph.from_model(model)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "clean-corrupted"])
def test_fast_engine_equals_bridge_engine(setup, method):
    shape, model, graph = setup
    assert isinstance(engine_for(model, "auto"), FastEngine)  # auto picks the fast engine here
    for task in (random_task(model, n=5, seq=7, seed=1), ioi(model, 6, seed=2)):  # full logits, readout
        fast = attribute(model, graph, task, method, engine="fast", progress=False, ig_steps=3)
        bridge = attribute(model, graph, task, method, engine="bridge", progress=False, ig_steps=3)
        scale = float(bridge.abs().max())
        assert scale > 1e-6, "degenerate scores would make the comparison vacuous"
        rel = SHAPES[shape]
        torch.testing.assert_close(fast, bridge, rtol=rel, atol=rel * scale, msg=f"{shape} {method} {task.name}")


def test_fast_engine_node_scores_and_batches(setup):
    """Node level and a split into batches give the bridge's numbers too (scores are summed over
    batches in the same units)."""
    shape, model, graph = setup
    task = random_task(model, n=5, seq=7, seed=4)
    rel = SHAPES[shape]
    fast = attribute(model, graph, task, level="node", engine="fast", batch_size=2, progress=False)
    bridge = attribute(model, graph, task, level="node", engine="bridge", progress=False)
    torch.testing.assert_close(fast, bridge, rtol=rel, atol=rel * float(bridge.abs().max()))


def test_hooks_attached_send_auto_to_the_bridge_and_fast_refuses(tiny_model):
    """A user hook changes the model; only the bridge runs it. 'auto' then uses the bridge (the
    hook's effect shows in the scores), 'fast' refuses rather than silently ignore the hook."""
    model = tiny_model
    graph = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=5)
    plain = attribute(model, graph, task, engine="fast", progress=False)
    model.add_hook("blocks.1.hook_resid_pre", lambda x, hook=None: 2.0 * x)
    try:
        assert engine_for(model, "auto") is None
        hooked = attribute(model, graph, task, engine="auto", progress=False)
        bridge = attribute(model, graph, task, engine="bridge", progress=False)
        torch.testing.assert_close(hooked, bridge, rtol=0, atol=0)
        assert (hooked - plain).abs().max() > 1e-3 * plain.abs().max()  # negative control: the hook matters
        with pytest.raises(UnsupportedModel, match="hooks attached"):
            attribute(model, graph, task, engine="fast", progress=False)
    finally:
        model.reset_hooks()
    torch.testing.assert_close(attribute(model, graph, task, progress=False), plain, rtol=0, atol=0)


def test_a_model_the_adapter_does_not_reproduce_falls_back_with_a_warning(monkeypatch):
    model = random_model("gpt2-tiny", seed=9, **F64)  # fresh: the verdict is cached per model
    graph = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=6)

    def refuse(self, model, n_pos=8):
        raise UnsupportedModel("gpt2: pretend block 0 differs")

    monkeypatch.setattr(Arch, "verify", refuse)
    with pytest.warns(UserWarning, match="pretend"):
        got = attribute(model, graph, task, engine="auto", progress=False)
    with pytest.raises(UnsupportedModel, match="pretend"):
        attribute(model, graph, task, engine="fast", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per model
        again = attribute(model, graph, task, engine="auto", progress=False)
    want = attribute(model, graph, task, engine="bridge", progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_engine_arguments_are_checked(tiny_model):
    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=2, seq=5, seed=7)
    with pytest.raises(AttributionError, match="unknown engine"):
        attribute(tiny_model, graph, task, engine="turbo", progress=False)
    with pytest.raises(AttributionError, match="bridge engine only"):
        attribute(tiny_model, graph, task, "atp-qk", engine="fast", progress=False)


def test_weights_changed_in_place_are_seen(tiny_model):
    """The engine holds views of the bridge's weights, built per call: an in-place edit of a
    weight (as in an ablation study) changes the fast scores exactly as the bridge's."""
    model = random_model("gpt2-tiny", seed=10, **F64)
    graph = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=8)
    before = attribute(model, graph, task, engine="fast", progress=False)
    W = next(p for n, p in model.named_parameters() if "mlp" in n and p.ndim == 2)
    with torch.no_grad():
        W.mul_(3.0)
    after = attribute(model, graph, task, engine="fast", progress=False)
    bridge = attribute(model, graph, task, engine="bridge", progress=False)
    torch.testing.assert_close(after, bridge, rtol=1e-12, atol=1e-12 * float(bridge.abs().max()))
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
