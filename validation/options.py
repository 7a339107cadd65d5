"""Typed options and statistics of exact patching and circuit evaluation.

:class:`PatchOptions` is one frozen object for what ``patch_edges``, ``patch_nodes`` and
``evaluate_circuit`` share (edges, scale, memory budget, batch size, engine, executor, results
file, shard, progress, readout); the functions still take the same keyword arguments, which
override ``options``. :class:`PatchStats` and :class:`CircuitStats` are what a run reports; they
read like the dicts they replace (``stats["patch_s"]``, ``dict(stats)``), and a dict passed as
``stats=`` is still filled with the same keys.

Engines (one vocabulary with ``eap.attribute``): ``'auto'`` (the fast block runner, or the
bridge where the runner does not implement the architecture, with a warning), ``'fast'``,
``'bridge'`` (hooks through the TransformerLens bridge: full forwards). The former ``method=``
keyword and its value ``'hooks'`` still work for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator

from validation.errors import PatchError

#: The engines of exact patching and circuit evaluation.
ENGINES = ("auto", "fast", "bridge")
#: Former names of engines (deprecated).
_OLD_ENGINES = {"hooks": "bridge"}


def resolve_engine(engine: str | None = None, method: str | None = None) -> str:
    """The engine from ``engine=`` or the deprecated ``method=`` ('hooks' = 'bridge')."""
    if method is not None:
        if engine is not None and engine != method:
            raise PatchError(f"pass engine= only (method= is its deprecated name), got engine={engine!r}, "
                             f"method={method!r}")
        warnings.warn("method= is deprecated for exact patching and circuit evaluation: use engine= "
                      "('auto' | 'fast' | 'bridge')", DeprecationWarning, stacklevel=4)
        engine = method
    engine = "auto" if engine is None else engine
    if engine in _OLD_ENGINES:
        warnings.warn(f"engine {engine!r} is deprecated: use {_OLD_ENGINES[engine]!r}", DeprecationWarning,
                      stacklevel=4)
        engine = _OLD_ENGINES[engine]
    if engine not in ENGINES:
        raise PatchError(f"engine must be 'auto', 'fast' or 'bridge', got {engine!r}")
    return engine


@dataclass(frozen=True)
class PatchOptions:
    """What exact patching (and circuit evaluation) is asked to do, besides model, graph, task.

    edges: the edge selection when the call gives none (``Graph.select_edges``; patch_edges).
    scale: sender differences are multiplied by it (1 = ordinary noising).
    memory_budget: bytes or a size like '2GiB' (None: a share of the free device memory);
        resolved to bytes once, at the public function (``eap.budget.resolve_budget``).
    batch_size: prompts per batch (None: from the budget; a warning if it exceeds the budget).
    engine: 'auto' | 'fast' | 'bridge'. executor: 'local', 'ray', a dict spec or an
        ``Executor`` (``validation.executor_from_spec``). out: results file (resumable).
    shard: (i, n) or 'i/n'. progress: a progress bar. readout: only the read-out logits
        (None: when the task has a read-out)."""

    edges: Any = None
    scale: float = 1.0
    memory_budget: int | float | str | None = None
    batch_size: int | None = None
    engine: str = "auto"
    executor: Any = "local"
    out: Any = None
    shard: Any = None
    progress: bool = True
    readout: bool | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            object.__setattr__(self, "engine", resolve_engine(self.engine))
        if not math.isfinite(float(self.scale)):
            raise PatchError(f"scale must be finite, got {self.scale}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise PatchError(f"batch_size (prompts per batch) must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "shard", parse_shard(self.shard))

    @classmethod
    def of(cls, options: "PatchOptions | None" = None, **overrides: Any) -> "PatchOptions":
        """``options`` (default: the defaults) with the keyword arguments given (None values of
        ``engine``/``method`` mean 'not given'); unknown keywords are a ``PatchError``."""
        base = options if options is not None else cls()
        if not isinstance(base, PatchOptions):
            raise PatchError(f"options must be a validation.PatchOptions, got {type(base).__name__}")
        method = overrides.pop("method", None)
        engine = overrides.pop("engine", None)
        if method is not None or engine is not None:
            overrides["engine"] = resolve_engine(engine, method)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise PatchError(f"unknown option(s) {unknown}; options are {sorted(names)} (and stats=)")
        return replace(base, **overrides) if overrides else base


def parse_shard(shard: Any) -> tuple[int, int] | None:
    """``(i, n)`` from ``(i, n)`` or ``'i/n'`` (0 <= i < n); None for None."""
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise PatchError(f"bad shard {shard!r}: use 'i/n' with 0 <= i < n")
        shard = (int(a), int(b))
    i, n = (int(v) for v in shard)
    if n < 1 or not 0 <= i < n:
        raise PatchError(f"bad shard {(i, n)}: need 0 <= i < n")
    return (i, n)


class _StatsMapping(Mapping):
    """Read a stats dataclass like the dict it replaces: ``stats["key"]``, ``dict(stats)``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fill(self, target: Any) -> None:
        """Copy these figures into ``target``: a dict (updated) or a stats object of this type."""
        if target is None:
            return
        if isinstance(target, dict):
            target.update(self.as_dict())
        elif isinstance(target, type(self)):
            for k in self._keys():
                setattr(target, k, getattr(self, k))
        else:
            raise PatchError(f"stats must be a dict or a {type(self).__name__}, got {type(target).__name__}")


@dataclass(eq=False)
class PatchStats(_StatsMapping):
    """What an exact-patching call reports (seconds, counts, bytes).

    setup_s: caching forwards; patch_s: patched forwards only (with several workers both are
    worker-seconds); fingerprint_s; io_s: results file; wall_s: computing the units.
    n_measured (items_per_s = n_measured / patch_s), n_requested, n_assigned, n_forwards,
    n_units, n_units_resumed, n_batches, rows_per_forward, copies_per_forward,
    prompts_per_batch, memory_budget and planned_peak_bytes (bytes), engine ('fast' | 'bridge'),
    path (its former name: 'fast' | 'hooks'), readout, fingerprint, executor, n_workers,
    n_units_retried (units given to another worker after one died), workers_lost, threads
    (torch threads the units were computed with)."""

    kind: str = "edges"
    n_measured: int = 0
    n_requested: int = 0
    n_assigned: int = 0
    setup_s: float = 0.0
    patch_s: float = 0.0
    fingerprint_s: float = 0.0
    io_s: float = 0.0
    items_per_s: float = float("nan")
    n_forwards: int = 0
    n_units: int = 0
    n_units_resumed: int = 0
    n_batches: int = 0
    rows_per_forward: int = 0
    copies_per_forward: int = 0
    prompts_per_batch: int = 0
    memory_budget: int = 0
    planned_peak_bytes: int = 0
    engine: str = "fast"
    path: str = "fast"
    readout: bool = False
    fingerprint: str = ""
    executor: str = "local"
    n_workers: int = 1
    wall_s: float = 0.0
    n_units_retried: int = 0
    workers_lost: int = 0
    threads: int = 0


@dataclass(eq=False)
class CircuitStats(_StatsMapping):
    """What a circuit evaluation reports: setup_s (corrupted forwards), eval_s (circuit
    forwards), n_circuits (baselines included), n_forwards, circuits_per_forward,
    prompts_per_batch, n_batches, rows_per_forward, memory_budget and planned_peak_bytes
    (bytes), engine ('fast' | 'bridge'), path ('fast' | 'hooks', its former name), readout."""

    setup_s: float = 0.0
    eval_s: float = 0.0
    n_circuits: int = 0
    n_forwards: int = 0
    circuits_per_forward: int = 0
    prompts_per_batch: int = 0
    n_batches: int = 0
    rows_per_forward: int = 0
    memory_budget: int = 0
    planned_peak_bytes: int = 0
    engine: str = "fast"
    path: str = "fast"
    readout: bool = False


def path_name(engine: str) -> str:
    """The former name of an engine that ran ('fast' | 'hooks'), kept in stats as ``path``."""
    return "hooks" if engine == "bridge" else engine
