"""Where exact-patching units are computed: this process, or the workers of a Ray cluster.

``validation.patch`` turns a request into a job (plan, store, the :class:`~validation.units.Unit`
list still to do) and hands the units to an executor, chosen explicitly:

* :class:`LocalExecutor` (``executor="local"``, the default): the loop in this process, prompt
  batch by prompt batch (one setup per batch, then its units).
* :class:`RayExecutor` (``executor="ray"`` or an instance): Ray actors
  (``validation.ray_worker.PatchWorker``), each of which makes the model once, compute units
  that the driver hands out one at a time; the driver alone records them in the results store.

:func:`executor_from_spec` turns any of the shapes an executor arrives in ('local', 'ray', a
dict spec, bench's ``Config`` fields, an :class:`Executor`) into an :class:`Executor`.

Same numbers, same file
-----------------------
Every executor records, per unit, what ``compute_unit(job, vu.prepare_batch(job, unit.batch), unit)``
returns on the same model, and the store sums each item's batches in batch order whatever the
order of arrival: the result is bit-identical to the local executor's at equal torch thread
counts (same device, dtype and plan), in the same edge order and the same results file. A Ray
worker uses the driver's torch thread count unless ``RayExecutor(threads=...)`` says otherwise
(CPU kernels may sum in another order with another thread count: then the values agree to
float rounding only); the thread count is recorded in the results file (``meta["threads"]``)
and in ``stats.threads``. A worker gets the driver's plan
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

import socket
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from eap.measure import sync
from validation.errors import ExecutorError, PatchError
from validation.ray_worker import (  # noqa: F401  (re-exported: the executor's names as they were)
    RAY_INSTALL_HINT, FromOrigin, JobSpec, PatchWorker, Shipped, _cause, check_reachable, import_ray, parse_address,
)
from validation import units as vu
from validation.units import PatchJob, Unit, item_weights

__all__ = ["Executor", "ExecutorError", "LocalExecutor", "RayExecutor", "RunTimes", "executor_from_spec"]


@dataclass
class RunTimes:
    """What an executor reports: seconds of caching forwards (``setup_s``) and patched forwards
    (``patch_s``), summed over workers; results-file seconds on the driver (``io_s``); stacked
    forwards; workers used; wall seconds; units handed out again after a worker died; workers
    lost for good; the torch thread count the units were computed with."""

    executor: str = "local"
    setup_s: float = 0.0
    patch_s: float = 0.0
    io_s: float = 0.0
    n_forwards: int = 0
    n_workers: int = 1
    wall_s: float = 0.0
    n_retried: int = 0
    workers_lost: int = 0
    threads: int = 0


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
        times = RunTimes(executor=self.name, threads=torch.get_num_threads())
        device = next(job.model.parameters()).device
        t_start = time.perf_counter()
        for b in range(len(job.batches)):
            mine = [u for u in units if u.batch == b]
            if not mine:
                continue
            ev = None  # free the previous batch's cache before caching this one
            sync(device)
            t0 = time.perf_counter()
            ev = vu.prepare_batch(job, b)
            sync(device)
            times.setup_s += time.perf_counter() - t0
            for unit in mine:
                t0 = time.perf_counter()
                sums = vu.compute_unit(job, ev, unit)
                times.patch_s += time.perf_counter() - t0
                times.n_forwards += vu.forwards_of(job, unit)
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
    """The executor ``spec`` names (see :func:`executor_from_spec`), and whether the caller owns
    it (must close it after the call): an :class:`Executor` passed in is the caller's to close,
    one made here is owned."""
    if isinstance(spec, Executor):
        return spec, False
    return executor_from_spec(spec), True


#: Keys of a dict (or object) executor spec besides ``backend``: ``RayExecutor`` arguments.
_RAY_KEYS = ("address", "workers", "gpus_per_worker", "cpus_per_worker", "threads")
#: bench ``Config`` fields -> ``RayExecutor`` arguments.
_CONFIG_KEYS = {"ray_address": "address", "ray_workers": "workers", "gpus_per_worker": "gpus_per_worker",
                "ray_gpus_per_worker": "gpus_per_worker"}


def executor_from_spec(spec: Any = "local") -> Executor:
    """An :class:`Executor` from any of the shapes one arrives in:

    * an :class:`Executor`: itself;
    * None or 'local': a new :class:`LocalExecutor`; 'ray': a new :class:`RayExecutor`;
    * a dict ``{"backend": "local" | "ray", "address": ..., "workers": ..., "gpus_per_worker": ...,
      "cpus_per_worker": ..., "threads": ...}`` (missing keys: defaults), or an object with those
      attributes (bench's ``ExecutorSpec``);
    * an object with an ``executor`` field ('local' | 'ray') and ``ray_address``, ``ray_workers``,
      ``gpus_per_worker`` (bench's ``Config``).

    Anything else is a :class:`PatchError` naming what is accepted."""
    if isinstance(spec, Executor):
        return spec
    backend: Any = None
    kw: dict[str, Any] = {}
    if spec is None or isinstance(spec, str):
        backend = spec or "local"
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"backend", *_RAY_KEYS})
        if unknown:
            raise PatchError(f"unknown executor spec keys {unknown}; use 'backend' and {list(_RAY_KEYS)}")
        backend = spec.get("backend", "local")
        kw = {k: spec[k] for k in _RAY_KEYS if spec.get(k) is not None}
    elif hasattr(spec, "backend"):
        backend = spec.backend
        kw = {k: getattr(spec, k) for k in _RAY_KEYS if getattr(spec, k, None) is not None}
    elif hasattr(spec, "executor"):
        backend = spec.executor or "local"
        kw = {a: getattr(spec, f) for f, a in _CONFIG_KEYS.items() if getattr(spec, f, None) is not None}
    if backend == "local":
        return LocalExecutor()
    if backend == "ray":
        return RayExecutor(**kw)
    raise PatchError(f"executor must be 'local', 'ray', a spec with backend 'local' or 'ray' ({{'backend': 'ray', "
                     f"'address': ...}}), a Config with an executor field, or an Executor (LocalExecutor(), "
                     f"RayExecutor(...)); got {spec!r}")


def _local_ips() -> set[str]:
    """Addresses that mean this machine."""
    ips = {"127.0.0.1", "::1", "localhost"}
    try:
        ips |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return ips


def same_cluster(asked: str | None, session: str | None) -> bool:
    """Whether the Ray session at GCS address ``session`` ('ip:port') is the cluster ``asked``
    ('host:port', 'ray://host:port' (the client port differs from the GCS port: the host
    decides), 'auto' (one on this machine), None/'local')."""
    want = parse_address(asked)
    if want is None or not session:
        return asked in (None, "", "local", "auto") and (asked != "auto" or session is not None)
    got = parse_address(session)
    local = _local_ips()

    def ip(host: str) -> str:
        try:
            host = socket.gethostbyname(host)
        except OSError:
            pass
        return "local" if host in local or host.startswith("127.") else host

    same_host = ip(want[0]) == ip(got[0])
    return same_host if str(asked).startswith("ray://") else same_host and want[1] == got[1]


# ----------------------------------------------------------------------------------- Ray
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
        on CUDA, else 0 (CPU workers). cpus_per_worker: CPUs Ray reserves per actor.
    threads: torch threads per actor; default the driver's ``torch.get_num_threads()`` when the
        pool starts, so that the numbers are bit-identical to the local executor's (a smaller
        count, e.g. ``int(cpus_per_worker)``, avoids oversubscribing CPUs; the values then agree
        to float rounding). Recorded in the results file and ``stats.threads``.
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
        threads: int | None = None,
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
        if threads is not None and int(threads) < 1:
            raise ExecutorError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads) if threads is not None else None
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
            if not self._started_ray and self.address not in (None, "", "local"):
                session = ray.get_runtime_context().gcs_address
                if not same_cluster(self.address, session):
                    warnings.warn(f"Ray is already initialised in this process (cluster {session}): using that "
                                  f"session, not {self.address}")
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

            from ray.exceptions import RayError

            for s in self._slots:
                try:
                    ray.kill(s.actor)
                except (RayError, ValueError):  # already gone
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
        threads = self.threads or torch.get_num_threads()  # the driver's: numbers bit-identical to local
        key = (id(model), parts["weights"], parts["model_cfg"], parts["dtype"], threads)
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
        t_start = time.perf_counter()
        slots = self._pool(ray, job, parts, len(units))
        spec = JobSpec(job.graph, job.task.to("cpu"), job.kind, job.runner is not None, job.readout, job.scale,
                       job.item_sender, job.plan, store.requested, parts)
        dispatch = _Dispatch(self, ray, slots, job, units, store, bar, times, t_start)
        try:
            dispatch.loop([ray.put(spec)], uuid.uuid4().hex)
        except BaseException:
            self._drop_pool()  # nothing keeps computing for a driver that stopped
            raise
        for s in slots:
            s.in_flight = 0
        times.threads = next((int(s.info["threads"]) for s in slots if s.info.get("threads")), 0)
        times.wall_s = time.perf_counter() - t_start
        return times


class _Dispatch:
    """One :meth:`RayExecutor.run`: hands units out (per worker at most ``in_flight``, units of the
    batch it has cached first, heaviest first), records results as they arrive, and gives the
    units of a dead worker to the others."""

    def __init__(self, ex: RayExecutor, ray: Any, slots: list[_Slot], job: PatchJob, units: list[Unit], store: Any,
                 bar: Any, times: RunTimes, t_start: float) -> None:
        self.ex, self.ray, self.slots, self.store, self.bar, self.times = ex, ray, slots, store, bar, times
        self.t_start = t_start
        queues: dict[int, list[Unit]] = {}
        for u in units:
            queues.setdefault(u.batch, []).append(u)
        self.queues: dict[int, deque] = {}
        for b, us in queues.items():
            w = [float(item_weights(job.graph, job.kind, torch.tensor(u.items)).sum()) for u in us]
            self.queues[b] = deque(u for _, u in sorted(zip(w, us), key=lambda wu: (-wu[0], wu[1].key)))
        self.left = {b: len(q) for b, q in self.queues.items()}  # units of each batch not yet recorded
        self.failures: dict[Unit, int] = {}
        self.pending: dict[Any, tuple[_Slot, Unit | None]] = {}  # ref -> (worker, unit; None for a hello)
        for s in slots:
            if s.state in ("starting", "probing"):
                self.pending[s.actor.hello.remote()] = (s, None)
            else:
                s.batch = None  # the worker's cache belongs to the previous call
        self.n_left, self.shown, self.last_error = len(units), None, None
        times.n_workers = sum(s.state == "ready" for s in slots)

    def next_unit(self, s: _Slot) -> Unit | None:
        if s.batch is not None and self.queues.get(s.batch):
            return self.queues[s.batch].popleft()
        open_batches = [b for b, q in self.queues.items() if q]
        if not open_batches:
            return None
        on = {b: sum(1 for o in self.slots if o.state == "ready" and o.batch == b and o is not s) for b in open_batches}
        b = min(open_batches, key=lambda b: (on[b], b))
        return self.queues[b].popleft()

    def lose(self, s: _Slot, unit: Unit | None, exc: Exception) -> None:
        self.last_error = exc
        if unit is not None:
            self.failures[unit] = self.failures.get(unit, 0) + 1
            if self.failures[unit] > self.ex.max_unit_failures:
                raise ExecutorError(f"unit (key {unit.key}, prompt batch {unit.batch}) was lost with "
                                    f"{self.failures[unit]} workers (last: {exc}); finished units are saved, fix the "
                                    "cause and re-run")
            self.queues[unit.batch].appendleft(unit)
            self.times.n_retried += 1
        if s.state == "ready":  # ask it whether it comes back (Ray restarts it) or is gone
            s.state, s.batch = "probing", None
            self.pending[s.actor.hello.remote()] = (s, None)

    def submit(self, box: list, job_id: str) -> None:
        """Fill every ready worker's queue; fail when no worker is left or none became ready."""
        for s in self.slots:
            while s.state == "ready" and s.in_flight < self.ex.in_flight:
                unit = self.next_unit(s)
                if unit is None:
                    break
                s.batch, s.in_flight = unit.batch, s.in_flight + 1
                self.pending[s.actor.compute.remote(job_id, box, unit)] = (s, unit)
        alive = sum(s.state != "dead" for s in self.slots)
        ready = sum(s.state == "ready" for s in self.slots)
        if alive == 0:
            raise ExecutorError(f"all {len(self.slots)} Ray workers died (last error: {self.last_error}); finished "
                                "units are saved: re-run the same command to resume")
        if self.times.n_workers == 0 and time.perf_counter() - self.t_start > self.ex.start_timeout:
            raise ExecutorError(f"no Ray worker became ready within {self.ex.start_timeout:g} s (cluster resources: "
                                f"{self.ray.cluster_resources()}; each worker asks for {self.ex.cpus_per_worker:g} "
                                f"CPU and {self.ex.gpus_per_worker or 0:g} GPU)")
        text = f"workers {ready}/{len(self.slots)}" + (f", {alive - ready} starting" if alive > ready else "")
        if text != self.shown:
            self.bar.set_postfix_str(text)
            self.shown = text

    def hello(self, s: _Slot, ref: Any) -> None:
        """A worker answered: ready (again), or gone."""
        from ray.exceptions import RayError, RayTaskError

        try:
            s.info = self.ray.get(ref)
            s.state, s.batch = "ready", None
            self.times.n_workers = max(self.times.n_workers, sum(o.state == "ready" for o in self.slots))
        except RayTaskError as exc:
            raise _cause(exc)  # making the model failed: it would fail everywhere
        except RayError as exc:
            s.state, self.last_error = "dead", exc
            self.times.workers_lost += 1

    def result(self, s: _Slot, unit: Unit, ref: Any) -> None:
        """A unit came back: record it (or hand it out again if its worker died)."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        s.in_flight -= 1
        try:
            res = self.ray.get(ref)
        except RayTaskError as exc:
            raise _cause(exc)  # the computation failed (bad metric, NaN, mismatch): not the worker's fault
        except (RayActorError, RayError) as exc:
            self.lose(s, unit, exc)
            return
        t0 = time.perf_counter()
        self.store.record_unit(unit.batch, unit.items, res["sums"])
        self.left[unit.batch] -= 1
        if self.left[unit.batch] == 0:
            self.store.save()
        self.times.io_s += time.perf_counter() - t0
        self.times.setup_s += res["setup_s"]
        self.times.patch_s += res["patch_s"]
        self.times.n_forwards += res["n_forwards"]
        self.n_left -= 1
        self.bar.update(len(unit.items))

    def loop(self, box: list, job_id: str) -> None:
        while self.n_left:
            self.submit(box, job_id)
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in done:
                s, unit = self.pending.pop(ref)
                if unit is None:
                    self.hello(s, ref)
                else:
                    self.result(s, unit, ref)
