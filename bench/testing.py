"""Fidelity gates in your own tests: how well does *your* method agree with exact patching on
*your* task?

    from bench.testing import assert_fidelity

    def test_my_method_is_faithful():
        assert_fidelity("toy-gpt2-4l", "mytasks:arith", "mymethods:fast_eap", min_spearman=0.5, min_recall_at_10=0.6)

:func:`fidelity` runs the method and exact patching (``validation.patch_edges``) on the same
edges and prompts and returns the agreement statistics of ``bench.agreement`` with 95%
bootstrap CIs over prompt groups. The exact truth is cached: in this process (keyed by
``validation.fingerprint`` of every prompt group, which covers weights, prompts, per-prompt data
and metric), so several tests on one model/task pay for it once, and on disk when ``cache_dir``
(or the environment variable ``EAP_BENCH_CACHE``) names a directory, through validation's
fingerprint-checked results files, so CI can keep it between runs.

:func:`assert_fidelity` fails with a readable message: each statistic, measured vs minimum, its
CI, and the edges where the method is most wrong. Minima are keyword arguments ``min_<stat>``,
with ``@`` spelled ``_at_`` and ``%`` spelled ``pct`` (``min_recall_at_10``, ``min_kendall_abs``,
``min_recall_at_1pct``), or a dict ``mins={"recall@10": 0.6}``.

Arguments: ``model`` an ``eap.load_model`` name (loaded once per process) or a loaded model;
``task`` a task spec (built-in name, ``module:function``, entry point; built with ``n`` prompts
and ``seed``), a builder callable, or an ``eap.Task``; ``method`` a method spec or a callable
``fn(model, graph, task, **method_kwargs) -> Tensor[n_edges]``; ``edges`` anything
``Graph.select_edges`` takes (``all``, ``stratified:K``, ``sample:K``, names or indices).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.plugins import Plugin, build_task, call_method, resolve_method, resolve_task

_MODELS: dict[str, Any] = {}
_TRUTH: dict[tuple[str, ...], torch.Tensor] = {}


@dataclass
class Fidelity:
    """Agreement of one method with exact patching: ``stats[stat] = {value, lo, hi, boot_bias}``
    (``fid["spearman"]`` is the point estimate), the worst edges, and what was compared."""

    model: str
    task: str
    method: str
    n: int
    edges: str
    n_edges: int
    n_edges_selected: int
    groups: int
    stats: dict[str, dict[str, float]]
    worst: list[dict] = field(default_factory=list)
    exact_cached: bool = False

    def __getitem__(self, stat: str) -> float:
        return self.stats[stat]["value"]

    def describe(self) -> str:
        sel = (f"{self.n_edges:,} edges" if self.n_edges_selected == self.n_edges
               else f"{self.n_edges_selected:,}/{self.n_edges:,} edges ({self.edges})")
        return (f"method {self.method!r} on task {self.task!r} (model {self.model}, {self.n} prompts in "
                f"{self.groups} groups, {sel})")


def _model(model: Any) -> tuple[Any, str]:
    if not isinstance(model, str):
        return model, type(model).__name__
    if model not in _MODELS:
        import eap

        _MODELS.clear()  # one model at a time
        _MODELS[model] = eap.load_model(model)
    return _MODELS[model], model


def _task(task: Any, model: Any, n: int, seed: int, kwargs: dict | None) -> tuple[Any, str]:
    from eap.task import Task

    if isinstance(task, Task):
        return task, task.name
    if isinstance(task, str):
        return build_task(resolve_task(task), model, n, seed, kwargs), task
    if callable(task):
        name = getattr(task, "__qualname__", repr(task))
        return build_task(Plugin("task", name, name, task, False), model, n, seed, kwargs), name
    raise TypeError(f"task must be a spec string, a builder callable or an eap.Task, got {type(task).__name__}")


def _method(method: Any) -> Plugin:
    if isinstance(method, str):
        return resolve_method(method)
    if callable(method):
        name = getattr(method, "__qualname__", repr(method))
        return Plugin("method", name, name, method, False)
    raise TypeError(f"method must be a spec string or a callable, got {type(method).__name__}")


def exact_truth(model: Any, graph: Any, subs: list, edges: torch.Tensor, cache_dir: str | os.PathLike | None = None,
                progress: bool = False) -> tuple[torch.Tensor, bool]:
    """Exact effects ``[G, n_edges]`` (NaN off the selection) of each prompt group, and whether
    they came from a cache (see module docstring)."""
    import validation

    fps = tuple(validation.fingerprint(model, graph, sub, edges, 1.0, "edges") for sub in subs)
    if fps in _TRUTH:
        return _TRUTH[fps], True
    root = cache_dir or os.environ.get("EAP_BENCH_CACHE")
    rows, cached = [], bool(root)
    for sub, fp in zip(subs, fps):
        out = None
        if root:
            out = Path(root) / f"edges-{fp[:24]}.pt"
            cached = cached and out.exists()
        rows.append(validation.patch_edges(model, graph, sub, edges=edges, out=out, progress=progress).float())
    _TRUTH[fps] = torch.stack(rows)
    return _TRUTH[fps], cached


def fidelity(
    model: Any,
    task: Any,
    method: Any = "eap",
    edges: Any = "stratified:300",
    seed: int = 0,
    *,
    n: int = 16,
    groups: int = 8,
    bootstrap: int = 200,
    task_kwargs: dict | None = None,
    method_kwargs: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    worst: int = 5,
) -> Fidelity:
    """Agreement statistics of ``method`` with exact patching on ``task`` (see module docstring).

    Prompts are split into G equal groups (G the largest divisor of n up to ``groups``); the
    method and exact patching each give one score vector per group; statistics are computed on
    the means, with 95% bootstrap CIs over groups (``bench.agreement.bootstrap``)."""
    import eap
    from bench.agreement import bootstrap as boot
    from bench.agreement import statistics, worst_edges
    from bench.worker import groups_of

    model, model_name = _model(model)
    task, task_name = _task(task, model, n, seed, task_kwargs)
    plugin = _method(method)
    graph = eap.Graph.from_model(model)
    idx = graph.select_edges(edges, seed=seed)
    parts = groups_of(task.n_prompts, groups)
    subs = [task.subset(p) for p in parts]
    E, cached = exact_truth(model, graph, subs, idx, cache_dir)
    A = torch.stack([call_method(plugin, model, graph, sub, method_kwargs).float() for sub in subs])
    sel = idx.numpy()
    kinds = [graph.edge_kind[i] for i in sel.tolist()]
    a, e = A.double().numpy()[:, sel], E.double().numpy()[:, sel]
    stats = boot(a, e, lambda x, y: statistics(x, y, kinds), n_boot=bootstrap, seed=seed)
    names = [graph.edge_names[i] for i in sel.tolist()]
    return Fidelity(model=model_name, task=task_name, method=plugin.spec, n=task.n_prompts, edges=str(edges),
                    n_edges=graph.n_edges, n_edges_selected=len(sel), groups=len(parts), stats=stats,
                    worst=worst_edges(a.mean(0), e.mean(0), names, kinds, worst), exact_cached=cached)


def _stat_name(key: str) -> str:
    """``recall_at_10`` -> ``recall@10``, ``recall_at_1pct`` -> ``recall@1%``."""
    return key.replace("_at_", "@").replace("pct", "%")


def check_fidelity(fid: Fidelity, mins: dict[str, float]) -> tuple[bool, str]:
    """(all minima met, the report) for a computed :class:`Fidelity`."""
    lines = [f"fidelity of {fid.describe()}:"]
    ok_all = True
    for stat, minimum in mins.items():
        s = fid.stats.get(stat)
        if s is None:
            ok_all = False
            lines.append(f"  FAIL {stat:<12} not a statistic (known: {', '.join(sorted(fid.stats)[:12])}, ...)")
            continue
        v, lo, hi = s["value"], s["lo"], s["hi"]
        ok = math.isfinite(v) and v >= minimum
        ok_all &= ok
        ci = f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "[no CI]"
        lines.append(f"  {'pass' if ok else 'FAIL'} {stat:<12} {v:6.3f} {ci:<16} {'>=' if ok else '<'} min {minimum:.3f}")
    if fid.worst:
        lines.append("worst edges (largest |attribution - exact|, metric units):")
        for w in fid.worst:
            lines.append(f"  {w['edge']:<24} ({w['kind']})  attribution {w['attribution']:+.4g}  exact {w['exact']:+.4g}"
                         f"  rank exact {w['rank_exact']}, attribution {w['rank_attribution']}")
    return ok_all, "\n".join(lines)


def assert_fidelity(model: Any, task: Any, method: Any = "eap", *, mins: dict[str, float] | None = None,
                    **kwargs: Any) -> Fidelity:
    """:func:`fidelity`, then ``AssertionError`` with a readable report when any minimum is not
    met. Minima: ``min_spearman=0.5``, ``min_recall_at_10=0.6``, ... or ``mins={...}``; other
    keyword arguments go to :func:`fidelity`. Returns the :class:`Fidelity`."""
    mins = dict(mins or {})
    for key in [k for k in kwargs if k.startswith("min_")]:
        value = kwargs.pop(key)
        if value is not None:
            mins[_stat_name(key[4:])] = float(value)
    if not mins:
        raise TypeError("assert_fidelity needs at least one minimum, e.g. min_spearman=0.5")
    fid = fidelity(model, task, method, **kwargs)
    ok, report = check_fidelity(fid, mins)
    if not ok:
        raise AssertionError(report)
    return fid


def clear_cache() -> None:
    """Forget the models and exact truths this process holds."""
    _MODELS.clear()
    _TRUTH.clear()


__all__ = ["Fidelity", "assert_fidelity", "check_fidelity", "clear_cache", "exact_truth", "fidelity"]
