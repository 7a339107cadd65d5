"""The method registry (eap.methods): one entry per method, read by eap.attribute and bench."""

from __future__ import annotations

import pytest
import torch

import eap
from eap import Graph, attribute
from eap.attribute import AttributionError
from eap.methods import REGISTRY, FunctionMethod, GradientPointsMethod, Option, Registry

from conftest import random_task


def test_builtin_names_come_from_the_registry():
    assert eap.METHODS == ("eap", "eap-ig", "clean-corrupted", "atp-qk", "atp-graddrop", "atp*")
    assert tuple(m.name for m in REGISTRY if m.builtin) == eap.METHODS
    assert REGISTRY.get("eap-ig").options[0].name == "ig_steps" and REGISTRY.get("eap-ig").options[0].default == 5
    assert REGISTRY.get("atp*").levels == ("edge",) and REGISTRY.get("eap").levels == ("edge", "node")
    from bench.matrix import DEFAULT_METHODS

    assert DEFAULT_METHODS == ("eap", "eap-ig", "clean-corrupted")


def test_a_new_gradient_method_is_one_registry_entry(tiny_model):
    """A method added as one entry runs through eap.attribute: half the weight of EAP's one
    gradient point gives exactly half of EAP's scores; 'eap-ig' with one step is EAP."""
    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=3, seq=5, seed=3)
    half = GradientPointsMethod("half-eap", "EAP at half weight", lambda: [(1.0, 0.5)])
    reg_before = REGISTRY.names()
    try:
        eap.register(half)
        assert "half-eap" in REGISTRY.names() and "half-eap" not in eap.METHODS
        got = attribute(tiny_model, graph, task, "half-eap", progress=False, write_graph=False)
    finally:
        REGISTRY.unregister("half-eap")
    assert REGISTRY.names() == reg_before
    ref = attribute(tiny_model, graph, task, "eap", progress=False, write_graph=False)
    torch.testing.assert_close(got, 0.5 * ref, rtol=0, atol=0)
    one = attribute(tiny_model, graph, task, "eap-ig", ig_steps=1, progress=False, write_graph=False)
    torch.testing.assert_close(one, ref, rtol=0, atol=0)


def test_options_are_typed_and_unknown_ones_refused(tiny_model):
    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=2, seq=5)
    with pytest.raises(AttributionError, match="ig_steps must be int"):
        attribute(tiny_model, graph, task, "eap-ig", ig_steps=2.5, progress=False)
    with pytest.raises(AttributionError, match="ig_steps must be >= 1"):
        attribute(tiny_model, graph, task, "eap-ig", ig_steps=0, progress=False)
    with pytest.raises(AttributionError, match="has no option steps"):
        attribute(tiny_model, graph, task, "eap-ig", steps=3, progress=False)
    # ig_steps is passed to every method but taken only where declared (as before the registry)
    attribute(tiny_model, graph, task, "eap", ig_steps=3, progress=False, write_graph=False)
    assert Option("x", float, 1.0, "").check(2, "m") == 2.0


def test_registry_refuses_to_replace_a_builtin():
    reg = Registry()
    reg.register(REGISTRY.get("eap"))
    with pytest.raises(AttributionError, match="already registered"):
        reg.register(FunctionMethod("eap", lambda *a: None))
    with pytest.raises(AttributionError, match="cannot be removed"):
        reg.unregister("eap")
    with pytest.raises(AttributionError, match="unknown attribution method 'nope'"):
        reg.get("nope")


def test_user_method_registers_into_the_same_registry(tiny_model, tmp_path, monkeypatch):
    """bench's resolver registers a module:function method; eap.attribute then runs it by name."""
    (tmp_path / "usermeth.py").write_text(
        "import torch\n"
        "def doubled(model, graph, task, scale=2.0):\n"
        "    '''EAP times scale.'''\n"
        "    import eap\n"
        "    return scale * eap.attribute(model, graph, task, 'eap', progress=False, write_graph=False)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from bench.plugins import call_method, resolve_method

    plugin = resolve_method("usermeth:doubled")
    try:
        assert plugin.method is REGISTRY.get("usermeth:doubled") and not plugin.method.builtin
        assert plugin.method.levels == ("edge",)
        graph = Graph.from_model(tiny_model)
        task = random_task(tiny_model, n=2, seq=5, seed=1)
        ref = attribute(tiny_model, graph, task, "eap", progress=False, write_graph=False)
        torch.testing.assert_close(attribute(tiny_model, graph, task, "usermeth:doubled", scale=3.0,
                                             progress=False), 3.0 * ref, rtol=0, atol=0)
        torch.testing.assert_close(call_method(plugin, tiny_model, graph, task), 2.0 * ref, rtol=0, atol=0)
        with pytest.raises(AttributionError, match="edges only"):
            attribute(tiny_model, graph, task, "usermeth:doubled", level="node", progress=False)
    finally:
        REGISTRY.unregister("usermeth:doubled")


def test_bench_builtin_plugin_reads_the_registry():
    from bench.matrix import Config
    from bench.plugins import resolve_method

    cfg = Config(models=["m"], tasks=["ioi"], ig_steps=3, batch_size=4)
    ig, plain = resolve_method("eap-ig"), resolve_method("eap")
    assert ig.builtin and ig.method is REGISTRY.get("eap-ig")
    assert cfg.method_kwargs_for(ig) == {"batch_size": 4, "ig_steps": 3}
    assert cfg.method_kwargs_for(plain) == {"batch_size": 4}
