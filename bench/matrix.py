"""The benchmark matrix: models x dataset sizes x attribution methods, run cell by cell.

A *cell* is (model, task, n prompts, method, edge selection, seed). Its measurements:

* attribution: wall time (median of ``repeats`` after one warm-up) on all n prompts, peak
  memory (MiB over the pre-call baseline, see ``bench.measure``), the floor pass time and the
  ratio time / floor;
* exact patching of the selected edges (``validation.patch_edges``): wall time, edges/s, peak
  memory; cached per (model, task, n, seed, edges, groups, device, dtype) under
  ``<cache>/exact/<key>/`` so re-running or adding a method never recomputes it;
* agreement (``bench.agreement``) between the two edge vectors with 95% bootstrap CIs over
  prompt groups (prompts split into G equal groups; both methods give one vector per group).

Finished work is never lost: exact truth and attribution vectors are files, each finished cell
is ``<run>/cells/<id>.json`` (+ ``.npz`` with the mean vectors) and a re-run skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
DEFAULT_MODELS = ["toy-ioi-2l", "toy-ioi-4l"]
METHODS = ("eap", "eap-ig", "clean-corrupted")
REPO = Path(__file__).resolve().parent.parent
#: Settings a run directory is tied to (cells measured under other values would not be comparable).
FIXED_KEYS = ("task", "task_kwargs", "seed", "groups", "ig_steps", "batch_size", "device", "dtype")


@dataclass
class Config:
    """Everything that defines a run (flags or a JSON/TOML config file with these keys)."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    sizes: list[int] = field(default_factory=lambda: [16, 32])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    task: str = "ioi"
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    edges: str = "all"
    groups: int = 8
    repeats: int = 3
    bootstrap: int = 200
    ig_steps: int = 5
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    isolate: str = "model"
    cache_dir: str | None = None
    figures: bool = True
    worst: int = 10
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "Config":
        text = Path(path).read_text()
        if str(path).endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
        data = data.get("bench", data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
        if self.isolate not in ("model", "job", "none"):
            raise ValueError("isolate must be 'model', 'job' or 'none'")
        if any(int(n) < 1 for n in self.sizes):
            raise ValueError("sizes must be positive numbers of prompts")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80]


def exact_key(cfg: Config, model: str, n: int) -> str:
    """Cache key of the exact truth of one (model, task, n, seed, edges, groups, device, dtype)."""
    ident = {
        "model": _model_identity(model),
        "task": cfg.task,
        "task_kwargs": cfg.task_kwargs,
        "n": n,
        "seed": cfg.seed,
        "edges": cfg.edges,
        "groups": cfg.groups,
        "device": cfg.device or "auto",
        "dtype": cfg.dtype or "float32",
    }
    h = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{slug(model)}-{cfg.task}-n{n}-s{cfg.seed}-{slug(cfg.edges)}-{h}"


def _model_identity(model: str) -> str:
    """Model name; for a local directory its absolute path and the config/weights' mtimes."""
    p = Path(model).expanduser()
    try:
        from eap.models import EMBEDDED_DIR, embedded_names

        if model in embedded_names():  # embedded models can be retrained: key on their files too
            p = EMBEDDED_DIR / model
    except ImportError:  # pragma: no cover
        pass
    if p.is_dir():
        stamps = sorted(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in p.iterdir() if f.is_file())
        return f"{model}|{','.join(stamps)}"
    return model


def cell_id(cfg: Config, model: str, n: int, method: str) -> str:
    return f"{slug(model)}__{cfg.task}__n{n}__{method}__{slug(cfg.edges)}__s{cfg.seed}"


def environment(device: str | None = None) -> dict[str, Any]:
    """Package versions, device, git commit: what a result depends on."""
    import importlib.metadata as md

    import torch

    vers = {}
    for pkg in ("torch", "transformer-lens", "transformers", "numpy", "scipy", "matplotlib", "eap-bench"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "device": device or ("cuda" if cuda else "cpu"),
        "packages": vers,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------- running
def _spawn(spec: dict, work: Path, cfg: Config) -> None:
    """Run worker jobs in this process or in a fresh one (see ``Config.isolate``)."""
    if cfg.isolate == "none":
        from bench.worker import run_jobs

        run_jobs(spec, progress=cfg.progress)
        return
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"jobs-{slug(spec['model'])}-{os.getpid()}-{time.time_ns()}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed,
    # so the RSS of a later measurement is not hidden by heap memory kept from an earlier one.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "bench.worker", str(path)], env=env)
    path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {spec['model']} failed with exit code {proc.returncode}")


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) the matrix into ``run_dir``; returns the results dict (also written)."""
    cfg.check()
    run_dir = Path(run_dir)
    (run_dir / "cells").mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    old_cfg = run_dir / "config.json"
    if old_cfg.exists():
        prev = json.loads(old_cfg.read_text())
        diff = [k for k in FIXED_KEYS if prev.get(k) != dataclasses.asdict(cfg)[k]]
        if diff:
            raise ValueError(f"{run_dir} was run with other {', '.join(diff)} ("
                             + ", ".join(f"{k}={prev.get(k)!r}" for k in diff) + "); use another --out")
    old_cfg.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    stats = {"exact_computed": 0, "exact_reused": 0, "cells_computed": 0, "cells_reused": 0}
    for model in cfg.models:
        jobs = []
        todo = []
        for n in cfg.sizes:
            edir = cache / "exact" / exact_key(cfg, model, n)
            pending = [m for m in cfg.methods if not (run_dir / "cells" / f"{cell_id(cfg, model, n, m)}.json").exists()]
            stats["cells_reused"] += len(cfg.methods) - len(pending)
            if not pending:
                continue
            if (edir / "meta.json").exists():
                stats["exact_reused"] += 1
            else:
                stats["exact_computed"] += 1
                jobs.append(dict(kind="exact", dir=str(edir), task=cfg.task, task_kwargs=cfg.task_kwargs, n=n,
                                 seed=cfg.seed, edges=cfg.edges, groups=cfg.groups))
            for m in pending:
                out = run_dir / "attr" / cell_id(cfg, model, n, m)
                todo.append((n, m, edir, out))
                if Path(str(out) + ".json").exists() and Path(str(out) + ".pt").exists():
                    continue  # measured before an interruption: only the agreement is missing
                jobs.append(dict(kind="attr", out=str(out), task=cfg.task, task_kwargs=cfg.task_kwargs, n=n,
                                 seed=cfg.seed, groups=cfg.groups, method=m, repeats=cfg.repeats,
                                 ig_steps=cfg.ig_steps, batch_size=cfg.batch_size))
        if not todo:
            continue
        (run_dir / "attr").mkdir(exist_ok=True)
        base = dict(model=model, device=cfg.device, dtype=cfg.dtype, progress=cfg.progress,
                    describe_out=str(run_dir / "models" / f"{slug(model)}.json"))
        if not jobs:
            pass
        elif cfg.isolate == "job":
            for job in jobs:
                _spawn({**base, "jobs": [job]}, run_dir / "work", cfg)
        else:
            _spawn({**base, "jobs": jobs}, run_dir / "work", cfg)
        for n, m, edir, out in todo:
            finish_cell(cfg, run_dir, model, n, m, edir, Path(str(out)))
            stats["cells_computed"] += 1
    results = collect(cfg, run_dir, stats)
    return results


def finish_cell(cfg: Config, run_dir: Path, model: str, n: int, method: str, edir: Path, out: Path) -> dict:
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
    cid = cell_id(cfg, model, n, method)
    cell = {
        "id": cid,
        "model": model,
        "model_info": json.loads(desc_path.read_text()) if desc_path.exists() else {},
        "task": cfg.task,
        "n": n,
        "method": method,
        "seed": cfg.seed,
        "edges_spec": cfg.edges,
        "n_edges": edges["n_edges"],
        "n_edges_selected": len(idx),
        "groups": A.shape[0],
        "bootstrap": cfg.bootstrap,
        "attribution": attr_meta,
        "exact": {**exact_meta, "cache": str(edir)},
        "speedup": exact_meta["time_s"] * (len(idx) and edges["n_edges"] / len(idx)) / attr_meta["time_s"]
        if attr_meta.get("repeats") else float("nan"),
        "stats": boot,
        "by_kind_n": {k: int(sum(1 for x in kinds if x == k)) for k in dict.fromkeys(kinds)},
        "worst": worst_edges(a, e, edges["names"], kinds, cfg.worst),
        "metric_scale": {"max_abs_exact": float(np.abs(e).max()), "max_abs_attribution": float(np.abs(a).max())},
    }
    np.savez_compressed(run_dir / "cells" / f"{cid}.npz", attribution=a, exact=e,
                        names=np.asarray(edges["names"]), kinds=np.asarray(kinds))
    tmp = run_dir / "cells" / f"{cid}.json.tmp"
    tmp.write_text(json.dumps(cell, indent=1, allow_nan=True))
    tmp.replace(run_dir / "cells" / f"{cid}.json")
    return cell


def load_cells(run_dir: str | Path) -> list[dict]:
    cells = [json.loads(p.read_text()) for p in sorted(Path(run_dir, "cells").glob("*.json"))]
    return sorted(cells, key=lambda c: (c["model"], c["task"], c["n"], METHODS.index(c["method"]) if c["method"] in METHODS else 9))


def collect(cfg: Config, run_dir: str | Path, stats: dict | None = None) -> dict:
    """Gather every finished cell of a run into ``results.json`` (+ csv, md, figures)."""
    from bench import report

    run_dir = Path(run_dir)
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "eap-bench",
        "config": dataclasses.asdict(cfg),
        "environment": environment(cfg.device),
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
