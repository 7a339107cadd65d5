"""Circuit evaluation (validation.evaluate_circuit) against an independent, naive hooked
implementation of MIB/EAP-IG's ``evaluate_graph``, and its anchors: the empty circuit is the
corrupted run, the full circuit the clean run, a circuit missing one edge is that edge's
``patch_edges`` value. Tiny float64 models of a sequential (GPT-2), a parallel (GPT-NeoX) and a
grouped-query (Llama, ungrouped) family."""

from __future__ import annotations

import pytest
import torch

import validation
from eap import Graph, random_model
from eap.graph import GraphError
from eap.hooks import as_nodes
from eap.task import Task, TaskError
from validation import CircuitError

from conftest import closure_task, random_task
from test_validation import readout_task

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)
TOL = 1e-9


@pytest.fixture(scope="module", params=["gpt2-tiny", "pythia-tiny", "llama-tiny"])
def family(request):
    model = random_model(request.param, seed=3, **F64)
    return request.param, model, Graph.from_model(model)


# ------------------------------------------------------------------------ naive reference
def naive_circuit(model, graph, task, keep):
    """Per-prompt metric of ONE circuit (bool mask over edges), one forward through the bridge's
    hooks, written from EAP-IG's description: every receiver's input += sum over its senders
    outside the circuit of (corrupted output - current output), current outputs recorded by
    hooks as the run goes, corrupted outputs from a separate corrupted forward. Plain loops."""
    def outputs(store):
        def save(g):
            def hook(x, hook=None):
                nodes = as_nodes(x.detach(), g)
                for i in range(g.size):
                    store[g.start + i] = nodes[i].clone()
                return x
            return hook
        return [(g.hook, save(g)) for g in graph.sender_groups]

    corr: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(task.corrupted, fwd_hooks=outputs(corr))
    kept = {(int(graph.edge_sender[e]), int(graph.edge_receiver[e])) for e in keep.nonzero().flatten().tolist()}
    cur: dict[int, torch.Tensor] = {}

    def fix(g):
        def hook(x, hook=None):
            x = x.clone()
            for i in range(g.size):
                r = g.start + i
                for u in range(g.n_upstream):
                    if (u, r) not in kept:
                        if g.n_heads:
                            x[:, :, i] += corr[u] - cur[u]
                        else:
                            x += corr[u] - cur[u]
            return x
        return hook

    hooks = outputs(cur) + [(g.hook, fix(g)) for g in graph.receiver_groups]
    with torch.no_grad():
        return task.metric(model.run_with_hooks(task.clean, fwd_hooks=hooks)).double()


def random_circuits(graph, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    density = torch.linspace(0.05, 0.95, n)[:, None]
    return torch.rand(n, graph.n_edges, generator=g) < density


# ------------------------------------------------------------------------ correctness
def test_random_circuits_equal_naive_hooks(family):
    name, model, graph = family
    task = random_task(model, n=3, seq=6, seed=1)
    circuits = random_circuits(graph, 4)
    stats = {}
    got = validation.evaluate_circuit(model, graph, task, circuits, stats=stats)
    assert stats["path"] == "fast"
    want = torch.stack([naive_circuit(model, graph, task, c) for c in circuits])
    spread = (want - naive_circuit(model, graph, task, torch.ones(graph.n_edges, dtype=torch.bool))).abs().max()
    assert spread > 1e-3, "the circuits must change the metric for the comparison to mean anything"
    torch.testing.assert_close(got.per_prompt, want, atol=TOL, rtol=0)


def test_hook_path_equals_naive_hooks(family):
    _, model, graph = family
    task = random_task(model, n=3, seq=6, seed=2)
    circuits = random_circuits(graph, 3, seed=5)
    stats = {}
    got = validation.evaluate_circuit(model, graph, task, circuits, engine="bridge", stats=stats)
    assert stats["path"] == "hooks"
    want = torch.stack([naive_circuit(model, graph, task, c) for c in circuits])
    torch.testing.assert_close(got.per_prompt, want, atol=TOL, rtol=0)


def test_empty_circuit_is_the_corrupted_run_and_full_circuit_the_clean_run(family):
    _, model, graph = family
    task = random_task(model, n=4, seq=7, seed=3)
    res = validation.evaluate_circuit(model, graph, task, torch.stack([
        torch.zeros(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges, dtype=torch.bool)]))
    with torch.no_grad():
        clean = task.metric(model(task.clean)).double()
        corrupted = task.metric(model(task.corrupted)).double()
    assert (clean - corrupted).abs().max() > 1e-3
    torch.testing.assert_close(res.per_prompt[0], corrupted, atol=TOL, rtol=0)
    torch.testing.assert_close(res.per_prompt[1], clean, atol=TOL, rtol=0)
    torch.testing.assert_close(res.corrupted, corrupted, atol=TOL, rtol=0)
    torch.testing.assert_close(res.clean, clean, atol=TOL, rtol=0)
    torch.testing.assert_close(res.faithfulness, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-7, rtol=0)


def test_circuit_missing_one_edge_is_that_edges_patch_value(family):
    _, model, graph = family
    task = random_task(model, n=3, seq=6, seed=4)
    edges = graph.select_edges("stratified:25", seed=2)
    circuits = torch.ones(len(edges), graph.n_edges, dtype=torch.bool)
    circuits[torch.arange(len(edges)), edges] = False
    res = validation.evaluate_circuit(model, graph, task, circuits)
    exact = validation.patch_edges(model, graph, task, edges, progress=False)[edges]
    assert exact.abs().max() > 1e-3
    torch.testing.assert_close(res.effect, exact, atol=TOL, rtol=0)


def test_readout_path_equals_full_logits(family):
    _, model, graph = family
    task = readout_task(model, n=4, seq=8, seed=5)
    circuits = random_circuits(graph, 3, seed=6)
    fast = validation.evaluate_circuit(model, graph, task, circuits, stats=(st := {}))
    assert st["readout"]
    full = validation.evaluate_circuit(model, graph, task, circuits, readout=False)
    torch.testing.assert_close(fast.per_prompt, full.per_prompt, atol=TOL, rtol=0)
    want = torch.stack([naive_circuit(model, graph, task, c) for c in circuits])
    torch.testing.assert_close(fast.per_prompt, want, atol=TOL, rtol=0)


def test_attention_only_model_equals_naive_hooks():
    model = random_model(dict(n_layer=3, n_embd=24, n_head=3, n_positions=32, attn_only=True), seed=2, **F64)
    graph = Graph.from_model(model)
    task = random_task(model, n=3, seq=6, seed=7)
    circuits = random_circuits(graph, 3, seed=7)
    got = validation.evaluate_circuit(model, graph, task, circuits)
    want = torch.stack([naive_circuit(model, graph, task, c) for c in circuits])
    torch.testing.assert_close(got.per_prompt, want, atol=TOL, rtol=0)


# ------------------------------------------------------------------------ batching
def test_several_circuits_per_forward_equal_one_at_a_time(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    task = random_task(tiny3_model, n=5, seq=6, seed=8)
    circuits = random_circuits(graph, 6, seed=8)
    together = validation.evaluate_circuit(tiny3_model, graph, task, circuits, stats=(st := {}))
    assert st["circuits_per_forward"] >= 8 and st["n_forwards"] == 1  # 6 circuits + 2 baselines at once
    for i, c in enumerate(circuits):
        alone = validation.evaluate_circuit(tiny3_model, graph, task, c, baselines=False)
        assert alone.per_prompt.shape == (5,) and alone.clean is None
        torch.testing.assert_close(alone.per_prompt, together.per_prompt[i], atol=1e-12, rtol=0)


def test_budget_streams_prompt_batches_with_the_same_result(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    task = random_task(tiny3_model, n=7, seq=6, seed=9)
    circuits = random_circuits(graph, 5, seed=9)
    whole = validation.evaluate_circuit(tiny3_model, graph, task, circuits, stats=(a := {}))
    with pytest.warns(UserWarning, match="below what one prompt needs"):
        small = validation.evaluate_circuit(tiny3_model, graph, task, circuits, memory_budget=4096, stats=(b := {}))
    assert a["n_batches"] == 1 and b["n_batches"] == 7 and b["circuits_per_forward"] == 1
    assert b["n_forwards"] == 7 * 7  # every (prompt, circuit) alone, baselines included
    torch.testing.assert_close(small.per_prompt, whole.per_prompt, atol=1e-12, rtol=0)
    torch.testing.assert_close(small.clean, whole.clean, atol=1e-12, rtol=0)
    batched = validation.evaluate_circuit(tiny3_model, graph, task, circuits, batch_size=3, stats=(c := {}))
    assert c["n_batches"] == 3
    torch.testing.assert_close(batched.per_prompt, whole.per_prompt, atol=1e-12, rtol=0)


def test_planned_peak_grows_with_circuits_per_forward_not_prompts(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    circuits = random_circuits(graph, 4, seed=10)
    peaks = []
    for n in (8, 64):
        task = random_task(tiny3_model, n=n, seq=6, seed=10)
        validation.evaluate_circuit(tiny3_model, graph, task, circuits, batch_size=8, stats=(st := {}))
        peaks.append(st["planned_peak_bytes"])
    assert peaks[0] == peaks[1]


def test_metric_closing_over_all_prompts_runs_as_one_batch(tiny_model):
    graph = Graph.from_model(tiny_model)
    closure, per_prompt = closure_task(tiny_model, n=5, seq=6)
    circuits = random_circuits(graph, 3, seed=11)
    a = validation.evaluate_circuit(tiny_model, graph, closure, circuits, stats=(st := {}))
    b = validation.evaluate_circuit(tiny_model, graph, per_prompt, circuits, batch_size=2)
    assert st["n_batches"] == 1
    torch.testing.assert_close(a.per_prompt, b.per_prompt, atol=1e-12, rtol=0)
    with pytest.raises(TaskError, match="close over"):
        validation.evaluate_circuit(tiny_model, graph, closure, circuits, batch_size=2)


def test_pruning_does_not_change_the_result(tiny3_model):
    """EAP-IG prunes before evaluating; the module docstring argues pruning is a no-op."""
    graph = Graph.from_model(tiny3_model)
    task = random_task(tiny3_model, n=3, seq=6, seed=12)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    graph.set_edge_scores(scores)
    pruned, unpruned = [], []
    for k in (3, 10, 40, 120):
        graph.apply_topn(k, prune=False)
        unpruned.append(graph.in_graph[graph.edge_sender, graph.edge_receiver].clone())
        graph.prune()
        pruned.append(graph.in_graph[graph.edge_sender, graph.edge_receiver].clone())
    pruned, unpruned = torch.stack(pruned), torch.stack(unpruned)
    assert (pruned != unpruned).any(), "pruning must remove edges for the test to mean anything"
    a = validation.evaluate_circuit(tiny3_model, graph, task, pruned)
    b = validation.evaluate_circuit(tiny3_model, graph, task, unpruned)
    torch.testing.assert_close(a.per_prompt, b.per_prompt, atol=TOL, rtol=0)
    assert (b.per_prompt - b.clean).abs().max() > 1e-4


# ------------------------------------------------------------------------ circuit specs
def test_circuit_specs_agree(tiny_model):
    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=2, seq=5, seed=13)
    idx = [0, 5, 17, graph.n_edges - 1]
    names = [graph.edge_names[i] for i in idx]
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    mask[idx] = True
    want = validation.evaluate_circuit(tiny_model, graph, task, mask, baselines=False).per_prompt
    g2 = Graph.from_model(tiny_model)
    g2.in_graph = torch.zeros_like(g2.mask)
    g2.in_graph[g2.edge_sender[idx], g2.edge_receiver[idx]] = True
    for spec in (idx, names, torch.tensor(idx), mask.double(), mask.numpy(), g2, [names[0], idx[1], idx[2], names[3]]):
        got = validation.evaluate_circuit(tiny_model, graph, task, spec, baselines=False).per_prompt
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    several = validation.evaluate_circuit(tiny_model, graph, task, [idx, names[:2]], baselines=False)
    assert several.per_prompt.shape == (2, 2)
    torch.testing.assert_close(several.per_prompt[0], want, atol=0, rtol=0)
    assert validation.evaluate_circuit(tiny_model, g2, task, None, baselines=False).per_prompt.equal(want)


@pytest.mark.parametrize("spec, match", [
    (lambda g: torch.ones(g.n_edges + 1, dtype=torch.bool), "one entry per edge"),
    (lambda g: torch.ones(2, g.n_edges - 1, dtype=torch.bool), "one entry per edge"),
    (lambda g: torch.zeros(0, g.n_edges, dtype=torch.bool), "no circuits"),
    (lambda g: torch.full((g.n_edges,), float("nan")), "NaN"),
    (lambda g: torch.full((g.n_edges,), 0.5), "0 or 1"),
    (lambda g: ["a0.h0->nowhere"], "unknown edge name"),
    (lambda g: [g.n_edges], "out of range"),
    (lambda g: [1, 2, 1], "more than once"),
    (lambda g: [1.0, 2.0], "integers"),
    (lambda g: torch.ones(2, g.n_edges, dtype=torch.long), "integer tensor"),
    (lambda g: "input->m0", "cannot read a circuit"),
    (lambda g: [[0, 1], ["nope"]], "circuit 1"),
    (lambda g: Graph.from_cfg(dict(n_layers=1, n_heads=1)), "circuit's graph"),
])
def test_bad_circuits_are_refused_with_a_clear_message(tiny_model, spec, match):
    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=2, seq=5, seed=14)
    with pytest.raises((CircuitError, GraphError), match=match):
        validation.evaluate_circuit(tiny_model, graph, task, spec(graph))


def test_nan_metric_is_refused(tiny_model):
    graph = Graph.from_model(tiny_model)
    base = random_task(tiny_model, n=2, seq=5, seed=15)
    task = Task(base.clean, base.corrupted, lambda logits, **_: logits[:, -1, 0] * float("nan"), name="nan")
    with pytest.raises(TaskError, match="NaN"):
        validation.evaluate_circuit(tiny_model, graph, task, [0, 1])


def test_faithfulness_needs_baselines(tiny_model):
    graph = Graph.from_model(tiny_model)
    res = validation.evaluate_circuit(tiny_model, graph, random_task(tiny_model, n=2, seq=5), [0], baselines=False)
    with pytest.raises(CircuitError, match="baselines=True"):
        res.faithfulness
