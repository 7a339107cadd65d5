"""Speed-up of exact patching with 1 and 2 Ray workers against the local executor (``pytest --benchmark``).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest --benchmark -s tests/test_benchmarks_ray.py

``random:gpt2-small`` (float32), 8 IOI prompts, ``stratified:200`` edges (spread over ~150
receivers, so ~150 units to share out: a receiver's edges are one unit per prompt batch, and all
incoming edges of two receivers would be two lopsided units), one torch thread in the driver and in each
worker. One local Ray cluster; both executors' workers are made (and warmed up) before the
timing, then local, 1 worker and 2 workers are timed in turn, ``ROUNDS`` times: wall time of
``patch_edges`` (worker start not included). Prints the medians and the speed-ups; the numbers
must equal the local ones bit for bit. On a 2-core machine 2 workers can at best halve the
time, and only if nothing else runs.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'eap-bench[ray]'")

import eap  # noqa: E402
import validation  # noqa: E402
from eap.graph import Graph  # noqa: E402
from validation.executor import RayExecutor  # noqa: E402

ROUNDS = 2
EDGES = "stratified:200"


@pytest.mark.benchmark
def test_ray_speedup_one_and_two_workers():
    torch.set_num_threads(1)
    model = eap.load_model("random:gpt2-small", device="cpu")
    graph = Graph.from_model(model)
    task = eap.tasks.ioi(model, 8, seed=0)
    edges = graph.select_edges(EDGES)
    kw = dict(progress=False, memory_budget="1GiB")
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        one, two = RayExecutor(workers=1), RayExecutor(workers=2)
        want = validation.patch_edges(model, graph, task, edges, **kw)
        for ex in (one, two):  # make the workers' models; warm up
            assert torch.equal(validation.patch_edges(model, graph, task, edges, executor=ex, **kw).nan_to_num(),
                               want.nan_to_num())
        times: dict[str, list[float]] = {"local": [], "ray 1 worker": [], "ray 2 workers": []}
        for _ in range(ROUNDS):
            for name, ex in (("local", "local"), ("ray 1 worker", one), ("ray 2 workers", two)):
                t0 = time.perf_counter()
                validation.patch_edges(model, graph, task, edges, executor=ex, **kw)
                times[name].append(time.perf_counter() - t0)
        one.close()
        two.close()
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nexact patching, random:gpt2-small, 8 prompts, {len(edges)} edges ({EDGES}), median of {ROUNDS} interleaved rounds:")
    for name, t in med.items():
        print(f"  {name:14s} {t:7.1f} s  speed-up over local {med['local'] / t:.2f}x   (all: {', '.join(f'{x:.1f}' for x in times[name])})")
    print(f"  1 -> 2 workers: {med['ray 1 worker'] / med['ray 2 workers']:.2f}x")
