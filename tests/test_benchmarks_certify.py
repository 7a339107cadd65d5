"""Benchmark of ``validation.certify`` (``pytest --benchmark``; prints figures, asserts no timing).

    pytest tests/test_benchmarks_certify.py --benchmark -s

``random:gpt2-small`` (32,491 edges), IOI with 8 prompts, EAP scores, tau = 2% of the largest
verified |effect|: wall time and forward-equivalents (seconds over one plain forward of the 8
prompts) of a certificate at K = 500 and 2,000 exactly patched edges, against exhaustive truth's
estimated cost: edges x forward-equivalents per edge of docs/scaling.md's model
(``bench.scaling.fe_per_edge``, measured on GPT-2 small's shape). One torch thread.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]


def test_certify_gpt2_small_cost():
    import eap
    import validation
    from validation.speed import forward_seconds
    from bench.scaling import CONFIGS, fe_per_edge

    torch.manual_seed(0)
    model = eap.load_model("random:gpt2-small", device="cpu")
    graph = eap.Graph.from_model(model)
    task = eap.tasks.ioi(model, 8, seed=0)
    scores = eap.attribute(model, graph, task, progress=False, write_graph=False)
    fwd = forward_seconds(model, task)
    fe, measured = fe_per_edge("GPT-2 small", CONFIGS["GPT-2 small"])
    exhaustive_fe = graph.n_edges * fe
    print(f"\nrandom:gpt2-small: {graph.n_edges} edges, 8 prompts x {task.seq_len} tokens, one plain forward "
          f"{fwd:.3f}s; exhaustive truth ~ {exhaustive_fe:,.0f} forward-equivalents ({fe:.3f} per edge, "
          f"{'measured' if measured else 'extrapolated'}) ~ {exhaustive_fe * fwd / 60:.0f} min here")
    for K in (500, 2000):
        t0 = time.perf_counter()
        cert = validation.certify(model, graph, task, scores, budget=K, threshold="2%", progress=False)
        wall = time.perf_counter() - t0
        assert cert.n_patched == K
        print(f"K={K}: {wall:.1f}s = {wall / fwd:,.0f} forward-equivalents ({wall / fwd / K:.3f} per edge; "
              f"{100 * wall / fwd / exhaustive_fe:.1f}% of exhaustive truth); verified {cert.verified.numel()} "
              f"({'stable' if cert.stable else 'cap reached'}), {cert.found_misses.numel()} misses found, "
              f"bound {cert.missed_upper} unsampled misses at 95% (estimate {cert.missed_estimate:.0f}), "
              f"tau {cert.threshold:.4g}")
