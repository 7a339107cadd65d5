"""The one registry of attribution methods: each method is one object that knows its name, the
levels it scores (``'edge'``, ``'node'``), its typed options with defaults, and how it computes.

``eap.attribute`` looks a method up here and calls its ``compute``; bench's CLI help, plug-in
resolver (``bench.plugins``) and matrix read the same registry, and a user's method
(``module:function`` or an ``eap_bench.methods`` entry point) is registered into it as a
:class:`FunctionMethod`. ``eap.METHODS`` is the tuple of the built-in names.

Sign and units of every method: ``score ~= mean over prompts of metric(patched) -
metric(clean)`` in the metric's units ("noising"; ``eap.attribute``'s module docstring).

Adding a method is adding one entry to :data:`REGISTRY` (``REGISTRY.register(...)`` below):

* gradients at fixed points (EAP-style, on either engine): ``GradientPointsMethod(name,
  summary, points)``, ``points(**options) -> [(alpha, weight), ...]`` where the input of each
  backward pass is ``clean + (1 - alpha) * (corrupted - clean)`` and its gradient counts with
  ``weight`` (the first point must be the clean run, ``alpha = 1``);
* AtP* variants (bridge engine, edges only): ``AtPMethod(name, summary, AtPOptions(...))``;
* anything else: a subclass of :class:`StrategyMethod` (a strategy of ``eap.passes.Strategy``'s
  shape) or of :class:`Method` (its own ``compute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from jaxtyping import Float
from torch import Tensor

from eap.atp import VARIANTS, AtP, AtPOptions
from eap.fast import POST_NORMS, engine_for, refuse_bridge_for_post_norms
from eap.graph import Graph
from eap.hooks import require_edge_hooks
from eap.passes import LEVELS, AttributionError, GradientMethod, Strategy, run_strategy
from eap.task import Task

__all__ = [
    "AtPMethod", "FunctionMethod", "GradientPointsMethod", "Method", "Option", "REGISTRY", "Registry",
    "StrategyMethod", "get_method", "register",
]


@dataclass(frozen=True)
class Option:
    """One typed option of a method: ``name``, its ``type`` (int, float, bool, str), ``default``,
    a one-line ``doc``, for numbers an inclusive ``minimum``, for strings the allowed ``choices``."""

    name: str
    type: type
    default: Any
    doc: str
    minimum: float | None = None
    choices: tuple[Any, ...] = ()

    def check(self, value: Any, method: str) -> Any:
        """``value`` if it has this option's type (and minimum), else an ``AttributionError``."""
        ok = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise AttributionError(f"{method}: option {self.name} must be {self.type.__name__}, "
                                   f"got {type(value).__name__} {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise AttributionError(f"{self.name} must be >= {self.minimum:g}, got {value}")
        if self.choices and value not in self.choices:
            raise AttributionError(f"{method}: option {self.name} must be one of {self.choices}, got {value!r}")
        return value


class Method:
    """An attribution method (base class). ``levels``: what it scores; ``options``: its typed
    options; ``bench_default``: part of bench's default run; ``builtin``: shipped with eap."""

    def __init__(self, name: str, summary: str, *, levels: tuple[str, ...] = LEVELS,
                 options: tuple[Option, ...] = (), bench_default: bool = False, builtin: bool = False) -> None:
        self.name, self.summary, self.levels, self.options = name, summary, tuple(levels), tuple(options)
        self.bench_default, self.builtin = bench_default, builtin

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def check_level(self, level: str) -> None:
        """An ``AttributionError`` unless this method scores ``level``."""
        if level not in LEVELS:
            raise AttributionError(f"level must be 'edge' or 'node', got {level!r}")
        if level not in self.levels:
            raise AttributionError(f"{self.name!r} scores {' and '.join(l + 's' for l in self.levels)} only "
                                   f"(level={self.levels[0]!r}), not level={level!r}")

    def bind(self, options: dict[str, Any], shared: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every option's value: ``options`` (an unknown name is an error), else ``shared`` (keywords
        ``eap.attribute`` passes to every method, taken only where declared), else the default."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            have = ", ".join(f"{o.name} ({o.type.__name__}, default {o.default!r})" for o in self.options) or "none"
            raise AttributionError(f"method {self.name!r} has no option {', '.join(unknown)}; its options: {have}")
        given = {**{k: v for k, v in (shared or {}).items() if k in known}, **options}
        return {name: opt.check(given.get(name, opt.default), self.name) for name, opt in known.items()}

    def supports(self, intervention: str) -> bool:
        """Whether this method scores under ``intervention`` (``eap.interventions``): every method
        under 'patching'; the others only where it declares the ``intervention`` option (the
        methods that need the corrupted prompts themselves do not)."""
        return intervention == "patching" or any(o.name == "intervention" for o in self.options)

    def describe(self) -> str:
        """``name (option=default, ...)``: one line of CLI help."""
        opts = ", ".join(f"{o.name}={o.default!r}" for o in self.options)
        return f"{self.name}{f' ({opts})' if opts else ''}"

    def compute(
        self, model: Any, graph: Graph, task: Task, *, level: str, batch_size: int | None,
        memory_budget: int | float | str | None, progress: bool, write_graph: bool, engine: str,
        options: dict[str, Any],
    ) -> Float[Tensor, " n"]:
        """Scores ``[graph.n_edges]`` (``level='edge'``) or ``[graph.n_senders]`` (``'node'``);
        ``options`` as :meth:`bind` returns them. Inputs are checked by ``eap.attribute``."""
        raise NotImplementedError


class StrategyMethod(Method):
    """A method computed by a strategy (``eap.passes.Strategy``) through ``run_strategy``'s batch loop."""

    def strategy(self, model: Any, graph: Graph, scores: Float[Tensor, "n_senders n_receivers"], engine: str,
                 options: dict[str, Any]) -> Strategy:
        raise NotImplementedError

    def compute(self, model, graph, task, *, level, batch_size, memory_budget, progress, write_graph, engine,
                options):
        return run_strategy(model, graph, task, lambda scores: self.strategy(model, graph, scores, engine, options),
                            level=level, batch_size=batch_size, memory_budget=memory_budget, progress=progress,
                            write_graph=write_graph, label=self.name, engine=engine)


#: every gradient method's option: how a head's difference passes a post-norm (``eap.arch.postnorm``)
POST_NORM_OPTION = Option(
    "post_norm", str, "jacobian", "post-norm families: 'jacobian' (first-order term of exact patching) or 'ignore' "
    "(EAP-IG's attribute.py: raw pre-norm head differences, for reproducing MIB numbers); same scores elsewhere",
    choices=POST_NORMS)


class GradientPointsMethod(StrategyMethod):
    """Gradients at fixed points between the corrupted and the clean input, contracted at every
    receiver (``eap.passes.GradientMethod``), on the fast engine or the bridge. Every such method
    has the option ``post_norm`` (:data:`POST_NORM_OPTION`, after its own ``options``), passed to
    the fast engine (``eap.fast.FastEngine``)."""

    def __init__(self, name: str, summary: str, points: Callable[..., list[tuple[float, float]]], *,
                 options: tuple[Option, ...] = (), bench_default: bool = False, builtin: bool = False) -> None:
        super().__init__(name, summary, options=(*options, POST_NORM_OPTION), bench_default=bench_default,
                         builtin=builtin)
        self._points = points

    def points(self, **options: Any) -> list[tuple[float, float]]:
        """(alpha, weight) pairs: the input of each backward pass is ``clean + (1 - alpha) *
        (corrupted - clean)`` and its gradient counts with ``weight``. ``options`` this method
        does not declare are ignored (``eap.attribute`` passes ``ig_steps`` to every method)."""
        bound = self.bind({}, shared=options)
        bound.pop(POST_NORM_OPTION.name)
        return self._points(**{k: v for k, v in bound.items() if k not in _REPLACEMENT_OPTIONS})

    def strategy(self, model, graph, scores, engine, options):
        own = dict(options)
        post_norm = own.pop(POST_NORM_OPTION.name)
        points = self._points(**{k: v for k, v in own.items() if k not in _REPLACEMENT_OPTIONS})
        return GradientMethod(model, graph, points, scores, engine_for(model, engine, post_norm),
                              own.get("intervention", "patching"), own.get("reference"))


class AtPMethod(StrategyMethod):
    """One of AtP*'s variants (``eap.atp``): edges only, on the bridge engine."""

    def __init__(self, name: str, summary: str, atp: AtPOptions, *, builtin: bool = False) -> None:
        super().__init__(name, summary, levels=("edge",), builtin=builtin)
        self.atp = atp

    def check_level(self, level: str) -> None:
        if level == "node":
            raise AttributionError(
                f"{self.name!r} scores edges only (level='edge'): its QK-fix and GradDrop terms are not additive "
                "over a sender's edges, so a node score would not be the estimate of patching the node; use 'eap' "
                "for nodes"
            )
        super().check_level(level)

    def strategy(self, model, graph, scores, engine, options):
        if engine == "fast":
            raise AttributionError(f"{self.name!r} runs on the bridge engine only (eap.atp); use engine='auto' "
                                   "or 'bridge'")
        require_edge_hooks(model, f"{self.name!r} runs on the bridge engine only (eap.atp)")  # GPT-J: no such engine
        refuse_bridge_for_post_norms(model)  # the bridge's hooks have no post-norm Jacobian
        return AtP(model, graph, self.atp, scores)


class IGActivationsMethod(StrategyMethod):
    """EAP-IG over sender activations (``eap.ig_activations``), on the bridge engine."""

    def strategy(self, model, graph, scores, engine, options):
        from eap.ig_activations import IGActivations

        if engine == "fast":
            raise AttributionError(f"{self.name!r} runs on the bridge engine only; use engine='auto' or 'bridge'")
        refuse_bridge_for_post_norms(model)  # the bridge's hooks have no post-norm Jacobian
        return IGActivations(model, graph, options["ig_steps"], scores, options["intervention"], options["reference"],
                             gradient_through_group=options["gradient_through_group"])


class FlowRoutesMethod(StrategyMethod):
    """Information flow routes (``eap.flow_routes``): edges only, bridge engine, no gradient; the
    same scores under every intervention (it declares the option so that it runs under all)."""

    def strategy(self, model, graph, scores, engine, options):
        from eap.flow_routes import FlowRoutes

        if engine == "fast":
            raise AttributionError(f"{self.name!r} runs on the bridge engine only; use engine='auto' or 'bridge'")
        return FlowRoutes(model, graph, scores)


class FunctionMethod(Method):
    """A user's method: ``fn(model, graph, task, **kwargs) -> Tensor[n_edges]`` (edges only; its
    keyword arguments are its own, passed through unchecked). ``target``: where it came from
    (``module:function``)."""

    def __init__(self, name: str, fn: Callable[..., Tensor], target: str | None = None) -> None:
        super().__init__(name, (fn.__doc__ or "").strip().split("\n")[0], levels=("edge",), builtin=False)
        self.fn, self.target = fn, target or name

    def bind(self, options: dict[str, Any], shared: dict[str, Any] | None = None) -> dict[str, Any]:
        """Its own keyword arguments, plus ``intervention``/``reference`` when the call sets them."""
        asked = {k: v for k, v in (shared or {}).items() if k in _REPLACEMENT_OPTIONS}
        return {**asked, **options}

    def supports(self, intervention: str) -> bool:
        """A user's method is asked (it gets ``intervention=`` and may refuse by raising)."""
        return True

    def compute(self, model, graph, task, *, level, batch_size, memory_budget, progress, write_graph, engine,
                options):
        return self.fn(model, graph, task, **options)


class Registry:
    """Methods by name, in registration order (built-ins first)."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, method: Method, *, replace: bool = False) -> Method:
        """Add ``method``; a built-in name is never replaced, another name only with ``replace``."""
        old = self._methods.get(method.name)
        if old is not None and old is not method and (old.builtin or not replace):
            raise AttributionError(f"an attribution method named {method.name!r} is already registered ({old!r})")
        self._methods[method.name] = method
        return method

    def unregister(self, name: str) -> None:
        """Remove a user's method (built-ins stay)."""
        if name in self._methods and self._methods[name].builtin:
            raise AttributionError(f"the built-in method {name!r} cannot be removed")
        self._methods.pop(name, None)

    def get(self, method: "str | Method") -> Method:
        """The method of that name (a ``Method`` is returned as it is)."""
        if isinstance(method, Method):
            return method
        found = self._methods.get(method) if isinstance(method, str) else None
        if found is None:
            raise AttributionError(f"unknown attribution method {method!r}; choose one of {self.names()}")
        return found

    def names(self, builtin_only: bool = False) -> tuple[str, ...]:
        return tuple(n for n, m in self._methods.items() if m.builtin or not builtin_only)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(list(self._methods.values()))


#: The options of the methods that score under every intervention (``eap.interventions``).
INTERVENTION = Option("intervention", str, "patching",
                      "what a patched sender output becomes: patching | zero | mean | mean-positional")
REFERENCE = Option("reference", object, None, "prompts [m, seq] the means are over (default: task.reference)")
_REPLACEMENT_OPTIONS = ("intervention", "reference")
IG_STEPS = Option("ig_steps", int, 5, "interpolation points (1 = EAP)", minimum=1)
GRADIENT_THROUGH_GROUP = Option(
    "gradient_through_group", bool, True,
    "eap-ig-activations: True shifts the moved group's output (ig_steps=1 = EAP); False replaces it by a "
    "detached constant as hannamw/EAP-IG does (its MIB numbers; 'patching' only)")


def _eap_points() -> list[tuple[float, float]]:
    return [(1.0, 1.0)]


def _ig_points(ig_steps: int) -> list[tuple[float, float]]:
    return [(k / ig_steps, 1.0 / ig_steps) for k in range(ig_steps, 0, -1)]


def _clean_corrupted_points() -> list[tuple[float, float]]:
    return [(1.0, 0.5), (0.0, 0.5)]


REGISTRY = Registry()
REGISTRY.register(GradientPointsMethod(
    "eap", "gradient at the clean run (the seed notebook's method)", _eap_points,
    options=(INTERVENTION, REFERENCE), bench_default=True, builtin=True))
REGISTRY.register(GradientPointsMethod(
    "eap-ig", "gradients averaged over ig_steps inputs interpolated between corrupted and clean embeddings",
    _ig_points, options=(IG_STEPS,), bench_default=True, builtin=True))
REGISTRY.register(GradientPointsMethod(
    "clean-corrupted", "mean of the gradients at the clean and at the corrupted run", _clean_corrupted_points,
    bench_default=True, builtin=True))
for _name, (_fixes, _summary) in VARIANTS.items():
    REGISTRY.register(AtPMethod(_name, _summary, _fixes, builtin=True))
REGISTRY.register(IGActivationsMethod(
    "eap-ig-activations", "gradients averaged over runs with one sender group moved toward its replacement "
    "output (MIB's EAP-IG-activations)", options=(IG_STEPS, INTERVENTION, REFERENCE, GRADIENT_THROUGH_GROUP),
    builtin=True))
REGISTRY.register(FlowRoutesMethod(
    "information-flow-routes", "Ferrando & Voita's contribution shares on the clean run, no gradient (not a "
    "patching estimate)", levels=("edge",), options=(INTERVENTION, REFERENCE), builtin=True))


def get_method(method: "str | Method") -> Method:
    """``REGISTRY.get``: the registered method of that name."""
    return REGISTRY.get(method)


def register(method: Method, *, replace: bool = False) -> Method:
    """``REGISTRY.register``: add a method (e.g. a user's :class:`FunctionMethod`)."""
    return REGISTRY.register(method, replace=replace)
