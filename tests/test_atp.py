"""AtP* (eap.atp): QK-fix and GradDrop against independent computations on tiny float64 models.

References here use only the model's own hooks (``hook_{q,k}_input``, ``attn.hook_pattern``,
``hook_attn_out`` / ``hook_mlp_out``) and autograd, one edge at a time; nothing from eap.atp or
eap.arch:

* QK-fix of edge u -> aL.hH<q|k>: a clean forward with the sender's difference added to head H's
  q (or k) input gives the exactly patched pattern A'; the score is
  sum (A' - A) * d mean-metric / dA over prompts and positions, with dA from autograd on the
  clean run.
* GradDrop's term for layer l: EAP's directional derivative with layer l's attention and MLP
  outputs detached (their gradient stopped), test_attribute.reference_scores.
"""

from __future__ import annotations

import pytest
import torch

import validation
from eap import Graph, attribute, random_model
from eap.atp import AtP, atp_options, layer_dropped
from eap.attribute import AttributionError
from eap.budget import plan_atp

from conftest import random_task
from memtools import live_peak_bytes
from test_attribute import reference_scores, sender_outputs

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)
MODELS = {
    "gpt2": (dict(n_layer=3, n_embd=24, n_head=3, n_positions=32, vocab_size=64), "gpt2"),
    # rotary, RMSNorm, SwiGLU, grouped-query attention (2 KV heads for 4 query heads, ungrouped)
    "llama-gqa": (dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, max_position_embeddings=64), "llama"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    shape, arch = MODELS[request.param]
    model = random_model(shape, seed=2, arch=arch, **F64)
    graph = Graph.from_model(model)
    return request.param, model, graph, random_task(model, n=4, seq=6, seed=11)


def _leaf(x, hook=None):
    return x.detach().requires_grad_(True)


def stop_layer_hooks(layer):
    """Forward hooks that detach layer ``layer``'s writes into the residual stream."""
    return [(f"blocks.{layer}.hook_attn_out", lambda x, hook=None: x.detach()),
            (f"blocks.{layer}.hook_mlp_out", lambda x, hook=None: x.detach())]


def pattern_grads(model, task, extra_hooks=()):
    """Clean patterns and d mean-metric / d pattern per layer, by autograd on the bridge's pattern."""
    L = model.cfg.n_layers
    pats = {}

    def keep(layer):
        def hook(x, hook=None):
            pats[layer] = x
            return x

        return hook

    hooks = [("blocks.0.hook_resid_pre", _leaf)] + [(f"blocks.{l}.attn.hook_pattern", keep(l)) for l in range(L)]
    with model.hooks(fwd_hooks=hooks + list(extra_hooks)):
        value = task.metric(model(task.clean)).mean()
    grads = torch.autograd.grad(value, [pats[l] for l in range(L)], allow_unused=True)
    return ({l: pats[l].detach() for l in range(L)},
            {l: torch.zeros_like(pats[l]) if g is None else g for l, g in enumerate(grads)})


def qk_reference(model, graph, task, extra_hooks=()):
    """Per-edge QK-fix, one edge and one forward at a time: {edge index: score} for q/k edges."""
    delta = sender_outputs(model, graph, task.corrupted) - sender_outputs(model, graph, task.clean)
    clean, grads = pattern_grads(model, task, extra_hooks)
    out = {}
    for e, (u, r) in enumerate(zip(graph.edge_sender.tolist(), graph.edge_receiver.tolist())):
        name = graph.receivers[r]  # aL.hH<q>
        kind = name[-2]
        if kind not in "qk":
            continue
        layer, head = (int(x) for x in name[1:].split("<")[0].split(".h"))
        got = {}

        def patch(x, hook=None, u=u, head=head):
            x = x.clone()
            x[:, :, head] += delta[u]
            return x

        def grab(x, hook=None):
            got["A"] = x.detach()
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_{kind}_input", patch),
                                                     (f"blocks.{layer}.attn.hook_pattern", grab)]):
            model(task.clean)
        out[e] = float(((got["A"][:, head] - clean[layer][:, head]) * grads[layer][:, head]).sum())
    return out


def test_qk_fix_equals_direct_per_edge_computation(setup):
    name, model, graph, task = setup
    ref = qk_reference(model, graph, task)
    got = attribute(model, graph, task, "atp-qk", progress=False)
    idx = torch.tensor(sorted(ref))
    want = torch.tensor([ref[i] for i in idx.tolist()], dtype=torch.float64)
    assert want.abs().max() > 1e-5  # the q/k edges carry signal
    torch.testing.assert_close(got[idx], want, rtol=0, atol=1e-9 * float(want.abs().max()))
    # ... and they are not EAP's numbers (the fix changes something)
    eap = attribute(model, graph, task, "eap", progress=False)
    assert (eap[idx] - want).abs().max() > 1e-4 * want.abs().max()


def test_qk_fix_leaves_other_edges_equal_to_eap(setup):
    _, model, graph, task = setup
    got = attribute(model, graph, task, "atp-qk", progress=False)
    # the AtP methods run on the bridge; so does this EAP (the fast engine's float32 softmax in
    # Llama rounds differently, test_fast.py)
    eap = attribute(model, graph, task, "eap", progress=False, engine="bridge")
    other = torch.tensor([k not in ("q", "k") for k in graph.edge_kind])
    assert other.sum() > 0 and eap[other].abs().max() > 1e-4
    torch.testing.assert_close(got[other], eap[other], rtol=1e-12, atol=0)


def test_graddrop_terms_equal_eap_with_that_layers_gradient_stopped(setup):
    _, model, graph, task = setup
    terms = layer_dropped(model, graph, task)  # [L, n_edges]
    eap = attribute(model, graph, task, "eap", progress=False)
    L = model.cfg.n_layers
    assert terms.shape == (L, graph.n_edges)
    for layer in range(L):
        ref = reference_scores(model, graph, task, extra_hooks=stop_layer_hooks(layer))
        ref = ref[graph.edge_sender, graph.edge_receiver]
        torch.testing.assert_close(terms[layer], ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    # negative control: dropping an upper layer changes the estimates of the layers below it
    assert (terms[L - 1] - eap).abs().max() > 1e-3 * eap.abs().max()


def documented_graddrop(terms, graph):
    """sign(first largest term) * mean over l != the receiver's layer of |c_l|, in a plain loop."""
    L = terms.shape[0]
    want = torch.empty(graph.n_edges, dtype=torch.float64)
    for e, r in enumerate(graph.edge_receiver.tolist()):
        name = graph.receivers[r]  # 'logits', 'm2', 'a1.h0<q>'
        own = L if name == "logits" else int(name[1:].split(".")[0].split("<")[0])
        vals = [float(terms[l, e]) for l in range(L) if l != own]
        big = max(vals, key=abs)
        want[e] = (1 if big > 0 else -1 if big < 0 else 0) * sum(abs(v) for v in vals) / len(vals)
    return want


def test_graddrop_score_is_the_documented_signed_mean(setup):
    _, model, graph, task = setup
    got = attribute(model, graph, task, "atp-graddrop", progress=False)
    want = documented_graddrop(layer_dropped(model, graph, task), graph)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    eap = attribute(model, graph, task, "eap", progress=False)
    assert (got - eap).abs().max() > 1e-4 * eap.abs().max()
    logits = torch.tensor([k == "logits" for k in graph.edge_kind])  # nothing to drop after the logits
    torch.testing.assert_close(got[logits], eap[logits], rtol=1e-12, atol=0)


def test_atp_star_terms_are_qk_fixed_with_the_dropped_gradient(setup):
    """atp*'s term for a dropped layer: on q/k edges the exact-pattern-then-linear estimate with
    the gradient of the run whose layer l is stopped; elsewhere GradDrop's term."""
    _, model, graph, task = setup
    L = model.cfg.n_layers
    star = layer_dropped(model, graph, task, qk_fix=True)
    plain = layer_dropped(model, graph, task)
    qk = torch.tensor([k in ("q", "k") for k in graph.edge_kind])
    torch.testing.assert_close(star[:, ~qk], plain[:, ~qk], rtol=1e-12, atol=0)
    layer = L - 1
    ref = qk_reference(model, graph, task, extra_hooks=stop_layer_hooks(layer))
    idx = torch.tensor(sorted(ref))
    want = torch.tensor([ref[i] for i in idx.tolist()], dtype=torch.float64)
    torch.testing.assert_close(star[layer, idx], want, rtol=0, atol=1e-9 * float(want.abs().max()))
    # atp* is GradDrop's combination of these terms
    got = attribute(model, graph, task, "atp*", progress=False)
    torch.testing.assert_close(got, documented_graddrop(star, graph), rtol=1e-12, atol=1e-15)


def test_batches_and_sender_chunks_do_not_change_scores(tiny3_model):
    model = tiny3_model
    graph = Graph.from_model(model)
    task = random_task(model, n=5, seq=6, seed=3)
    whole = attribute(model, graph, task, "atp*", progress=False)
    split = attribute(model, graph, task, "atp*", batch_size=2, progress=False)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-14)
    # a budget that leaves room for one sender at a time
    plan = plan_atp(model, graph.n_senders, 5, 6, False, qk_fix=True, grad_drop=True, budget=2**20, prompts_per_batch=5)
    assert plan.senders_per_chunk < graph.n_upstream.max()
    chunked = attribute(model, graph, task, "atp*", batch_size=5, memory_budget=2**20, progress=False)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-14)


def test_qk_fix_is_closer_to_exact_patching_on_a_saturated_head(tiny3_model):
    """Negative control where EAP is known to fail: a head whose attention is saturated (large
    query and key weights). On its q/k edges EAP misses most of the exact effect; QK-fix does not."""
    model = random_model(dict(n_layer=3, n_embd=24, n_head=3, n_positions=32, vocab_size=64), seed=1, **F64)
    graph = Graph.from_model(model)
    task = random_task(model, n=6, seq=7, seed=3)
    gen = torch.Generator().manual_seed(0)
    attn = model.blocks[1].attn
    with torch.no_grad():  # W_Q / W_K are views of the model's weights
        attn.W_Q[0].copy_(torch.randn(attn.W_Q[0].shape, generator=gen, dtype=torch.float64))
        attn.W_K[0].copy_(torch.randn(attn.W_K[0].shape, generator=gen, dtype=torch.float64))
    pats, _ = pattern_grads(model, task)
    assert pats[1][:, 0, 2:].max(-1).values.median() > 0.99  # saturated: one key takes > 99% of a row
    sel = [i for i, n in enumerate(graph.edge_names) if n.endswith(("a1.h0<q>", "a1.h0<k>"))]
    exact = validation.patch_edges(model, graph, task, sel, progress=False)[sel]
    eap = attribute(model, graph, task, "eap", progress=False)[sel]
    qk = attribute(model, graph, task, "atp-qk", progress=False)[sel]
    err_eap, err_qk = (eap - exact).abs().sum(), (qk - exact).abs().sum()
    assert err_eap > 0.5 * exact.abs().sum()  # EAP fails here (measured: 72% of the exact |effect|)
    assert err_qk < 0.1 * err_eap  # measured: 2.3% of the exact |effect|, 32x smaller than EAP's error


def test_atp_refuses_node_level_and_names_methods(setup):
    _, model, graph, task = setup
    with pytest.raises(AttributionError, match="scores edges only"):
        attribute(model, graph, task, "atp*", level="node")
    with pytest.raises(AttributionError, match="atp-qk"):
        attribute(model, graph, task, "atp")


@pytest.mark.parametrize("method", ["atp-qk", "atp-graddrop", "atp*"])
def test_peak_memory_within_the_plan_and_the_budget(method):
    """Live tensor peak (tests/memtools.py) <= the budget when the budget holds about 4 of 12
    prompts, and <= the plan's estimate with all 12 in one batch; negative control: those 12 in
    one batch exceed the smaller budget."""
    import eap

    model = eap.load_model("toy-gpt2-2l", device="cpu")
    graph = Graph.from_model(model)
    task = eap.tasks.ioi(model, 12, seed=0)
    atp = AtP(model, graph, atp_options(method), torch.zeros(graph.n_senders, graph.n_receivers))
    whole_plan = atp.plan(task, 12, "1TiB")
    budget = whole_plan.peak_bytes // 3
    assert atp.plan(task, None, budget).prompts_per_batch in (3, 4)
    live_peak_bytes(lambda: attribute(model, graph, task, "eap", progress=False))  # profiler warm-up
    _, peak = live_peak_bytes(lambda: attribute(model, graph, task, method, memory_budget=budget, progress=False,
                                                write_graph=False))
    assert peak <= budget, (peak, budget)
    _, whole = live_peak_bytes(lambda: attribute(model, graph, task, method, batch_size=12, progress=False,
                                                 write_graph=False))
    assert budget < whole <= whole_plan.peak_bytes, (whole, whole_plan.peak_bytes)
