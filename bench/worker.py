"""Run the measurement jobs of one model (in this process, or as ``python -m bench.worker JOBS.json``).

A job is a dict; its results go to files named in the job, so finished work survives a crash:

``{"kind": "exact", "dir": D, ...}``
    exact patching of the selected edges on each prompt group, through
    ``validation.patch_edges(out=D/group{g}.pt)`` (resumable). Writes ``D/exact.pt``
    (``[G, n_edges]``, NaN on edges not selected) and then ``D/meta.json`` (wall time summed over
    groups, peak memory, edges/s). ``meta.json`` marks a finished, reusable truth.
``{"kind": "attr", "out": P, ...}``
    times ``eap.attribute`` on the whole task (warm-up, then the median of repeats), measures
    its peak memory and the floor pass, then computes one attribution vector per prompt group
    (untimed). Writes ``P.pt`` (``[G, n_edges]``) and ``P.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import PeakMemory, floor_pass, median, time_call

_MODELS: dict[tuple, Any] = {}


def load(model_name: str, device: str | None, dtype: str | None) -> Any:
    """Load (and keep, per process) a model; dtype by name ('float32', ...) or None."""
    key = (model_name, device, dtype)
    if key not in _MODELS:
        import eap

        _MODELS.clear()  # one model at a time keeps memory measurements honest
        _MODELS[key] = eap.load_model(model_name, device=device, dtype=getattr(torch, dtype) if dtype else None)
    return _MODELS[key]


def make_task(model: Any, name: str, n: int, seed: int, kwargs: dict | None = None) -> Any:
    """The task of a cell. Only 'ioi' is built in; kwargs go to ``eap.tasks.<name>``."""
    import eap.tasks

    fn = getattr(eap.tasks, name, None)
    if fn is None:
        raise ValueError(f"unknown task {name!r}; built in: ioi")
    return fn(model, n, seed=seed, **(kwargs or {}))


def groups_of(n: int, groups: int) -> list[torch.Tensor]:
    """Split prompts 0..n-1 into G equal contiguous groups, G the largest divisor of n <= groups."""
    g = max(d for d in range(1, min(groups, n) + 1) if n % d == 0)
    size = n // g
    return [torch.arange(i * size, (i + 1) * size) for i in range(g)]


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_exact(model: Any, job: dict, progress: bool = True) -> dict:
    import eap
    import validation

    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    graph = eap.Graph.from_model(model)
    task = make_task(model, job["task"], job["n"], job["seed"], job.get("task_kwargs"))
    edges = torch.load(out / "edges.pt") if (out / "edges.pt").exists() else graph.select_edges(
        job["edges"], seed=job["seed"]
    )
    torch.save(edges, out / "edges.pt")
    (out / "edges.json").write_text(json.dumps({
        "index": edges.tolist(),
        "names": [graph.edge_names[i] for i in edges.tolist()],
        "kinds": [graph.edge_kind[i] for i in edges.tolist()],
        "n_edges": graph.n_edges,
    }))
    device = next(model.parameters()).device
    rows, total = [], 0.0
    peak = 0.0
    for g, idx in enumerate(groups_of(job["n"], job["groups"])):
        _log(f"exact {job['model']} n={job['n']} group {g + 1}: {len(edges)} edges", progress)
        sub = task.subset(idx)
        with PeakMemory(device) as pm:
            t0 = time.perf_counter()
            res = validation.patch_edges(
                model, graph, sub, edges=edges, seed=job["seed"], out=str(out / f"group{g}.pt"), progress=progress
            )
            total += time.perf_counter() - t0
        peak = max(peak, pm.mib)
        rows.append(res.detach().float().cpu())
    exact = torch.stack(rows)
    torch.save(exact, out / "exact.pt")
    meta = {
        "time_s": total,
        "peak_mib": peak,
        "memory_method": pm.method,
        "n_edges_selected": int(len(edges)),
        "n_edges": graph.n_edges,
        "edges_per_s": len(edges) / total if total > 0 else float("nan"),
        "groups": len(rows),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def run_attr(model: Any, job: dict, progress: bool = True) -> dict:
    import eap

    graph = eap.Graph.from_model(model)
    task = make_task(model, job["task"], job["n"], job["seed"], job.get("task_kwargs"))
    device = next(model.parameters()).device
    kw = dict(method=job["method"], batch_size=job.get("batch_size"), ig_steps=job.get("ig_steps", 5), progress=False)

    def call() -> Any:
        return eap.attribute(model, graph, task, **kw)

    times: list[float] = []
    peak = float("nan")
    floor_times: list[float] = []
    if job.get("repeats", 0) > 0:
        _log(f"time {job['method']} {job['model']} n={job['n']}", progress)
        floor_times = time_call(lambda: floor_pass(model, task), job["repeats"], 1, device)
        with PeakMemory(device) as pm:  # the warm-up call counts: it is the first, coldest call
            times = time_call(call, job["repeats"], 1, device)
        peak = pm.mib
    rows = [eap.attribute(model, graph, task.subset(idx), **kw).detach().float().cpu()
            for idx in groups_of(job["n"], job["groups"])]
    torch.save(torch.stack(rows), job["out"] + ".pt")
    t, f = median(times), median(floor_times)
    meta = {
        "time_s": t,
        "times_s": times,
        "repeats": len(times),
        "floor_s": f,
        "floor_ratio": t / f if times and f > 0 else float("nan"),
        "peak_mib": peak,
        "n_edges": graph.n_edges,
    }
    Path(job["out"] + ".json").write_text(json.dumps(meta, indent=1))
    return meta


def run_jobs(spec: dict, progress: bool = True) -> None:
    """Run ``spec['jobs']`` on ``spec['model']`` (loaded once)."""
    model = load(spec["model"], spec.get("device"), spec.get("dtype"))
    torch.manual_seed(0)
    if spec.get("describe_out"):
        from eap.models import describe

        Path(spec["describe_out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(spec["describe_out"]).write_text(json.dumps(describe(model), indent=1))
    for job in spec["jobs"]:
        job = {**job, "model": spec["model"]}
        if job["kind"] == "exact":
            run_exact(model, job, progress)
        elif job["kind"] == "attr":
            run_attr(model, job, progress)
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_jobs(spec, progress=spec.get("progress", True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
