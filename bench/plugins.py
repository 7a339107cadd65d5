"""Tasks and attribution methods from anywhere: one resolver for built-in names,
``module:function`` references and installed plug-ins (entry points).

A **task** is a callable ``builder(model, n, seed=0, **task_kwargs) -> eap.Task``. A **method**
follows ``eap.attribute``'s contract: ``fn(model, graph, task, **kwargs) -> Tensor[n_edges]``,
one score per edge in ``graph.edge_names`` order, in the metric's units with the noising sign
(score ~= metric(edge patched) - metric(clean)). Under an intervention other than 'patching'
(``bench run --interventions``) it is also called with ``intervention=`` ('zero', 'mean',
'mean-positional'; ``eap.interventions``) and scores patching with that replacement.

A spec (what a user writes after ``--tasks`` / ``--methods``) is resolved in this order:

1. ``module:function`` (``module`` a dotted import path on ``sys.path``/``PYTHONPATH``, or
   installed; ``function`` may be dotted, ``module:Class.method``);
2. a built-in name: ``eap.tasks.TASKS`` for tasks; the built-ins of ``eap.methods.REGISTRY``
   (``eap.METHODS``) for methods (built-ins win over plug-ins of the same name);
3. the name of an entry point in the group ``eap_bench.tasks`` / ``eap_bench.methods`` of an
   installed distribution, as pytest finds its ``pytest11`` plug-ins. A package registers one in
   its ``pyproject.toml``::

       [project.entry-points."eap_bench.methods"]
       mymethod = "mypackage.attribution:my_method"

Every failure raises :class:`PluginError` naming the spec and what went wrong (the module and
its import error, the missing attribute, a bad return value).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from eap.attribute import attribute
from eap.methods import REGISTRY as METHOD_REGISTRY
from eap.methods import FunctionMethod, Method

TASK_GROUP = "eap_bench.tasks"
METHOD_GROUP = "eap_bench.methods"


class PluginError(ValueError):
    """A task or method spec that cannot be resolved, or a plug-in that broke its contract."""


@dataclass(frozen=True)
class Plugin:
    """A resolved task or method.

    ``spec``: what the user wrote (used as the label in results); ``target``: what a worker
    process resolves to get the same callable (``module:function``, or the built-in name);
    ``paths``: directories a worker needs on ``sys.path`` to import ``target`` (the root of a
    module found through the parent's ``sys.path``, the location of an entry point's
    distribution); ``builtin``: True for the package's own tasks and methods."""

    role: str  # "task" | "method"
    spec: str
    target: str
    fn: Callable[..., Any]
    builtin: bool
    paths: tuple[str, ...] = ()
    method: Method | None = None  # methods: the entry of eap.methods.REGISTRY

    @property
    def kind(self) -> str:
        """The older name of ``role``."""
        return self.role


# ---------------------------------------------------------------------- built-in methods
class BuiltinMethod:
    """The callable of a method of ``eap.methods.REGISTRY``: ``eap.attribute`` with that method,
    ``fn(model, graph, task, *, batch_size=None, **options) -> Tensor[n_edges]`` (no progress bar,
    ``graph.scores`` untouched); ``options`` are the method's own (e.g. ``ig_steps`` of ``eap-ig``)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.__name__ = self.__qualname__ = method.name
        self.__doc__ = f"Built-in {method.name!r}: {method.summary} (eap.attribute)."

    def __call__(self, model: Any, graph: Any, task: Any, *, batch_size: int | None = None,
                 memory_budget: int | str | None = None, **options: Any) -> Tensor:
        return attribute(model, graph, task, self.method, batch_size=batch_size, memory_budget=memory_budget,
                         progress=False, write_graph=False, **options)


def builtin_methods() -> dict[str, BuiltinMethod]:
    """The built-in methods of ``eap.methods.REGISTRY``, by name, as bench callables."""
    return {m.name: BuiltinMethod(m) for m in METHOD_REGISTRY if m.builtin}


def supports_intervention(plugin: Plugin, intervention: str) -> bool:
    """Whether a method can be asked for ``intervention``: every method for 'patching'; a
    built-in when it declares the ``intervention`` option (``eap.methods.Method.supports``: not
    those that need the corrupted prompts); a plug-in is asked (it gets ``intervention=`` and may
    refuse by raising)."""
    return intervention == "patching" or plugin.method is None or plugin.method.supports(intervention)


def builtin_tasks() -> dict[str, Callable[..., Any]]:
    from eap.tasks import TASKS

    return dict(TASKS)


# ---------------------------------------------------------------------- resolving
def _root_of(module: Any) -> str | None:
    """The ``sys.path`` entry a module was imported from (None for built-in/namespace modules)."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    p = Path(file).resolve()
    if p.name == "__init__.py":
        p = p.parent
    depth = len(module.__name__.split("."))
    return str(p.parents[depth - 1])


def import_target(target: str, role: str, spec: str | None = None) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """Import ``module:function`` and return (the callable, the module's root directory)."""
    label = f"{role} {spec or target!r}" if spec and spec != target else f"{role} {target!r}"
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise PluginError(f"{label}: {target!r} is not 'module:function'")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError, or any error raised while the module runs
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {where.filename}:{where.lineno})" if where and not isinstance(exc, ModuleNotFoundError) else ""
        raise PluginError(f"{label}: cannot import module {mod_name!r}: {type(exc).__name__}: {exc}{at}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            have = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise PluginError(f"{label}: module {mod_name!r} has no attribute {attr!r}"
                              f" (callables there: {', '.join(have[:12]) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{label}: {target} is a {type(obj).__name__}, not a callable")
    root = _root_of(module)
    return obj, ((root,) if root else ())


def _entry_points(group: str) -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group=group)}


def _resolve(spec: str, role: str, builtins: dict[str, Callable[..., Any]], group: str) -> Plugin:
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"empty {role} spec")
    spec = spec.strip()
    if ":" in spec:
        fn, paths = import_target(spec, role)
        return Plugin(role, spec, spec, fn, False, paths)
    if spec in builtins:
        return Plugin(role, spec, spec, builtins[spec], True)
    eps = _entry_points(group)
    if spec in eps:
        ep = eps[spec]
        fn, paths = import_target(ep.value, role, spec=f"{spec!r} (entry point {group})")
        dist_root = str(ep.dist.locate_file("")) if ep.dist is not None else None
        return Plugin(role, spec, ep.value, fn, False, tuple(dict.fromkeys(paths + ((dist_root,) if dist_root else ()))))
    raise PluginError(
        f"unknown {role} {spec!r}: not 'module:function', not built in ({', '.join(builtins) or 'none'}), "
        f"and no installed entry point in group {group!r} "
        f"({', '.join(sorted(eps)) or 'none installed'})"
    )


def resolve_task(spec: str) -> Plugin:
    """A task spec -> :class:`Plugin` (see module docstring for the order)."""
    return _resolve(spec, "task", builtin_tasks(), TASK_GROUP)


def resolve_method(spec: str) -> Plugin:
    """A method spec -> :class:`Plugin` (see module docstring for the order). Its ``method`` is the
    entry of ``eap.methods.REGISTRY``: the built-in one, or the user's function registered there
    (``eap.methods.FunctionMethod`` under the spec, so ``eap.attribute(method=spec)`` also runs it)."""
    plugin = _resolve(spec, "method", builtin_methods(), METHOD_GROUP)
    if plugin.builtin:
        return dataclasses.replace(plugin, method=METHOD_REGISTRY.get(plugin.spec))
    method = METHOD_REGISTRY.register(FunctionMethod(plugin.spec, plugin.fn, plugin.target), replace=True)
    return dataclasses.replace(plugin, method=method)


# ---------------------------------------------------------------------- calling
def build_task(plugin: Plugin, model: Any, n: int, seed: int = 0, kwargs: dict | None = None) -> Any:
    """``plugin.fn(model, n, seed=seed, **kwargs)``, checked to be an ``eap.Task`` of n prompts."""
    from eap.task import Task

    try:
        task = plugin.fn(model, n, seed=seed, **(kwargs or {}))
    except Exception as exc:
        raise PluginError(f"task {plugin.spec!r} ({plugin.target}) failed when called as "
                          f"fn(model, {n}, seed={seed}{''.join(f', {k}=...' for k in (kwargs or {}))}): "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise PluginError(f"task {plugin.spec!r} ({plugin.target}) returned {type(task).__name__}, expected an eap.Task")
    if task.n_prompts != n:
        raise PluginError(f"task {plugin.spec!r} ({plugin.target}) returned {task.n_prompts} prompts, asked for {n}")
    return task


def check_scores(scores: Any, graph: Any, spec: str) -> Float[Tensor, " n_edges"]:
    """The method contract: a finite floating tensor of shape ``[graph.n_edges]``."""
    if not isinstance(scores, Tensor):
        raise PluginError(f"method {spec!r} returned {type(scores).__name__}, expected a torch.Tensor of shape "
                          f"[n_edges] = [{graph.n_edges}] in graph.edge_names order")
    if tuple(scores.shape) != (graph.n_edges,):
        hint = ""
        if tuple(scores.shape) == (graph.n_senders, graph.n_receivers):
            hint = " (a [n_senders, n_receivers] matrix: index it with graph.edge_sender, graph.edge_receiver)"
        raise PluginError(f"method {spec!r} returned shape {tuple(scores.shape)}, expected [n_edges] = "
                          f"[{graph.n_edges}] in graph.edge_names order{hint}")
    if not scores.dtype.is_floating_point:
        raise PluginError(f"method {spec!r} returned dtype {scores.dtype}, expected a floating-point tensor")
    bad = ~torch.isfinite(scores.detach())
    if bad.any():
        idx = bad.nonzero().flatten()[:3].tolist()
        raise PluginError(f"method {spec!r} returned {int(bad.sum())} non-finite scores (NaN/inf), e.g. "
                          + ", ".join(graph.edge_names[i] for i in idx))
    return scores


def call_method(plugin: Plugin, model: Any, graph: Any, task: Any, kwargs: dict | None = None) -> Tensor:
    """Run a method and check its result (:func:`check_scores`); returns detached CPU scores."""
    try:
        out = plugin.fn(model, graph, task, **(kwargs or {}))
    except Exception as exc:
        if plugin.builtin:
            raise
        raise PluginError(f"method {plugin.spec!r} ({plugin.target}) failed: {type(exc).__name__}: {exc}") from exc
    return check_scores(out, graph, plugin.spec).detach().cpu()
