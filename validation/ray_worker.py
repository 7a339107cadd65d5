"""What runs inside a Ray worker of exact patching, and the Ray helpers the driver shares.

:class:`PatchWorker` is the state of one Ray actor (``validation.executor.RayExecutor`` makes
them): the model, made once from its origin or shipped (:class:`FromOrigin`, :class:`Shipped`),
the job (:class:`JobSpec`, checked against the driver's fingerprint parts) and the cache of the
last prompt batch. It computes units with the same functions as the local executor
(``validation.units.prepare_batch`` / ``compute_unit``) at the torch thread count the driver
asks for (by default the driver's own, so that the numbers are bit-identical to the local
executor's; see ``validation.executor``).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from eap.measure import sync
from validation.errors import ExecutorError
from validation.fingerprints import fingerprint_parts
from validation.runner import BlockRunner
from validation import units as vu
from validation.units import PatchJob, Unit

#: What to tell a user whose environment has no Ray.
RAY_INSTALL_HINT = "pip install 'eap-bench[ray]'"


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
                            spec.scale, spec.item_sender, spec.plan)
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
            self.ev = vu.prepare_batch(job, unit.batch)
            sync(device)
            setup_s = time.perf_counter() - t0
            self.batch = unit.batch
        t0 = time.perf_counter()
        sums = vu.compute_unit(job, self.ev, unit)
        return {"sums": sums, "setup_s": setup_s, "patch_s": time.perf_counter() - t0,
                "n_forwards": vu.forwards_of(job, unit)}


def _cause(exc: Exception) -> BaseException:
    """The exception a worker raised (its remote traceback chained), rather than Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        cause.__cause__ = exc
        return cause
    return exc
