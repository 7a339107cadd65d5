"""The results file of an exact-patching run: fingerprint, units, resume, merge.

Exact patching is done in *units*: the requested edges into one receiver (or the requested
senders of one node group) on one prompt batch (``validation.patch.Unit``). A unit's result is,
per item, the float64 sum over the batch's prompts of ``metric(patched) - metric(clean)``. An
item is finished when every prompt batch has been recorded for it; its value is then the sum
over batches (in batch order) divided by the number of prompts, in the metric's units. NaN =
not measured.

Files
-----
``out`` (``torch.save`` dict, format ``FORMAT``) holds the request (fingerprint, items, shard,
``meta``), the finished values, and the partial per-batch sums of unfinished items. It is
rewritten atomically (temp file, fsync, ``os.replace``) when a run starts, after every prompt
batch and when the run ends or fails. ``out.units`` is a journal: one JSON line per finished
unit, appended and fsync'd as the unit finishes, folded into ``out`` at the next rewrite. So
``kill -9`` at any moment loses at most the unit in flight, and re-running with the same
arguments measures nothing twice. Units can be recorded in any order, from any worker
(:meth:`ResultStore.record_unit`); the result does not depend on the order.

One writer at a time: an open store holds ``out.lock`` (:class:`WriterLock`); a second process
opening the same file is refused (``StoreLocked``) with the first one's host and pid. The lock
dies with its process however it ends (``kill -9`` too), so a lock file left behind is taken
over by the next run, which also deletes the temp files a killed writer left.

A file written for other arguments is refused (``StoreMismatch``), never mixed. The key is
:func:`fingerprint`: model config, weights, dtype, graph, prompts, per-prompt data, the
metric's and readout's *code* (:func:`code_hash`: bytecode, constants, closed-over values,
referenced globals), the requested items, scale, kind, the package version and a hash of the
source of the modules that compute exact patching (:func:`patching_code_hash`) — so a fix to
the metric or to the patching code never silently reuses old truth. bench uses these files as
its cache of exact truth: :func:`fingerprint` / :func:`default_path` give the key and location.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import errno
import fcntl
import json
import os
import socket
import time
import types
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

FORMAT = "eap-bench/validation/2"
#: Modules whose source determines exact-patching numbers (missing ones are skipped).
PATCHING_MODULES = (
    "validation.patch", "validation.runner", "eap.arch", "eap.hooks", "eap.graph", "eap.task",
)
#: Elements per chunk when summing a parameter in float64 (bounds the transient copy).
_SUM_CHUNK = 2**18


class StoreError(ValueError):
    """A results file is unreadable, incomplete, or does not fit the request."""


class StoreMismatch(StoreError):
    """A results file was written for different arguments."""


class StoreLocked(StoreError):
    """Another process is writing the results file."""


# ----------------------------------------------------------------------------- fingerprint
def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _sum64(flat: Tensor) -> float:
    """Float64 sum of a 1-d tensor in chunks (no float64 copy of the whole tensor)."""
    total = 0.0
    for chunk in flat.split(_SUM_CHUNK):
        total += float(chunk.sum(dtype=torch.float64))
    return total


def weights_hash(model: Any, sample: int = 2048) -> str:
    """Cheap hash of a model's weights: per parameter its name, shape, dtype, float64 sum and
    ``sample`` evenly spaced entries (any retraining or different seed changes it). The sum is
    taken in chunks, so no full float64 copy of a parameter is made."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(_tensor_bytes(flat[::step][:sample].double()))
        h.update(repr(_sum64(flat)).encode())
    return h.hexdigest()


def cfg_dict(model: Any) -> dict[str, Any]:
    """The model config's plain fields (device-independent)."""
    cfg = model.cfg
    items = cfg.items() if isinstance(cfg, dict) else vars(cfg).items()
    skip = {"device", "n_devices", "dtype", "model_name", "tokenizer_name"}  # names: temp dirs for random models
    return {
        k: v for k, v in sorted(items) if k not in skip and not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))
    }


def _fn_name(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# ------------------------------------------------------------------------ code of callables
def code_hash(fn: Any) -> str:
    """Hash (16 hex digits) of what a callable computes, for the fingerprint of its results.

    A Python function is hashed by its bytecode, constants (nested functions and lambdas
    included), names, default arguments, the values it closes over (tensors by their bytes),
    and the globals it reads: tensors and plain values by value, functions defined outside
    installed libraries recursively. ``functools.partial`` adds its arguments, a bound method
    its object's attributes, a callable object its class's ``__call__`` and attributes.
    Modules, classes, library and builtin functions count by name only, so do objects of other
    types (e.g. a model the metric calls). Line numbers and formatting do not count; editing
    what the function does, or a value it closes over, changes the hash. Bytecode differs
    between Python versions: a new interpreter means new truth."""
    if fn is None:
        return "none"
    h = hashlib.sha256()
    _feed(h, fn, set(), 0)
    return h.hexdigest()[:16]


def _library_function(fn: types.FunctionType) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    top = mod.split(".")[0]
    return top in {"torch", "numpy", "math", "functools", "builtins", "einops", "jaxtyping", "transformer_lens",
                   "transformers", "scipy", "typing"}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, code.co_kwonlyargcount)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _feed_code(h, c)
        else:
            h.update(repr(c).encode())


def _feed(h: Any, obj: Any, seen: set[int], depth: int) -> None:
    """Add ``obj``'s value (or code) to hash ``h``; see :func:`code_hash`."""
    if depth > 8:
        h.update(f"<deep {type(obj).__qualname__}>".encode())
        return
    if isinstance(obj, Tensor):
        t = obj.detach()
        if t.numel() > 2**24:  # huge: shape, dtype, a sample and the sum
            flat = t.reshape(-1)
            h.update(_tensor_bytes(flat[:: max(1, flat.numel() // 4096)][:4096]))
            h.update(repr(_sum64(flat)).encode())
        else:
            h.update(_tensor_bytes(t))
        return
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
        return
    if isinstance(obj, (tuple, list, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        h.update(f"<{type(obj).__name__} {len(items)}>".encode())
        for v in items:
            _feed(h, v, seen, depth + 1)
        return
    if isinstance(obj, dict):
        h.update(f"<dict {len(obj)}>".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], seen, depth + 1)
        return
    if isinstance(obj, (types.ModuleType, type)):
        h.update(f"<{type(obj).__name__} {getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj.__name__)}>".encode())
        return
    if id(obj) in seen:
        h.update(b"<seen>")
        return
    if isinstance(obj, functools.partial):
        seen.add(id(obj))
        h.update(b"<partial>")
        _feed(h, obj.func, seen, depth + 1)
        _feed(h, obj.args, seen, depth + 1)
        _feed(h, obj.keywords, seen, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        seen.add(id(obj))
        h.update(b"<method>")
        _feed(h, obj.__func__, seen, depth + 1)
        _feed(h, obj.__self__, seen, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        seen.add(id(obj))
        h.update(f"<function {obj.__qualname__}>".encode())
        if depth > 0 and _library_function(obj):
            h.update(str(obj.__module__).encode())
            return
        code = obj.__code__
        _feed_code(h, code)
        _feed(h, obj.__defaults__, seen, depth + 1)
        _feed(h, obj.__kwdefaults__, seen, depth + 1)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                h.update(b"<empty cell>")
                continue
            _feed(h, value, seen, depth + 1)
        g = obj.__globals__
        for name in sorted(_code_names(code)):
            if name in g:
                h.update(f"<global {name}>".encode())
                _feed(h, g[name], seen, depth + 1)
        return
    if callable(obj) and hasattr(type(obj), "__call__") and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
        seen.add(id(obj))
        h.update(f"<callable {type(obj).__module__}.{type(obj).__qualname__}>".encode())
        _feed(h, type(obj).__call__, seen, depth + 1)
        _feed(h, dict(vars(obj)), seen, depth + 1)
        return
    # builtins, library objects, models: by type (and qualified name where there is one)
    h.update(f"<{type(obj).__module__}.{type(obj).__qualname__} {getattr(obj, '__qualname__', '')}>".encode())


@functools.lru_cache(maxsize=1)
def patching_code_hash() -> str:
    """Hash (16 hex digits) of the source of the modules that compute exact patching
    (``PATCHING_MODULES``): any change to them is a new version of the truth."""
    h = hashlib.sha256()
    for name in PATCHING_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        mod = importlib.import_module(name)
        h.update(name.encode())
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def package_version() -> str:
    try:
        return importlib.metadata.version("eap-bench")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def describe_request(model: Any, graph: Any, task: Any, items: Int[Tensor, " k"], scale: float, kind: str) -> dict:
    """Human-readable facts of a request (stored as ``meta``, used in mismatch messages)."""
    dtype = next(model.parameters()).dtype
    return {
        "kind": kind,
        "graph": repr(graph.spec),
        "dtype": str(dtype).replace("torch.", ""),
        "task": getattr(task, "name", "?"),
        "n_prompts": int(task.n_prompts),
        "seq_len": int(task.seq_len),
        "metric": _fn_name(task.metric_fn),
        "n_requested": int(items.numel()),
        "scale": float(scale),
        "seed": task.info.get("seed") if isinstance(getattr(task, "info", None), dict) else None,
        "package": package_version(),
    }


def fingerprint_parts(
    model: Any, graph: Any, task: Any, edges_idx: Int[Tensor, " k"], scale: float = 1.0, kind: str = "edges"
) -> dict[str, str]:
    """The hashed components of a request's fingerprint (see :func:`fingerprint`)."""

    def sha(*chunks: bytes) -> str:
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        return h.hexdigest()[:16]

    per_prompt = [key.encode() + _tensor_bytes(task.per_prompt[key]) for key in sorted(task.per_prompt)]
    return {
        "format": FORMAT,
        "model_cfg": sha(json.dumps(cfg_dict(model), sort_keys=True, default=str).encode()),
        "dtype": str(next(model.parameters()).dtype),
        "weights": weights_hash(model)[:16],
        "graph": repr(graph.spec),
        "prompts": sha(_tensor_bytes(task.clean.long()), _tensor_bytes(task.corrupted.long())),
        "per_prompt": sha(*per_prompt),
        "metric": f"{_fn_name(task.metric_fn)}|{code_hash(task.metric_fn)}",
        "readout": f"{_fn_name(task.readout_fn)}|{code_hash(task.readout_fn)}",
        "items": sha(_tensor_bytes(torch.as_tensor(edges_idx).long())),
        "scale": repr(float(scale)),
        "kind": kind,
        "package": package_version(),
        "code": patching_code_hash(),
    }


def fingerprint_of(parts: dict[str, str]) -> str:
    """The sha256 of a request's :func:`fingerprint_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fingerprint(
    model: Any, graph: Any, task: Any, edges_idx: Int[Tensor, " k"], scale: float = 1.0, kind: str = "edges"
) -> str:
    """sha256 identifying an exact-patching request: model cfg + weights hash + dtype, graph
    spec, the task's token tensors, per-prompt tensors, the metric's and readout's names and
    code (:func:`code_hash`), the requested edge (or node) indices, ``scale``, ``kind`` ('edges'
    or 'nodes'), the package version and the patching code (:func:`patching_code_hash`)."""
    return fingerprint_of(fingerprint_parts(model, graph, task, edges_idx, scale, kind))


def default_path(
    model: Any, graph: Any, task: Any, edges_idx: Tensor, scale: float = 1.0, kind: str = "edges",
    root: str | os.PathLike | None = None, fp: str | None = None,
) -> Path:
    """Default cache file for a request: ``$EAP_VALIDATION_CACHE`` (or ``results/validation``)
    ``/<kind>-<fingerprint[:24]>.pt`` (``fp``: a fingerprint already computed)."""
    root = Path(root or os.environ.get("EAP_VALIDATION_CACHE", "results/validation"))
    fp = fp or fingerprint(model, graph, task, edges_idx, scale, kind)
    return root / f"{kind}-{fp[:24]}.pt"


# ---------------------------------------------------------------------------------- store
def journal_path(path: str | os.PathLike) -> Path:
    """The unit journal that belongs to results file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".units")


def lock_path(path: str | os.PathLike) -> Path:
    """The writer lock that belongs to results file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _temp_files(path: Path) -> list[Path]:
    """Temp files of :meth:`ResultStore.save` for ``path`` (any writer's pid)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot; Linux), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class WriterLock:
    """The exclusive right to write one results file: ``<out>.lock``.

    The file is locked with ``flock`` while the store is open and holds the writer's host, pid,
    process start time and the time it took the lock (for the message another writer gets). The
    kernel drops an ``flock`` when its process ends, however it ends, so a lock file left by a
    ``kill -9`` is stale by construction and the next writer takes it over. On a filesystem
    without locks (some network filesystems) the record decides instead: a lock of a process of
    this host that no longer runs (pid gone, or reused by a process that started later) is stale;
    a live one, or one from another host, is refused."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.data_path = Path(path)
        self.path = lock_path(path)
        self._fd: int | None = None
        self.took_over: dict | None = None  #: the record of a dead writer's lock this one replaced

    @staticmethod
    def _record() -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    @staticmethod
    def _parse(text: str) -> dict:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _refuse(self, rec: dict) -> StoreLocked:
        who = (f"process {rec.get('pid', '?')} on host {rec.get('host', '?')} (since {rec.get('since', '?')})"
               if rec else "another process")
        return StoreLocked(
            f"{self.data_path} is being written by {who}: two writers would corrupt it. Wait for that run "
            f"to finish (re-running it resumes), or pass another output path. If no such process exists "
            f"(e.g. it ran on a machine that was lost), delete {self.path}."
        )

    def acquire(self) -> "WriterLock":
        """Take the lock or raise ``StoreLocked``; returns self."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise self._refuse(rec) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                self._by_record(fd)  # no locks on this filesystem
                return self
            # the holder before us may have released (deleted) the file after we opened it
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._own(fd)
                return self
            os.close(fd)
        raise StoreLocked(f"could not take {self.path}: it keeps being replaced by other writers")

    def _own(self, fd: int) -> None:
        old = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        self.took_over = old or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _by_record(self, fd: int) -> None:
        rec = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if rec and (rec.get("host") != socket.gethostname() or rec.get("pid") == os.getpid()
                    or _running(int(rec.get("pid", -1)), rec.get("start"))):
            os.close(fd)
            raise self._refuse(rec)
        self._own(fd)

    def release(self) -> None:
        """Delete the lock file and drop the lock (no-op if not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a store dropped without close()
        try:
            self.release()
        except Exception:
            pass


class ResultStore:
    """Results of one request (or one shard of it): finished values and per-batch partial sums.

    ``prompts_per_batch`` fixes the prompt batches (consecutive slices; the last may be
    shorter) whose sums :meth:`record_unit` takes; see the module docstring for the files."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        fp: str,
        n_items: int,
        requested: Int[Tensor, " k"],
        assigned: Int[Tensor, " k"],
        shard: tuple[int, int] | None,
        meta: dict,
        kind: str,
        n_prompts: int = 1,
        prompts_per_batch: int | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = fp
        self.n_items = n_items
        self.requested = requested.cpu().long()
        self.assigned = assigned.cpu().long()
        self.shard = tuple(shard) if shard is not None else None
        self.meta = meta
        self.kind = kind
        self.n_prompts = int(n_prompts)
        self.values: Float[Tensor, " n"] = torch.full((n_items,), float("nan"), dtype=torch.float64)
        self.done: Bool[Tensor, " n"] = torch.zeros(n_items, dtype=torch.bool)
        self._journal = None
        self.lock: WriterLock | None = None  #: the writer lock while open (stores with a path)
        self.set_batches(prompts_per_batch or self.n_prompts)

    # ------------------------------------------------------------------ batches
    @property
    def n_batches(self) -> int:
        return -(-self.n_prompts // self.prompts_per_batch)

    def set_batches(self, prompts_per_batch: int) -> int:
        """Use prompt batches of ``prompts_per_batch``; partial sums recorded for other batches
        are dropped (finished values are kept). Returns the number of (item, batch) sums dropped."""
        dropped = int(self.measured.sum()) if hasattr(self, "measured") else 0
        self.prompts_per_batch = max(1, min(int(prompts_per_batch), self.n_prompts))
        self.sums: Float[Tensor, "b n"] = torch.zeros(self.n_batches, self.n_items, dtype=torch.float64)
        self.measured: Bool[Tensor, "b n"] = torch.zeros(self.n_batches, self.n_items, dtype=torch.bool)
        return dropped

    @property
    def has_partial(self) -> bool:
        """Whether unfinished items have sums for some prompt batches."""
        return bool(self.measured.any())

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, fp, n_items, requested, assigned, shard, meta, kind, n_prompts=1,
             prompts_per_batch=None) -> "ResultStore":
        """A fresh store (written at once when ``path`` is given), or the one at ``path`` (with
        its journal) if it was written for the same request (``StoreMismatch`` otherwise). A
        resumed store keeps the file's prompt batches; see :meth:`set_batches` to change them.

        With a path, the store holds the file's :class:`WriterLock` until :meth:`close`
        (``StoreLocked`` if another process writes it) and deletes temp files a killed writer
        left."""
        store = cls(path, fp, n_items, requested, assigned, shard, meta, kind, n_prompts, prompts_per_batch)
        if store.path is None:
            return store
        store.lock = WriterLock(store.path).acquire()
        try:
            for tmp in _temp_files(store.path):  # only the lock holder writes temp files: these are orphans
                tmp.unlink(missing_ok=True)
            if store.path.exists():
                data = load_file(store.path)
                store._check_same(data)
                store.values = data["values"].double()
                store.done = data["done"].bool()
                store.prompts_per_batch = int(data["prompts_per_batch"])
                store.sums = data["sums"].double().clone()
                store.measured = data["measured"].bool().clone()
            elif journal_path(store.path).exists():
                journal_path(store.path).unlink()  # a journal without its file: nothing was finished
            store.save()
        except BaseException:
            store.release()
            raise
        return store

    def _check_same(self, data: dict) -> None:
        if data["fingerprint"] != self.fingerprint or data["kind"] != self.kind or data["n_items"] != self.n_items:
            old, now = data["meta"], self.meta
            old_parts, now_parts = old.get("parts", {}), now.get("parts", {})
            diff = {
                k: (old.get(k), now.get(k))
                for k in sorted(set(now) | set(old))
                if k != "parts" and old.get(k) != now.get(k)
            }
            diff.update({
                f"hash of {k}": (old_parts.get(k), now_parts.get(k))
                for k in sorted(set(now_parts) | set(old_parts))
                if old_parts.get(k) != now_parts.get(k)
            })
            raise StoreMismatch(
                f"{self.path} holds results for different arguments (fingerprint "
                f"{data['fingerprint'][:12]}… vs this run's {self.fingerprint[:12]}…"
                + (f"; differing: {', '.join(f'{k}: file {a!r} vs now {b!r}' for k, (a, b) in diff.items())}" if diff else
                   "; model weights, prompts, metric or edge list differ")
                + "). Refusing to mix them: pass another output path or delete the file."
            )
        file_shard = tuple(data["shard"]) if data["shard"] is not None else None
        if file_shard != self.shard:
            raise StoreMismatch(
                f"{self.path} is shard {file_shard} of this request but this run is shard {self.shard}; "
                "use one file per shard"
            )

    # ---------------------------------------------------------------- update
    def record_unit(self, batch: int, items: Int[Tensor, " k"] | Sequence[int], sums: Float[Tensor, " k"]) -> None:
        """Record a finished unit: for each item, the float64 sum over prompt batch ``batch`` of
        metric(patched) - metric(clean). Any order, any worker; recording a unit twice is
        harmless. Items whose every batch is recorded become finished values (mean over all
        prompts). Appended to the journal at once when the store has a path."""
        idx = torch.as_tensor(items, dtype=torch.long).cpu()
        vals = torch.as_tensor(sums).detach().cpu().double().reshape(-1)
        if idx.numel() != vals.numel():
            raise StoreError(f"unit of {idx.numel()} items got {vals.numel()} sums")
        if not 0 <= int(batch) < self.n_batches:
            raise StoreError(f"prompt batch {batch} out of range (the store has {self.n_batches})")
        self._apply(int(batch), idx, vals)
        if self.path is not None:
            self._append({"batch": int(batch), "items": idx.tolist(), "sums": vals.tolist()})

    def _apply(self, batch: int, idx: Tensor, vals: Tensor) -> None:
        keep = ~self.done[idx]  # a unit recorded again after its items finished changes nothing
        idx, vals = idx[keep], vals[keep]
        self.sums[batch, idx] = vals
        self.measured[batch, idx] = True
        fin = idx[self.measured[:, idx].all(0) & ~self.done[idx]]
        if len(fin):
            total = self.sums[0, fin].clone()
            for b in range(1, self.n_batches):  # in batch order: the same sum whatever the recording order
                total += self.sums[b, fin]
            self.values[fin] = total / self.n_prompts
            self.done[fin] = True
            self.sums[:, fin] = 0.0
            self.measured[:, fin] = False

    def unit_done(self, batch: int, items: Int[Tensor, " k"]) -> bool:
        """Whether every item of a unit is finished or has batch ``batch`` recorded."""
        idx = torch.as_tensor(items, dtype=torch.long)
        return bool((self.done[idx] | self.measured[batch, idx]).all())

    @property
    def complete(self) -> bool:
        return bool(self.done[self.assigned].all())

    def todo(self) -> Int[Tensor, " k"]:
        """Assigned items not finished yet (sorted)."""
        return self.assigned[~self.done[self.assigned]]

    # ------------------------------------------------------------------- files
    def _append(self, record: dict) -> None:
        if self._journal is None:
            jp = journal_path(self.path)
            fresh = not jp.exists() or jp.stat().st_size == 0
            self._journal = open(jp, "a")
            if fresh:
                self._journal.write(json.dumps(self._header()) + "\n")
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _header(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "prompts_per_batch": self.prompts_per_batch,
                "n_prompts": self.n_prompts}

    def save(self) -> None:
        """Atomically write the file (temp + fsync + os.replace) and empty the journal; no-op
        without a path."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "n_items": self.n_items,
            "requested": self.requested,
            "assigned": self.assigned,
            "shard": list(self.shard) if self.shard is not None else None,
            "meta": self.meta,
            "values": self.values,
            "done": self.done,
            "complete": self.complete,
            "n_prompts": self.n_prompts,
            "prompts_per_batch": self.prompts_per_batch,
            "sums": self.sums,
            "measured": self.measured,
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        jp = journal_path(self.path)
        if jp.exists():
            jp.unlink()

    def close(self) -> None:
        """Save (folding the journal into the file), release the journal and the writer lock."""
        try:
            self.save()
        finally:
            self.release()

    def release(self) -> None:
        """Release the writer lock without saving (no-op if not held)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _replay(data: dict, path: Path) -> dict:
    """Fold the journal of ``path`` (units finished after the file was written) into ``data``."""
    jp = journal_path(path)
    if not jp.exists():
        return data
    lines = jp.read_text().split("\n")
    if not lines or not lines[0]:
        return data
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        warnings.warn(f"{jp}: unreadable journal header; its units are ignored")
        return data
    if header.get("fingerprint") != data["fingerprint"] or header.get("prompts_per_batch") != data["prompts_per_batch"]:
        warnings.warn(f"{jp} belongs to another request or prompt batching; its units are ignored")
        return data
    store = ResultStore(None, data["fingerprint"], data["n_items"], data["requested"], data["assigned"],
                        data["shard"], data["meta"], data["kind"], data["n_prompts"], data["prompts_per_batch"])
    store.values, store.done = data["values"].double().clone(), data["done"].bool().clone()
    store.sums, store.measured = data["sums"].double().clone(), data["measured"].bool().clone()
    # the last line may be cut short by a kill: only complete lines count
    for line in lines[1:-1]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{jp}: skipping an unreadable unit record")
            continue
        store._apply(int(rec["batch"]), torch.tensor(rec["items"], dtype=torch.long),
                     torch.tensor(rec["sums"], dtype=torch.float64))
    data = dict(data, values=store.values, done=store.done, sums=store.sums, measured=store.measured)
    data["complete"] = bool(store.complete)
    return data


def load_file(path: str | os.PathLike) -> dict:
    """Read a results file (checked for format), with the units of its journal folded in."""
    path = Path(path)
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:
        raise StoreError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise StoreError(
            f"{path} is not an eap-bench validation results file ({FORMAT})"
            + (f": it was written in format {found!r} by an older version; delete it to recompute" if found else "")
        )
    return _replay(data, path)


def load_values(path: str | os.PathLike) -> Float[Tensor, " n"]:
    """The values of a complete, unsharded results file (NaN = not requested)."""
    data = load_file(path)
    if data["shard"] is not None:
        raise StoreError(f"{path} is shard {data['shard']}: merge the shards with validation.merge")
    if not bool(data["done"][data["assigned"]].all()):
        missing = int((~data["done"][data["assigned"]]).sum())
        raise StoreError(f"{path} is incomplete ({missing} items missing): re-run the same command to resume")
    return data["values"]


def merge(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> Float[Tensor, " n"]:
    """Combine the shard files of one request into one tensor (NaN = not requested).

    Checks that all fingerprints agree, every shard ``0..n-1`` is present exactly once and
    complete, shards are disjoint, and together they cover exactly the requested items. With
    ``out``, also writes the merged (unsharded) results file."""
    if not paths:
        raise StoreError("merge needs at least one results file")
    files = [(Path(p), load_file(p)) for p in paths]
    p0, d0 = files[0]
    for p, d in files[1:]:
        if d["fingerprint"] != d0["fingerprint"] or d["kind"] != d0["kind"]:
            raise StoreMismatch(f"{p} and {p0} belong to different requests (fingerprints differ); refusing to merge")
    counts = {tuple(d["shard"])[1] if d["shard"] else 1 for _, d in files}
    if len(counts) != 1:
        raise StoreError(f"files come from different shardings: {sorted(counts)} parts")
    n_parts = counts.pop()
    seen: dict[int, Path] = {}
    for p, d in files:
        i = d["shard"][0] if d["shard"] else 0
        if i in seen:
            raise StoreError(f"shard {i}/{n_parts} given twice: {seen[i]} and {p}")
        seen[i] = p
    missing_shards = sorted(set(range(n_parts)) - set(seen))
    if missing_shards:
        raise StoreError(f"shards {missing_shards} of {n_parts} are missing")
    n_items = d0["n_items"]
    values = torch.full((n_items,), float("nan"), dtype=torch.float64)
    covered = torch.zeros(n_items, dtype=torch.bool)
    for p, d in files:
        a = d["assigned"]
        if not bool(d["done"][a].all()):
            raise StoreError(f"{p} is incomplete ({int((~d['done'][a]).sum())} items missing): resume it first")
        if bool(covered[a].any()):
            raise StoreError(f"{p} overlaps another shard ({int(covered[a].sum())} duplicated items)")
        covered[a] = True
        values[a] = d["values"][a]
    req = torch.zeros(n_items, dtype=torch.bool)
    req[d0["requested"]] = True
    if not torch.equal(covered, req):
        raise StoreError(
            f"shards do not cover the request: {int((req & ~covered).sum())} missing, "
            f"{int((covered & ~req).sum())} not requested"
        )
    if out is not None:
        store = ResultStore(out, d0["fingerprint"], n_items, d0["requested"], d0["requested"], None, d0["meta"],
                            d0["kind"], d0["n_prompts"], d0["n_prompts"])
        store.values, store.done = values.clone(), covered.clone()
        with WriterLock(out):
            for tmp in _temp_files(Path(out)):
                tmp.unlink(missing_ok=True)
            store.save()
    return values
