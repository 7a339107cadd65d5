"""Exact patching (validation/) against naive one-edge-per-forward hooks, EAP as ε -> 0,
graph completeness, resume / shards / merge, and input errors. Tiny float64 models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import validation
from eap.graph import Graph, GraphError
from eap.hooks import HookError, as_nodes
from eap.task import Task, TaskError
from validation.store import ResultStore, StoreError, StoreMismatch

from conftest import closure_task

TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ naive reference
def _sender_outputs(model, graph, tokens):
    """Per-sender outputs [n_senders, n, p, d] of one forward, through ordinary hooks."""
    got = {}

    def save(key):
        def hook(x, hook=None):
            got[key] = x.detach().clone()
            return x

        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(g.hook, save(g.hook)) for g in graph.sender_groups])
    return torch.cat([as_nodes(got[g.hook], g) for g in graph.sender_groups])


def _add_hook(group, index, delta):
    head = index - group.start if group.n_heads else None

    def hook(x, hook=None):
        x = x.clone()
        if head is None:
            x = x + delta
        else:
            x[:, :, head] = x[:, :, head] + delta
        return x

    return hook


def naive_edges(model, graph, task, edges, scale=1.0):
    """One full forward per edge: receiver input += scale * (corr_u - clean_u) at its hook."""
    diff = _sender_outputs(model, graph, task.corrupted) - _sender_outputs(model, graph, task.clean)
    with torch.no_grad():
        base = task.metric(model(task.clean))
        out = []
        for e in edges:
            u, r = int(graph.edge_sender[e]), int(graph.edge_receiver[e])
            g = graph.receiver_group_of(r)
            logits = model.run_with_hooks(task.clean, fwd_hooks=[(g.hook, _add_hook(g, r, scale * diff[u]))])
            out.append((task.metric(logits) - base).mean().item())
    return torch.tensor(out, dtype=torch.float64)


def naive_nodes(model, graph, task):
    diff = _sender_outputs(model, graph, task.corrupted) - _sender_outputs(model, graph, task.clean)
    with torch.no_grad():
        base = task.metric(model(task.clean))
        out = []
        for u in range(graph.n_senders):
            g = next(g for g in graph.sender_groups if g.start <= u < g.start + g.size)
            logits = model.run_with_hooks(task.clean, fwd_hooks=[(g.hook, _add_hook(g, u, diff[u]))])
            out.append((task.metric(logits) - base).mean().item())
    return torch.tensor(out, dtype=torch.float64)


def readout_task(model, n=5, seq=8, seed=3):
    """Logit difference of two tokens at a per-prompt position, with a readout."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(3, vocab, (n, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, : seq // 2] = torch.randint(3, vocab, (n, seq // 2), generator=g)
    pos = torch.randint(seq // 2, seq, (n,), generator=g)
    toks = torch.randint(3, vocab, (n, 2), generator=g)
    return Task(
        clean, corrupted, _ld_metric, readout=_ld_readout, name="ld",
        per_prompt={"readout_pos": pos, "readout_tokens": toks},
    )


def _ld_metric(logits, readout_pos, readout_tokens, **_):
    sel = logits[torch.arange(logits.shape[0]), readout_pos]
    return sel.gather(1, readout_tokens[:, :1]).squeeze(1) - sel.gather(1, readout_tokens[:, 1:]).squeeze(1)


def _ld_readout(selected, **_):
    return selected[:, 0] - selected[:, 1]


# ------------------------------------------------------------------------ correctness
def test_all_edges_match_naive(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=4, seq=7)
    stats = {}
    # batch_size=3: prompt batches of 3 + 1 (copies per forward are tested elsewhere)
    got = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=3, stats=stats)
    assert stats["path"] == "fast" and stats["prompts_per_batch"] == 3 and stats["n_batches"] == 2
    want = naive_edges(tiny_model, graph, task, range(graph.n_edges))
    assert set(graph.edge_kind) == {"q", "k", "v", "mlp", "logits"}
    assert got.shape == (graph.n_edges,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert want.abs().max() > 1e-4  # not trivially zero (the largest edge is ~9e-4 with the 375-token vocabulary)


def test_readout_path_matches_full_logits_and_naive(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    task = readout_task(tiny3_model)
    edges = graph.select_edges("stratified:40", seed=1)
    fast = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, batch_size=64)
    full = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, readout=False)
    want = naive_edges(tiny3_model, graph, task, edges.tolist())
    torch.testing.assert_close(fast[edges], want, atol=TOL, rtol=0)
    torch.testing.assert_close(full[edges], want, atol=TOL, rtol=0)
    assert torch.isnan(fast).sum() == graph.n_edges - len(edges)


def test_hook_path_matches_fast_path(tiny3_model, make_random_task):
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=3, seq=6)
    edges = graph.select_edges("sample:30", seed=2)
    fast = validation.patch_edges(tiny3_model, graph, task, edges, progress=False)
    hooks = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, engine="bridge")
    torch.testing.assert_close(fast, hooks, atol=TOL, rtol=0, equal_nan=True)


def test_unsupported_architecture_falls_back_to_hooks(tiny_model, make_random_task, monkeypatch):
    import validation.patch as vp

    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    edges = [0, 7, graph.n_edges - 1]
    fast = validation.patch_edges(tiny_model, graph, task, edges, progress=False)

    def unsupported(model):
        raise validation.UnsupportedModel("block runner does not support: rotary (test)")

    monkeypatch.setattr(vp, "BlockRunner", unsupported)
    stats = {}
    with pytest.warns(UserWarning, match="hook-based"):
        slow = validation.patch_edges(tiny_model, graph, task, edges, progress=False, stats=stats)
    assert stats["path"] == "hooks"
    torch.testing.assert_close(slow, fast, atol=TOL, rtol=0, equal_nan=True)
    with pytest.raises(validation.UnsupportedModel):
        validation.patch_edges(tiny_model, graph, task, edges, progress=False, engine="fast")


def test_nodes_match_naive(tiny3_model, make_random_task):
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=3, seq=6)
    got = validation.patch_nodes(tiny3_model, graph, task, progress=False, batch_size=6)
    torch.testing.assert_close(got, naive_nodes(tiny3_model, graph, task), atol=TOL, rtol=0)
    names = ["input", "a1.h2", "m2"]
    hooks = validation.patch_nodes(tiny3_model, graph, task, names, progress=False, engine="bridge")
    idx = [graph.senders.index(n) for n in names]
    torch.testing.assert_close(hooks[idx], got[idx], atol=TOL, rtol=0)
    assert int(torch.isnan(hooks).sum()) == graph.n_senders - 3


def test_scale_is_linear_interpolation(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    edges = [0, 5, graph.n_edges - 1]
    got = validation.patch_edges(tiny_model, graph, task, edges, scale=0.3, progress=False)
    torch.testing.assert_close(got[edges], naive_edges(tiny_model, graph, task, edges, scale=0.3), atol=TOL, rtol=0)


def _eap_autograd(model, graph, task):
    """d/dα metric(receiver input += α Δ_u) at α = 0 for every edge, by autograd on hooked forwards."""
    diff = _sender_outputs(model, graph, task.corrupted) - _sender_outputs(model, graph, task.clean)
    zeros, hooks = {}, []
    for g in graph.receiver_groups:
        shape = (task.n_prompts, task.seq_len) + ((g.n_heads,) if g.n_heads else ()) + (model.cfg.d_model,)
        z = torch.zeros(shape, dtype=diff.dtype, requires_grad=True)
        zeros[g.hook] = z
        hooks.append((g.hook, (lambda z: lambda x, hook=None: x + z)(z)))
    logits = model.run_with_hooks(task.clean, fwd_hooks=hooks)
    grads = torch.autograd.grad(task.metric(logits).mean(), list(zeros.values()))
    grad_of = {}
    for g, gr in zip(graph.receiver_groups, grads):
        for j, node in enumerate(as_nodes(gr, g)):
            grad_of[g.start + j] = node
    return torch.stack([
        (grad_of[int(r)] * diff[int(u)]).sum() for u, r in zip(graph.edge_sender, graph.edge_receiver)
    ]).double()


def test_small_scale_converges_to_eap(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=4, seq=7)
    eps = 1e-4
    exact = validation.patch_edges(tiny_model, graph, task, scale=eps, progress=False) / eps
    eap = _eap_autograd(tiny_model, graph, task)
    big = eap.abs() > 1e-3 * eap.abs().max()
    ratio = exact[big] / eap[big]
    assert (ratio - 1).abs().max() < 1e-3, ratio
    assert (exact - eap).abs().max() < 1e-3 * eap.abs().max()
    try:
        from eap.attribute import attribute
    except ImportError:
        return
    scores = attribute(tiny_model, graph, task, method="eap", progress=False, write_graph=False)
    torch.testing.assert_close(scores.double(), eap, atol=1e-9, rtol=1e-6)
    # node level: first order of patching a sender everywhere = sum of its edges' EAP scores
    nodes = validation.patch_nodes(tiny_model, graph, task, scale=eps, progress=False) / eps
    node_eap = attribute(tiny_model, graph, task, method="eap", level="node", progress=False, write_graph=False)
    assert (nodes - node_eap.double()).abs().max() < 1e-3 * node_eap.abs().max()


def _receiver_inputs(model, graph, tokens):
    """Every receiver's input [n_receivers, batch, pos, d_model] on a hooked no-grad run."""
    got = {}
    hooks = [(g.hook, (lambda g: lambda x, hook=None: got.__setitem__(g.hook, x.detach().clone()))(g))
             for g in graph.receiver_groups]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    return torch.cat([as_nodes(got[g.hook], g) for g in graph.receiver_groups])


def test_every_receiver_input_is_the_sum_of_its_senders(tiny3_model, make_random_task):
    """clean_input_v + Σ_u (corr_u - clean_u) == corrupted_input_v: nothing missing from the graph."""
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=3, seq=6)
    diff = _sender_outputs(tiny3_model, graph, task.corrupted) - _sender_outputs(tiny3_model, graph, task.clean)

    clean, corr = _receiver_inputs(tiny3_model, graph, task.clean), _receiver_inputs(tiny3_model, graph, task.corrupted)
    for r in range(graph.n_receivers):
        k = int(graph.n_upstream[r])
        torch.testing.assert_close(clean[r] + diff[:k].sum(0), corr[r], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------ streaming prompts
def test_streamed_equals_unbatched_with_uneven_last_batch(tiny3_model, make_random_task):
    """Prompt batches of 3 + 3 + 1 give the one-batch result to float64 rounding (the per-prompt
    metrics differ only in the last bits of matrix products over other row counts)."""
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=7, seq=6)
    one, streamed = {}, {}
    whole = validation.patch_edges(tiny3_model, graph, task, progress=False, stats=one)
    got = validation.patch_edges(tiny3_model, graph, task, progress=False, batch_size=3, stats=streamed)
    assert one["n_batches"] == 1 and streamed["n_batches"] == 3 and streamed["prompts_per_batch"] == 3
    assert got.dtype == torch.float64 and whole.abs().max() > 1e-3
    torch.testing.assert_close(got, whole, atol=1e-14, rtol=0)
    # the unbatched result is the plain mean over prompts of the naive per-edge effects
    edges = graph.select_edges("sample:12", seed=0)
    torch.testing.assert_close(got[edges], naive_edges(tiny3_model, graph, task, edges.tolist()), atol=TOL, rtol=0)


def test_streamed_nodes_and_readout_equal_unbatched(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    task = readout_task(tiny3_model, n=5)
    whole = validation.patch_nodes(tiny3_model, graph, task, progress=False)
    torch.testing.assert_close(validation.patch_nodes(tiny3_model, graph, task, progress=False, batch_size=2),
                               whole, atol=1e-14, rtol=0)
    hooks = validation.patch_nodes(tiny3_model, graph, task, progress=False, batch_size=3, engine="bridge")
    torch.testing.assert_close(hooks, whole, atol=TOL, rtol=0)


def test_tiny_memory_budget_streams_one_prompt_at_a_time(tiny_model, make_random_task):
    from eap.budget import BudgetWarning

    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=4, seq=7)
    whole = validation.patch_edges(tiny_model, graph, task, progress=False)
    stats = {}
    with pytest.warns(BudgetWarning, match="below what one prompt needs"):
        got = validation.patch_edges(tiny_model, graph, task, progress=False, memory_budget=1, stats=stats)
    assert stats["prompts_per_batch"] == 1 and stats["copies_per_forward"] == 1 and stats["n_batches"] == 4
    assert stats["n_forwards"] == graph.n_edges * 4  # one copy of one prompt per forward
    torch.testing.assert_close(got, whole, atol=1e-14, rtol=0)
    # a budget in words: the same plan as in bytes
    a, b = {}, {}
    validation.patch_edges(tiny_model, graph, task, [0, 1], progress=False, memory_budget="1MiB", stats=a)
    validation.patch_edges(tiny_model, graph, task, [0, 1], progress=False, memory_budget=2**20, stats=b)
    assert a["memory_budget"] == b["memory_budget"] == 2**20 and a["prompts_per_batch"] == b["prompts_per_batch"]


def test_stats_contract(tiny_model, make_random_task, tmp_path):
    """The keys bench reads (contract 1), with consistent values."""
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=5, seq=6)
    stats = {}
    validation.patch_edges(tiny_model, graph, task, "sample:20", progress=False, batch_size=2, out=tmp_path / "s.pt",
                           stats=stats)
    for key in ("setup_s", "patch_s", "fingerprint_s", "io_s", "n_measured", "items_per_s", "n_forwards",
                "rows_per_forward", "prompts_per_batch", "path", "readout", "fingerprint"):
        assert key in stats, key
    assert stats["n_measured"] == 20 and stats["path"] == "fast" and stats["readout"] is False
    assert stats["items_per_s"] == pytest.approx(20 / stats["patch_s"])
    assert stats["rows_per_forward"] == stats["prompts_per_batch"] * stats["copies_per_forward"]
    assert min(stats["setup_s"], stats["patch_s"], stats["fingerprint_s"], stats["io_s"]) > 0
    assert stats["fingerprint"] == validation.load_file(tmp_path / "s.pt")["fingerprint"]


# ------------------------------------------------------------------------ metrics that close over the prompts
def test_closure_metric_exact_patching_matches_per_prompt_metric(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    closure, base = closure_task(tiny3_model, n=5)
    assert closure.subset_problem(tiny3_model.cfg.d_vocab) is not None
    assert base.subset_problem(tiny3_model.cfg.d_vocab) is None  # the per-prompt version can be split
    stats = {}
    got = validation.patch_edges(tiny3_model, graph, closure, "sample:40", seed=1, progress=False, stats=stats)
    want = validation.patch_edges(tiny3_model, graph, base, "sample:40", seed=1, progress=False, batch_size=2)
    assert stats["prompts_per_batch"] == 5 and stats["copies_per_forward"] > 1  # all prompts, stacked copies
    torch.testing.assert_close(got, want, atol=1e-14, rtol=0, equal_nan=True)
    nodes = validation.patch_nodes(tiny3_model, graph, closure, progress=False, engine="bridge")
    torch.testing.assert_close(nodes, validation.patch_nodes(tiny3_model, graph, base, progress=False), atol=TOL, rtol=0)


def test_closure_metric_that_cannot_fit_the_budget_is_a_clear_error(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    closure, _ = closure_task(tiny3_model, n=5)
    with pytest.raises(TaskError, match="per_prompt") as err:
        validation.patch_edges(tiny3_model, graph, closure, [0, 1], progress=False, memory_budget="1KiB")
    assert "all 5 prompts" in str(err.value) and "memory budget" in str(err.value)
    with pytest.raises(TaskError, match="batch_size=2"):
        validation.patch_edges(tiny3_model, graph, closure, [0, 1], progress=False, batch_size=2)


# ------------------------------------------------------------------------ fingerprint: no stale truth
def test_fingerprint_keys_metric_code_closures_and_data(tiny_model, make_random_task, monkeypatch):
    import validation.fingerprints as vf
    from validation import store as vs

    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    idx = torch.tensor([0, 1, 2])
    fp = validation.fingerprint(tiny_model, graph, task, idx)
    assert fp == validation.fingerprint(tiny_model, graph, make_random_task(tiny_model, n=3, seq=6), idx)

    def with_metric(metric, **kw):
        return Task(task.clean, task.corrupted, metric, per_prompt=kw.get("per_prompt", task.per_prompt))

    def other_code(logits, end, toks, **_):  # same name and signature as the task's, other code
        return -logits[torch.arange(logits.shape[0]), end].log_softmax(-1).gather(1, toks[:, :1]).squeeze(1)

    other_code.__qualname__ = task.metric_fn.__qualname__
    other_code.__module__ = task.metric_fn.__module__
    assert validation.fingerprint(tiny_model, graph, with_metric(other_code), idx) != fp

    def lam(offset):
        return lambda logits, end, toks, **_: logits[torch.arange(logits.shape[0]), end, toks[:, 0]] + offset

    fa, fb, fc = (validation.fingerprint(tiny_model, graph, with_metric(lam(o)), idx) for o in (0.0, 1.0, 0.0))
    assert fa != fb and fa == fc  # a closed-over value counts, the object identity does not
    answer = torch.tensor([5, 6, 7])
    t1 = with_metric(lambda logits, **_: logits[:, -1, answer])
    before = validation.fingerprint(tiny_model, graph, t1, idx)
    answer[0] = 9  # a closed-over tensor changed in place
    assert validation.fingerprint(tiny_model, graph, t1, idx) != before
    moved = dict(task.per_prompt, end=task.per_prompt["end"] - 1)
    assert validation.fingerprint(tiny_model, graph, with_metric(task.metric_fn, per_prompt=moved), idx) != fp
    parts = vs.fingerprint_parts(tiny_model, graph, task, idx)
    assert parts["package"] == vs.package_version() and len(parts["code"]) == 16
    monkeypatch.setattr(vf, "patching_code_hash", lambda: "another-version")  # a fix to the patching code
    assert validation.fingerprint(tiny_model, graph, task, idx) != fp
    monkeypatch.setattr(vf, "package_version", lambda: "9.9")
    assert vs.fingerprint_parts(tiny_model, graph, task, idx)["package"] == "9.9"


def test_code_hash_follows_partials_objects_and_helpers():
    import functools

    from validation.store import code_hash

    def scaled(logits, offset=0.0, **_):
        return logits[:, -1, 0] + offset

    assert code_hash(functools.partial(scaled, offset=1.0)) == code_hash(functools.partial(scaled, offset=1.0))
    assert code_hash(functools.partial(scaled, offset=1.0)) != code_hash(functools.partial(scaled, offset=2.0))

    class Answer:
        def __init__(self, io):
            self.io = io

        def __call__(self, logits, **_):
            return logits[:, -1, self.io].diagonal()

    a, b = Answer(torch.tensor([1, 2])), Answer(torch.tensor([1, 3]))
    assert code_hash(a) != code_hash(b) and code_hash(a) == code_hash(Answer(torch.tensor([1, 2])))
    ns: dict = {}
    exec("def helper(x):\n    return x + 1\ndef metric(logits):\n    return helper(logits[:, -1, 0])", ns)
    before = code_hash(ns["metric"])
    exec("def helper(x):\n    return x + 2", ns)  # the helper the metric calls was fixed
    assert code_hash(ns["metric"]) != before


def test_fingerprint_once_per_call(tiny_model, make_random_task, monkeypatch, tmp_path):
    import validation.fingerprints as vf

    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    real, calls = vf.weights_hash, []
    monkeypatch.setattr(vf, "weights_hash", lambda model, *a: calls.append(1) or real(model, *a))
    validation.patch_edges(tiny_model, graph, task, [0, 1], progress=False, out=tmp_path / "f.pt")
    assert len(calls) == 1


# ------------------------------------------------------------------------ store / resume
class _Interrupt(Exception):
    pass


def _count_units(monkeypatch):
    """Count the units computed (``validation.units.compute_unit`` calls)."""
    import validation.units as vp

    real, calls = vp.compute_unit, []

    def counting(job, ev, unit):
        calls.append((unit.key, unit.batch))
        return real(job, ev, unit)

    monkeypatch.setattr(vp, "compute_unit", counting)
    return calls


@pytest.mark.parametrize("k", [1, 7])
def test_kill_and_resume_loses_no_unit(tiny3_model, make_random_task, tmp_path, monkeypatch, k):
    """An exception after k finished units (mid prompt batch), then a resume: exactly the other
    units are computed, and the result equals an uninterrupted run."""
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=5, seq=6)
    edges = graph.select_edges("sample:40", seed=3)
    full = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, batch_size=2)
    out = tmp_path / "r.pt"
    real_record, recorded = ResultStore.record_unit, []

    def flaky(self, batch, items, sums):
        real_record(self, batch, items, sums)
        recorded.append(batch)
        if len(recorded) == k:
            raise _Interrupt

    monkeypatch.setattr(ResultStore, "record_unit", flaky)
    with pytest.raises(_Interrupt):
        validation.patch_edges(tiny3_model, graph, task, edges, progress=False, batch_size=2, out=out)
    monkeypatch.setattr(ResultStore, "record_unit", real_record)
    calls = _count_units(monkeypatch)
    stats = {}
    got = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, batch_size=2, out=out, stats=stats)
    n_units = len(graph.edge_receiver[edges].unique()) * 3  # receivers x prompt batches (2 + 2 + 1)
    assert stats["n_batches"] == 3 and stats["n_units_resumed"] == k
    assert len(calls) == stats["n_units"] == n_units - k  # nothing computed twice, nothing lost
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0, equal_nan=True)
    again = {}
    validation.patch_edges(tiny3_model, graph, task, edges, progress=False, batch_size=2, out=out, stats=again)
    assert again["n_measured"] == 0 and again["n_units"] == 0
    torch.testing.assert_close(validation.load_values(out), full, atol=1e-12, rtol=0, equal_nan=True)


def test_resume_with_other_prompt_batches(tiny3_model, make_random_task, tmp_path, monkeypatch):
    """A resumed file keeps its prompt batches when no batch size is asked for (its partial sums
    stay valid); asked for other batches, it recomputes the partial items (with a warning)."""
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=5, seq=6)
    full = validation.patch_edges(tiny3_model, graph, task, progress=False)
    real_record = ResultStore.record_unit

    def interrupted(path):
        calls = []

        def flaky(self, *args):
            real_record(self, *args)
            calls.append(1)
            if len(calls) == 9:
                raise _Interrupt

        monkeypatch.setattr(ResultStore, "record_unit", flaky)
        with pytest.raises(_Interrupt):
            validation.patch_edges(tiny3_model, graph, task, progress=False, batch_size=2, out=path)
        monkeypatch.setattr(ResultStore, "record_unit", real_record)

    interrupted(tmp_path / "a.pt")
    kept = {}
    got = validation.patch_edges(tiny3_model, graph, task, progress=False, out=tmp_path / "a.pt", stats=kept)
    assert kept["prompts_per_batch"] == 2 and kept["n_units_resumed"] == 9
    torch.testing.assert_close(got, full, atol=1e-14, rtol=0)
    interrupted(tmp_path / "b.pt")
    other = {}
    with pytest.warns(UserWarning, match="recomputing"):
        got = validation.patch_edges(tiny3_model, graph, task, progress=False, batch_size=3, out=tmp_path / "b.pt",
                                     stats=other)
    assert other["prompts_per_batch"] == 3 and other["n_units_resumed"] == 0
    torch.testing.assert_close(got, full, atol=1e-14, rtol=0)


def test_resume_after_sigkill(tiny_model, make_random_task, tmp_path):
    """kill -9 after 5 journalled units: the file plus its journal resume with those units."""
    graph = Graph.from_model(tiny_model)
    out = tmp_path / "k.pt"
    script = textwrap.dedent(f"""
        import time, torch
        torch.set_num_threads(1)
        from conftest import TINY_SHAPE, random_task
        from eap.models import random_model
        from eap.graph import Graph
        import validation
        from validation.store import ResultStore
        real = ResultStore.record_unit
        def slow(self, *args):
            real(self, *args); print("unit", flush=True); time.sleep(0.05)
        ResultStore.record_unit = slow
        m = random_model(TINY_SHAPE, seed=0, device="cpu", dtype=torch.float64)
        t = random_task(m, n=3, seq=6)
        validation.patch_edges(m, Graph.from_model(m), t, progress=False, batch_size=2, out={str(out)!r})
    """)
    here = Path(__file__).resolve().parent  # conftest (tests/) and the package root, like pytest's rootdir
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    units = 0
    while units < 5:
        line = proc.stdout.readline()
        if not line:
            break
        units += line.startswith(b"unit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert units == 5, "subprocess ended before it could be killed"
    assert validation.store.journal_path(out).exists()  # the kill left the journal unfolded
    task = make_random_task(tiny_model, n=3, seq=6)
    stats = {}
    got = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=2, out=out, stats=stats)
    assert stats["n_units_resumed"] >= 5
    assert stats["n_units"] + stats["n_units_resumed"] == graph.n_receivers * 2
    full = validation.patch_edges(tiny_model, graph, task, progress=False)
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0)


def test_units_recorded_in_any_order_give_the_same_values(tiny3_model, make_random_task):
    """The store's contract for executors: units from anywhere, in any order."""
    import validation.patch as vp

    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=5, seq=6)
    want = validation.patch_edges(tiny3_model, graph, task, "sample:30", seed=1, progress=False, batch_size=2)
    items = graph.select_edges("sample:30", seed=1)
    job = vp.PatchJob(tiny3_model, graph, task, "edges", validation.BlockRunner(tiny3_model), False, 1.0,
                      graph.edge_sender, vp.plan_patching(tiny3_model, graph.n_senders, 5, 6, readout=False,
                                                          prompts_per_batch=2, max_copies=4, budget="1GiB"))
    results = []
    for b in range(len(job.batches)):
        ev = vp.prepare_batch(job, b)
        results += [(u, vp.compute_unit(job, ev, u)) for u in job.units(items) if u.batch == b]
    store = ResultStore(None, "fp", graph.n_edges, items, items, None, {}, "edges", 5, 2)
    for u, sums in reversed(results):
        store.record_unit(u.batch, u.items, sums)
    assert store.complete
    torch.testing.assert_close(store.values, want, atol=1e-12, rtol=0, equal_nan=True)


def test_shards_merge_to_unsharded(tiny_model, make_random_task, tmp_path):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    edges = graph.select_edges("sample:40", seed=0)
    full = validation.patch_edges(tiny_model, graph, task, edges, progress=False)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.pt")
        part = validation.patch_edges(tiny_model, graph, task, edges, progress=False, shard=f"{i}/3", out=paths[-1])
        assert 0 < int((~torch.isnan(part)).sum()) < len(edges)
    merged = validation.merge(paths, out=tmp_path / "m.pt")
    torch.testing.assert_close(merged, full, atol=1e-12, rtol=0, equal_nan=True)
    torch.testing.assert_close(validation.load_values(tmp_path / "m.pt"), full, atol=1e-12, rtol=0, equal_nan=True)
    with pytest.raises(StoreError, match="missing"):
        validation.merge(paths[:2])
    with pytest.raises(StoreError, match="twice"):
        validation.merge(paths + paths[:1])
    other = tmp_path / "other.pt"
    validation.patch_edges(tiny_model, graph, task, edges[:10], progress=False, shard="0/3", out=other)
    with pytest.raises(StoreMismatch):
        validation.merge([other, paths[1], paths[2]])
    with pytest.raises(StoreError, match="shard"):
        validation.load_values(paths[0])


def test_mismatched_resume_file_is_refused(tiny_model, make_random_task, tmp_path):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6, seed=0)
    out = tmp_path / "r.pt"
    validation.patch_edges(tiny_model, graph, task, [0, 1, 2], progress=False, out=out)
    for kwargs in (
        dict(task=make_random_task(tiny_model, n=3, seq=6, seed=1), edges=[0, 1, 2]),  # other seed
        dict(task=make_random_task(tiny_model, n=4, seq=6, seed=0), edges=[0, 1, 2]),  # other n
        dict(task=task, edges=[0, 1, 3]),  # other edges
        dict(task=task, edges=[0, 1, 2], scale=0.5),  # other scale
    ):
        with pytest.raises(StoreMismatch, match="different arguments"):
            validation.patch_edges(tiny_model, graph, progress=False, out=out, **kwargs)
    with pytest.raises(StoreMismatch, match="shard"):
        validation.patch_edges(tiny_model, graph, task, [0, 1, 2], progress=False, out=out, shard="0/2")
    fp = validation.fingerprint(tiny_model, graph, task, torch.tensor([0, 1, 2]))
    assert validation.load_file(out)["fingerprint"] == fp
    assert fp[:24] in validation.default_path(tiny_model, graph, task, torch.tensor([0, 1, 2])).name


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("spec", ["bogus", "topk:0", "sample:x", "topk:5", ["nope->m0"], [10**6], [1, 1]])
def test_bad_edge_specs(tiny_model, make_random_task, spec):
    graph = Graph.from_model(tiny_model)
    with pytest.raises(GraphError):
        validation.patch_edges(tiny_model, graph, make_random_task(tiny_model, n=2, seq=4), spec, progress=False)


def test_bad_inputs(tiny_model, tiny3_model, make_random_task):
    task = make_random_task(tiny_model, n=2, seq=4)
    with pytest.raises(GraphError):
        validation.patch_edges(tiny_model, Graph.from_model(tiny3_model), task, progress=False)

    class NoHooks:
        cfg = tiny_model.cfg

        def parameters(self):
            return tiny_model.parameters()

    with pytest.raises(HookError):
        validation.patch_edges(NoHooks(), Graph.from_model(tiny_model), task, progress=False)
    with pytest.raises(validation.PatchError):
        validation.patch_edges(tiny_model, Graph.from_model(tiny_model), task, progress=False, shard="3/2")
    with pytest.raises(GraphError):
        validation.patch_nodes(tiny_model, Graph.from_model(tiny_model), task, ["zz"], progress=False)


def test_out_of_vocabulary_tokens(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    bad = task.clean.clone()
    bad[1, 2] = tiny_model.cfg.d_vocab
    for t in (Task(bad, task.corrupted, task.metric_fn, per_prompt=task.per_prompt),
              Task(task.clean, -bad.abs() - 1, task.metric_fn, per_prompt=task.per_prompt)):
        with pytest.raises(TaskError, match="vocabulary"):
            validation.patch_edges(tiny_model, graph, t, [0], progress=False)
    with pytest.raises(TaskError, match=r"prompt 1, position 2"):
        validation.patch_nodes(tiny_model, graph, Task(bad, task.corrupted, task.metric_fn, per_prompt=task.per_prompt),
                               progress=False)


def test_throughput_reports(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    res = validation.throughput(tiny_model, graph, make_random_task(tiny_model, n=4, seq=6), n_edges=20)
    assert res["n_edges"] >= 20 and res["edges_per_s"] > 0 and res["forward_equivalents_per_edge"] > 0


def test_cli_run_shards_and_merge(tmp_path, capsys):
    from validation.__main__ import main

    common = ["--model", "random:gpt2-tiny", "--device", "cpu", "--n", "4", "--edges", "sample:12", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "all.pt")]) == 0
    assert "top" in capsys.readouterr().out
    for i in range(2):
        assert main(common + ["--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.pt")]) == 0
    assert main(["merge", str(tmp_path / "s0.pt"), str(tmp_path / "s1.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    torch.testing.assert_close(
        validation.load_values(tmp_path / "m.pt"), validation.load_values(tmp_path / "all.pt"), equal_nan=True,
        atol=1e-5, rtol=1e-4,
    )
