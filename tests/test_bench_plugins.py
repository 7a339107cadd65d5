"""Bring your own task and method: ``module:function`` specs, entry points, isolated workers,
clear errors for broken plug-ins, the task axis, and no stale exact truth."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from bench.matrix import Config, WorkerError, run
from bench.plugins import PluginError, build_task, call_method, resolve_method, resolve_task

pytestmark = pytest.mark.usefixtures("one_thread")

# A custom task (IOI's prompts with another readout-free metric, so it is not the built-in one)
# and custom methods, written to a temporary module as a user would.
PLUGIN_SOURCE = '''
import torch
import eap

def build(model, n, seed=0, offset=0):
    base = eap.tasks.ioi(model, n, seed=seed + offset)
    def metric(logits, end, io, s, **_):
        rows = torch.arange(logits.shape[0])
        return logits[rows, end, io] - logits[rows, end, s]
    return eap.Task(base.clean, base.corrupted, metric, per_prompt=base.per_prompt, name="my-ioi")

def flipped(model, graph, task):
    return -eap.attribute(model, graph, task, progress=False)

def plain(model, graph, task, scale=1.0):
    return scale * eap.attribute(model, graph, task, progress=False)

def wrong_shape(model, graph, task):
    return torch.zeros(graph.n_senders, graph.n_receivers)

def with_nan(model, graph, task):
    out = eap.attribute(model, graph, task, progress=False)
    out[3] = float("nan")
    return out

def not_a_tensor(model, graph, task):
    return [0.0] * graph.n_edges

def integer(model, graph, task):
    return torch.zeros(graph.n_edges, dtype=torch.long)

def raises(model, graph, task):
    raise RuntimeError("my method broke")

def not_a_task(model, n, seed=0):
    return {"clean": None}

NOT_CALLABLE = 3
'''


@pytest.fixture
def plugdir(tmp_path, monkeypatch):
    """A directory with the user's module ``myplug`` on sys.path (as PYTHONPATH would put it)."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "myplug.py").write_text(PLUGIN_SOURCE)
    (d / "broken_on_import.py").write_text("import torch\nraise RuntimeError('this module is broken')\n")
    monkeypatch.syspath_prepend(str(d))
    return d


def test_resolve_builtins_and_module_function(plugdir):
    ioi = resolve_task("ioi")
    assert ioi.builtin and ioi.target == "ioi"
    eap_m = resolve_method("eap")
    assert eap_m.builtin
    t = resolve_task("myplug:build")
    assert not t.builtin and t.target == "myplug:build" and t.paths == (str(plugdir.resolve()),)
    assert resolve_method("myplug:flipped").fn.__name__ == "flipped"


@pytest.mark.parametrize("spec,kind,pattern", [
    ("nosuchmodule:fn", "task", r"cannot import module 'nosuchmodule'.*ModuleNotFoundError"),
    ("broken_on_import:fn", "method", r"cannot import module 'broken_on_import'.*RuntimeError: this module is broken"),
    ("myplug:nope", "method", r"module 'myplug' has no attribute 'nope'.*flipped"),
    ("myplug:NOT_CALLABLE", "method", r"not a callable"),
    ("no-such-name", "method", r"unknown method 'no-such-name'.*eap, eap-ig.*eap_bench.methods"),
    ("no-such-task", "task", r"unknown task 'no-such-task'.*ioi"),
])
def test_bad_specs_have_clear_errors(plugdir, spec, kind, pattern):
    resolve = resolve_task if kind == "task" else resolve_method
    with pytest.raises(PluginError, match=pattern):
        resolve(spec)


@pytest.mark.parametrize("name,pattern", [
    ("wrong_shape", r"returned shape \(\d+, \d+\).*expected \[n_edges\].*edge_sender"),
    ("with_nan", r"1 non-finite scores.*->"),
    ("not_a_tensor", r"returned list, expected a torch.Tensor"),
    ("integer", r"dtype torch.int64, expected a floating-point"),
    ("raises", r"'myplug:raises'.*failed: RuntimeError: my method broke"),
])
def test_bad_method_results_have_clear_errors(plugdir, tiny_model, name, pattern):
    import eap

    from conftest import random_task

    graph = eap.Graph.from_model(tiny_model)
    with pytest.raises(PluginError, match=pattern):
        call_method(resolve_method(f"myplug:{name}"), tiny_model, graph, random_task(tiny_model))


def test_bad_task_results_have_clear_errors(plugdir, tiny_model):
    with pytest.raises(PluginError, match=r"returned dict, expected an eap.Task"):
        build_task(resolve_task("myplug:not_a_task"), tiny_model, 4)
    with pytest.raises(PluginError, match=r"failed when called as fn\(model, 4, seed=0, bogus=...\).*TypeError"):
        build_task(resolve_task("myplug:build"), tiny_model, 4, kwargs={"bogus": 1})


def test_cli_reports_bad_plugins_with_exit_status_2(plugdir, tmp_path, capsys):
    from bench.__main__ import main

    rc = main(["run", "--models", "toy-gpt2-2l", "--methods", "eap,nosuchmodule:f", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "cannot import module 'nosuchmodule'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def plugin_runs(tmp_path_factory):
    """Two runs on toy-gpt2-2l with a custom task, sharing one exact cache: built-in eap only, and
    eap + the sign-flipped custom method. Plug-ins are imported by the isolated worker processes."""
    d = tmp_path_factory.mktemp("plugins")
    (d / "myplug.py").write_text(PLUGIN_SOURCE)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(d))
    base = tmp_path_factory.mktemp("runs")
    common = dict(models=["toy-gpt2-2l"], tasks=["myplug:build"], task_kwargs={"offset": 1}, sizes=[8], groups=2,
                  edges="stratified:60", repeats=0, bootstrap=20, isolate="model", progress=False,
                  cache_dir=str(base / "cache"), threads=1)
    only_eap = run(Config(**{**common, "isolate": "none"}, methods=["eap"], figures=False), base / "eap")
    both = run(Config(**common, methods=["eap", "myplug:flipped"]), base / "both")  # in a worker process
    yield base, only_eap, both
    mp.undo()


def test_custom_task_and_method_go_through_run(plugin_runs):
    base, only_eap, both = plugin_runs
    assert both["run_stats"]["exact_reused"] == 1  # the truth of the first run, through the shared cache
    cells = {c["method"]: c for c in both["cells"]}
    assert set(cells) == {"eap", "myplug:flipped"}
    assert all(c["task"] == "myplug:build" and c["task_kwargs"] == {"offset": 1} for c in cells.values())
    # the flipped method is exactly the negative of eap: every signed statistic flips sign
    for stat in ("spearman", "kendall", "pearson"):
        assert cells["myplug:flipped"]["stats"][stat]["value"] == pytest.approx(-cells["eap"]["stats"][stat]["value"])
    summary = (base / "both" / "summary.md").read_text()
    assert "| toy-gpt2-2l | myplug:build | 8 | myplug:flipped |" in summary
    fig = base / "both" / "figures" / "scatter_toy-gpt2-2l_myplug_build_n8.png"
    assert fig.stat().st_size > 1000


def test_sign_flipped_method_fails_the_gate_and_eap_passes(plugin_runs, capsys):
    from bench.__main__ import main

    base, _, _ = plugin_runs
    assert main(["gate", str(base / "eap"), "--min", "spearman=0.3"]) == 0
    capsys.readouterr()
    assert main(["gate", str(base / "both"), "--min", "spearman=0.3"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(" eap " in ln and "PASS" in ln for ln in lines)
    assert any("myplug:flipped" in ln and "FAIL" in ln for ln in lines)


def test_a_method_failing_in_the_worker_names_itself(plugdir, tmp_path):
    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[4], groups=1, edges="stratified:20", repeats=0,
                 bootstrap=0, methods=["myplug:raises"], isolate="model", progress=False, figures=False, threads=1)
    with pytest.raises(WorkerError, match=r"method 'myplug:raises' \(myplug:raises\) failed: RuntimeError: my method broke"):
        run(cfg, tmp_path / "r")


def test_entry_points_from_an_installed_distribution(tmp_path, monkeypatch):
    """A throwaway distribution (module + dist-info with entry points) on sys.path registers a
    task and a method by name, for this process and for the isolated worker."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "epplug.py").write_text(PLUGIN_SOURCE)
    info = site / "epplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [eap_bench.tasks]
        my-ioi = epplug:build
        [eap_bench.methods]
        flipped = epplug:flipped
        """))
    monkeypatch.syspath_prepend(str(site))
    m = resolve_method("flipped")
    assert m.target == "epplug:flipped" and str(site.resolve()) in m.paths
    assert resolve_task("my-ioi").target == "epplug:build"
    res = run(Config(models=["toy-gpt2-2l"], tasks=["my-ioi"], sizes=[4], groups=1, edges="stratified:30",
                     repeats=0, bootstrap=0, methods=["eap", "flipped"], isolate="model", progress=False,
                     figures=False, threads=1), tmp_path / "r")  # the worker finds the entry point's module
    cells = {c["method"]: c for c in res["cells"]}
    assert cells["flipped"]["task"] == "my-ioi"
    assert cells["flipped"]["stats"]["spearman"]["value"] == pytest.approx(-cells["eap"]["stats"]["spearman"]["value"])


def test_task_axis_and_kwargs(plugdir, tmp_path):
    """Two tasks in one run: one cell per (task, method), kwargs per task, a task column in the summary."""
    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi", "myplug:build"],
                 task_kwargs={"ioi": {"prompt_type": "BABA"}, "myplug:build": {"offset": 2}}, sizes=[4], groups=1,
                 edges="stratified:30", repeats=0, bootstrap=0, methods=["eap"], isolate="none", progress=False,
                 figures=True, threads=1)
    res = run(cfg, tmp_path / "r")
    assert [(c["task"], c["task_kwargs"]) for c in res["cells"]] == [("ioi", {"prompt_type": "BABA"}),
                                                                      ("myplug:build", {"offset": 2})]
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| toy-gpt2-2l | ioi | 4 | eap |" in summary and "| toy-gpt2-2l | myplug:build | 4 | eap |" in summary
    assert (tmp_path / "r" / "figures" / "agreement_vs_n.png").exists()
    # the older single-task spelling is a one-element axis; bare kwargs belong to the single task
    assert Config(task="ioi", task_kwargs={"prompt_type": "BABA"}).tasks == ["ioi"]
    assert Config(task="ioi", task_kwargs={"prompt_type": "BABA"}).task_kwargs == {"ioi": {"prompt_type": "BABA"}}
    from bench.matrix import ConfigError

    with pytest.raises(ConfigError, match="task_kwargs per task"):
        Config(tasks=["ioi", "myplug:build"], task_kwargs={"prompt_type": "BABA"})


def test_config_file_with_custom_task(plugdir, tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[bench]\nmodels = ["toy-gpt2-2l"]\ntasks = ["myplug:build"]\nmethods = ["eap", "myplug:plain"]\n'
                    '[bench.task_kwargs]\noffset = 3\n[bench.method_kwargs."myplug:plain"]\nscale = 2.0\n')
    cfg = Config.from_file(path)
    assert cfg.tasks == ["myplug:build"] and cfg.task_kwargs == {"myplug:build": {"offset": 3}}
    _, methods = cfg.check()
    assert cfg.method_kwargs_for(methods["myplug:plain"]) == {"scale": 2.0}
    assert cfg.method_kwargs_for(methods["eap"]) == {"batch_size": None}


def test_stale_exact_truth_is_recomputed(tmp_path, monkeypatch):
    """The exact cache is keyed by task name; when the task's code changes its prompts (same name,
    same kwargs), the stored fingerprint no longer matches and the truth is recomputed. (In this
    process: the edited module is dropped from ``sys.modules`` as a fresh worker would not have it.)"""
    import sys

    d = tmp_path / "mods"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    src = "import eap\n\ndef build(model, n, seed=0):\n    return eap.tasks.ioi(model, n, seed=seed + {OFFSET})\n"
    (d / "drifting.py").write_text(src.replace("{OFFSET}", "0"))
    common = dict(models=["toy-gpt2-2l"], tasks=["drifting:build"], sizes=[4], groups=1, edges="stratified:30",
                  repeats=0, bootstrap=0, methods=["eap"], isolate="none", progress=False, figures=False,
                  cache_dir=str(tmp_path / "cache"), threads=1)
    first = run(Config(**common), tmp_path / "a")
    assert first["run_stats"]["exact_computed"] == 1
    again = run(Config(**common), tmp_path / "b")  # same code: reused
    assert again["run_stats"]["exact_reused"] == 1 and again["run_stats"]["exact_stale"] == 0
    (d / "drifting.py").write_text(src.replace("{OFFSET}", "100"))  # a "fix" that changes the prompts
    monkeypatch.delitem(sys.modules, "drifting")
    fixed = run(Config(**common), tmp_path / "c")
    assert fixed["run_stats"]["exact_computed"] == 1 and fixed["run_stats"]["exact_stale"] == 1
    (meta,) = (tmp_path / "cache" / "exact").glob("*/meta.json")
    assert json.loads(meta.read_text())["replaced_stale"] is not None
    e_old = torch.tensor(first["cells"][0]["metric_scale"]["max_abs_exact"])
    e_new = torch.tensor(fixed["cells"][0]["metric_scale"]["max_abs_exact"])
    assert e_old != e_new  # new truth, not the old one


def test_stale_truth_after_a_metric_code_change(tmp_path, monkeypatch):
    """Same name, same prompts, a different metric body: needs a fingerprint that covers the
    metric's code (issue #8 item 6, validation side)."""
    import eap
    import validation

    d = tmp_path / "mods"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    src = ("import eap\n\ndef metric(logits, end, io, s, **_):\n    import torch\n    r = torch.arange(logits.shape[0])\n"
           "    return {BODY}\n\ndef build(model, n, seed=0):\n    t = eap.tasks.ioi(model, n, seed=seed)\n"
           "    return eap.Task(t.clean, t.corrupted, metric, per_prompt=t.per_prompt)\n")
    (d / "metricmod.py").write_text(src.replace("{BODY}", "logits[r, end, io] - logits[r, end, s]"))
    import importlib

    import metricmod

    model = eap.load_model("toy-gpt2-2l", device="cpu")
    graph = eap.Graph.from_model(model)
    edges = torch.arange(5)
    fp1 = validation.fingerprint(model, graph, metricmod.build(model, 4), edges)
    (d / "metricmod.py").write_text(src.replace("{BODY}", "logits[r, end, s] - logits[r, end, io]"))
    importlib.reload(metricmod)
    fp2 = validation.fingerprint(model, graph, metricmod.build(model, 4), edges)
    assert fp1 != fp2, "validation.fingerprint must cover the metric's code"
    common = dict(models=["toy-gpt2-2l"], tasks=["metricmod:build"], sizes=[4], groups=1, edges="stratified:30",
                  repeats=0, bootstrap=0, methods=["eap"], isolate="model", progress=False, figures=False,
                  cache_dir=str(tmp_path / "cache"), threads=1)
    (d / "metricmod.py").write_text(src.replace("{BODY}", "logits[r, end, io] - logits[r, end, s]"))
    run(Config(**common), tmp_path / "a")
    (d / "metricmod.py").write_text(src.replace("{BODY}", "logits[r, end, s] - logits[r, end, io]"))
    res = run(Config(**common), tmp_path / "b")
    assert res["run_stats"]["exact_stale"] == 1
