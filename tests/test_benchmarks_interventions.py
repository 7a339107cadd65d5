"""Cost of MIB's extra baselines and of exact patching under a mean intervention; skipped
unless ``pytest --benchmark``.

    pytest tests/test_benchmarks_interventions.py --benchmark -s

On ``random:gpt2-small`` with 8 IOI prompts, one torch thread, one process:

* ``eap-ig-activations`` (``ig_steps=2``: G (m - 1) + 1 = 26 forward+backward passes through the
  bridge) and ``information-flow-routes`` (one bridge forward without grad) against the honest
  floor (``bench.measure.floor_pass``) and EAP, interleaved, median of the rounds;
* exact patching of 200 stratified edges under ``patching`` and ``mean`` (warm: the means are
  computed once per model, graph and reference, before the timed calls): patched-forward seconds
  and whole-call seconds. Target: mean within 10% of patching. docs/faithfulness.md has the figures.
"""

from __future__ import annotations

import pytest
import torch

from bench.measure import floor_pass
from eap.measure import median, time_interleaved

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]


def test_mib_baselines_and_mean_patching_cost(benchmark):
    import eap
    import validation

    torch.manual_seed(0)
    model = eap.load_model("random:gpt2-small", device="cpu")
    graph = eap.Graph.from_model(model)
    task = eap.tasks.ioi(model, 8, seed=0)

    def attr(method, **kw):
        return lambda: eap.attribute(model, graph, task, method, progress=False, write_graph=False, **kw)

    fns = {"floor": lambda: floor_pass(model, task), "eap": attr("eap"),
           "eap-ig-activations": attr("eap-ig-activations", ig_steps=2),
           "information-flow-routes": attr("information-flow-routes")}
    times = benchmark.pedantic(time_interleaved, args=(fns,), kwargs=dict(repeats=2, warmup=0), rounds=1, iterations=1)
    med = {k: median(v) for k, v in times.items()}

    edges = graph.select_edges("stratified:200", seed=0)
    validation.patch_edges(model, graph, task, edges, intervention="mean", progress=False)  # means, warm-up
    patch = {}
    for _ in range(2):
        for iv in ("patching", "mean"):
            st: dict = {}
            t = time_interleaved({"call": lambda: validation.patch_edges(
                model, graph, task, edges, intervention=iv, progress=False, stats=st)}, repeats=1, warmup=0)
            patch.setdefault(iv, []).append((median(t["call"]), st["patch_s"], st["setup_s"]))
    best = {iv: min(v) for iv, v in patch.items()}
    ratio = best["mean"][0] / best["patching"][0]
    info = {f"{k}_s": round(v, 3) for k, v in med.items()}
    info.update({f"{k}_x_floor": round(v / med["floor"], 2) for k, v in med.items()})
    info.update(exact_patching_s=round(best["patching"][0], 3), exact_mean_s=round(best["mean"][0], 3),
                exact_mean_over_patching=round(ratio, 3), edges=graph.n_edges, prompts=8, threads=1)
    benchmark.extra_info.update(info)
    print(f"\nrandom:gpt2-small, 8 IOI prompts x {task.seq_len} tokens, {graph.n_edges} edges; "
          f"floor {med['floor']:.2f} s")
    for k in ("eap", "eap-ig-activations", "information-flow-routes"):
        print(f"  {k:24s} {med[k]:8.2f} s = {med[k] / med['floor']:6.2f} x floor")
    for iv, (call, p, s) in best.items():
        print(f"  exact, 200 edges, {iv:9s} {call:6.2f} s (patched forwards {p:.2f} s, setup {s:.2f} s)")
    print(f"  mean / patching: {ratio:.3f} (target <= 1.10)")
