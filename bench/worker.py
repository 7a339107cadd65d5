"""Run the measurement jobs of one model (in this process, or as ``python -m bench.worker JOBS.json``).

Tasks and methods arrive as targets (``module:function`` or a built-in name) and are imported
here by module path (:mod:`bench.plugins`), so a plug-in on ``PYTHONPATH`` or installed in the
environment works in a fresh process. A job's results go to files named in the job, so finished
work survives a crash; a failing worker process writes its error to ``JOBS.json.error`` for the
parent to report.

Jobs are typed (``ExactJob``, ``AttrJob``, ``FaithJob``; a ``WorkerSpec`` holds a model's
jobs, ``to_dict`` / ``from_dict`` their JSON form for a fresh process):

``ExactJob(dir=D, ...)``
    the exact truth of the selected edges on each prompt group, through
    ``validation.patch_edges(out=D/group{g}.pt)`` (resumable), on the executor the spec names
    (``WorkerSpec.executor``: an ``ExecutorSpec``, backend 'local' or 'ray' with address, workers,
    gpus_per_worker; one executor for all the model's jobs). Writes ``D/exact.pt``
    (``[G, n_edges]``, NaN on edges not selected), ``D/edges.json`` and then ``D/meta.json``,
    which marks a finished truth and stores the ``validation.fingerprint`` of every group: a
    truth whose fingerprints differ from the current ones (other weights, prompts, per-prompt
    data, metric, code) is deleted and recomputed, never reused. ``meta['cold']``: the truth
    run's costs summed over groups (wall, and the ``stats`` of ``patch_edges``: setup, patched
    forwards, fingerprint, I/O, where reported). With ``repeats > 0``, ``meta['warm']``: one more
    ``patch_edges`` call on all prompts with ``out=None`` (no file I/O), its stats, peak memory,
    and the forward-equivalents per edge (patched-forward seconds per edge / one plain forward).
``AttrJob(out=P, ...)``
    times the method on the whole task interleaved with the floor of the same read-out (and,
    for a task with a read-out, both again with full logits), measures the peak memory of one
    warm call, then computes one attribution vector per prompt group (untimed). Writes ``P.pt``
    (``[G, n_edges]``) and ``P.json``.
``FaithJob(dir=D, methods=((method, P, F), ...), ...)``
    faithfulness curves (``bench.faithfulness``): circuits of the top-k edges of each method's
    ranking (the mean of ``P.pt``) and, with exhaustive exact truth, of the exact ranking (the
    mean of ``D/exact.pt``), evaluated exactly in one ``validation.evaluate_circuit`` call.
    Writes ``F`` per method and the oracle's ``D/faith.json``; a file whose ranking fingerprint
    and curve version match is kept, not recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.measure import PeakMemory, floor_pass, full_logits, median, readout_mode, time_interleaved
from bench.plugins import build_task, call_method, resolve_method, resolve_task

_MODELS: dict[tuple, Any] = {}


# ------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One measurement of one model (``model``: its name), task (``task``: the label;
    ``task_target``: what the worker resolves, ``bench.plugins``; ``task_kwargs``), ``n``
    prompts and ``seed``. Subclasses say what is measured and run it (``run``)."""

    model: str
    task: str
    task_target: str
    task_kwargs: dict[str, Any]
    n: int
    seed: int

    def run(self, model: Any, progress: bool, executor: Any) -> Any:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"job": _JOB_NAMES[type(self)], **dataclasses.asdict(self)}


@dataclass(frozen=True)
class ExactJob(Job):
    """The exact truth of the selected ``edges`` per prompt group into ``dir`` (``run_exact``)."""

    dir: str
    edges: str
    groups: int
    repeats: int
    token: str | None = None
    intervention: str = "patching"  # eap.interventions
    memory_budget: int | str | None = None  # bytes or '2GiB' for patch_edges (None: eap.budget's default)

    def run(self, model: Any, progress: bool, executor: Any) -> dict:
        return run_exact(model, self, progress, executor)


@dataclass(frozen=True)
class AttrJob(Job):
    """Timing, memory and per-group vectors of one method into ``out`` (``run_attr``)."""

    out: str
    groups: int
    method: str
    method_target: str
    method_kwargs: dict[str, Any]
    repeats: int
    memory_budget: int | str | None = None  # bytes or '2GiB' for a built-in method's eap.attribute

    def run(self, model: Any, progress: bool, executor: Any) -> dict:
        return run_attr(model, self, progress)


@dataclass(frozen=True)
class FaithJob(Job):
    """Faithfulness curves (``run_faith``): ``methods`` = ``[(method, attribution file stem,
    curve file)]``; the oracle's curves go to ``dir``."""

    dir: str
    methods: tuple[tuple[str, str, str], ...]
    intervention: str = "patching"  # what out-of-circuit edges carry (eap.interventions)
    memory_budget: int | str | None = None  # bytes or '2GiB' for evaluate_circuit

    def run(self, model: Any, progress: bool, executor: Any) -> None:
        run_faith(model, self, progress)


#: The tag of each job type in a jobs file (the only place a name picks a class: reading JSON).
_JOB_TYPES: dict[str, type[Job]] = {"exact": ExactJob, "attr": AttrJob, "faith": FaithJob}
_JOB_NAMES = {cls: name for name, cls in _JOB_TYPES.items()}


def job_from_dict(data: dict[str, Any]) -> Job:
    """A job from its ``to_dict`` form (``job``: 'exact', 'attr' or 'faith')."""
    data = dict(data)
    tag = data.pop("job", None)
    if tag not in _JOB_TYPES:
        raise ValueError(f"unknown job {tag!r}; expected one of {sorted(_JOB_TYPES)}")
    if tag == "faith":
        data["methods"] = tuple(tuple(m) for m in data["methods"])
    return _JOB_TYPES[tag](**data)


@dataclass(frozen=True)
class ExecutorSpec:
    """Where exact truth is computed: ``backend`` 'local' or 'ray' (``validation.executor.RayExecutor``
    with ``address``, ``workers``, ``gpus_per_worker``)."""

    backend: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    def make(self) -> Any:
        """A new ``validation.Executor`` (``LocalExecutor`` or ``RayExecutor``), through
        ``validation.executor_from_spec``; the caller closes it."""
        from validation.executor import executor_from_spec

        return executor_from_spec(self)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process does: load ``model`` once (``device``, ``dtype``, ``threads``
    torch threads), describe it into ``describe_out``, run ``jobs`` in order."""

    model: str
    jobs: tuple[Job, ...]
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    progress: bool = True
    describe_out: str | None = None
    executor: ExecutorSpec = ExecutorSpec()

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("jobs", "executor")},
                "executor": dataclasses.asdict(self.executor), "jobs": [j.to_dict() for j in self.jobs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerSpec":
        data = dict(data)
        data["jobs"] = tuple(job_from_dict(j) for j in data.get("jobs", ()))
        data["executor"] = ExecutorSpec(**(data.get("executor") or {}))
        return cls(**data)


def load(model_name: str, device: str | None, dtype: str | None) -> Any:
    """Load (and keep, per process) a model; dtype by name ('float32', ...) or None."""
    key = (model_name, device, dtype)
    if key not in _MODELS:
        import eap

        _MODELS.clear()  # one model at a time keeps memory measurements honest
        _MODELS[key] = eap.load_model(model_name, device=device, dtype=getattr(torch, dtype) if dtype else None)
    return _MODELS[key]


def make_task(model: Any, spec: str, n: int, seed: int, kwargs: dict | None = None) -> Any:
    """The task of a cell: ``spec`` (a built-in name, ``module:function`` or an entry point)
    called as ``fn(model, n, seed=seed, **kwargs)``."""
    return build_task(resolve_task(spec), model, n, seed, kwargs)


def groups_of(n: int, groups: int) -> list[torch.Tensor]:
    """Split prompts 0..n-1 into G equal contiguous groups, G the largest divisor of n <= groups."""
    g = max(d for d in range(1, min(groups, n) + 1) if n % d == 0)
    size = n // g
    return [torch.arange(i * size, (i + 1) * size) for i in range(g)]


def prompt_groups(model: Any, task: Any, job: Any) -> list[Any]:
    """The task split into the job's prompt groups (:func:`groups_of`). Before any split, the
    check ``eap.attribute`` makes for its batches: a metric closing over data of all prompts is a
    ``TaskError`` naming ``per_prompt=`` and bench's way out, ``--groups 1``."""
    groups = groups_of(job.n, job.groups)
    if len(groups) > 1:
        task.check_split(model.cfg.d_vocab, f"bench (--groups {job.groups}: {len(groups)} prompt groups, for the "
                         "bootstrap confidence intervals)", "run bench with --groups 1 (one prompt group: it works, "
                         "but gives no confidence intervals)")
    return [task.subset(idx) for idx in groups]


class EngineLog(logging.Handler):
    """The engines ``eap.attribute`` reports while the block runs (its INFO record's
    ``eap_engine``/``eap_engine_reason``): :meth:`summary` is ``{"engine", "engine_reason"}`` for a
    cell, "not reported" for a method that never calls ``eap.attribute``. The logger's level is
    restored on exit."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[str, str] = {}
        self.logger = logging.getLogger("eap.attribute")

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "eap_engine", None)
        if name:
            self.seen.setdefault(name, getattr(record, "eap_engine_reason", ""))

    def __enter__(self) -> "EngineLog":
        self.old_level = self.logger.level
        self.logger.addHandler(self)
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)

    def summary(self) -> dict[str, str]:
        if not self.seen:
            return {"engine": "not reported", "engine_reason": "the method did not call eap.attribute"}
        return {"engine": "+".join(sorted(self.seen)), "engine_reason": "; ".join(r for r in self.seen.values() if r)}


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _job_task(model: Any, job: "Job") -> Any:
    return make_task(model, job.task_target, job.n, job.seed, job.task_kwargs)


def _iv(job: "ExactJob | FaithJob") -> dict:
    """The job's intervention as keyword arguments (none for 'patching': calls as before)."""
    return {} if job.intervention == "patching" else {"intervention": job.intervention}


def _stat(stats: dict, key: str) -> float | None:
    v = stats.get(key)
    return None if v is None else float(v)


def _fingerprints(model: Any, graph: Any, subs: list, edges: torch.Tensor) -> list[str]:
    import validation

    return [validation.fingerprint(model, graph, sub, edges, 1.0, "edges") for sub in subs]


def _what_differs(old: dict, model: Any, graph: Any, sub: Any, edges: torch.Tensor) -> list[str]:
    """Names of the fingerprint parts that changed (empty when the parts are not available)."""
    try:
        from validation.store import fingerprint_parts

        now = fingerprint_parts(model, graph, sub, edges, 1.0, "edges")
    except (ImportError, TypeError) as exc:  # validation without per-part fingerprints
        _log(f"cannot say which fingerprint parts differ ({type(exc).__name__}: {exc})", True)
        return []
    before = old.get("fingerprint_parts") or {}
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))


def run_exact(model: Any, job: "ExactJob", progress: bool = True, executor: Any = "local") -> dict:
    import eap
    import validation
    from validation.store import StoreLocked

    out = Path(job.dir)
    out.mkdir(parents=True, exist_ok=True)
    graph = eap.Graph.from_model(model)
    task = _job_task(model, job)
    edges = graph.select_edges(job.edges, seed=job.seed)
    subs = prompt_groups(model, task, job)
    fps = _fingerprints(model, graph, subs, edges)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    stale = None
    if meta is not None and meta.get("fingerprints") != fps:
        differs = _what_differs(meta, model, graph, subs[0], edges)
        stale = {"old_fingerprint": (meta.get("fingerprints") or ["?"])[0][:16], "differs": differs}
        _log(f"exact truth in {out} was computed for other inputs"
             f"{' (' + ', '.join(differs) + ' differ)' if differs else ''}: recomputing", True)
        shutil.rmtree(out)
        out.mkdir(parents=True)
        meta = None
    device = next(model.parameters()).device
    if meta is None:
        (out / "edges.json").write_text(json.dumps({
            "index": edges.tolist(),
            "names": [graph.edge_names[i] for i in edges.tolist()],
            "kinds": [graph.edge_kind[i] for i in edges.tolist()],
            "n_edges": graph.n_edges,
        }))
        rows, cold = [], {"wall_s": 0.0, "setup_s": 0.0, "patch_s": 0.0, "fingerprint_s": 0.0, "io_s": 0.0,
                          "peak_mib": 0.0}
        for g, sub in enumerate(subs):
            _log(f"exact {job.model} {job.task} n={job.n} group {g + 1}/{len(subs)}: {len(edges)} edges",
                 progress)
            st: dict[str, Any] = {}
            path = out / f"group{g}.pt"
            patch = functools.partial(validation.patch_edges, model, graph, sub, edges=edges, seed=job.seed,
                                      out=str(path), progress=progress, stats=st, executor=executor,
                                      memory_budget=job.memory_budget, **_iv(job))
            with PeakMemory(device) as pm:
                t0 = time.perf_counter()
                try:
                    res = patch()
                except validation.StoreError as exc:  # a partial file from other inputs (an interrupted stale run)
                    if isinstance(exc, StoreLocked):  # another process writes it: never delete
                        raise
                    path.unlink()
                    res = patch()
                cold["wall_s"] += time.perf_counter() - t0
            for key in ("setup_s", "patch_s", "fingerprint_s", "io_s"):  # contract 1; None where not reported
                v = _stat(st, key)
                cold[key] = None if v is None or cold[key] is None else cold[key] + v
            cold["peak_mib"] = max(cold["peak_mib"], pm.mib)
            cold["memory_method"] = pm.method
            rows.append(res.detach().float().cpu())
        torch.save(torch.stack(rows), out / "exact.pt")
        meta = {
            "n_edges_selected": int(len(edges)),
            "n_edges": graph.n_edges,
            "groups": len(rows),
            "cold": cold,
            "warm": None,
            "fingerprints": fps,
            "token": job.token,
            "replaced_stale": stale,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            from validation.store import fingerprint_parts

            meta["fingerprint_parts"] = fingerprint_parts(model, graph, subs[0], edges, 1.0, "edges")
        except (ImportError, TypeError) as exc:  # validation without per-part fingerprints
            _log(f"fingerprint parts not stored ({type(exc).__name__}: {exc})", True)
        _write_json(meta_path, meta)
    if job.repeats > 0 and not meta.get("warm"):
        meta["warm"] = _warm_exact(model, graph, task, edges, job, progress)
        _write_json(meta_path, meta)
    return meta


def _warm_exact(model: Any, graph: Any, task: Any, edges: torch.Tensor, job: "ExactJob", progress: bool) -> dict:
    """One more exact call on all prompts, ``out=None``: compute and memory without file I/O."""
    import validation

    device = next(model.parameters()).device
    _log(f"exact (warm, timed) {job.model} {job.task} n={job.n}: {len(edges)} edges", progress)
    st: dict[str, Any] = {}
    with PeakMemory(device) as pm:
        t0 = time.perf_counter()
        validation.patch_edges(model, graph, task, edges=edges, seed=job.seed, out=None, progress=False, stats=st,
                               memory_budget=job.memory_budget, **_iv(job))
        wall = time.perf_counter() - t0
    fwd = validation.forward_seconds(model, task)
    patch_s, n = _stat(st, "patch_s"), int(st.get("n_measured", len(edges)))
    return {
        "wall_s": wall,
        "setup_s": _stat(st, "setup_s"),
        "patch_s": patch_s,
        "fingerprint_s": _stat(st, "fingerprint_s"),
        "n_measured": n,
        "forward_s": fwd,
        "fwd_eq_per_edge": patch_s / n / fwd if patch_s is not None and n else None,
        "peak_mib": pm.mib,
        "memory_method": pm.method,
        "path": st.get("path"),
        "rows_per_forward": st.get("rows_per_forward"),
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    tmp.replace(path)


def run_attr(model: Any, job: "AttrJob", progress: bool = True) -> dict:
    import eap

    graph = eap.Graph.from_model(model)
    task = _job_task(model, job)
    method = resolve_method(job.method_target)
    kw = dict(job.method_kwargs)
    if method.builtin and job.memory_budget is not None:  # plug-ins take only their own kwargs
        kw["memory_budget"] = job.memory_budget
    device = next(model.parameters()).device

    def call(t: Any) -> torch.Tensor:
        return call_method(method, model, graph, t, kw)

    groups = prompt_groups(model, task, job)  # checked before any timed call

    meta: dict[str, Any] = {"n_edges": graph.n_edges, "repeats": 0, "time_s": float("nan"), "times_s": [],
                            "floor_kind": readout_mode(task), "floor_s": float("nan"), "floor_ratio": float("nan"),
                            "full_logits": None, "peak_mib": float("nan"), "floor_peak_mib": float("nan")}
    if job.repeats > 0:
        _log(f"time {job.method} {job.model} {job.task} n={job.n}", progress)
        fns = {"floor": lambda: floor_pass(model, task), "attr": lambda: call(task)}
        if task.has_readout:
            ft = full_logits(task)
            fns.update(floor_full=lambda: floor_pass(model, ft), attr_full=lambda: call(ft))
        times = time_interleaved(fns, job.repeats, warmup=1, device=device)
        t, f = median(times["attr"]), median(times["floor"])
        meta.update(time_s=t, times_s=times["attr"], repeats=len(times["attr"]), floor_s=f, floor_times_s=times["floor"],
                    floor_ratio=t / f if f > 0 else float("nan"))
        if task.has_readout:
            tf, ff = median(times["attr_full"]), median(times["floor_full"])
            meta["full_logits"] = {"time_s": tf, "floor_s": ff, "floor_ratio": tf / ff if ff > 0 else float("nan")}
        with PeakMemory(device) as pm:  # one warm call
            call(task)
        with PeakMemory(device) as fpm:
            floor_pass(model, task)
        meta.update(peak_mib=pm.mib, floor_peak_mib=fpm.mib, memory_method=pm.method)
    with EngineLog() as engines:
        rows = [call(sub).float() for sub in groups]
    meta.update(engines.summary())
    torch.save(torch.stack(rows), job.out + ".pt")
    Path(job.out + ".json").write_text(json.dumps(meta, indent=1, allow_nan=True))
    return meta


def _curve_file_ok(path: Path, scores: torch.Tensor, name: str) -> bool:
    """A stored curve file of the current curve version for exactly these ranking scores."""
    from bench.faithfulness import CURVE_VERSION, ranking_sha

    if not path.exists():
        return False
    data = json.loads(path.read_text())
    entry = data.get("rankings", {}).get(name)
    return data.get("version") == CURVE_VERSION and entry is not None and entry.get("sha") == ranking_sha(scores)


def run_faith(model: Any, job: "FaithJob", progress: bool = True) -> None:
    import eap
    from bench.faithfulness import ORACLE, compute_curves, mean_scores

    graph = eap.Graph.from_model(model)
    edir = Path(job.dir)
    exhaustive = len(json.loads((edir / "edges.json").read_text())["index"]) == graph.n_edges
    rankings: dict[str, torch.Tensor] = {}
    outs: dict[str, Path] = {}
    if exhaustive:
        E = mean_scores(edir / "exact.pt")
        if not _curve_file_ok(edir / "faith.json", E, ORACLE):
            rankings[ORACLE], outs[ORACLE] = E, edir / "faith.json"
    for method, attr, out in job.methods:
        A = mean_scores(attr + ".pt")
        if not _curve_file_ok(Path(out), A, method):
            rankings[method], outs[method] = A, Path(out)
    if not rankings:
        return
    _log(f"faithfulness curves {job.model} {job.task} n={job.n}: {', '.join(rankings)}", progress)
    curves = compute_curves(model, graph, _job_task(model, job), rankings, progress=progress,
                            memory_budget=job.memory_budget, **_iv(job))
    for name, path in outs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {**curves, "rankings": {name: curves["rankings"][name]}})


def run_jobs(spec: "WorkerSpec | dict", progress: bool = True) -> None:
    """Run ``spec.jobs`` on ``spec.model`` (loaded once), with ``spec.threads`` torch threads if
    given (restored afterwards: this may be the caller's process). A dict is read as
    ``WorkerSpec.from_dict``."""
    if isinstance(spec, dict):
        spec = WorkerSpec.from_dict(spec)
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    executor = spec.executor.make()
    try:
        model = load(spec.model, spec.device, spec.dtype)
        torch.manual_seed(0)
        if spec.describe_out:
            from eap.models import describe

            Path(spec.describe_out).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.describe_out).write_text(json.dumps(describe(model), indent=1))
        for job in spec.jobs:
            job.run(model, progress, executor)
    finally:
        executor.close()
        torch.set_num_threads(threads)


def main(argv: list[str]) -> int:
    from eap.task import TaskError

    path = Path(argv[0])
    spec = WorkerSpec.from_dict(json.loads(path.read_text()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_jobs(spec, progress=spec.progress)
    except Exception as exc:
        Path(str(path) + ".error").write_text(f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, TaskError):  # a task the user must fix: the message says it all
            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
