"""Throughput of exact patching: edges/s and forward-equivalents per edge (``validation.throughput``)."""

from __future__ import annotations

from typing import Any

import torch

from eap.graph import Graph
from eap.measure import median, time_call
from eap.task import Task
from validation.patch import patch_edges


def forward_seconds(model: Any, task: Task, repeats: int = 3) -> float:
    """Median wall time (s) of one plain forward of the task's clean prompts through the model
    (no hooks, no grad), after one warm-up call (``eap.measure.time_call``)."""
    dev = next(model.parameters()).device
    tokens = task.clean.to(dev)
    with torch.no_grad():
        return median(time_call(lambda: model(tokens), repeats=repeats, warmup=1, device=dev))


def receiver_sample(graph: Graph, n_edges: int, seed: int = 0) -> torch.Tensor:
    """Edge indices of all incoming edges of seeded uniformly drawn receivers (>= n_edges)."""
    order = torch.randperm(graph.n_receivers, generator=torch.Generator().manual_seed(seed))
    counts = graph.n_upstream[order]
    k = int((counts.cumsum(0) < n_edges).sum()) + 1
    chosen = torch.zeros(graph.n_receivers, dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen[graph.edge_receiver].nonzero().flatten()


def throughput(
    model: Any, graph: Graph, task: Task, n_edges: int = 256, edges: Any = None, seed: int = 0,
    repeats: int = 3, **kwargs: Any,
) -> dict[str, Any]:
    """Measure exact edge patching on ``edges`` (default: all incoming edges of uniformly drawn
    receivers, seeded, until at least ``n_edges``; total time / total edges then estimates the
    per-edge average over the whole graph, with chunks as full as in a real run).

    Returns ``edges_per_s`` (patched edges per second, excluding the one-off clean/corrupted
    caching, reported as ``setup_s``), ``forward_s`` (one plain forward of the same prompts) and
    ``forward_equivalents_per_edge`` = (seconds per edge) / ``forward_s`` (goal <= 0.5), plus the
    run's stats (path, rows_per_forward, ...). Extra kwargs go to ``patch_edges``."""
    fwd = forward_seconds(model, task, repeats)
    stats: dict[str, Any] = {}
    spec = edges if edges is not None else receiver_sample(graph, n_edges, seed)
    patch_edges(model, graph, task, spec, seed=seed, progress=False, stats=stats, **kwargs)
    n = stats["n_measured"]
    per_edge = stats["patch_s"] / n if n else float("nan")
    return dict(
        stats,
        n_edges=n,
        n_prompts=task.n_prompts,
        seq_len=task.seq_len,
        edges_per_s=(1.0 / per_edge) if n else float("nan"),
        seconds_per_edge=per_edge,
        forward_s=fwd,
        forward_equivalents_per_edge=per_edge / fwd,
        forward_equivalents_per_edge_with_setup=(stats["patch_s"] + stats["setup_s"]) / max(n, 1) / fwd,
    )
