"""The benchmark matrix: models x tasks x dataset sizes x attribution methods, run cell by cell.

A *cell* is (model, task, n prompts, method, edge selection, seed). Tasks and methods are
specs resolved by :mod:`bench.plugins` (built-in names, ``module:function``, entry points).
Its measurements:

* attribution: wall time (median of ``repeats`` after one warm-up) on all n prompts,
  interleaved with the floor pass of the same read-out (``bench.measure``) and, for a task with a
  read-out, also both again with full logits; peak memory of one warm call (MiB over the
  pre-call baseline, ``eap.measure``);
* exact patching of the selected edges (``validation.patch_edges``): the truth, computed once
  per prompt group with resumable results files ("cold": fingerprint, setup, patched forwards,
  file I/O, as ``stats`` reports them), and, when timing, one more call on all n prompts with
  ``out=None`` ("warm": compute and peak memory without file I/O), plus one plain forward of
  the prompts for forward-equivalents per edge;
* agreement (``bench.agreement``) between the two edge vectors with 95% bootstrap CIs over
  prompt groups (prompts split into G equal groups; both methods give one vector per group);
* circuit faithfulness (``bench.faithfulness``, with ``faithfulness=True``): curves of the
  method's top-k circuits and of the exact ranking's, evaluated exactly on all n prompts; MIB's
  CPR and CMD and the gaps to the exact ranking, merged into the cell's statistics.

Exact truth is cached under ``<cache>/exact/<key>/`` (key: model, task and its kwargs, n, seed,
edges, groups, device, dtype) and reused only when ``validation.fingerprint`` of every prompt
group (weights, prompts, per-prompt data, metric, edges, code versions) equals the stored one;
otherwise it is recomputed and the run says so (``run_stats['exact_stale']``).

Finished work is never lost: exact truth and attribution vectors are files, each finished cell
is ``<run>/cells/<id>.json`` (+ ``.npz`` with the mean vectors) and a re-run skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.plugins import Plugin, resolve_method, resolve_task, supports_intervention
from bench.report import slug
from bench.worker import AttrJob, ExactJob, ExecutorSpec, FaithJob, WorkerSpec, run_jobs
from bench.environment import environment
from eap.budget import BudgetError, parse_size
from eap.methods import REGISTRY as METHOD_REGISTRY

SCHEMA_VERSION = 2
DEFAULT_MODELS = ["toy-gpt2-2l", "toy-gpt2-4l", "toy-llama-4l", "toy-gemma2-4l"]
#: Tasks of the default run: the first two of these that ``eap.tasks.TASKS`` has.
PREFERRED_TASKS = ("ioi", "greater-than", "induction", "sva")
#: Methods of the default run: the registry's methods marked ``bench_default`` (``eap.methods``).
DEFAULT_METHODS = tuple(m.name for m in METHOD_REGISTRY if m.bench_default)
METHODS = DEFAULT_METHODS  # the older name
REPO = Path(__file__).resolve().parent.parent
#: Settings a run directory is tied to (cells measured under other values would not be comparable).
FIXED_KEYS = ("seed", "groups", "ig_steps", "post_norm", "batch_size", "device", "dtype")


class ConfigError(ValueError):
    """Settings of a run that cannot work together."""


def default_tasks() -> list[str]:
    from eap.tasks import TASKS

    return [t for t in PREFERRED_TASKS if t in TASKS][:2] or ["ioi"]


#: Command-line spellings accepted as config keys: --address, --workers (their Config names differ).
_FLAG_KEYS = {"address": "ray_address", "workers": "ray_workers"}
#: Negative flags accepted as config keys: no_figures = true -> figures = false, quiet -> progress.
_NEGATED_KEYS = {"no_figures": "figures", "no_faithfulness": "faithfulness", "quiet": "progress"}


def _config_keys(data: dict[str, Any], valid: set[str], path: Any) -> dict[str, Any]:
    """A config file's keys as ``Config`` fields: the command-line flag spellings are accepted
    (dashes, ``no_faithfulness = true``, ``quiet``, ``address``); anything else is a ConfigError
    listing the valid keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = _FLAG_KEYS.get(name, name)
        if name in _NEGATED_KEYS:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key} is a flag: true or false, got {value!r}")
            name, value = _NEGATED_KEYS[name], not value
        if name not in valid:
            raise ConfigError(f"{path}: unknown config key {key!r}; valid keys: {', '.join(sorted(valid))} "
                              f"(and the flag spellings {', '.join(sorted(_NEGATED_KEYS))})")
        if name in out:
            raise ConfigError(f"{path}: {key!r} sets {name!r} a second time")
        out[name] = value
    return out


@dataclass
class Config:
    """Everything that defines a run (flags or a JSON/TOML config file with these keys).

    ``tasks``: task specs (built-in names, ``module:function``, entry-point names); ``task``: one
    task (the older spelling, same as ``tasks=[task]``). ``task_kwargs``: keyword arguments of the
    task builder, ``{task: {...}}`` (with a single task also just ``{...}``). ``method_kwargs``:
    ``{method: {...}}`` for plug-in methods (built-ins take ``batch_size``, ``ig_steps`` and
    ``post_norm``: the gradient methods' option, ``eap.methods.POST_NORM_OPTION``; 'ignore' is
    EAP-IG's variant on post-norm families, for reproducing MIB numbers).
    ``threads``: torch CPU threads in the workers (default: torch's; 1 gives steadier timings on a
    busy machine). ``executor``: where the exact truth's units are computed, 'local' or 'ray'
    (``validation.executor.RayExecutor`` with ``ray_address``, ``ray_workers``,
    ``gpus_per_worker``; one set of Ray workers per model). The truth is the same bit for bit
    either way, so a cached truth is reused across executors; the warm timing (``repeats`` > 0)
    stays an in-process measurement.
    ``faithfulness``: compute circuit faithfulness curves (``bench.faithfulness``)
    for the cells of this run (cells finished before are reused as they are).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    sizes: list[int] = field(default_factory=lambda: [16, 32])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: list[str] | None = None
    task: str | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    edges: str = "all"
    groups: int = 8
    repeats: int = 3
    bootstrap: int = 200
    ig_steps: int = 5
    post_norm: str = "jacobian"
    batch_size: int | None = None
    memory_budget: int | str | None = None  # bytes or '2GiB': memory_budget= of the workers' calls (None: eap.budget's)
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    isolate: str = "model"
    cache_dir: str | None = None
    figures: bool = True
    faithfulness: bool = True
    worst: int = 10
    progress: bool = True
    executor: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    gpus_per_worker: float | None = None
    interventions: list[str] = field(default_factory=lambda: ["patching"])
    #: a built-in method that needs the corrupted prompts is left out of the other interventions

    def __post_init__(self) -> None:
        if self.task is not None:
            if self.tasks not in (None, [self.task]):
                raise ConfigError(f"give either task={self.task!r} or tasks={self.tasks!r}, not both")
            self.tasks, self.task = [self.task], None
        if self.tasks is None:
            self.tasks = default_tasks()
        self.tasks = list(dict.fromkeys(self.tasks))
        self.task_kwargs = _per_key(self.task_kwargs, self.tasks, "task")
        self.method_kwargs = _per_key(self.method_kwargs, self.methods, "method")
        try:  # a bad size fails here, not in a worker
            self.memory_budget is None or parse_size(self.memory_budget)
        except BudgetError as exc:
            raise ConfigError(f"--memory-budget: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "Config":
        text = Path(path).read_text()
        if str(path).endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        data = _config_keys(data.get("bench", data), {f.name for f in dataclasses.fields(cls)}, path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "task" in overrides or "tasks" in overrides:  # a task flag replaces the file's task list
            data.pop("task", None)
            data.pop("tasks", None)
        data.update(overrides)
        return cls(**data)

    def check(self) -> tuple[dict[str, Plugin], dict[str, Plugin]]:
        """Validate settings and resolve every task and method (imports plug-ins, so a bad
        plug-in fails here, before any model is loaded). Returns ({task: Plugin}, {method: Plugin})."""
        from eap.fast import POST_NORMS

        if self.post_norm not in POST_NORMS:
            raise ConfigError(f"post_norm must be one of {POST_NORMS}, got {self.post_norm!r}")
        if self.isolate not in ("model", "job", "none"):
            raise ConfigError("isolate must be 'model', 'job' or 'none'")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "ray":
            from validation.executor import ExecutorError, import_ray, parse_address

            try:  # says how to install Ray, or what is wrong with the address, before any model is loaded
                import_ray()
                parse_address(self.ray_address)
            except ExecutorError as exc:
                raise ConfigError(str(exc)) from exc
        if any(int(n) < 1 for n in self.sizes):
            raise ConfigError("sizes must be positive numbers of prompts")
        if not self.tasks or not self.methods or not self.models:
            raise ConfigError("a run needs at least one model, task and method")
        from eap.interventions import INTERVENTIONS

        bad = [i for i in self.interventions if i not in INTERVENTIONS]
        if bad or not self.interventions:
            raise ConfigError(f"unknown interventions {bad}; choose from {INTERVENTIONS}")
        tasks = {t: resolve_task(t) for t in self.tasks}
        methods = {m: resolve_method(m) for m in self.methods}
        return tasks, methods

    def method_kwargs_for(self, plugin: Plugin) -> dict[str, Any]:
        """Keyword arguments a method is called with: for built-ins ``batch_size`` and every
        option the method declares (``eap.methods.Option``) that this config sets, under the same
        name, to another value than the option's default (``ig_steps`` for ``eap-ig``,
        ``post_norm`` for the gradient methods); ``method_kwargs[spec]`` for plug-ins."""
        if plugin.builtin:
            own = {o.name: getattr(self, o.name) for o in plugin.method.options
                   if hasattr(self, o.name) and getattr(self, o.name) != o.default}  # defaults: the method's own
            return {"batch_size": self.batch_size, **own}
        return dict(self.method_kwargs.get(plugin.spec, {}))


def _per_key(kwargs: dict[str, Any] | None, keys: list[str], what: str) -> dict[str, dict[str, Any]]:
    """``{key: {...}}`` from either that form or, with a single key, the bare ``{...}``."""
    kwargs = dict(kwargs or {})
    if not kwargs:
        return {}
    if all(k in keys and isinstance(v, dict) for k, v in kwargs.items()):
        return kwargs
    if len(keys) == 1:
        return {keys[0]: kwargs}
    raise ConfigError(f"with several {what}s give {what}_kwargs per {what}: "
                     f"{{\"<{what}>\": {{...}}}} with <{what}> one of {keys}; got keys {sorted(kwargs)}")


def _kw_tag(kwargs: dict[str, Any] | None) -> str:
    if not kwargs:
        return ""
    return "-" + hashlib.sha1(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:8]


def exact_key(cfg: Config, model: str, task: str, n: int, intervention: str = "patching") -> str:
    """Cache directory name of the exact truth of one (model, task + kwargs, n, seed, edges,
    groups, device, dtype). Inside, the stored fingerprints decide whether it is still valid."""
    ident = {
        "model": _model_identity(model),
        "task": task,
        "task_kwargs": cfg.task_kwargs.get(task, {}),
        "n": n,
        "seed": cfg.seed,
        "edges": cfg.edges,
        "groups": cfg.groups,
        "device": cfg.device or "auto",
        "dtype": cfg.dtype or "float32",
    }
    tag = ""
    if intervention != "patching":  # patching's keys stay as they were
        ident["intervention"] = intervention
        tag = f"-{slug(intervention)}"
    h = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{slug(model)}-{slug(task)}-n{n}-s{cfg.seed}-{slug(cfg.edges)}{tag}-{h}"


def _model_identity(model: str) -> str:
    """Model name; for a local directory its absolute path and the config/weights' mtimes."""
    from eap.models import EMBEDDED_DIR, embedded_names

    p = Path(model).expanduser()
    if model in embedded_names():  # embedded models can be retrained: key on their files too
        p = EMBEDDED_DIR / model
    if p.is_dir():
        stamps = sorted(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in p.iterdir() if f.is_file())
        return f"{model}|{','.join(stamps)}"
    return model


def cell_id(cfg: Config, model: str, task: str, n: int, method: str, intervention: str = "patching") -> str:
    t = slug(task) + _kw_tag(cfg.task_kwargs.get(task))
    m = slug(method) + _kw_tag(cfg.method_kwargs.get(method))
    iv = "" if intervention == "patching" else f"__{slug(intervention)}"
    return f"{slug(model)}__{t}__n{n}__{m}__{slug(cfg.edges)}__s{cfg.seed}{iv}"


# --------------------------------------------------------------------------------- running
class WorkerError(RuntimeError):
    """A worker process failed; the message holds the worker's own error."""


def _spawn(spec: WorkerSpec, work: Path, cfg: Config, paths: list[str]) -> None:
    """Run worker jobs in this process or in a fresh one (see ``Config.isolate``).

    A fresh worker imports plug-ins by module path: it gets this package, ``paths`` (where the
    plug-ins resolved here live) and the caller's ``PYTHONPATH``, and runs in the same directory."""
    if cfg.isolate == "none":
        run_jobs(spec, progress=cfg.progress)
        return
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"jobs-{slug(spec.model)}-{os.getpid()}-{time.time_ns()}.json"
    path.write_text(json.dumps(spec.to_dict()))
    err = Path(str(path) + ".error")
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed,
    # so the RSS of a later measurement is not hidden by heap memory kept from an earlier one.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    entries = [str(REPO), *paths, *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(e for e in entries if e))
    proc = subprocess.run([sys.executable, "-m", "bench.worker", str(path)], env=env)
    path.unlink(missing_ok=True)
    if proc.returncode != 0:
        detail = err.read_text().strip() if err.exists() else f"exit code {proc.returncode} (see its output above)"
        err.unlink(missing_ok=True)
        raise WorkerError(f"worker for {spec.model} failed: {detail}")


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the matrix into ``run_dir``; returns the results dict (also written)."""
    task_plugins, method_plugins = cfg.check()
    run_dir = Path(run_dir)
    (run_dir / "cells").mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    old_cfg = run_dir / "config.json"
    if old_cfg.exists():
        prev = json.loads(old_cfg.read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
        diff = [k for k in FIXED_KEYS if prev.get(k, defaults.get(k)) != dataclasses.asdict(cfg)[k]]  # older: default
        if diff:
            raise ConfigError(f"{run_dir} was run with other {', '.join(diff)} ("
                             + ", ".join(f"{k}={prev.get(k)!r}" for k in diff) + "); use another --out")
    old_cfg.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    token = f"{os.getpid()}-{time.time_ns()}"
    paths = list(dict.fromkeys(p for pl in [*task_plugins.values(), *method_plugins.values()] for p in pl.paths))
    stats = {"exact_computed": 0, "exact_reused": 0, "exact_stale": 0, "cells_computed": 0, "cells_reused": 0}
    for model in cfg.models:
        jobs, todo, exact_dirs = [], [], []
        for task in cfg.tasks:
            tp = task_plugins[task]
            tkw = cfg.task_kwargs.get(task, {})
            for n, iv in ((n, iv) for n in cfg.sizes for iv in cfg.interventions):
                edir = cache / "exact" / exact_key(cfg, model, task, n, iv)
                usable = [m for m in cfg.methods if supports_intervention(method_plugins[m], iv)]
                pending = [m for m in usable
                           if not (run_dir / "cells" / f"{cell_id(cfg, model, task, n, m, iv)}.json").exists()]
                stats["cells_reused"] += len(usable) - len(pending)
                if not pending:
                    continue
                exact_dirs.append(edir)
                ivkw = {} if iv == "patching" else {"intervention": iv}
                ref = dict(model=model, task=task, task_target=tp.target, task_kwargs=tkw, n=n, seed=cfg.seed,
                           memory_budget=cfg.memory_budget)
                jobs.append(ExactJob(**ref, dir=str(edir), edges=cfg.edges, groups=cfg.groups, repeats=cfg.repeats,
                                     token=token, intervention=iv))
                for m in pending:
                    mp = method_plugins[m]
                    out = run_dir / "attr" / cell_id(cfg, model, task, n, m, iv)
                    todo.append((task, n, m, edir, out, iv))
                    if Path(str(out) + ".json").exists() and Path(str(out) + ".pt").exists():
                        continue  # measured before an interruption: only the agreement is missing
                    jobs.append(AttrJob(**ref, out=str(out), groups=cfg.groups, method=m, method_target=mp.target,
                                        method_kwargs={**cfg.method_kwargs_for(mp), **ivkw}, repeats=cfg.repeats))
                if cfg.faithfulness:
                    jobs.append(FaithJob(**ref, dir=str(edir), intervention=iv, methods=tuple(
                        (m, str(run_dir / "attr" / cell_id(cfg, model, task, n, m, iv)),
                         str(faith_path(run_dir, cell_id(cfg, model, task, n, m, iv)))) for m in pending)))
        if not todo:
            continue
        (run_dir / "attr").mkdir(exist_ok=True)
        spec = WorkerSpec(model=model, jobs=tuple(jobs), device=cfg.device, dtype=cfg.dtype, threads=cfg.threads,
                          progress=cfg.progress, describe_out=str(run_dir / "models" / f"{slug(model)}.json"),
                          executor=ExecutorSpec(backend=cfg.executor, address=cfg.ray_address,
                                                workers=cfg.ray_workers, gpus_per_worker=cfg.gpus_per_worker))
        if cfg.isolate == "job":
            for job in jobs:
                _spawn(dataclasses.replace(spec, jobs=(job,)), run_dir / "work", cfg, paths)
        else:
            _spawn(spec, run_dir / "work", cfg, paths)
        for edir in exact_dirs:
            meta = json.loads((edir / "meta.json").read_text())
            if meta.get("token") != token:
                stats["exact_reused"] += 1
            else:
                stats["exact_computed"] += 1
                stats["exact_stale"] += int(bool(meta.get("replaced_stale")))
        for task, n, m, edir, out, iv in todo:
            finish_cell(cfg, run_dir, model, task, n, m, edir, Path(str(out)), iv)
            stats["cells_computed"] += 1
    results = collect(cfg, run_dir, stats)
    return results


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def exact_cost(meta: dict, n_edges: int) -> dict[str, float]:
    """The exact-patching cost columns of a cell from the truth's ``meta.json``.

    ``compute_s``: warm patched forwards only (``stats['patch_s']`` of the ``out=None`` call on
    all prompts); ``setup_io_s``: the rest of a real run: caching forwards (warm ``setup_s``),
    fingerprint (warm) and results-file I/O (cold, summed over prompt groups); where the patching
    code reports no ``fingerprint_s``/``io_s``, the cold wall time not spent in setup or patched
    forwards stands for both. ``all_edges_s``: warm setup + patched forwards scaled to every edge
    of the graph (no fingerprint, no I/O). NaN where no warm call was timed (``repeats`` 0)."""
    cold, warm = meta.get("cold", {}), meta.get("warm") or {}
    n_sel = meta["n_edges_selected"]
    if cold.get("io_s") is not None and cold.get("fingerprint_s") is not None:
        cold_other = cold["io_s"] + (warm.get("fingerprint_s") if warm.get("fingerprint_s") is not None
                                     else cold["fingerprint_s"])
    else:
        cold_other = cold["wall_s"] - cold["setup_s"] - cold["patch_s"]
    compute = _nan(warm.get("patch_s"))
    setup = _nan(warm.get("setup_s"))
    return {
        "compute_s": compute,
        "setup_io_s": setup + max(0.0, cold_other),
        "all_edges_s": setup + compute * (n_edges / n_sel) if n_sel else float("nan"),
        "fwd_eq_per_edge": _nan(warm.get("fwd_eq_per_edge")),
        "edges_per_s": n_sel / compute if compute and compute > 0 else float("nan"),
        "peak_mib": _nan(warm.get("peak_mib")),
        "cold_wall_s": cold["wall_s"],
    }


def faith_path(run_dir: Path, cid: str) -> Path:
    """The faithfulness curves of one cell (``bench.worker.run_faith``)."""
    return Path(run_dir) / "faith" / f"{cid}.json"


def cell_faithfulness(run_dir: Path, cid: str, method: str, edir: Path, attr_file: Path,
                      n_boot: int, seed: int) -> dict | None:
    """The cell's faithfulness summary (``bench.faithfulness.summarize``) with the oracle curve
    from the exact truth's directory, or None without curves. Curves of other ranking scores
    than the cell's attribution now (e.g. replaced files) are reported stale, with NaN scores."""
    from bench import faithfulness as fa

    path = faith_path(run_dir, cid)
    if not path.exists():
        return None
    curves = json.loads(path.read_text())
    entry = curves["rankings"][method]
    if curves.get("version") != fa.CURVE_VERSION or entry["sha"] != fa.ranking_sha(fa.mean_scores(attr_file)):
        return {"stale": True, "stats": {k: {"value": float("nan"), "lo": float("nan"), "hi": float("nan")}
                                         for k in fa.STATS + fa.ORACLE_STATS}}
    oracle = edir / "faith.json"
    if oracle.exists():
        o = json.loads(oracle.read_text())
        if o.get("version") == fa.CURVE_VERSION and fa.ORACLE in o["rankings"]:
            curves["rankings"][fa.ORACLE] = o["rankings"][fa.ORACLE]
    summary = fa.summarize(curves, method, n_boot=n_boot, seed=seed)
    summary["cost"] = {**curves["cost"], "curve_fwd_eq": summary["n_circuits"] * curves["cost"]["fwd_eq_per_circuit"]}
    return summary


def finish_cell(cfg: Config, run_dir: Path, model: str, task: str, n: int, method: str, edir: Path,
                out: Path, intervention: str = "patching") -> dict:
    """Agreement statistics of one cell from its files; writes ``cells/<id>.json`` and ``.npz``."""
    import torch

    from bench.agreement import bootstrap, statistics, worst_edges

    edges = json.loads((edir / "edges.json").read_text())
    idx = np.asarray(edges["index"], dtype=np.int64)
    exact_meta = json.loads((edir / "meta.json").read_text())
    attr_meta = json.loads(Path(str(out) + ".json").read_text())
    E = torch.load(edir / "exact.pt").double().numpy()[:, idx]
    A = torch.load(str(out) + ".pt").double().numpy()[:, idx]
    if not np.isfinite(E).all():
        raise RuntimeError(f"exact truth in {edir} has NaN on requested edges")
    kinds = edges["kinds"]
    boot = bootstrap(A, E, lambda a, e: statistics(a, e, kinds), n_boot=cfg.bootstrap, seed=cfg.seed)
    a, e = A.mean(0), E.mean(0)
    desc_path = run_dir / "models" / f"{slug(model)}.json"
    cid = cell_id(cfg, model, task, n, method, intervention)
    faith = cell_faithfulness(run_dir, cid, method, edir, Path(str(out) + ".pt"), cfg.bootstrap, cfg.seed)
    if faith is not None:
        boot.update(faith.pop("stats"))
    cost = exact_cost(exact_meta, edges["n_edges"])
    timed = bool(attr_meta.get("repeats"))
    cell = {
        "id": cid,
        "model": model,
        "model_info": json.loads(desc_path.read_text()) if desc_path.exists() else {},
        "task": task,
        "task_kwargs": cfg.task_kwargs.get(task, {}),
        "n": n,
        "method": method,
        "intervention": intervention,
        "seed": cfg.seed,
        "edges_spec": cfg.edges,
        "n_edges": edges["n_edges"],
        "n_edges_selected": len(idx),
        "groups": A.shape[0],
        "bootstrap": cfg.bootstrap,
        "attribution": attr_meta,
        "exact": {**exact_meta, "cost": cost, "cache": str(edir)},
        # warm exact (setup + patched forwards, scaled to all edges) / warm attribution median
        "speedup": cost["all_edges_s"] / attr_meta["time_s"] if timed else float("nan"),
        "stats": boot,
        "by_kind_n": {k: int(sum(1 for x in kinds if x == k)) for k in dict.fromkeys(kinds)},
        "worst": worst_edges(a, e, edges["names"], kinds, cfg.worst),
        "metric_scale": {"max_abs_exact": float(np.abs(e).max()), "max_abs_attribution": float(np.abs(a).max())},
        "faithfulness": faith,
    }
    np.savez_compressed(run_dir / "cells" / f"{cid}.npz", attribution=a, exact=e,
                        names=np.asarray(edges["names"]), kinds=np.asarray(kinds))
    tmp = run_dir / "cells" / f"{cid}.json.tmp"
    tmp.write_text(json.dumps(cell, indent=1, allow_nan=True))
    tmp.replace(run_dir / "cells" / f"{cid}.json")
    return cell


def rescore(cfg: Config, run_dir: str | Path) -> dict:
    """Recompute every cell's agreement from the run's attribution and exact files (e.g. after
    the attribution files were replaced) and rewrite ``results.json``; returns it."""
    run_dir = Path(run_dir)
    for path in sorted((run_dir / "cells").glob("*.json")):
        c = json.loads(path.read_text())
        edir = Path(c["exact"]["cache"])
        finish_cell(cfg, run_dir, c["model"], c["task"], c["n"], c["method"], edir, run_dir / "attr" / c["id"],
                    intervention_of(c))
    return collect(cfg, run_dir)


def intervention_of(cell: dict) -> str:
    """A cell's intervention ('patching' for cells written before the intervention axis)."""
    return cell.get("intervention", "patching")


def load_cells(run_dir: str | Path) -> list[dict]:
    from eap.interventions import INTERVENTIONS

    cells = [json.loads(p.read_text()) for p in sorted(Path(run_dir, "cells").glob("*.json"))]
    order = {name: i for i, name in enumerate(DEFAULT_METHODS)}
    for c in cells:
        c.setdefault("intervention", "patching")
    return sorted(cells, key=lambda c: (c["model"], c["task"], c["n"], INTERVENTIONS.index(c["intervention"]),
                                        order.get(c["method"], 9), c["method"]))


def collect(cfg: Config, run_dir: str | Path, stats: dict | None = None) -> dict:
    """Gather every finished cell of a run into ``results.json`` (+ csv, md, figures)."""
    from bench import report

    run_dir = Path(run_dir)
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "eap-bench",
        "config": dataclasses.asdict(cfg),
        "environment": {**environment(cfg.device), **({"torch_threads": cfg.threads} if cfg.threads else {})},
        "seeds": {"task": cfg.seed, "edge_sample": cfg.seed, "bootstrap": cfg.seed, "torch": 0},
        "run_stats": stats or {},
        "cells": load_cells(run_dir),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    report.write_csv(results, run_dir / "results.csv")
    (run_dir / "summary.md").write_text(report.markdown(results))
    if cfg.figures and results["cells"]:
        from bench import figures

        figures.all_figures(results, run_dir, run_dir / "figures")
    return results
