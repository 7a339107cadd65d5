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

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from validation.errors import StoreError, StoreLocked, StoreMismatch
from validation.fingerprints import (  # noqa: F401  (re-exported: the store's names as they were)
    FORMAT, PATCHING_MODULES, cfg_dict, code_hash, default_path, describe_request, fingerprint, fingerprint_of,
    fingerprint_parts, package_version, patching_code_hash, source_hash, weights_hash,
)
from validation.lock import WriterLock, lock_path  # noqa: F401

__all__ = [
    "ResultStore", "StoreError", "StoreLocked", "StoreMismatch", "WriterLock", "journal_path", "load_file",
    "load_values", "lock_path", "merge",
]


# ---------------------------------------------------------------------------------- store
def journal_path(path: str | os.PathLike) -> Path:
    """The unit journal that belongs to results file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".units")



def _temp_files(path: Path) -> list[Path]:
    """Temp files of :meth:`ResultStore.save` for ``path`` (any writer's pid)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))



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
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # missing, cut short, not ours
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
