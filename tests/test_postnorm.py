"""Post-norm families (Gemma-2, Gemma-3): edges through the recomputed post-norm, MIB/EAP-IG semantics.

Definitions (``eap.arch.postnorm``): a head sender's output is its pre-norm result; patching
``u -> v`` (u a head of layer L) adds ``PN_L(S_L + scale d_u) - PN_L(S_L)`` to v's input only,
``S_L`` the layer's clean pre-norm attention sum; EAP is ``J_PN_L(S_L) d_u`` contracted with v's
gradient. Everything here is checked against naive computations written from those definitions
with the bridge's hooks and HF's own norm modules (not the adapter's). Tiny float64 models; HF
computes Gemma's RMSNorm in float32, which bounds the tolerances.
"""

from __future__ import annotations

import pytest
import torch

import validation
import validation.runner
from eap import Graph, attribute, random_model
from eap.arch import Arch
from eap.arch.postnorm import post_norm_jvp, post_normed_difference
from eap.attribute import GradientMethod
from eap.fast import FastEngine
from eap.hooks import as_nodes
from validation.runner import BlockRunner

from conftest import random_task, central_difference, exact_over_eps_errors
from test_validation import _add_hook, _sender_outputs, readout_task, _receiver_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module", params=["gemma-2-tiny", "gemma-3-tiny"])
def gemma(request):
    """Gemma-2 and Gemma-3 (per-head q/k norms, local/global rotary bases): per-head q/k norms do
    not couple heads, so the bridge's per-head q/k/v input hooks are a valid naive reference."""
    model = random_model(request.param, seed=2, **F64)
    return model, Graph.from_model(model)


# ------------------------------------------------------------------------------ naive references
def hf_post_norm(model, layer):
    """HF's own post-attention norm module of ``layer`` (not the adapter's)."""
    return model.original_model.model.layers[layer].post_attention_layernorm


def attn_sums(model, graph, outputs):
    """Per layer, the pre-norm attention sum (heads + b_O) from per-sender outputs."""
    sums = {}
    for g in graph.sender_groups:
        if g.kind == "head":
            b_O = getattr(model.blocks[g.layer].attn, "b_O", None)
            s = outputs[g.start : g.start + g.size].sum(0)
            sums[g.layer] = s if b_O is None else s + b_O
    return sums


def head_layer(graph, u):
    g = next(g for g in graph.sender_groups if g.start <= u < g.start + g.size)
    return g.layer if g.kind == "head" else None


def naive_postnorm_edges(model, graph, task, edges, scale=1.0):
    """One full bridge forward per edge: receiver v's input += PN_L(S_L + scale d_u) - PN_L(S_L)
    for a head u of layer L (HF's norm module), += scale d_u for other senders."""
    clean = _sender_outputs(model, graph, task.clean)
    diff = _sender_outputs(model, graph, task.corrupted) - clean
    sums = attn_sums(model, graph, clean)
    with torch.no_grad():
        base = task.metric(model(task.clean))
        out = []
        for e in edges:
            u, r = int(graph.edge_sender[e]), int(graph.edge_receiver[e])
            L = head_layer(graph, u)
            D = scale * diff[u]
            if L is not None:
                norm = hf_post_norm(model, L)
                D = norm(sums[L] + D) - norm(sums[L])
            g = graph.receiver_group_of(r)
            logits = model.run_with_hooks(task.clean, fwd_hooks=[(g.hook, _add_hook(g, r, D))])
            out.append((task.metric(logits) - base).mean().item())
    return torch.tensor(out, dtype=torch.float64)


def naive_circuit(model, graph, task, keep):
    """EAP-IG's evaluate_graph with normalisation before and after, with the bridge's hooks: one
    clean forward; sender hooks record current outputs; every receiver hook adds, over the senders
    u outside the circuit, (corr_u - cur_u) for input/MLP senders and, per earlier layer L,
    PN_L(S_L^cur + sum_h (corr_h - cur_h)) - PN_L(S_L^cur) for its heads."""
    corr = _sender_outputs(model, graph, task.corrupted)
    cur = torch.zeros_like(corr)
    patched = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    out_edges = ~keep
    patched[graph.edge_sender[out_edges], graph.edge_receiver[out_edges]] = True

    def record(g):
        def hook(x, hook=None):
            cur[g.start : g.start + g.size] = as_nodes(x.detach(), g)
            return x
        return hook

    def correct(g):
        def hook(x, hook=None):
            x = x.clone()
            dif = corr - cur
            sums = attn_sums(model, graph, cur)
            for j in range(g.size):
                up = patched[:, g.start + j].clone()
                up[int(graph.n_upstream[g.start + j]):] = False
                add = torch.zeros_like(cur[0])
                for u in torch.nonzero(up).flatten().tolist():
                    if head_layer(graph, u) is None:
                        add += dif[u]
                for L, S in sums.items():
                    hs = [u for u in torch.nonzero(up).flatten().tolist() if head_layer(graph, u) == L]
                    if hs:
                        norm = hf_post_norm(model, L)
                        add += norm(S + dif[hs].sum(0)) - norm(S)
                if g.n_heads:
                    x[:, :, j] += add
                else:
                    x += add
            return x
        return hook

    hooks = [(g.hook, record(g)) for g in graph.sender_groups] + [(g.hook, correct(g)) for g in graph.receiver_groups]
    with torch.no_grad():
        return task.metric(model.run_with_hooks(task.clean, fwd_hooks=hooks))


# ------------------------------------------------------------------------------ the two functions
def test_post_norm_functions_reduce_to_additivity_for_an_identity_norm():
    gen = torch.Generator().manual_seed(0)
    S, D = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    identity = lambda x: x  # noqa: E731
    assert torch.equal(post_normed_difference(identity, S, D), D + S - S)
    torch.testing.assert_close(post_normed_difference(identity, S, D), D, atol=1e-14, rtol=0)


def test_post_norm_jvp_is_the_derivative(gemma):
    model, _ = gemma
    norm = Arch(model).layers[0].ln1_post
    gen = torch.Generator().manual_seed(1)
    S, D = torch.randn(4, 32, generator=gen, dtype=torch.float64), torch.randn(4, 32, generator=gen, dtype=torch.float64)
    jvp = post_norm_jvp(norm, S, D)
    fd = (post_normed_difference(norm, S, 1e-2 * D) - post_normed_difference(norm, S, -1e-2 * D)) / 2e-2
    torch.testing.assert_close(jvp, fd, rtol=1e-4, atol=1e-4 * float(jvp.abs().max()))
    # against autograd through HF's own module (float32 statistics inside)
    ref = torch.func.jvp(hf_post_norm(model, 0), (S,), (D,))[1]
    torch.testing.assert_close(jvp, ref, rtol=1e-5, atol=1e-6)


def test_circuits_reduce_to_the_additive_definition_when_the_post_norm_is_the_identity(gemma):
    """With identity post-norms, the post-norm branch of run_circuits and the additive branch of
    every other family give the same receiver inputs."""
    from dataclasses import replace

    model, g = gemma
    task = random_task(model, n=2, seq=5, seed=1)
    corr = _sender_outputs(model, g, task.corrupted)
    embed = _sender_outputs(model, g, task.clean)[0]
    patched = (torch.rand(3, g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(2)) < 0.5).double() * g.mask
    runners = []
    for post in (True, False):
        rn = BlockRunner(model, verify=False)
        for lw in rn.arch.layers:
            lw.ln1_post = (lambda x: x) if post else None
            lw.ln2_post = None
        rn.arch.spec = replace(rn.arch.spec, post_norms=post)
        runners.append(rn)
    a, b = (rn.run_circuits(g, embed, corr, patched) for rn in runners)
    assert a.abs().max() > 1
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------ exact patching
def test_fast_exact_path_equals_naive_post_norm_edges(gemma):
    model, g = gemma
    task = random_task(model, n=3, seq=7, seed=6)
    stats = {}
    got = validation.patch_edges(model, g, task, progress=False, batch_size=2, stats=stats)
    assert stats["path"] == "fast"
    want = naive_postnorm_edges(model, g, task, range(g.n_edges))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=0)


def test_negative_control_plain_additivity_fails(gemma, monkeypatch):
    """Replacing the post-norm recomputation with plain additivity (D itself) breaks agreement."""
    model, g = gemma
    task = random_task(model, n=3, seq=7, seed=6)
    heads_to_layer1 = [e for e in range(g.n_edges) if g.edge_names[e].startswith("a0.") and "a1" in g.edge_names[e]]
    want = naive_postnorm_edges(model, g, task, heads_to_layer1)
    monkeypatch.setattr(validation.runner, "post_normed_difference", lambda norm, S, D: D)
    bad = validation.patch_edges(model, g, task, heads_to_layer1, progress=False)[heads_to_layer1]
    assert (bad - want).abs().max() > 0.05 * want.abs().max()


def test_readout_path_and_nodes_equal_naive(gemma):
    from test_validation import naive_nodes

    model, g = gemma
    task = readout_task(model, n=4, seq=8, seed=7)
    edges = g.select_edges("stratified:40", seed=1)
    fast = validation.patch_edges(model, g, task, edges, progress=False)
    want = naive_postnorm_edges(model, g, task, edges.tolist())
    torch.testing.assert_close(fast[edges], want, atol=1e-6 * float(want.abs().max()), rtol=0)
    task = random_task(model, n=3, seq=6, seed=8)
    nodes = validation.patch_nodes(model, g, task, progress=False)
    want = naive_nodes(model, g, task)  # the head's pre-norm output replaced at hook_result: the bridge re-norms
    torch.testing.assert_close(nodes, want, atol=1e-6 * float(want.abs().max()), rtol=0)


def test_hook_path_is_refused_for_post_norms(gemma):
    model, g = gemma
    task = random_task(model, n=2, seq=5)
    with pytest.raises(validation.UnsupportedModel, match="block runner"):
        validation.patch_edges(model, g, task, [0, 1], progress=False, engine="bridge")
    with pytest.raises(validation.UnsupportedModel, match="Jacobian"):
        attribute(model, g, task, progress=False, engine="bridge")


# ------------------------------------------------------------------------------ completeness
@pytest.mark.parametrize("shape", ["gemma-2-tiny", "olmo-2-tiny"])
def test_every_receiver_input_is_clean_plus_post_normed_differences(shape):
    """corrupted_v == clean_v + sum_{input, MLPs} d_u + sum_L [PN_L(S_L + sum_h d_h) - PN_L(S_L)];
    negative control: adding the heads' pre-norm differences instead fails."""
    model = random_model(shape, seed=2, **F64)
    g = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=9)
    clean_out = _sender_outputs(model, g, task.clean)
    diff = _sender_outputs(model, g, task.corrupted) - clean_out
    sums = attn_sums(model, g, clean_out)

    clean, corr = _receiver_inputs(model, g, task.clean), _receiver_inputs(model, g, task.corrupted)
    worst_additive = 0.0
    for r in range(g.n_receivers):
        k = int(g.n_upstream[r])
        total = torch.zeros_like(clean[r])
        for u in range(k):
            if head_layer(g, u) is None:
                total += diff[u]
        for L, S in sums.items():
            hs = [u for u in range(k) if head_layer(g, u) == L]
            if hs:
                norm = hf_post_norm(model, L)
                total += norm(S + diff[hs].sum(0)) - norm(S)
        torch.testing.assert_close(clean[r] + total, corr[r], atol=1e-6, rtol=1e-6)
        worst_additive = max(worst_additive, float((clean[r] + diff[:k].sum(0) - corr[r]).abs().max()))
    assert worst_additive > 1e-2


# ------------------------------------------------------------------------------ attribution
def test_exact_over_eps_converges_to_eap(gemma):
    """Central differences of exact patching with ``scale`` -> fast EAP (edges and nodes)."""
    model, g = gemma
    task = random_task(model, n=3, seq=6, seed=10)
    scores = attribute(model, g, task, progress=False).double()
    errors = exact_over_eps_errors(model, g, task, scores)
    assert errors[0] > 5 * errors[1] and errors[2] < errors[1], errors
    assert errors[2] < 1e-3, errors
    eps = 1e-2
    nodes = central_difference(validation.patch_nodes, model, g, task, eps)
    node_eap = attribute(model, g, task, level="node", progress=False).double()
    assert (nodes - node_eap).abs().max() < 1e-3 * node_eap.abs().max()


def eap_ignoring_post_norm(model, g, task, fast):
    """EAP-IG's attribute.py variant (raw pre-norm head differences) on an engine (None: the bridge)."""
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    GradientMethod(model, g, [(1.0, 1.0)], scores, fast).accumulate(task, 1.0 / task.n_prompts)
    return scores[g.edge_sender, g.edge_receiver]


def test_eap_ig_variant_is_an_option_equal_to_the_bridge_and_not_the_first_order_term(gemma):
    """FastEngine(post_norm='ignore') = the bridge's hooks (both contract raw pre-norm
    differences, as EAP-IG's attribute.py); it is not the limit of exact/eps (the default is)."""
    model, g = gemma
    task = random_task(model, n=3, seq=6, seed=10)
    ignore = eap_ignoring_post_norm(model, g, task, FastEngine(model, post_norm="ignore"))
    bridge = eap_ignoring_post_norm(model, g, task, None)
    torch.testing.assert_close(ignore, bridge, rtol=1e-6, atol=1e-7 * float(bridge.abs().max()))  # float32 norms in HF
    eps = 1e-2
    fd = central_difference(validation.patch_edges, model, g, task, eps)
    default = attribute(model, g, task, progress=False).double()
    assert (default - fd).abs().max() < 1e-3 * fd.abs().max()
    assert (ignore - fd).abs().max() > 0.05 * fd.abs().max()


# ------------------------------------------------------------------------------ circuits
def test_circuits_equal_naive_evaluate_graph(gemma):
    model, g = gemma
    task = random_task(model, n=3, seq=6, seed=11)
    gen = torch.Generator().manual_seed(3)
    keeps = [torch.rand(g.n_edges, generator=gen) < p for p in (0.3, 0.7)]
    res = validation.evaluate_circuit(model, g, task, torch.stack(keeps), progress=False)
    for i, keep in enumerate(keeps):
        want = naive_circuit(model, g, task, keep)
        torch.testing.assert_close(res.per_prompt[i], want.double(), atol=1e-6 * float(want.abs().max()), rtol=0)
    # one edge out of the circuit = that edge's exact patching value; the empty circuit = corrupted run
    e = int(torch.nonzero(torch.tensor([n.startswith("a0.h1->a1") for n in g.edge_names]))[0])
    one = validation.evaluate_circuit(model, g, task, torch.arange(g.n_edges) != e, progress=False)
    exact = validation.patch_edges(model, g, task, [e], progress=False)[e]
    torch.testing.assert_close(one.effect, exact.reshape(()).double(), atol=1e-9, rtol=1e-6)
    empty = validation.evaluate_circuit(model, g, task, torch.zeros(g.n_edges, dtype=torch.bool), progress=False)
    with torch.no_grad():
        corrupted = task.metric(model(task.corrupted)).double()
    torch.testing.assert_close(empty.per_prompt, corrupted, atol=1e-6, rtol=1e-6)


def test_gemma3_local_and_global_rotary_bases_are_checked():
    """Gemma-3's layers use their own rotary bases; negative control: swapping them is caught."""
    from dataclasses import replace

    from eap.arch import UnsupportedModel

    model = random_model("gemma-3-tiny", seed=2, **F64)
    arch = Arch(model)
    assert arch.spec.rope_types == ("sliding_attention", "full_attention") and arch.spec.windows == (4, None)
    arch.verify(model, n_pos=10)
    bad = Arch(model)
    bad.spec = replace(bad.spec, rope_types=("full_attention", "full_attention"))
    with pytest.raises(UnsupportedModel, match="block 0"):
        bad.verify(model, n_pos=10)


@pytest.mark.parametrize("shape, dims", [("gemma-2-2b", (26, 8, 2304)), ("gemma-3-1b", (26, 4, 1152))])
def test_edge_counts_follow_the_closed_form(shape, dims):
    """Post-norm families keep the sequential graph: edge counts by the closed form, from configs only."""
    from transformers import AutoConfig

    from eap.arch import graph_spec
    from eap.models import RANDOM_SHAPES
    from test_architectures import closed_form_edges

    family, fields = RANDOM_SHAPES[shape]
    spec = graph_spec(AutoConfig.for_model({"gemma2": "gemma2", "gemma3": "gemma3_text"}[family], **fields))
    assert (spec.n_layers, spec.n_heads, spec.d_model) == dims
    assert Graph(spec).n_edges == closed_form_edges(spec.n_layers, spec.n_heads)


def test_embedded_post_norm_toy_eap_is_the_first_order_term_of_exact_patching():
    """toy-gemma2-4l (trained, eap/embedded/; its card is re-measured by test_embedded_models.py)
    is a post-norm model on which EAP = lim exact/eps on IOI, and EAP-IG's variant is not."""
    from eap import load_model
    from eap.arch import arch_spec
    from eap.tasks import TASKS

    model = load_model("toy-gemma2-4l", device="cpu", dtype=torch.float64)
    spec = arch_spec(model)
    assert spec.family == "gemma2" and spec.post_norms and spec.grouped_kv_heads == 2
    g = Graph.from_model(model)
    task = TASKS["ioi"](model, 4, seed=3)
    edges = g.select_edges("stratified:60", seed=0)
    eap = attribute(model, g, task, progress=False).double()[edges]
    ignore = eap_ignoring_post_norm(model, g, task, FastEngine(model, post_norm="ignore"))[edges]
    eps = 1e-2
    fd = ((validation.patch_edges(model, g, task, edges, scale=eps, progress=False)
           - validation.patch_edges(model, g, task, edges, scale=-eps, progress=False)) / (2 * eps))[edges]
    assert (eap - fd).abs().max() < 1e-3 * fd.abs().max()
    assert (ignore - fd).abs().max() > 0.05 * fd.abs().max()


def test_gradient_points_use_their_own_post_norm_jacobian(gemma):
    """clean-corrupted = (EAP(task) - EAP(task with clean and corrupted swapped)) / 2: its second
    point needs the post-norm's Jacobian at the corrupted run, not the clean one."""
    from conftest import _lp_diff
    from eap.task import Task

    model, g = gemma
    task = random_task(model, n=3, seq=6, seed=12)
    swapped = Task(task.corrupted, task.clean, _lp_diff, per_prompt=task.per_prompt, name="swapped")
    both = attribute(model, g, task, method="clean-corrupted", progress=False).double()
    want = 0.5 * (attribute(model, g, task, progress=False).double() - attribute(model, g, swapped, progress=False).double())
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(both, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))
