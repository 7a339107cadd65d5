"""eap.attribute against independent computations on tiny float64 models.

The reference for an edge u -> v is the directional derivative
    d/d alpha  mean_prompts metric(clean run with in_v += alpha * (corrupted_u - clean_u))  at alpha = 0,
computed here with autograd through the model's ordinary hooks, one receiver at a time, without
any code from eap.attribute.
"""

from __future__ import annotations

import pytest
import torch

import eap
from eap import Graph, attribute
from eap.attribute import AttributionError
from eap.hooks import HookError
from eap.task import Task, TaskError

from conftest import random_task


def sender_outputs(model, graph, tokens):
    """[n_senders, b, p, d] sender outputs of one forward, read with plain hooks."""
    acts = {}

    def keep(name):
        def hook(x, hook):
            acts[name] = x.detach().clone()

        return hook

    with model.hooks(fwd_hooks=[(g.hook, keep(g.hook)) for g in graph.sender_groups]):
        model(tokens)
    parts = []
    for g in graph.sender_groups:
        a = acts[g.hook]
        parts += [a[:, :, h] for h in range(g.n_heads)] if g.n_heads else [a]
    return torch.stack(parts)


def reference_scores(model, graph, task, at_tokens=None, input_shift=None, extra_hooks=()):
    """Independent per-edge directional derivatives, [n_senders, n_receivers], taken at the run
    on ``at_tokens`` (default clean) with ``input_shift`` added to the input residual and any
    ``extra_hooks`` (e.g. ones that stop a layer's gradient) attached."""
    delta = sender_outputs(model, graph, task.corrupted) - sender_outputs(model, graph, task.clean)
    tokens = task.clean if at_tokens is None else at_tokens
    hooks = [] if input_shift is None else [("blocks.0.hook_resid_pre", lambda x, hook: x + input_shift)]
    hooks += list(extra_hooks)
    ref = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for g in graph.receiver_groups:
        for head in range(g.size):
            r = g.start + head
            n_up = int(graph.n_upstream[r])
            alpha = torch.zeros(n_up, dtype=torch.float64, requires_grad=True)

            def add(x, hook, head=head, n_up=n_up, alpha=alpha):
                push = torch.einsum("s,sbpd->bpd", alpha, delta[:n_up])
                x = x.clone()
                if g.n_heads:
                    x[:, :, head] = x[:, :, head] + push
                else:
                    x = x + push
                return x

            with model.hooks(fwd_hooks=hooks + [(g.hook, add)]):
                value = task.metric(model(tokens)).mean()
            if value.requires_grad:  # (an extra hook may cut the receiver off the metric)
                ref[:n_up, r] = torch.autograd.grad(value, alpha)[0]
    return ref


@pytest.fixture(scope="module")
def setup(tiny3_model):
    model = tiny3_model
    graph = Graph.from_model(model)
    task = random_task(model, n=5, seq=6, seed=3)
    return model, graph, task


def test_eap_equals_directional_derivative(setup):
    model, graph, task = setup
    ref = reference_scores(model, graph, task)[graph.edge_sender, graph.edge_receiver]
    got = attribute(model, graph, task, "eap", progress=False)
    assert got.shape == (graph.n_edges,)
    assert got.dtype == torch.float64
    scale = ref.abs().max()
    assert scale > 1e-3  # the test means something
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * scale)


def test_batches_do_not_change_scores(setup):
    model, graph, task = setup
    whole = attribute(model, graph, task, "eap", progress=False)
    split = attribute(model, graph, task, "eap", batch_size=2, progress=False)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_scores_written_into_graph(setup):
    model, graph, task = setup
    g = Graph.from_model(model)
    got = attribute(model, g, task, progress=False)
    torch.testing.assert_close(g.edge_scores(), got)
    assert g.scores[~g.mask].abs().sum() == 0


def test_readout_path_equals_full_logits(setup):
    """IOI-style readout (two logits at one position) gives the same scores as full logits."""
    model, graph, _ = setup
    base = random_task(model, n=4, seq=6, seed=5)
    end = base.per_prompt["end"]
    toks = base.per_prompt["toks"]

    def ld(logits, readout_pos, readout_tokens, **_):
        sel = logits[torch.arange(logits.shape[0]), readout_pos]
        return sel.gather(1, readout_tokens[:, :1]).squeeze(1) - sel.gather(1, readout_tokens[:, 1:]).squeeze(1)

    def ld_readout(sel, **_):
        return sel[:, 0] - sel[:, 1]

    pp = {"readout_pos": end, "readout_tokens": toks}
    full = Task(base.clean, base.corrupted, ld, per_prompt=pp)
    fast = Task(base.clean, base.corrupted, ld, per_prompt=pp, readout=ld_readout)
    a = attribute(model, graph, full, progress=False)
    b = attribute(model, graph, fast, progress=False)
    assert a.abs().max() > 1e-4
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_eap_ig_one_step_is_eap(setup):
    model, graph, task = setup
    torch.testing.assert_close(
        attribute(model, graph, task, "eap-ig", ig_steps=1, progress=False),
        attribute(model, graph, task, "eap", progress=False),
        rtol=1e-12,
        atol=1e-14,
    )


def test_eap_ig_converges_and_matches_riemann_reference(setup):
    model, graph, task = setup
    s16 = attribute(model, graph, task, "eap-ig", ig_steps=16, progress=False)
    s32 = attribute(model, graph, task, "eap-ig", ig_steps=32, progress=False)
    assert (s32 - s16).abs().max() < 0.05 * s32.abs().max()
    # independent: the mean of reference gradients at the interpolated inputs (m = 3)
    delta_in = sender_outputs(model, graph, task.corrupted)[0] - sender_outputs(model, graph, task.clean)[0]
    ref = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for k in (1, 2, 3):
        ref += reference_scores(model, graph, task, input_shift=(1 - k / 3) * delta_in) / 3
    got = attribute(model, graph, task, "eap-ig", ig_steps=3, progress=False)
    ref = ref[graph.edge_sender, graph.edge_receiver]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * ref.abs().max())


def test_clean_corrupted_is_average_of_two_gradients(setup):
    model, graph, task = setup
    at_clean = reference_scores(model, graph, task)
    at_corr = reference_scores(model, graph, task, at_tokens=task.corrupted)
    ref = ((at_clean + at_corr) / 2)[graph.edge_sender, graph.edge_receiver]
    got = attribute(model, graph, task, "clean-corrupted", progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * ref.abs().max())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_node_scores_sum_edges_and_match_sender_gradient(setup):
    model, graph, task = setup
    edges = attribute(model, graph, task, progress=False)
    nodes = attribute(model, graph, task, level="node", progress=False)
    row_sums = torch.zeros(graph.n_senders, dtype=torch.float64).index_add_(0, graph.edge_sender, edges)
    torch.testing.assert_close(nodes, row_sums, rtol=1e-10, atol=1e-12)
    # independent: gradient at each sender's own output (hooks at the sender), dotted with delta
    delta = sender_outputs(model, graph, task.corrupted) - sender_outputs(model, graph, task.clean)
    grads = {}

    def leaf(x, hook):
        return x.detach().requires_grad_(True)

    def keep(name):
        def hook(g, hook):
            grads[name] = g.detach().clone()

        return hook

    bwd = [(g.hook, keep(g.hook)) for g in graph.sender_groups]
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", leaf)], bwd_hooks=bwd):
        task.metric(model(task.clean)).mean().backward()
    ref = []
    for g in graph.sender_groups:
        gr = grads[g.hook]
        ref += [gr[:, :, h] for h in range(g.n_heads)] if g.n_heads else [gr]
    ref = (torch.stack(ref) * delta).sum(dim=(1, 2, 3))
    torch.testing.assert_close(nodes, ref, rtol=1e-6, atol=1e-9 * ref.abs().max())


def test_seed_parity_head_to_head(tiny3_model):
    """The seed notebook's loop, literally: for head->head q/k/v edges it sums
    grad(in_v) * (clean_u - corrupted_u) with the gradient of the NEGATIVE normalised metric.
    That is (corrupted - clean) . grad(+metric): our sign. Units: the seed's normalised IOI metric."""
    model = tiny3_model
    graph = Graph.from_model(model)
    base = random_task(model, n=4, seq=6, seed=7)
    from conftest import _lp_diff

    with torch.no_grad():
        m_clean = base.metric(model(base.clean)).mean()
        m_corr = base.metric(model(base.corrupted)).mean()

    def normalised(logits, **pp):
        return (_lp_diff(logits, **pp) - m_corr) / (m_clean - m_corr)

    task = Task(base.clean, base.corrupted, normalised, per_prompt=base.per_prompt)
    ours = attribute(model, graph, task, progress=False)

    # --- the seed's get_3_caches + loop, transcribed for the bridge ---
    clean_cache, grad_cache, corr_cache = {}, {}, {}
    fwd_names = [f"blocks.{l}.attn.hook_result" for l in range(model.cfg.n_layers)]
    bwd_names = [f"blocks.{l}.hook_{x}_input" for l in range(model.cfg.n_layers) for x in "qkv"]

    def store(cache, name):
        def hook(act, hook):
            cache[name] = act.detach()

        return hook

    def leaf(x, hook):
        return x.detach().requires_grad_(True)

    with model.hooks(
        fwd_hooks=[("blocks.0.hook_resid_pre", leaf)] + [(n, store(clean_cache, n)) for n in fwd_names],
        bwd_hooks=[(n, store(grad_cache, n)) for n in bwd_names],
    ):
        value = -task.metric(model(task.clean)).mean()  # negative_ioi_metric
        value.backward()
    with model.hooks(fwd_hooks=[(n, store(corr_cache, n)) for n in fwd_names]):
        model(task.corrupted)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    results = {}
    for ul in range(L):
        for uh in range(H):
            for letter in "qkv":
                for dl in range(ul + 1, L):
                    for dh in range(H):
                        g = grad_cache[f"blocks.{dl}.hook_{letter}_input"][:, :, dh]
                        diff = clean_cache[f"blocks.{ul}.attn.hook_result"][:, :, uh] - corr_cache[
                            f"blocks.{ul}.attn.hook_result"
                        ][:, :, uh]
                        results[(ul, uh, letter, dl, dh)] = (g * diff).sum()
    names = graph.edge_names
    idx = {n: i for i, n in enumerate(names)}
    seed_vals = torch.stack(list(results.values()))
    our_vals = torch.stack([ours[idx[f"a{ul}.h{uh}->a{dl}.h{dh}<{x}>"]] for (ul, uh, x, dl, dh) in results])
    assert seed_vals.abs().max() > 1e-4
    torch.testing.assert_close(our_vals, seed_vals, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------- bad input
def test_unknown_method(setup):
    model, graph, task = setup
    with pytest.raises(AttributionError, match="unknown attribution method"):
        attribute(model, graph, task, "magic")


def test_graph_for_another_model(setup):
    model, _, task = setup
    other = Graph.from_cfg(dict(n_layers=5, n_heads=7))
    with pytest.raises(eap.GraphError, match="graph was built for"):
        attribute(model, other, task)


def test_nan_metric(setup):
    model, graph, task = setup

    def bad(logits, **_):
        return logits[:, -1, 0] * float("nan")

    with pytest.raises(TaskError, match="NaN"):
        attribute(model, graph, Task(task.clean, task.corrupted, bad), progress=False)


def test_wrong_metric_shape(setup):
    model, graph, task = setup

    def scalar(logits, **_):
        return logits[:, -1, 0].mean()

    with pytest.raises(TaskError, match="one value per prompt"):
        attribute(model, graph, Task(task.clean, task.corrupted, scalar), progress=False)


def test_shape_mismatch():
    with pytest.raises(TaskError, match="same shape"):
        Task(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long), lambda l: l[:, 0, 0])


def test_model_without_edge_hooks(setup):
    model, graph, task = setup
    model.set_use_split_qkv_input(False)
    try:
        with pytest.raises(HookError, match="use_split_qkv_input"):
            attribute(model, graph, task)
    finally:
        model.set_use_split_qkv_input(True)


def test_not_a_hooked_model(setup):
    _, graph, task = setup
    with pytest.raises(HookError, match="not a TransformerLens model"):
        attribute(torch.nn.Linear(2, 2), graph, task)
