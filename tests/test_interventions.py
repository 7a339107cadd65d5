"""Interventions (zero, mean, mean-positional) and MIB's two extra baselines against naive
computations written here from the definitions (float64, tiny models).

The naive references use only TransformerLens hooks on the bridge: replacement outputs from
``run_with_cache`` over the reference prompts, patched runs that add ``rep_u - clean_u`` at one
receiver's hook, a run with every sender's output replaced, per-edge gradients from retained
receiver activations. Nothing from ``eap.interventions`` is used to build them.
"""

from __future__ import annotations

import pytest
import torch

from eap import Graph, attribute, load_model, random_model
from eap.attribute import AttributionError
from eap.interventions import InterventionError
from eap.task import Task
from eap.tasks import ioi
from validation import evaluate_circuit, patch_edges, patch_nodes

from conftest import random_task

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)
FAMILIES = ["gpt2-tiny", "pythia-tiny", "llama-tiny", "qwen-tiny"]  # the fast path's families (tests/test_fast.py)
REPLACING = ["zero", "mean", "mean-positional"]
#: fast path vs bridge: Llama-like models run softmax in float32 inside HF (see test_fast.py)
TOL = {"gpt2-tiny": 1e-9, "pythia-tiny": 1e-9, "llama-tiny": 1e-6, "qwen-tiny": 1e-6}


def with_reference(task: Task, reference: torch.Tensor) -> Task:
    return Task(task.clean, task.corrupted, task.metric_fn, per_prompt=task.per_prompt, name=task.name,
                reference=reference)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model = random_model(request.param, seed=5, **F64)
    graph = Graph.from_model(model)
    base = random_task(model, n=4, seq=6, seed=2)
    g = torch.Generator().manual_seed(7)
    reference = torch.randint(3, model.cfg.d_vocab, (5, 6), generator=g)  # 5 prompts, another set
    return request.param, model, graph, with_reference(base, reference)


# ------------------------------------------------------------------------------ naive pieces
def sender_slot(graph, s):
    """(hook, head index or None) of sender ``s``."""
    for g in graph.sender_groups:
        if g.start <= s < g.start + g.size:
            return g.hook, (s - g.start) if g.n_heads else None
    raise AssertionError(s)


def receiver_slot(graph, r):
    g = graph.receiver_group_of(r)
    return g.hook, (r - g.start) if g.n_heads else None


def pick(act, head):
    return act if head is None else act[:, :, head]


def naive_replacement(model, graph, tokens, intervention, s, p):
    """Sender ``s``'s replacement output [p, d] (broadcast over prompts) from a plain cache."""
    hook, head = sender_slot(graph, s)
    if intervention == "zero":
        return torch.zeros(p, model.cfg.d_model, dtype=torch.float64)
    _, cache = model.run_with_cache(tokens)
    act = pick(cache[hook], head)  # [m, p_ref, d]
    if intervention == "mean":
        return act.mean((0, 1)).expand(p, -1)
    return act.mean(0)[:p]


def naive_edge_effect(model, graph, task, e, rep):
    """mean over prompts of metric(receiver input + rep_u - clean_u) - metric(clean)."""
    s, r = int(graph.edge_sender[e]), int(graph.edge_receiver[e])
    s_hook, s_head = sender_slot(graph, s)
    r_hook, r_head = receiver_slot(graph, r)
    with torch.no_grad():
        logits, cache = model.run_with_cache(task.clean)
        diff = rep - pick(cache[s_hook], s_head)

        def add(x, hook=None):
            x = x.clone()
            if r_head is None:
                x += diff
            else:
                x[:, :, r_head] += diff
            return x

        patched = model.run_with_hooks(task.clean, fwd_hooks=[(r_hook, add)])
    return float((task.metric(patched) - task.metric(logits)).mean())


def some_edges(graph, k=10):
    """Edges from every kind of sender into every kind of receiver, deterministic."""
    idx = torch.linspace(0, graph.n_edges - 1, k).round().long()
    return sorted(set(idx.tolist()) | {0, graph.n_edges - 1})


# ------------------------------------------------------------------------------ exact patching
@pytest.mark.parametrize("intervention", REPLACING)
def test_exact_patching_equals_naive_hooked(setup, intervention):
    shape, model, graph, task = setup
    edges = some_edges(graph)
    got = patch_edges(model, graph, task, edges, intervention=intervention, progress=False)
    p = task.seq_len
    for e in edges:
        rep = naive_replacement(model, graph, task.reference, intervention, int(graph.edge_sender[e]), p)
        want = naive_edge_effect(model, graph, task, e, rep)
        assert abs(float(got[e]) - want) <= TOL[shape] * (1 + abs(want)), (shape, intervention, graph.edge_names[e])
    # the intervention matters: patching gives other numbers
    patching = patch_edges(model, graph, task, edges, progress=False)
    assert (patching[edges] - got[edges]).abs().max() > 1e-6


def test_mean_over_the_wrong_set_fails_the_mean_test(setup):
    """Negative control: means over the clean prompts instead of the reference set disagree."""
    shape, model, graph, task = setup
    edges = some_edges(graph, 6)
    got = patch_edges(model, graph, task, edges, intervention="mean", progress=False)
    worst = 0.0
    for e in edges:
        rep = naive_replacement(model, graph, task.clean, "mean", int(graph.edge_sender[e]), task.seq_len)
        worst = max(worst, abs(float(got[e]) - naive_edge_effect(model, graph, task, e, rep)))
    assert worst > 1e3 * TOL[shape]


@pytest.mark.parametrize("intervention", ["patching"] + REPLACING)
def test_epsilon_limit_of_exact_patching_is_eap(setup, intervention):
    """Central differences (eps = 0.01: float32 softmax inside HF's Llama limits smaller eps)."""
    shape, model, graph, task = setup
    eps = 1e-2

    def central(fn, **kw):
        return (fn(model, graph, task, intervention=intervention, scale=eps, progress=False, **kw)
                - fn(model, graph, task, intervention=intervention, scale=-eps, progress=False, **kw)) / (2 * eps)

    exact = central(patch_edges)
    for engine in ("fast", "bridge"):
        eap = attribute(model, graph, task, intervention=intervention, engine=engine, progress=False)
        scale = float(eap.abs().max())
        assert scale > 1e-6
        torch.testing.assert_close(exact.to(eap.dtype), eap, rtol=0, atol=1e-3 * scale,
                                   msg=f"{shape} {intervention} {engine}")
    nodes = central(patch_nodes)
    node_eap = attribute(model, graph, task, intervention=intervention, level="node", progress=False)
    torch.testing.assert_close(nodes.to(node_eap.dtype), node_eap, rtol=0, atol=1e-3 * float(node_eap.abs().max()))


@pytest.mark.parametrize("intervention", REPLACING)
def test_empty_circuit_is_every_sender_replaced(setup, intervention):
    shape, model, graph, task = setup
    p = task.seq_len
    hooks = {}
    for s in range(graph.n_senders):
        hook, head = sender_slot(graph, s)
        hooks.setdefault(hook, []).append((head, naive_replacement(model, graph, task.reference, intervention, s, p)))

    def replace(items):
        def hook_fn(x, hook=None):
            x = x.clone()
            for head, rep in items:
                if head is None:
                    x[:] = rep
                else:
                    x[:, :, head] = rep
            return x

        return hook_fn

    with torch.no_grad():
        logits = model.run_with_hooks(task.clean, fwd_hooks=[(h, replace(v)) for h, v in hooks.items()])
    want = task.metric(logits)
    empty = torch.zeros(graph.n_edges, dtype=torch.bool)
    got = evaluate_circuit(model, graph, task, empty, intervention=intervention)
    torch.testing.assert_close(got.per_prompt, want, rtol=0, atol=TOL[shape] * (1 + float(want.abs().max())))
    torch.testing.assert_close(got.corrupted, want, rtol=0, atol=TOL[shape] * (1 + float(want.abs().max())))
    # the edge missing from the full circuit is that edge's exact value
    e = graph.n_edges // 2
    one = torch.ones(graph.n_edges, dtype=torch.bool)
    one[e] = False
    minus_one = evaluate_circuit(model, graph, task, one, intervention=intervention)
    exact = patch_edges(model, graph, task, [e], intervention=intervention, progress=False)[e]
    assert abs(float(minus_one.per_prompt.mean() - minus_one.clean.mean()) - float(exact)) < 1e-8 + TOL[shape]


# ------------------------------------------------------------------------------ EAP-IG activations
@pytest.mark.parametrize("intervention", ["patching", "mean"])
def test_ig_activations_with_one_step_is_eap(setup, intervention):
    shape, model, graph, task = setup
    eap = attribute(model, graph, task, intervention=intervention, engine="bridge", progress=False)
    ig = attribute(model, graph, task, "eap-ig-activations", ig_steps=1, intervention=intervention, progress=False)
    torch.testing.assert_close(ig, eap, rtol=0, atol=1e-10 * float(eap.abs().max()))
    more = attribute(model, graph, task, "eap-ig-activations", ig_steps=3, intervention=intervention, progress=False)
    assert (more - eap).abs().max() > 1e-6 * eap.abs().max()  # more steps do move the scores


def test_refusals(setup):
    _, model, graph, task = setup
    for method in ("eap-ig", "clean-corrupted", "atp*"):
        with pytest.raises(AttributionError, match="corrupted prompts"):
            attribute(model, graph, task, method, intervention="mean", progress=False)
    with pytest.raises(InterventionError, match="unknown intervention"):
        attribute(model, graph, task, intervention="resample", progress=False)
    bare = Task(task.clean, task.corrupted, task.metric_fn, per_prompt=task.per_prompt)
    with pytest.raises(InterventionError, match="reference"):
        patch_edges(model, graph, bare, [0], intervention="mean", progress=False)
    short = with_reference(task, task.clean[:, :3])
    with pytest.raises(InterventionError, match="positions"):
        attribute(model, graph, short, intervention="mean-positional", progress=False)
    with pytest.raises(AttributionError, match="edges only"):
        attribute(model, graph, task, "information-flow-routes", level="node", progress=False)


# ------------------------------------------------------------------------------ embedded models
@pytest.fixture(scope="module")
def toy():
    model = load_model("toy-gpt2-2l", device="cpu", dtype=torch.float64)
    return model, Graph.from_model(model), ioi(model, 6, seed=3)


def naive_ig_activations(model, graph, task, intervention, steps, replace=False):
    """Per edge: (rep_u - clean_u) . d metric / d in_v, averaged over the G*steps runs in which
    one sender group is shifted toward its replacement (retained receiver activations). With
    ``replace`` (hannamw/EAP-IG's definition): the group's output is instead replaced by the
    constant ``a clean + (1 - a) rep`` from the cached runs, so no gradient passes through it."""
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean)
        if intervention == "patching":
            _, corr = model.run_with_cache(task.corrupted)
            rep = {g.hook: corr[g.hook] for g in graph.sender_groups}
        else:
            _, ref = model.run_with_cache(task.reference)
            rep = {g.hook: ref[g.hook].mean((0, 1)).expand_as(clean[g.hook]) for g in graph.sender_groups}
    diff = {h: rep[h] - clean[h] for h in rep}
    total = torch.zeros(graph.n_edges, dtype=torch.float64)
    for group in graph.sender_groups:
        for k in range(1, steps + 1):
            a = k / steps
            kept = {}

            def keep(name):
                def hook_fn(x, hook=None):
                    y = x.clone()  # the bridge passes resid_mid itself through hook_mlp_in: only
                    y.retain_grad()  # the hook's consumer (the MLP) may see this copy's gradient
                    kept[name] = y
                    return y

                return hook_fn

            def lead(x, hook=None):
                if replace and group.hook == "blocks.0.hook_resid_pre":
                    h = group.hook
                    return (a * clean[h] + (1 - a) * rep[h]).requires_grad_(True)
                x = x.detach().requires_grad_(True)
                return x + (1 - a) * diff[group.hook] if group.hook == "blocks.0.hook_resid_pre" else x

            def shift(x, hook=None):
                if replace:
                    return a * clean[group.hook] + (1 - a) * rep[group.hook]  # cached: a constant
                return x + (1 - a) * diff[group.hook]

            fwd = [("blocks.0.hook_resid_pre", lead)]
            if group.hook != "blocks.0.hook_resid_pre":
                fwd.append((group.hook, shift))
            fwd += [(g.hook, keep(g.hook)) for g in graph.receiver_groups]
            task.metric(model.run_with_hooks(task.clean, fwd_hooks=fwd)).sum().backward()
            for e in range(graph.n_edges):
                s_hook, s_head = sender_slot(graph, int(graph.edge_sender[e]))
                r_hook, r_head = receiver_slot(graph, int(graph.edge_receiver[e]))
                if replace and kept[r_hook].grad is None:  # replace: the receivers of the moved group get no gradient
                    continue
                total[e] += (pick(diff[s_hook], s_head) * pick(kept[r_hook].grad, r_head)).sum()
    return total / (len(graph.sender_groups) * steps * task.n_prompts)


@pytest.mark.parametrize("intervention", ["patching", "mean"])
def test_ig_activations_equals_direct_per_edge(toy, intervention):
    model, graph, task = toy
    got = attribute(model, graph, task, "eap-ig-activations", ig_steps=2, intervention=intervention, progress=False)
    want = naive_ig_activations(model, graph, task, intervention, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))


def test_ig_activations_eap_ig_variant_equals_its_definition(toy):
    """gradient_through_group=False: hannamw/EAP-IG's replacement (gradient cut at the group);
    at ig_steps=1 it is not EAP (a cut group's receivers, and those upstream of it, lose gradient)."""
    model, graph, task = toy
    got = attribute(model, graph, task, "eap-ig-activations", ig_steps=2, gradient_through_group=False,
                    progress=False)
    want = naive_ig_activations(model, graph, task, "patching", 2, replace=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * float(want.abs().max()))
    shifted = attribute(model, graph, task, "eap-ig-activations", ig_steps=2, progress=False)
    assert (got - shifted).abs().max() > 1e-3 * want.abs().max()  # the two variants do differ
    eap = attribute(model, graph, task, engine="bridge", progress=False)
    one = attribute(model, graph, task, "eap-ig-activations", ig_steps=1, gradient_through_group=False,
                    progress=False)
    assert (one - eap).abs().max() > 1e-3 * eap.abs().max()  # negative control: not EAP at ig_steps=1
    to_logits = torch.tensor([n.endswith("->logits") for n in graph.edge_names])  # the cut never reaches them
    assert 0 < int(to_logits.sum()) < graph.n_edges
    torch.testing.assert_close(one[to_logits], eap[to_logits], rtol=0, atol=1e-9 * float(eap.abs().max()))
    with pytest.raises(AttributionError, match="gradient_through_group=False.*'patching' only.*'mean'"):
        attribute(model, graph, task, "eap-ig-activations", gradient_through_group=False, intervention="mean",
                  progress=False)


def test_information_flow_routes_equals_direct_per_edge(toy):
    model, graph, task = toy
    got = attribute(model, graph, task, "information-flow-routes", progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(task.clean)
    want = torch.zeros(graph.n_edges, dtype=torch.float64)
    for r in range(graph.n_receivers):
        r_hook, r_head = receiver_slot(graph, r)
        x = pick(cache[r_hook], r_head)  # [n, p, d]
        up = [e for e in range(graph.n_edges) if int(graph.edge_receiver[e]) == r]
        prox = {}
        for e in up:
            s_hook, s_head = sender_slot(graph, int(graph.edge_sender[e]))
            o = pick(cache[s_hook], s_head)
            prox[e] = (x.abs().sum(-1) - (x - o).abs().sum(-1)).clamp_min(0)
        norm = sum(prox.values())
        for e in up:
            want[e] = (prox[e] / norm).mean(1).mean(0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # shares: each receiver's incoming scores sum to one
    sums = torch.zeros(graph.n_receivers, dtype=torch.float64).index_add_(0, graph.edge_receiver, got)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_mean_and_mean_positional_differ_on_positional_task(toy):
    """IOI's positions carry structure (names, the end): a per-position mean is another
    replacement than one mean vector, and the scores show it."""
    model, graph, task = toy
    mean = attribute(model, graph, task, intervention="mean", progress=False)
    positional = attribute(model, graph, task, intervention="mean-positional", progress=False)
    assert (mean - positional).abs().max() > 0.05 * mean.abs().max()


# ------------------------------------------------------------------------------ bench axis
def test_bench_intervention_axis(tmp_path):
    """``bench run --interventions``: one exact truth per intervention (the same numbers as
    patch_edges with it), methods needing corrupted prompts only under patching, the
    intervention in every cell and table, gate rules per intervention."""
    from bench import gate as gate_mod
    from bench.matrix import Config, run
    from bench.report import markdown
    from bench.worker import groups_of

    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[4], groups=2, repeats=0, bootstrap=10,
                 methods=["eap", "eap-ig", "information-flow-routes"], interventions=["patching", "zero"],
                 isolate="none", figures=False, faithfulness=False, progress=False, threads=1)
    res = run(cfg, tmp_path / "run")
    got = {(c["method"], c["intervention"]) for c in res["cells"]}
    assert got == {("eap", "patching"), ("eap-ig", "patching"), ("information-flow-routes", "patching"),
                   ("eap", "zero"), ("information-flow-routes", "zero")}
    zero = next(c for c in res["cells"] if c["intervention"] == "zero" and c["method"] == "eap")
    patching = next(c for c in res["cells"] if c["intervention"] == "patching" and c["method"] == "eap")
    assert zero["exact"]["cache"] != patching["exact"]["cache"]
    model = load_model("toy-gpt2-2l")
    graph = Graph.from_model(model)
    task = ioi(model, 4, seed=0)
    want = torch.stack([patch_edges(model, graph, task.subset(idx), intervention="zero", progress=False)
                        for idx in groups_of(4, 2)]).float()
    torch.testing.assert_close(torch.load(f"{zero['exact']['cache']}/exact.pt"), want)
    assert "| zero |" in markdown(res) and "## Which method, per intervention" in markdown(res)
    rows = gate_mod.check(res["cells"], [{"intervention": "zero", "min": {"spearman": 2.0}}])
    assert len(rows) == 2 and not any(r["ok"] for r in rows)  # only the zero cells are gated
    thresholds = gate_mod.make_thresholds(res, stats=["spearman"], floor={"spearman": -1.0}, band={"spearman": 0.05})
    assert {r["intervention"] for r in thresholds["rules"]} == {"patching", "zero"}
    assert all(r["ok"] for r in gate_mod.check(res["cells"], thresholds["rules"]))
