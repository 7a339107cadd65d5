"""Validation's structure contracts: the fingerprint keys what decides the numbers (not
docstrings, not graph file I/O), one engine vocabulary, typed options and stats, executors
from any spec, Ctrl-C during exact patching."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import pytest
import torch

import validation
import validation.fingerprints as vf
from eap.graph import Graph

ROOT = Path(__file__).resolve().parent.parent


def _tree(tmp_path: Path, name: str) -> Path:
    """A copy of the modules the patching-code hash reads, plus the graph file reader's module."""
    root = tmp_path / name
    for rel in [Path(*m.split(".")).with_suffix(".py") for m in vf.PATCHING_MODULES] + _readers():
        if (ROOT / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, root / rel)
    return root


def _readers() -> list[Path]:
    """The graph file reader's module(s): where ``Graph.from_json`` is defined, and
    ``eap/graph_io.py`` where the reading itself lives."""
    found = [Path(inspect.getsourcefile(Graph.from_json)).resolve().relative_to(ROOT)]
    return found + [Path("eap/graph_io.py")] * (ROOT / "eap/graph_io.py").exists()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_source_hash_ignores_docstrings_and_comments_not_code():
    src = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    assert vf.source_hash(src) == vf.source_hash('def f(x):\n    """Another doc."""\n    # note\n    return x + 1\n')
    assert vf.source_hash(src) == vf.source_hash('def f(x):\n    return (x +\n            1)\n')
    assert vf.source_hash(src) != vf.source_hash('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert vf.source_hash(src) != vf.source_hash('def f(x):\n    """Doc."""\n    return x - 1\n')


def test_patching_code_hash_follows_patching_code_not_graph_io_or_docs(tmp_path):
    base = vf.patching_code_hash(_tree(tmp_path, "base"))
    assert base == vf.patching_code_hash()  # the copy hashes like the imported modules

    io = _tree(tmp_path, "io")  # the graph file reader edited: code and docstring
    for reader in _readers():
        text = (io / reader).read_text()
        (io / reader).write_text(text + "\n\ndef _extra_reader_helper(path):\n    return open(path).read()\n")
    _edit(io / _readers()[0], "def from_json(", "def from_json(  # reads EAP-IG files\n")
    if len(_readers()) > 1:
        _edit(io / "eap/graph_io.py", "def read_json(", "def read_json(  # the reader itself\n")
    assert vf.patching_code_hash(io) == base

    doc = _tree(tmp_path, "doc")  # a docstring and a comment in the patching code
    _edit(doc / "validation/units.py", "How a unit is fast", "How a unit is quick")
    _edit(doc / "validation/units.py", "    items = torch.tensor(unit.items, dtype=torch.long)\n",
          "    # the unit's items\n    items = torch.tensor(unit.items, dtype=torch.long)\n")
    assert vf.patching_code_hash(doc) == base

    code = _tree(tmp_path, "code")  # negative control: the patching code computes something else
    _edit(code / "validation/units.py", "D = D * job.scale", "D = D * (job.scale * 1.0000001)")
    assert vf.patching_code_hash(code) != base
    runner = _tree(tmp_path, "runner")
    (runner / "validation/runner.py").write_text((runner / "validation/runner.py").read_text() + "\nSCALE = 2.0\n")
    assert vf.patching_code_hash(runner) != base


def test_fingerprint_keys_the_edge_list(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=2, seq=5)
    idx = torch.arange(4)
    parts = vf.fingerprint_parts(tiny_model, graph, task, idx)
    assert parts["edges"] == vf.edge_list_hash(Graph.from_model(tiny_model))
    other = Graph.from_model(tiny_model)
    other.edge_names = list(other.edge_names)
    other.edge_names[0] = other.edge_names[1]  # negative control: another edge list
    assert vf.edge_list_hash(other) != parts["edges"]


# ------------------------------------------------------------------------------ engine vocabulary
def test_engine_bridge_equals_deprecated_method_hooks(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=3, seq=6)
    st_new, st_old = {}, {}
    new = validation.patch_edges(tiny_model, graph, task, [0, 5, 9], progress=False, engine="bridge", stats=st_new)
    with pytest.warns(DeprecationWarning, match="engine="):
        old = validation.patch_edges(tiny_model, graph, task, [0, 5, 9], progress=False, method="hooks", stats=st_old)
    torch.testing.assert_close(new, old, atol=0, rtol=0, equal_nan=True)
    assert st_new["engine"] == "bridge" and st_new["path"] == "hooks" and st_old["engine"] == "bridge"
    with pytest.warns(DeprecationWarning, match="'hooks' is deprecated"):
        assert validation.PatchOptions(engine="hooks").engine == "bridge"
    fast = {}
    validation.patch_edges(tiny_model, graph, task, [0, 5, 9], progress=False, engine="fast", stats=fast)
    assert fast["engine"] == "fast"  # negative control: the engine reported is the one that ran
    with pytest.raises(validation.PatchError, match="engine must be"):
        validation.patch_edges(tiny_model, graph, task, [0], progress=False, engine="hooked")
    with pytest.raises(validation.PatchError, match="engine= only"):
        validation.patch_edges(tiny_model, graph, task, [0], progress=False, engine="fast", method="hooks")
    circ = {}
    validation.evaluate_circuit(tiny_model, graph, task, [0, 1], engine="bridge", stats=circ)
    assert circ["engine"] == "bridge"


def test_cli_engine_and_deprecated_method(capsys):
    from validation.__main__ import main

    args = ["--model", "toy-gpt2-2l", "--n", "2", "--edges", "0,1", "--no-progress", "--memory-budget", "256MiB"]
    assert main(args + ["--engine", "bridge", "--out", "/tmp/sv-cli-a.pt"]) == 0
    assert "engine bridge" in capsys.readouterr().out
    assert main(args + ["--method", "hooks", "--out", "/tmp/sv-cli-b.pt"]) == 0
    cap = capsys.readouterr()
    assert "engine bridge" in cap.out and "--method is deprecated" in cap.err
    for p in ("/tmp/sv-cli-a.pt", "/tmp/sv-cli-b.pt"):
        Path(p).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ options and stats
def test_options_object_equals_keywords_and_stats_read_like_a_dict(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=5, seq=6)
    opts = validation.PatchOptions(edges="sample:12", batch_size=2, memory_budget="64MiB", progress=False)
    with pytest.raises(AttributeError):
        opts.batch_size = 3  # frozen
    st = validation.PatchStats()
    by_options = validation.patch_edges(tiny_model, graph, task, options=opts, stats=st)
    by_keywords = validation.patch_edges(tiny_model, graph, task, "sample:12", batch_size=2,
                                         memory_budget="64MiB", progress=False)
    torch.testing.assert_close(by_options, by_keywords, atol=0, rtol=0, equal_nan=True)
    assert int((~by_options.isnan()).sum()) == 12
    assert st.n_measured == st["n_measured"] == 12 and st.prompts_per_batch == 2 and st.n_batches == 3
    assert st.memory_budget == 64 * 2**20  # resolved to bytes once
    assert dict(st)["n_units"] == st.n_units and set(st) == set(st.as_dict())
    overridden = {}
    validation.patch_edges(tiny_model, graph, task, options=opts, batch_size=5, stats=overridden)
    assert overridden["prompts_per_batch"] == 5 and overridden["n_batches"] == 1  # keywords win
    with pytest.raises(validation.PatchError, match="unknown option"):
        validation.patch_edges(tiny_model, graph, task, options=opts, batchsize=5)
    with pytest.raises(validation.PatchError, match="stats must be"):
        validation.patch_edges(tiny_model, graph, task, options=opts, stats=[])
    with pytest.raises(validation.CircuitError, match="does not take out"):
        validation.evaluate_circuit(tiny_model, graph, task, [0], out="x.pt")


def test_batch_size_beyond_the_budget_warns(tiny_model, make_random_task, recwarn):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=64, seq=16)
    st = {}
    with pytest.warns(UserWarning, match="more than the memory budget"):
        validation.patch_edges(tiny_model, graph, task, [0, 1], batch_size=64, memory_budget="2MiB",
                               progress=False, stats=st)
    assert st["planned_peak_bytes"] > st["memory_budget"] and st["prompts_per_batch"] == 64
    recwarn.clear()
    validation.patch_edges(tiny_model, graph, task, [0, 1], batch_size=64, memory_budget="1GiB", progress=False)
    validation.patch_edges(tiny_model, graph, task, [0, 1], memory_budget="2MiB", progress=False)  # budget decides
    assert not [w for w in recwarn if "memory budget" in str(w.message)]  # negative controls
    with pytest.warns(UserWarning, match="more than the memory budget"):
        validation.evaluate_circuit(tiny_model, graph, task, [0], batch_size=64, memory_budget="2MiB")


def test_executor_from_spec_always_gives_an_executor():
    from types import SimpleNamespace

    from validation.executor import Executor, LocalExecutor

    ex = LocalExecutor()
    assert validation.executor_from_spec(ex) is ex
    for spec in ("local", None, {"backend": "local"}, SimpleNamespace(backend="local", address=None),
                 SimpleNamespace(executor="local", ray_address=None)):
        assert isinstance(validation.executor_from_spec(spec), LocalExecutor), spec
    for bad in ("ray-cluster", 3, {"backend": "local", "adress": "x"}, {"kind": "local"},
                SimpleNamespace(backend="slurm")):
        with pytest.raises(validation.PatchError):
            validation.executor_from_spec(bad)
    pytest.importorskip("ray")
    ray_ex = validation.executor_from_spec({"backend": "ray", "address": "127.0.0.1:1", "workers": 2, "threads": 3})
    assert isinstance(ray_ex, Executor) and (ray_ex.address, ray_ex.workers, ray_ex.threads) == ("127.0.0.1:1", 2, 3)
    from bench.matrix import Config
    from bench.worker import ExecutorSpec

    got = validation.executor_from_spec(ExecutorSpec(backend="ray", address="auto", workers=3, gpus_per_worker=0.5))
    assert isinstance(got, validation.RayExecutor) and (got.address, got.workers, got.gpus_per_worker) == ("auto", 3, 0.5)
    cfg = Config(models=["toy-gpt2-2l"], executor="ray", ray_address="auto", ray_workers=4, gpus_per_worker=0.25)
    got = validation.executor_from_spec(cfg)
    assert isinstance(got, validation.RayExecutor) and (got.address, got.workers, got.gpus_per_worker) == ("auto", 4, 0.25)
    assert isinstance(validation.executor_from_spec(Config(models=["toy-gpt2-2l"])), LocalExecutor)


# ------------------------------------------------------------------------------ errors
def test_a_bug_in_select_edges_is_not_disguised_as_a_graph_error(tiny_model, make_random_task, monkeypatch):
    from eap.graph import GraphError

    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=2, seq=5)
    with pytest.raises(GraphError, match="bad edge spec"):  # bad input: a clear GraphError
        validation.patch_edges(tiny_model, graph, task, "bogus:3", progress=False)

    def broken(self, spec, scores=None, seed=0):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Graph, "select_edges", broken)
    with pytest.raises(ZeroDivisionError):
        validation.patch_edges(tiny_model, graph, task, "sample:3", progress=False)


def test_stratified_k_returns_exactly_k_edges(tiny_model, tiny3_model):
    for model in (tiny_model, tiny3_model):
        graph = Graph.from_model(model)
        kinds = list(dict.fromkeys(graph.edge_kind))
        for k in (1, 3, len(kinds), 10, 25, 40, graph.n_edges - 1, graph.n_edges, graph.n_edges + 5):
            idx = graph.select_edges(f"stratified:{k}", seed=0)
            assert len(idx) == min(k, graph.n_edges) and len(idx.unique()) == len(idx), k
            got = [graph.edge_kind[i] for i in idx.tolist()]
            if k >= len(kinds):  # every kind drawn, each within one edge of its share
                for kd in kinds:
                    share = min(k, graph.n_edges) * graph.edge_kind.count(kd) / graph.n_edges
                    assert abs(got.count(kd) - share) <= 1.0 + 1e-9 and got.count(kd) >= 1, (k, kd)


# ------------------------------------------------------------------------------ Ctrl-C
def _interrupt_after(monkeypatch, n: int) -> None:
    import validation.units as vu

    real, calls = vu.compute_unit, []

    def stopping(job, ev, unit):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(unit)
        return real(job, ev, unit)

    monkeypatch.setattr(vu, "compute_unit", stopping)


def test_ctrl_c_says_how_many_units_are_saved_and_a_rerun_resumes(tiny_model, make_random_task, tmp_path,
                                                                   monkeypatch):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=4, seq=6)
    out = tmp_path / "t.pt"
    _interrupt_after(monkeypatch, 3)
    n_units = graph.n_receivers * 2
    with pytest.raises(validation.PatchInterrupted, match=f"3 of {n_units} units are saved in .*re-run") as info:
        validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=2, out=out)
    assert isinstance(info.value, KeyboardInterrupt)
    monkeypatch.undo()
    st = {}
    got = validation.patch_edges(tiny_model, graph, task, progress=False, batch_size=2, out=out, stats=st)
    assert st["n_units_resumed"] == 3 and st["n_units"] == n_units - 3
    torch.testing.assert_close(got, validation.patch_edges(tiny_model, graph, task, progress=False), atol=1e-12, rtol=0)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(validation.PatchInterrupted, match="nothing is kept without a results file"):
        validation.patch_edges(tiny_model, graph, task, progress=False)


def test_cli_ctrl_c_exits_130_with_the_message(capsys, monkeypatch, tmp_path):
    import sys

    from validation.__main__ import _cli

    _interrupt_after(monkeypatch, 2)
    monkeypatch.setattr(sys, "argv", ["validation", "--model", "toy-gpt2-2l", "--n", "2", "--edges", "all",
                                      "--no-progress", "--out", str(tmp_path / "c.pt")])
    assert _cli() == 130
    err = capsys.readouterr().err
    assert "2 of" in err and "units are saved" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ bench run --memory-budget
def test_bench_run_memory_budget_reaches_the_calls(tiny_model, make_random_task, monkeypatch, tmp_path, capsys):
    """--memory-budget is Config.memory_budget, carried in every worker job and passed as
    ``memory_budget=`` to patch_edges, eap.attribute and evaluate_circuit (no environment variable)."""
    import eap
    import bench.__main__ as bm
    import bench.matrix as matrix
    import bench.plugins as plugins
    import bench.worker as worker

    seen_cfg = {}

    def fake_run(cfg, out):  # stands for the matrix: the Config it would build the jobs from
        seen_cfg["cfg"] = cfg
        (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("ok")
        return {"run_stats": {"cells_computed": 0, "cells_reused": 0, "exact_computed": 0, "exact_reused": 0}}

    monkeypatch.setattr(bm, "run", fake_run)
    env_before = dict(os.environ)
    assert bm.main(["run", "--models", "toy-gpt2-2l", "--memory-budget", "96MiB", "--out", str(tmp_path / "r")]) == 0
    assert seen_cfg["cfg"].memory_budget == "96MiB" and dict(os.environ) == env_before  # no side channel
    assert bm.main(["run", "--models", "toy-gpt2-2l", "--memory-budget", "lots", "--out", str(tmp_path / "s")]) == 2
    assert "--memory-budget" in capsys.readouterr().err
    assert bm.main(["run", "--models", "toy-gpt2-2l", "--out", str(tmp_path / "t")]) == 0
    assert seen_cfg["cfg"].memory_budget is None  # negative control: without the flag, the default budget

    class Spawned(Exception):
        pass

    def fake_spawn(spec, *a, **k):  # the jobs the matrix hands a worker, through their JSON form
        seen_cfg["spec"] = worker.WorkerSpec.from_dict(spec.to_dict())
        raise Spawned

    monkeypatch.setattr(matrix, "_spawn", fake_spawn)
    cfg = matrix.Config(models=["toy-gpt2-2l"], tasks=["ioi"], methods=["eap"], sizes=[4], groups=1,
                        memory_budget="96MiB", figures=False)
    with pytest.raises(Spawned):
        matrix.run(cfg, tmp_path / "m")
    jobs = seen_cfg["spec"].jobs
    assert {type(j) for j in jobs} == {worker.ExactJob, worker.AttrJob, worker.FaithJob}
    assert all(j.memory_budget == "96MiB" for j in jobs)

    task = make_random_task(tiny_model, n=2, seq=5)
    monkeypatch.setattr(worker, "make_task", lambda *a, **k: task)
    calls = []

    def recorder(name, fn):
        def wrapped(*a, **k):
            calls.append((name, k.get("memory_budget")))
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(validation, "patch_edges", recorder("patch_edges", validation.patch_edges))
    monkeypatch.setattr(validation, "evaluate_circuit", recorder("evaluate_circuit", validation.evaluate_circuit))
    monkeypatch.setattr(plugins, "attribute", recorder("attribute", eap.attribute))
    for budget, where in (("96MiB", "a"), (None, "b")):  # None: the negative control
        ref = dict(model="tiny", task="t", task_target="t", task_kwargs={}, n=2, seed=0, memory_budget=budget)
        edir, out = tmp_path / where / "exact", str(tmp_path / where / "attr")
        calls.clear()
        for job in (worker.ExactJob(**ref, dir=str(edir), edges="all", groups=1, repeats=1),
                    worker.AttrJob(**ref, out=out, groups=1, method="eap", method_target="eap", method_kwargs={},
                                   repeats=0),
                    worker.FaithJob(**ref, dir=str(edir), methods=(("eap", out, str(tmp_path / where / "f.json")),))):
            job.run(tiny_model, False, "local")
        assert {name for name, _ in calls} == {"patch_edges", "attribute", "evaluate_circuit"}
        assert all(b == budget for _, b in calls), calls
