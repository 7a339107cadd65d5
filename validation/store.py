"""The results file of an exact-patching run: fingerprint, incremental atomic saves, resume, merge.

One file per (model, task, edges, scale[, shard]) request. It is rewritten atomically (temp file,
fsync, ``os.replace``) after every finished receiver chunk, so ``kill -9`` at any moment loses at
most the chunk in flight, and re-running with the same arguments measures nothing twice. A file
written for other arguments is refused (``StoreMismatch``), never mixed. bench uses these files as
its cache of exact truth: :func:`fingerprint` / :func:`default_path` give the key and location.

Values are in the metric's units: mean over prompts of metric(patched) - metric(clean); NaN =
not measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

FORMAT = "eap-bench/validation/1"


class StoreError(ValueError):
    """A results file is unreadable, incomplete, or does not fit the request."""


class StoreMismatch(StoreError):
    """A results file was written for different arguments."""


# ----------------------------------------------------------------------------- fingerprint
def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()


def weights_hash(model: Any, sample: int = 2048) -> str:
    """Cheap hash of a model's weights: per parameter its name, shape, dtype, float64 sum and
    ``sample`` evenly spaced entries (any retraining or different seed changes it)."""
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
        h.update(_tensor_bytes(flat.double().sum().reshape(1)))
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
        "metric": f"{_fn_name(task.metric_fn)}|{_fn_name(task.readout_fn)}",
        "items": sha(_tensor_bytes(torch.as_tensor(edges_idx).long())),
        "scale": repr(float(scale)),
        "kind": kind,
    }


def fingerprint(
    model: Any, graph: Any, task: Any, edges_idx: Int[Tensor, " k"], scale: float = 1.0, kind: str = "edges"
) -> str:
    """sha256 identifying an exact-patching request: model cfg + weights hash + dtype, graph
    spec, the task's token tensors, per-prompt tensors and metric/readout names, the requested
    edge (or node) indices, ``scale`` and ``kind`` ('edges' or 'nodes')."""
    parts = fingerprint_parts(model, graph, task, edges_idx, scale, kind)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_path(
    model: Any, graph: Any, task: Any, edges_idx: Tensor, scale: float = 1.0, kind: str = "edges",
    root: str | os.PathLike | None = None,
) -> Path:
    """Default cache file for a request: ``$EAP_VALIDATION_CACHE`` (or ``results/validation``)
    ``/<kind>-<fingerprint[:24]>.pt``."""
    root = Path(root or os.environ.get("EAP_VALIDATION_CACHE", "results/validation"))
    return root / f"{kind}-{fingerprint(model, graph, task, edges_idx, scale, kind)[:24]}.pt"


# ---------------------------------------------------------------------------------- store
class ResultStore:
    """In-memory results of one request (or one shard of it), saved atomically on ``save``."""

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
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = fp
        self.n_items = n_items
        self.requested = requested.cpu().long()
        self.assigned = assigned.cpu().long()
        self.shard = tuple(shard) if shard is not None else None
        self.meta = meta
        self.kind = kind
        self.values: Float[Tensor, " n"] = torch.full((n_items,), float("nan"), dtype=torch.float64)
        self.done: Bool[Tensor, " n"] = torch.zeros(n_items, dtype=torch.bool)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, fp, n_items, requested, assigned, shard, meta, kind) -> "ResultStore":
        """A fresh store, or the one at ``path`` if it was written for the same request
        (raises ``StoreMismatch`` otherwise)."""
        store = cls(path, fp, n_items, requested, assigned, shard, meta, kind)
        if store.path is not None and store.path.exists():
            data = load_file(store.path)
            if data["fingerprint"] != fp or data["kind"] != kind or data["n_items"] != n_items:
                old, now = data["meta"], meta
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
                    f"{store.path} holds results for different arguments (fingerprint "
                    f"{data['fingerprint'][:12]}… vs this run's {fp[:12]}…"
                    + (f"; differing: {', '.join(f'{k}: file {a!r} vs now {b!r}' for k, (a, b) in diff.items())}" if diff else
                       "; model weights, prompts, metric or edge list differ")
                    + "). Refusing to mix them: pass another output path or delete the file."
                )
            file_shard = tuple(data["shard"]) if data["shard"] is not None else None
            if file_shard != store.shard:
                raise StoreMismatch(
                    f"{store.path} is shard {file_shard} of this request but this run is shard {store.shard}; "
                    "use one file per shard"
                )
            store.values = data["values"].double()
            store.done = data["done"].bool()
        return store

    # ---------------------------------------------------------------- update
    def record(self, idx: Int[Tensor, " k"], values: Float[Tensor, " k"]) -> None:
        idx = idx.cpu().long()
        self.values[idx] = values.detach().cpu().double()
        self.done[idx] = True

    @property
    def complete(self) -> bool:
        return bool(self.done[self.assigned].all())

    def todo(self) -> Int[Tensor, " k"]:
        """Assigned items not measured yet (sorted)."""
        return self.assigned[~self.done[self.assigned]]

    def save(self) -> None:
        """Atomically write the file (temp + fsync + os.replace); no-op without a path."""
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
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def load_file(path: str | os.PathLike) -> dict:
    """Read a results file (checked for format)."""
    path = Path(path)
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:
        raise StoreError(f"cannot read results file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not an eap-bench validation results file ({FORMAT})")
    return data


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
        store = ResultStore(out, d0["fingerprint"], n_items, d0["requested"], d0["requested"], None, d0["meta"], d0["kind"])
        store.values, store.done = values.clone(), covered.clone()
        store.save()
    return values
