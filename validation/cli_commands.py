"""Subcommands of ``python -m validation``: ``certify`` and ``circuit``, and the ``--task`` flag.

    python -m validation certify --model toy-gpt2-4l --task ioi --n 32 --methods eap,eap-ig \\
        --budget 300 --threshold 2% --confidence 0.95 --out results/cert [--json cert.json]
    python -m validation certify ... --scores graph.json[,other.json]    # scores from graph files
    python -m validation circuit --model toy-gpt2-4l --task ioi --n 32 --graph circuit.json [--graph b.json]

``--task`` takes a built-in name (``eap.tasks.TASKS``: ioi, greater-than, induction, sva) or
``module:function`` (a builder ``fn(model, n, seed=0, **kwargs) -> eap.Task``, importable from
``PYTHONPATH``), as bench's ``--tasks`` does; ``--task-kwargs`` passes JSON keyword arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

import torch

from eap.interventions import INTERVENTIONS


def dtype_arg(name: str | None):
    """The torch dtype a ``--dtype`` value names (None: the model's default)."""
    if name is None:
        return None
    table = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise SystemExit(f"unknown --dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="ioi", help="built-in task name (ioi, greater-than, induction, sva) or "
                   "module:function returning an eap.Task (builder(model, n, seed=0, **kwargs))")
    p.add_argument("--task-kwargs", default=None, help="JSON object of keyword arguments for the task builder")


def task_builder(spec: str):
    """The builder a ``--task`` spec names (a built-in name or ``module:function``)."""
    from eap.task import TaskError
    from eap.tasks import TASKS

    if spec in TASKS:
        return TASKS[spec]
    if ":" not in spec:
        raise TaskError(f"unknown task {spec!r}: use one of {sorted(TASKS)} or module:function")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise TaskError(f"--task {spec!r}: cannot import module {mod_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"--task {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"--task {spec!r}: {attr!r} is not callable")
    return obj


def make_task(model: Any, a: argparse.Namespace, extra: dict | None = None) -> Any:
    """Build the task of parsed arguments ``a`` (``--task``, ``--task-kwargs``, ``--n``, ``--seed``)."""
    from eap.task import Task, TaskError

    kw = dict(extra or {})
    if a.task_kwargs:
        try:
            given = json.loads(a.task_kwargs)
        except json.JSONDecodeError as exc:
            raise TaskError(f"--task-kwargs is not JSON: {exc}") from exc
        if not isinstance(given, dict):
            raise TaskError("--task-kwargs must be a JSON object")
        kw.update(given)
    task = task_builder(a.task)(model, a.n, seed=a.seed, **kw)
    if not isinstance(task, Task):
        raise TaskError(f"--task {a.task!r} returned {type(task).__name__}, not an eap.Task")
    return task


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy-gpt2-4l")
    p.add_argument("--n", type=int, default=32, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    add_task_args(p)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--memory-budget", default=None, help="bytes or a size such as 2GiB")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _load(a: argparse.Namespace):
    import eap
    from eap.graph import Graph
    if a.threads:
        torch.set_num_threads(a.threads)
    model = eap.load_model(a.model, device=a.device, dtype=dtype_arg(a.dtype))
    return model, Graph.from_model(model), make_task(model, a)


def _graph_file(path: str, model: Any):
    from eap.graph import Graph

    read = Graph.from_json if path.endswith(".json") else Graph.from_pt
    g = read(path, model)  # a file recorded for another model is refused
    g.check_model(model)
    return g


def certify_main(argv: list[str]) -> int:
    """``python -m validation certify``: see :func:`validation.certify`."""
    p = argparse.ArgumentParser(prog="python -m validation certify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--methods", default="eap", help="attribution methods to compute (comma-separated; the first "
                   "ranks the candidate circuit, all feed the error signal), unless --scores is given")
    p.add_argument("--scores", default=None, help="comma-separated graph files holding scores (instead of --methods)")
    p.add_argument("--budget", type=int, required=True, help="exactly patched edges in all (verify + search)")
    p.add_argument("--threshold", required=True, help="tau: |effect| in metric units, or P%% of the largest verified")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the search sample")
    p.add_argument("--patience", type=int, default=None, help="verification block (default max(8, budget/50))")
    p.add_argument("--verify-share", type=float, default=0.5, help="at most this share of the budget verifies")
    p.add_argument("--out", default=None, help="directory of results files (resumable; extend with a larger budget)")
    p.add_argument("--json", default=None, help="write the certificate as JSON here (bench gate --certify reads it)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import eap
    from validation.certify import certify
    from validation.certify_stats import CertifyError

    try:
        threshold = a.threshold if a.threshold.strip().endswith("%") else float(a.threshold)
    except ValueError:
        raise CertifyError(f"--threshold wants a number (|effect|, metric units) or P%, got {a.threshold!r}") from None
    model, graph, task = _load(a)
    if a.scores:
        scores = {path: _graph_file(path, model).edge_scores() for path in a.scores.split(",")}
    else:
        scores = {m: eap.attribute(model, graph, task, method=m, batch_size=a.batch_size, progress=False,
                                   write_graph=False) for m in a.methods.split(",")}
    print(f"{a.model}: {graph}; task {task.name} n={task.n_prompts}; scores from {', '.join(scores)}")
    cert = certify(model, graph, task, scores, budget=a.budget, threshold=threshold, confidence=a.confidence,
                   seed=a.sample_seed, patience=a.patience, verify_share=a.verify_share, out=a.out,
                   batch_size=a.batch_size, memory_budget=a.memory_budget, progress=not a.no_progress)
    print(cert.summary())
    s = cert.stats
    print(f"{s['n_patched_new']} edges patched now ({cert.n_patched - s['n_patched_new']} reused from {a.out}); "
          f"{s['wall_s']:.1f}s in all")
    if a.json:
        cert.save_json(a.json)
        print(f"certificate -> {a.json}")
    return 0


def circuit_main(argv: list[str]) -> int:
    """``python -m validation circuit``: the metric of circuits read from graph files (every edge
    outside the circuit patched at once; ``validation.evaluate_circuit``)."""
    p = argparse.ArgumentParser(prog="python -m validation circuit", description=circuit_main.__doc__)
    _common(p)
    p.add_argument("--graph", action="append", required=True,
                   help="a circuit file (Graph.to_json / EAP-IG json, or .pt); repeat for several")
    p.add_argument("--intervention", default="patching", choices=list(INTERVENTIONS),
                   help="what out-of-circuit edges carry (eap.interventions; 'corrupted' below is then every edge "
                        "replaced)")
    a = p.parse_args(argv)
    import validation

    model, graph, task = _load(a)
    circuits = [_graph_file(path, model) for path in a.graph]
    masks = torch.stack([g.in_graph[graph.edge_sender, graph.edge_receiver] for g in circuits])
    res = validation.evaluate_circuit(model, graph, task, masks, memory_budget=a.memory_budget, batch_size=a.batch_size,
                                      intervention=a.intervention)
    print(f"{a.model}: {graph}; task {task.name} n={task.n_prompts}; clean {res.clean.mean():.5f}, "
          f"corrupted {res.corrupted.mean():.5f} (metric units)")
    for path, m, mean, faith in zip(a.graph, masks, res.mean.reshape(-1).tolist(), res.faithfulness.reshape(-1).tolist()):
        print(f"{path}: {int(m.sum())} of {graph.n_edges} edges; metric {mean:.5f}; faithfulness {faith:.4f}")
    return 0


#: ``python -m validation <name> ...``: the subcommands beside the default (patching) and ``merge``.
SUBCOMMANDS = {"certify": certify_main, "circuit": circuit_main}
