"""Where exact-patching units are computed: this process, or the workers of a Ray cluster.

``validation.patch`` turns a request into a job (plan, store, the :class:`~validation.patch.Unit`
list still to do) and hands the units to an executor, chosen explicitly:

* :class:`LocalExecutor` (``executor="local"``, the default): the loop in this process, prompt
  batch by prompt batch (one setup per batch, then its units).
* :class:`RayExecutor` (``executor="ray"`` or an instance): Ray actors (:class:`PatchWorker`), each
  of which makes the model once, compute units that the driver hands out one at a time; the
  driver alone records them in the results store.

Same numbers, same file
-----------------------
Every executor records, per unit, what ``compute_unit(job, prepare_batch(job, unit.batch), unit)``
returns on the same model, and the store sums each item's batches in batch order whatever the
order of arrival: the result is bit-identical to the local executor's (same device, dtype and
plan), in the same edge order and the same results file. A worker gets the driver's plan
(prompt batches, copies per forward), readout flag, path and prompts, and before its first unit it
checks that its own ``validation.fingerprint`` parts of the job (model config, weights hash, dtype,
graph, prompts, metric code, patching-code hash, package version) equal the driver's: a worker
whose model, code or library versions differ is refused, never mixed in.

How a Ray worker gets the model (``model_source``)
--------------------------------------------------
* ``"auto"``: a model from ``eap.load_model`` (an embedded name, a directory, a HuggingFace name,
  ``random:<shape>@<seed>``) or ``eap.models.random_model`` (shape and seed) is made again by the
  worker from that origin (``eap.models.origin_of``) on its own device; any other model is
  shipped: ``ray.put`` once, each worker takes it from the object store.
* ``"ship"``: always ship (e.g. weights edited after loading: the fingerprint check refuses a
  worker that made the unedited model).

Scheduling, retries, resume
---------------------------
Units are handed out dynamically, at most ``in_flight`` per worker: a worker that finished one
gets the next unit of the prompt batch it has cached (its setup is reused), heaviest first (edges
into early layers run the most blocks), and when that batch has none left, a unit of the batch
the fewest workers are on. A worker that dies (``ray.kill``, a lost node, an OOM kill) loses only
its units in flight: the driver gives them to the others (after ``max_unit_failures`` deaths on
one unit it gives up), and Ray restarts the worker up to ``max_restarts`` times. A unit is
recorded the moment it arrives (journalled, fsync'd), so a driver interrupted at any point
resumes with the same command, recomputing no recorded unit. An error raised by the computation
itself (a bad metric, NaN) stops the run and is raised on the driver.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from eap.measure import sync
from validation import patch as vp
from validation.patch import PatchError, PatchJob, Unit

#: What to tell a user whose environment has no Ray.
RAY_INSTALL_HINT = "pip install 'eap-bench[ray]'"


class ExecutorError(PatchError):
    """An executor cannot run: Ray missing, a cluster unreachable, all workers lost, a worker
    whose model or code differs from the driver's."""


@dataclass
class RunTimes:
    """What an executor reports: seconds of caching forwards (``setup_s``) and patched forwards
    (``patch_s``), summed over workers; results-file seconds on the driver (``io_s``); stacked
    forwards; workers used; wall seconds; units handed out again after a worker died; workers
    lost for good."""

    executor: str = "local"
    setup_s: float = 0.0
    patch_s: float = 0.0
    io_s: float = 0.0
    n_forwards: int = 0
    n_workers: int = 1
    wall_s: float = 0.0
    n_retried: int = 0
    workers_lost: int = 0


class Executor:
    """Computes the units of a job and records each in the store as it finishes.

    ``run(job, units, store, bar, parts)``: ``units`` are the job's units not yet recorded;
    ``bar`` a progress bar (``update(k)``, ``set_postfix_str(s)``); ``parts`` the driver's
    ``validation.store.fingerprint_parts`` of the request. An executor can be reused for several
    calls; :meth:`close` releases what it holds."""

    name = "executor"

    def run(self, job: PatchJob, units: list[Unit], store: Any, bar: Any, parts: dict) -> RunTimes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process: for each prompt batch, its setup, then its units, in order."""

    name = "local"

    def run(self, job: PatchJob, units: list[Unit], store: Any, bar: Any, parts: dict) -> RunTimes:
        times = RunTimes(executor=self.name)
        device = next(job.model.parameters()).device
        t_start = time.perf_counter()
        for b in range(len(job.batches)):
            mine = [u for u in units if u.batch == b]
            if not mine:
                continue
            ev = None  # free the previous batch's cache before caching this one
            sync(device)
            t0 = time.perf_counter()
            ev = vp.prepare_batch(job, b)
            sync(device)
            times.setup_s += time.perf_counter() - t0
            for unit in mine:
                t0 = time.perf_counter()
                sums = vp.compute_unit(job, ev, unit)
                times.patch_s += time.perf_counter() - t0
                times.n_forwards += vp.forwards_of(job, unit)
                t0 = time.perf_counter()
                store.record_unit(unit.batch, unit.items, sums)
                times.io_s += time.perf_counter() - t0
                bar.update(len(unit.items))
            t0 = time.perf_counter()
            store.save()
            times.io_s += time.perf_counter() - t0
        times.wall_s = time.perf_counter() - t_start
        return times


def resolve_executor(spec: Any) -> tuple[Executor, bool]:
    """The executor ``spec`` names, and whether the caller owns it (must close it after the call):
    'local' -> a new :class:`LocalExecutor`, 'ray' -> a new :class:`RayExecutor` with default
    settings, an :class:`Executor` -> itself (the caller's to close)."""
    if isinstance(spec, Executor):
        return spec, False
    if spec is None or spec == "local":
        return LocalExecutor(), True
    if spec == "ray":
        return RayExecutor(), True
    raise PatchError(f"executor must be 'local', 'ray' or an Executor (LocalExecutor(), RayExecutor(...)), got {spec!r}")


# ----------------------------------------------------------------------------------- Ray
def import_ray() -> Any:
    """The ``ray`` module, or an :class:`ExecutorError` that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(f"the Ray executor needs Ray, which is not installed here ({exc}); install it with: "
                            f"{RAY_INSTALL_HINT}  (or use the local executor)") from exc
    return ray


def parse_address(address: str | None) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address ``'host:port'`` or ``'ray://host:port'``; None for
    None, 'local' (start a cluster here) and 'auto' (the cluster ``ray start`` left on this machine)."""
    if address in (None, "", "local", "auto"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ExecutorError(f"bad Ray address {address!r}: use 'auto', 'host:port' or 'ray://host:port'")
    return host.strip("[]"), int(port)


def check_reachable(address: str | None, timeout: float) -> None:
    """Fail within ``timeout`` seconds, with a clear message, if the cluster at ``address``
    does not accept connections (Ray itself would retry for a long time)."""
    hp = parse_address(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as exc:
        client = address.startswith("ray://")
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} within {timeout:g} s ({exc}). Is it running? Start one with "
            f"`ray start --head` on that machine ({'the Ray client server listens on port 10001 by default' if client else 'the head node listens on port 6379 by default'}), "
            "or leave --address out to start a local cluster on this machine."
        ) from exc


@dataclass(frozen=True)
class FromOrigin:
    """A worker makes the model itself: ``eap.models.ModelOrigin.make(device, dtype)``."""

    origin: Any  # eap.models.ModelOrigin
    dtype: torch.dtype

    def make(self, device: str) -> Any:
        return self.origin.make(device, self.dtype)

    def __str__(self) -> str:
        return f"made from {self.origin}"


@dataclass(frozen=True)
class Shipped:
    """A worker takes the driver's model from Ray's object store: ``box`` is ``[ObjectRef]`` of
    ``eap.models.portable(model)`` (transformers config, weights, tokenizer), from which the
    worker makes the bridge (``eap.models.from_portable``); in a list so that Ray passes the
    reference, not the weights, to the worker's constructor."""

    box: list
    dtype: torch.dtype

    def make(self, device: str) -> Any:
        import ray

        from eap.models import from_portable

        return from_portable(ray.get(self.box[0]), device, self.dtype)

    def __str__(self) -> str:
        return "shipped through the object store"


@dataclass
class JobSpec:
    """What a worker needs besides the model to compute a job's units exactly as the driver
    would: graph, prompts (on CPU), kind, path ('fast' or 'hooks'), readout, scale, item
    senders, the plan, the requested items and the driver's fingerprint parts (checked)."""

    graph: Any
    task: Any
    kind: str
    fast: bool
    readout: bool
    scale: float
    item_sender: Int[Tensor, " n_items"]
    plan: Any
    requested: Int[Tensor, " k"]
    parts: dict
    replacement: Any = None  # eap.interventions.Replacement (None: interchange patching)


class PatchWorker:
    """A Ray actor's state: the model (made once, lazily), the block runner, the current job and
    the cache of the last prompt batch (``prepare_batch``), kept while units of that batch come."""

    def __init__(self, source: Any, device: str, threads: int) -> None:
        self.source, self.device, self.threads = source, device, int(threads)
        self.model = self.runner = self.job = self.ev = None
        self.job_id: str | None = None
        self.batch: int | None = None
        self.load_s = 0.0
        torch.set_num_threads(self.threads)

    def _model(self) -> Any:
        if self.model is None:
            t0 = time.perf_counter()
            self.model = self.source.make(self.device)
            self.load_s = time.perf_counter() - t0
        return self.model

    def hello(self) -> dict:
        """Make the model if not done yet; who and where this worker is."""
        model = self._model()
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(next(model.parameters()).device),
                "threads": torch.get_num_threads(), "load_s": self.load_s}

    def _job_for(self, job_id: str, box: list) -> PatchJob:
        if job_id == self.job_id:
            return self.job
        import ray

        from validation.runner import BlockRunner
        from validation.store import fingerprint_parts

        try:
            spec: JobSpec = ray.get(box[0])
        except Exception as exc:  # typically a metric whose module this worker cannot import
            raise ExecutorError(
                f"Ray worker {socket.gethostname()}:{os.getpid()} cannot load the job (graph, prompts, metric): "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}. Functions travel "
                "by reference to their module: make the metric's module importable on every worker (install it, or "
                "ray.init(runtime_env={'py_modules': [...]})), or send it by value with "
                "ray.cloudpickle.register_pickle_by_value(module)"
            ) from None
        model = self._model()
        self.job = self.ev = None
        self.batch = None
        device = next(model.parameters()).device
        task = spec.task.to(device)
        mine = fingerprint_parts(model, spec.graph, task, spec.requested, spec.scale, spec.kind)
        replacement = None if spec.replacement is None else spec.replacement.to(device)
        if replacement is not None:
            mine["intervention"] = replacement.fingerprint()
        differ = sorted(k for k in set(mine) | set(spec.parts) if mine.get(k) != spec.parts.get(k))
        if differ:
            raise ExecutorError(
                f"Ray worker {socket.gethostname()}:{os.getpid()} ({self.source}) would compute other numbers than the "
                f"driver: its {', '.join(differ)} differ"
                + (" (the driver's weights were changed after loading? use model_source='ship')"
                   if "weights" in differ and isinstance(self.source, FromOrigin) else "")
                + (" (install the same eap-bench code and library versions on every node)"
                   if {"code", "package", "metric", "readout"} & set(differ) else "")
            )
        spec.graph.check_model(model)
        if spec.fast and self.runner is None:
            self.runner = BlockRunner(model)
        self.job = PatchJob(model, spec.graph, task, spec.kind, self.runner if spec.fast else None, spec.readout,
                            spec.scale, spec.item_sender, spec.plan, replacement)
        self.job_id = job_id
        return self.job

    def compute(self, job_id: str, box: list, unit: Unit) -> dict:
        """Per item of ``unit``, the float64 sum over its prompt batch of metric(patched) -
        metric(clean) (``compute_unit``), and the seconds it took."""
        job = self._job_for(job_id, box)
        device = next(job.model.parameters()).device
        setup_s = 0.0
        if self.batch != unit.batch:
            self.ev = None
            sync(device)
            t0 = time.perf_counter()
            self.ev = vp.prepare_batch(job, unit.batch)
            sync(device)
            setup_s = time.perf_counter() - t0
            self.batch = unit.batch
        t0 = time.perf_counter()
        sums = vp.compute_unit(job, self.ev, unit)
        return {"sums": sums, "setup_s": setup_s, "patch_s": time.perf_counter() - t0,
                "n_forwards": vp.forwards_of(job, unit)}


def _cause(exc: Exception) -> BaseException:
    """The exception a worker raised (its remote traceback chained), rather than Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        cause.__cause__ = exc
        return cause
    return exc


@dataclass
class _Slot:
    """The driver's view of one worker."""

    actor: Any
    state: str = "starting"  # starting -> ready (<-> probing after an error) -> dead
    batch: int | None = None
    in_flight: int = 0
    info: dict = field(default_factory=dict)


class RayExecutor(Executor):
    """Ray actors compute the units; the driver (this process) schedules and records them.

    address: None starts a local Ray cluster on this machine (or uses the one ``ray.init``
        already connected this process to); 'auto' joins the cluster ``ray start`` runs on this
        machine; 'host:port' or 'ray://host:port' a remote one (checked within
        ``connect_timeout`` seconds).
    workers: number of actors (default: as many as the cluster's CPUs, or GPUs with
        ``gpus_per_worker``, hold; never more than there are units).
    gpus_per_worker: GPUs per actor (fractions share a GPU); default 1 if the driver's model is
        on CUDA, else 0 (CPU workers). cpus_per_worker: CPUs (and torch threads) per actor.
    model_source: 'auto' or 'ship' (see the module docstring).
    in_flight: units queued per worker (2 hides the round trip). max_restarts: Ray restarts of
        a crashed actor. max_unit_failures: worker deaths one unit may cause before the run
        stops. start_timeout: seconds to wait for a first worker to be ready.
    init_kwargs: extra ``ray.init`` arguments when this executor starts or joins the cluster
        (e.g. ``num_cpus``, ``object_store_memory``).

    Reusable: the actors stay up between calls on the same model (``close()`` ends them, and
    the Ray session if this executor started it). Use as a context manager."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float = 1,
        model_source: str = "auto",
        in_flight: int = 2,
        max_restarts: int = 2,
        max_unit_failures: int = 3,
        start_timeout: float = 600.0,
        connect_timeout: float = 10.0,
        init_kwargs: dict | None = None,
    ) -> None:
        import_ray()  # fail now, not after the fingerprint
        if model_source not in ("auto", "ship"):
            raise ExecutorError(f"model_source must be 'auto' or 'ship', got {model_source!r}")
        if workers is not None and int(workers) < 1:
            raise ExecutorError(f"workers must be >= 1, got {workers}")
        if gpus_per_worker is not None and float(gpus_per_worker) < 0:
            raise ExecutorError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        if float(cpus_per_worker) <= 0 or int(in_flight) < 1:
            raise ExecutorError("cpus_per_worker must be > 0 and in_flight >= 1")
        parse_address(address)
        self.address, self.workers = address, workers
        self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker, float(cpus_per_worker)
        self.model_source, self.in_flight = model_source, int(in_flight)
        self.max_restarts, self.max_unit_failures = int(max_restarts), int(max_unit_failures)
        self.start_timeout, self.connect_timeout = float(start_timeout), float(connect_timeout)
        self.init_kwargs = dict(init_kwargs or {})
        self._started_ray = False
        self._slots: list[_Slot] = []
        self._pool_key: tuple | None = None
        self._shipped: Any = None
        self.source = ""  #: how the current workers got the model (e.g. 'made from random:gpt2-small@0')

    # ------------------------------------------------------------------ cluster
    def connect(self) -> Any:
        """Connect to (or start) the cluster; returns the ``ray`` module."""
        ray = import_ray()
        check_reachable(self.address, self.connect_timeout)
        if ray.is_initialized():
            if self.address not in (None, "", "local"):
                warnings.warn(f"Ray is already initialised in this process: using that session, not {self.address}")
            return ray
        kwargs = dict(log_to_driver=False, **self.init_kwargs)
        if self.address in (None, "", "local"):
            kwargs.setdefault("include_dashboard", False)
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise ExecutorError(f"could not connect to the Ray cluster at {self.address or 'a new local cluster'}: {exc}") from exc
        self._started_ray = True
        return ray

    def close(self) -> None:
        """End the actors, and the Ray session if this executor started it."""
        self._drop_pool()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def _drop_pool(self) -> None:
        if self._slots:
            import ray

            for s in self._slots:
                try:
                    ray.kill(s.actor)
                except Exception:  # already gone
                    pass
        self._slots, self._pool_key, self._shipped = [], None, None

    @property
    def actors(self) -> list:
        """The live actor handles (e.g. to inspect or kill one in a test)."""
        return [s.actor for s in self._slots if s.state != "dead"]

    def _n_workers(self, ray: Any, gpus: float, n_units: int) -> int:
        res = ray.cluster_resources()
        fit = int(res.get("GPU", 0) // gpus) if gpus > 0 else int(res.get("CPU", 1) // self.cpus_per_worker)
        if gpus > 0 and fit < 1:
            raise ExecutorError(f"the Ray cluster has {res.get('GPU', 0):g} GPUs; a worker asks for {gpus:g}")
        want = self.workers or max(1, fit)
        if want > max(fit, 1):
            warnings.warn(f"{want} Ray workers asked for, the cluster holds {max(fit, 1)} now: the rest start when "
                          "resources free up (or the autoscaler adds nodes)")
        return max(1, min(want, n_units))

    def _pool(self, ray: Any, job: PatchJob, parts: dict, n_units: int) -> list[_Slot]:
        """The actors for ``job.model`` (made once per model, kept across calls)."""
        from eap.models import origin_of

        model = job.model
        param = next(model.parameters())
        key = (id(model), parts["weights"], parts["model_cfg"], parts["dtype"])
        alive = [s for s in self._slots if s.state != "dead"]
        if self._pool_key == key and alive:
            return alive
        self._drop_pool()
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if param.is_cuda else 0.0)
        origin = origin_of(model) if self.model_source == "auto" else None
        if origin is not None:
            source: Any = FromOrigin(origin, param.dtype)
        else:
            from eap.models import portable

            self._shipped = ray.put(portable(model))
            source = Shipped([self._shipped], param.dtype)
        self.source = str(source)
        device = "cuda" if gpus > 0 else "cpu"
        threads = max(1, int(self.cpus_per_worker))
        actor_cls = ray.remote(PatchWorker).options(num_cpus=self.cpus_per_worker, num_gpus=gpus,
                                                    max_restarts=self.max_restarts, max_task_retries=0)
        self._slots = [_Slot(actor_cls.remote(source, device, threads)) for _ in range(self._n_workers(ray, gpus, n_units))]
        self._pool_key = key
        return list(self._slots)

    # ------------------------------------------------------------------ run
    def run(self, job: PatchJob, units: list[Unit], store: Any, bar: Any, parts: dict) -> RunTimes:
        times = RunTimes(executor=self.name, n_workers=0)
        if not units:
            return times
        ray = self.connect()
        from ray.exceptions import RayActorError, RayError, RayTaskError

        t_start = time.perf_counter()
        slots = self._pool(ray, job, parts, len(units))
        spec = JobSpec(job.graph, job.task.to("cpu"), job.kind, job.runner is not None, job.readout, job.scale,
                       job.item_sender, job.plan, store.requested, parts,
                       None if job.replacement is None else job.replacement.to("cpu"))
        box, job_id = [ray.put(spec)], uuid.uuid4().hex
        queues: dict[int, deque] = {}
        for u in units:
            queues.setdefault(u.batch, []).append(u)
        for b, us in queues.items():
            w = [float(vp.item_weights(job.graph, job.kind, torch.tensor(u.items)).sum()) for u in us]
            queues[b] = deque(u for _, u in sorted(zip(w, us), key=lambda wu: (-wu[0], wu[1].key)))
        left = {b: len(q) for b, q in queues.items()}  # units of each batch not yet recorded
        failures: dict[Unit, int] = {}
        pending: dict[Any, tuple[_Slot, Unit | None]] = {}  # ref -> (worker, unit; None for a hello)
        for s in slots:
            if s.state in ("starting", "probing"):
                pending[s.actor.hello.remote()] = (s, None)
            else:
                s.batch = None  # the worker's cache belongs to the previous call
        n_left, shown, last_error = len(units), None, None
        times.n_workers = sum(s.state == "ready" for s in slots)

        def next_unit(s: _Slot) -> Unit | None:
            if s.batch is not None and queues.get(s.batch):
                return queues[s.batch].popleft()
            open_batches = [b for b, q in queues.items() if q]
            if not open_batches:
                return None
            on = {b: sum(1 for o in slots if o.state == "ready" and o.batch == b and o is not s) for b in open_batches}
            b = min(open_batches, key=lambda b: (on[b], b))
            return queues[b].popleft()

        def lose(s: _Slot, unit: Unit | None, exc: Exception) -> None:
            nonlocal last_error
            last_error = exc
            if unit is not None:
                failures[unit] = failures.get(unit, 0) + 1
                if failures[unit] > self.max_unit_failures:
                    raise ExecutorError(f"unit (key {unit.key}, prompt batch {unit.batch}) was lost with {failures[unit]} "
                                        f"workers (last: {exc}); finished units are saved, fix the cause and re-run")
                queues[unit.batch].appendleft(unit)
                times.n_retried += 1
            if s.state == "ready":  # ask it whether it comes back (Ray restarts it) or is gone
                s.state, s.batch = "probing", None
                pending[s.actor.hello.remote()] = (s, None)

        try:
            while n_left:
                for s in slots:
                    while s.state == "ready" and s.in_flight < self.in_flight:
                        unit = next_unit(s)
                        if unit is None:
                            break
                        s.batch, s.in_flight = unit.batch, s.in_flight + 1
                        pending[s.actor.compute.remote(job_id, box, unit)] = (s, unit)
                alive = sum(s.state != "dead" for s in slots)
                ready = sum(s.state == "ready" for s in slots)
                if alive == 0:
                    raise ExecutorError(f"all {len(slots)} Ray workers died (last error: {last_error}); finished units "
                                        "are saved: re-run the same command to resume")
                if times.n_workers == 0 and time.perf_counter() - t_start > self.start_timeout:
                    raise ExecutorError(f"no Ray worker became ready within {self.start_timeout:g} s (cluster resources: "
                                        f"{ray.cluster_resources()}; each worker asks for {self.cpus_per_worker:g} CPU "
                                        f"and {self.gpus_per_worker or 0:g} GPU)")
                text = f"workers {ready}/{len(slots)}" + (f", {alive - ready} starting" if alive > ready else "")
                if text != shown:
                    bar.set_postfix_str(text)
                    shown = text
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    s, unit = pending.pop(ref)
                    if unit is None:  # a hello: the worker is ready (again), or gone
                        try:
                            s.info = ray.get(ref)
                            s.state, s.batch = "ready", None
                            times.n_workers = max(times.n_workers, sum(o.state == "ready" for o in slots))
                        except RayTaskError as exc:
                            raise _cause(exc)  # making the model failed: it would fail everywhere
                        except RayError as exc:
                            s.state, last_error = "dead", exc
                            times.workers_lost += 1
                        continue
                    s.in_flight -= 1
                    try:
                        res = ray.get(ref)
                    except RayTaskError as exc:
                        raise _cause(exc)  # the computation failed (bad metric, NaN, mismatch): not the worker's fault
                    except (RayActorError, RayError) as exc:
                        lose(s, unit, exc)
                        continue
                    t0 = time.perf_counter()
                    store.record_unit(unit.batch, unit.items, res["sums"])
                    left[unit.batch] -= 1
                    if left[unit.batch] == 0:
                        store.save()
                    times.io_s += time.perf_counter() - t0
                    times.setup_s += res["setup_s"]
                    times.patch_s += res["patch_s"]
                    times.n_forwards += res["n_forwards"]
                    n_left -= 1
                    bar.update(len(unit.items))
        except BaseException:
            self._drop_pool()  # nothing keeps computing for a driver that stopped
            raise
        for s in slots:
            s.in_flight = 0
        times.wall_s = time.perf_counter() - t_start
        return times
