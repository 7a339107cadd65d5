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

:func:`agreement` takes scores and a truth you already have (one method or several) and
returns the same statistics with CIs, plus a scatter figure, without recomputing anything.

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


@dataclass
class Agreement:
    """What :func:`agreement` returns: per method ``stats[method][stat] = {value, lo, hi,
    boot_bias}``, its worst edges, over what the CIs are (``"prompt groups"`` or ``"edges"``), the
    number of edges compared, and the figure files written."""

    stats: dict[str, dict[str, dict[str, float]]]
    worst: dict[str, list[dict]]
    ci_over: str
    n_edges: int
    figure: list[Path] = field(default_factory=list)

    def table(self, stats: tuple[str, ...] = ("spearman", "kendall_abs", "pearson_abs", "recall@10")) -> str:
        """One line per method: each statistic with its 95% CI."""
        lines = [f"{self.n_edges:,} edges, 95% CIs over {self.ci_over}"]
        for method, st in self.stats.items():
            cells = [f"{k} {st[k]['value']:.3f} [{st[k]['lo']:.3f}, {st[k]['hi']:.3f}]" for k in stats if k in st]
            lines.append(f"  {method:<16} " + "  ".join(cells))
        return "\n".join(lines)


def _as_rows(x: Any, what: str) -> Any:
    import numpy as np

    arr = np.asarray(x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{what} must be [n_edges] or [groups, n_edges], got shape {arr.shape}")
    return arr


def agreement(
    scores: Any,
    truth: Any,
    graph: Any = None,
    *,
    names: list[str] | None = None,
    kinds: list[str] | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    figure: str | os.PathLike | None = None,
    worst: int = 5,
) -> Agreement:
    """Agreement statistics, with 95% CIs, of scores you already have with a truth you already
    have, and a scatter figure: nothing is recomputed (unlike :func:`fidelity`).

    ``scores``: one method's scores or ``{method: scores}``; ``truth``: exact effects (e.g. of
    ``validation.patch_edges``; NaN = edge not patched). Each is a tensor or array ``[n_edges]``,
    or ``[G, n_edges]`` with one row per prompt group (each row a mean over its group's prompts).
    Only edges where the truth and every method are finite are compared. CIs are over prompt
    groups (``bench.agreement.bootstrap``) when the truth and every method have the same G >= 2
    rows, else over edges (``bench.agreement.bootstrap_edges``: group rows are averaged first);
    ``ci_over`` says which. ``graph`` (an ``eap.Graph``) gives edge names and receiver kinds
    (per-kind statistics, colours); or pass ``names``/``kinds``. ``figure``: a path without
    suffix; ``<figure>.png`` and ``.pdf`` get one column per method, values (the worst edges
    labelled) above ranks (``bench.figures.scatter_figure``)."""
    import numpy as np

    from bench.agreement import bootstrap as boot_groups
    from bench.agreement import bootstrap_edges, statistics, worst_edges

    methods = {k: _as_rows(v, f"scores[{k!r}]") for k, v in (scores if isinstance(scores, dict) else
                                                             {"scores": scores}).items()}
    E = _as_rows(truth, "truth")
    n = E.shape[-1]
    for k, A in methods.items():
        if A.shape[-1] != n:
            raise ValueError(f"scores[{k!r}] has {A.shape[-1]} edges, the truth {n}")
    if graph is not None:
        names, kinds = list(graph.edge_names), list(graph.edge_kind)
    names = list(names) if names is not None else [f"edge {i}" for i in range(n)]
    kinds_arr = np.asarray(list(kinds) if kinds is not None else ["edge"] * n)
    if len(names) != n or len(kinds_arr) != n:
        raise ValueError(f"names/kinds must have one entry per edge ({n})")
    ok = np.isfinite(E).all(0) if E.ndim == 2 else np.isfinite(E)
    for A in methods.values():
        ok &= np.isfinite(A).all(0) if A.ndim == 2 else np.isfinite(A)
    sel = np.flatnonzero(ok)
    if sel.size < 2:
        raise ValueError(f"only {sel.size} edges have a finite truth and finite scores; need at least 2")
    k_sel, n_sel = kinds_arr[sel], [names[i] for i in sel]
    by_groups = E.ndim == 2 and E.shape[0] >= 2 and all(A.ndim == 2 and A.shape[0] == E.shape[0]
                                                        for A in methods.values())

    def stat_fn(a: Any, e: Any) -> dict[str, float]:
        return statistics(a, e, k_sel if kinds is not None else None)

    def mean(x: Any) -> Any:
        return (x.mean(0) if x.ndim == 2 else x)[sel]

    stats, worst_by, panels = {}, {}, []
    for method, A in methods.items():
        if by_groups:
            stats[method] = boot_groups(A[:, sel], E[:, sel], stat_fn, n_boot=bootstrap, seed=seed)
        else:
            stats[method] = bootstrap_edges(mean(A), mean(E), stat_fn, n_boot=bootstrap, seed=seed)
        worst_by[method] = worst_edges(mean(A), mean(E), n_sel, list(k_sel), worst)
        s = stats[method]
        panels.append({"a": mean(A), "e": mean(E), "kinds": k_sel, "names": np.asarray(n_sel),
                       "title": f"{method}: ρ={s['spearman']['value']:.2f}  τ={s['kendall']['value']:.2f}",
                       "note": f"edges: {sel.size:,}"})
    paths: list[Path] = []
    if figure is not None:
        from bench import figures

        fig = figures.scatter_figure(panels, "attribution vs exact per edge")
        target = Path(figure)
        paths = figures.save_figure(fig, target.parent, target.name)
    return Agreement(stats=stats, worst=worst_by, ci_over="prompt groups" if by_groups else "edges",
                     n_edges=int(sel.size), figure=paths)


def clear_cache() -> None:
    """Forget the models and exact truths this process holds."""
    _MODELS.clear()
    _TRUTH.clear()


__all__ = ["Agreement", "Fidelity", "agreement", "assert_fidelity", "check_fidelity", "clear_cache", "exact_truth",
           "fidelity"]
