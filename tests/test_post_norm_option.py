"""The gradient methods' ``post_norm`` option (``eap.methods.POST_NORM_OPTION``).

'jacobian' (default): a head's difference passes its layer's post-norm Jacobian (the first-order
term of exact patching). 'ignore': EAP-IG's attribute.py variant, the raw pre-norm difference
contracted with the receiver gradient. The reference for 'ignore' is the bridge's hooks (they
contract the raw ``hook_result`` differences with the hooked receiver gradients: no Jacobian),
computed independently of the fast engine. Float64 tiny models.
"""

from __future__ import annotations

import pytest
import torch

from eap import Graph, attribute, random_model
from eap.methods import REGISTRY
from eap.passes import AttributionError, GradientMethod

from conftest import random_task

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)


def naive_raw_eap(model, g, task):
    """EAP without the post-norm Jacobian, from the definition with plain hooks and autograd:
    score(u -> r) = (corrupted - clean pre-norm output of u) . d mean(metric) / d (input of r),
    the gradient taken at the clean run (a zero leaf added at every receiver's hook)."""
    from eap.hooks import as_nodes

    from test_validation import _sender_outputs

    diff = (_sender_outputs(model, g, task.corrupted) - _sender_outputs(model, g, task.clean)).double()
    leaves = {}

    def add(group):
        def hook(x, hook=None):
            leaves[group.hook] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[group.hook]

        return hook

    logits = model.run_with_hooks(task.clean, fwd_hooks=[(r.hook, add(r)) for r in g.receiver_groups])
    task.metric(logits).mean().backward()
    grads = torch.cat([as_nodes(leaves[r.hook].grad, r) for r in g.receiver_groups]).double()  # [n_receivers, ...]
    full = torch.einsum("ubpd,rbpd->ur", diff, grads)
    return full[g.edge_sender, g.edge_receiver]


def bridge_scores(model, g, task, points):
    """Gradient-points scores on the bridge's hooks (raw pre-norm head differences)."""
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    GradientMethod(model, g, points, scores, None).accumulate(task, 1.0 / task.n_prompts)
    return scores[g.edge_sender, g.edge_receiver]


@pytest.mark.parametrize("method,points", [("eap", [(1.0, 1.0)]), ("clean-corrupted", [(1.0, 0.5), (0.0, 0.5)])])
def test_ignore_is_the_raw_pre_norm_variant_on_gemma2(method, points):
    model = random_model("gemma-2-tiny", seed=1, **F64)
    g = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=10)
    default = attribute(model, g, task, method=method, progress=False).double()
    jac = attribute(model, g, task, method=method, post_norm="jacobian", progress=False).double()
    ignore = attribute(model, g, task, method=method, post_norm="ignore", progress=False).double()
    torch.testing.assert_close(default, jac, rtol=0, atol=0)  # the default is the Jacobian
    want = bridge_scores(model, g, task, points)
    torch.testing.assert_close(ignore, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))  # float32 norms in HF
    if method == "eap":
        naive = naive_raw_eap(model, g, task)
        torch.testing.assert_close(ignore, naive, rtol=1e-6, atol=1e-7 * float(naive.abs().max()))
    assert (ignore - default).abs().max() > 0.05 * default.abs().max()  # a different quantity


def test_both_values_agree_without_post_norms():
    model = random_model(dict(n_layer=2, n_embd=16, n_head=2, n_positions=32), seed=0, **F64)
    g = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=4)
    for method in ("eap", "eap-ig"):
        a = attribute(model, g, task, method=method, progress=False)
        b = attribute(model, g, task, method=method, post_norm="ignore", progress=False)
        assert a.abs().max() > 0 and torch.equal(a, b)


def test_option_is_declared_and_checked():
    for name in ("eap", "eap-ig", "clean-corrupted"):
        opt = {o.name: o for o in REGISTRY.get(name).options}["post_norm"]
        assert opt.default == "jacobian" and opt.choices == ("jacobian", "ignore")
    assert REGISTRY.get("eap-ig").options[0].name == "ig_steps"
    model = random_model(dict(n_layer=1, n_embd=16, n_head=2, n_positions=32), seed=0, **F64)
    g = Graph.from_model(model)
    task = random_task(model, n=2, seq=5, seed=4)
    with pytest.raises(AttributionError, match="post_norm must be one of"):
        attribute(model, g, task, method="eap", post_norm="none", progress=False)
    with pytest.raises(AttributionError, match="no option post_norm"):
        attribute(model, g, task, method="atp-qk", post_norm="ignore", progress=False)


def test_bench_config_passes_post_norm_to_the_gradient_methods():
    from bench.matrix import Config, ConfigError
    from bench.plugins import resolve_method

    eap, atp = resolve_method("eap"), resolve_method("atp-qk")
    assert Config(models=["m"], tasks=["ioi"]).method_kwargs_for(eap) == {"batch_size": None}
    cfg = Config(models=["m"], tasks=["ioi"], post_norm="ignore")
    assert cfg.method_kwargs_for(eap) == {"batch_size": None, "post_norm": "ignore"}
    assert cfg.method_kwargs_for(atp) == {"batch_size": None}  # not an option of AtP
    with pytest.raises(ConfigError, match="post_norm must be one of"):
        Config(models=["toy-gpt2-2l"], tasks=["ioi"], post_norm="none").check()
