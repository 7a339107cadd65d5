"""Exact patching (validation/) against naive one-edge-per-forward hooks, EAP as ε -> 0,
graph completeness, resume / shards / merge, and input errors. Tiny float64 models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import validation
from eap.graph import Graph, GraphError
from eap.hooks import HookError, as_nodes
from eap.task import Task
from validation.store import ResultStore, StoreError, StoreMismatch

TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster single-threaded (and the CI box is shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    assert stats["path"] == "fast" and stats["prompts_per_forward"] == 3
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
    hooks = validation.patch_edges(tiny3_model, graph, task, edges, progress=False, method="hooks")
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
        validation.patch_edges(tiny_model, graph, task, edges, progress=False, method="fast")


def test_nodes_match_naive(tiny3_model, make_random_task):
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=3, seq=6)
    got = validation.patch_nodes(tiny3_model, graph, task, progress=False, batch_size=6)
    torch.testing.assert_close(got, naive_nodes(tiny3_model, graph, task), atol=TOL, rtol=0)
    names = ["input", "a1.h2", "m2"]
    hooks = validation.patch_nodes(tiny3_model, graph, task, names, progress=False, method="hooks")
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


def test_every_receiver_input_is_the_sum_of_its_senders(tiny3_model, make_random_task):
    """clean_input_v + Σ_u (corr_u - clean_u) == corrupted_input_v: nothing missing from the graph."""
    graph = Graph.from_model(tiny3_model)
    task = make_random_task(tiny3_model, n=3, seq=6)
    diff = _sender_outputs(tiny3_model, graph, task.corrupted) - _sender_outputs(tiny3_model, graph, task.clean)

    def receiver_inputs(tokens):
        got = {}
        hooks = [(g.hook, (lambda g: lambda x, hook=None: got.__setitem__(g.hook, x.detach().clone()))(g))
                 for g in graph.receiver_groups]
        with torch.no_grad():
            tiny3_model.run_with_hooks(tokens, fwd_hooks=hooks)
        return torch.cat([as_nodes(got[g.hook], g) for g in graph.receiver_groups])

    clean, corr = receiver_inputs(task.clean), receiver_inputs(task.corrupted)
    for r in range(graph.n_receivers):
        k = int(graph.n_upstream[r])
        torch.testing.assert_close(clean[r] + diff[:k].sum(0), corr[r], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------ store / resume
class _Interrupt(Exception):
    pass


def test_resume_after_exception(tiny_model, make_random_task, tmp_path, monkeypatch):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    full = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=6)
    out = tmp_path / "r.pt"
    real_save, calls = ResultStore.save, []

    def flaky_save(self):
        real_save(self)
        calls.append(1)
        if len(calls) == 4:
            raise _Interrupt

    monkeypatch.setattr(ResultStore, "save", flaky_save)
    with pytest.raises(_Interrupt):
        validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=6, out=out)
    monkeypatch.setattr(ResultStore, "save", real_save)
    partial = validation.load_file(out)
    assert 0 < int(partial["done"].sum()) < graph.n_edges and not partial["complete"]
    stats = {}
    got = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=6, out=out, stats=stats)
    assert stats["n_measured"] == graph.n_edges - int(partial["done"].sum())
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0)
    again = {}
    validation.patch_edges(tiny_model, graph, task, progress=False, out=out, stats=again)
    assert again["n_measured"] == 0
    torch.testing.assert_close(validation.load_values(out), full, atol=1e-12, rtol=0)


def test_resume_after_sigkill(tiny_model, make_random_task, tmp_path):
    graph = Graph.from_model(tiny_model)
    out = tmp_path / "k.pt"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from conftest import TINY_SHAPE, random_task
        from eap.models import random_model
        from eap.graph import Graph
        import validation
        from validation.store import ResultStore
        real = ResultStore.save
        def slow(self):
            real(self); print("saved", flush=True); time.sleep(0.05)
        ResultStore.save = slow
        m = random_model(TINY_SHAPE, seed=0, device="cpu", dtype=torch.float64)
        t = random_task(m, n=3, seq=6)
        validation.patch_edges(m, Graph.from_model(m), t, progress=False, batch_size=3, out={str(out)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    saves = 0
    while saves < 5:
        line = proc.stdout.readline()
        if not line:
            break
        saves += line.startswith(b"saved")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saves == 5, "subprocess ended before it could be killed"
    partial = validation.load_file(out)
    assert 0 < int(partial["done"].sum()) < graph.n_edges
    task = make_random_task(tiny_model, n=3, seq=6)
    got = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=3, out=out)
    full = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=3)
    torch.testing.assert_close(got, full, atol=1e-12, rtol=0)


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
