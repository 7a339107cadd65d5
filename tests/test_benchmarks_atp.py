"""Cost of AtP* (``eap.atp``); skipped unless ``pytest --benchmark``.

    pytest tests/test_benchmarks_atp.py --benchmark -s

Per model (the embedded models with 16 IOI prompts, ``random:gpt2-small`` with 8), measured
interleaved in one process with one torch thread (median of 7-9 rounds, 3 on GPT-2 small): one plain forward of
the bare model without grad (the forward-equivalent), the honest floor
(``bench.measure.floor_pass``: bare model, corrupted forward + clean forward + backward, same
read-out), EAP, ``atp-qk``, ``atp-graddrop`` and ``atp*``. Printed and recorded in
``extra_info``: each method's time × floor and in forward-equivalents, and ``atp*``'s peak of live
tensor memory (tests/memtools.py; the resident set adds glibc's fragmentation, see
docs/memory.md) against its plan (``eap.budget.plan_atp``, asserted not exceeded). docs/atp.md
has the figures.
"""

from __future__ import annotations

import pytest
import torch

from bench.measure import bare_model, floor_kind, floor_pass
from eap.measure import median, time_interleaved
from memtools import live_peak_bytes

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]

#: (model name, prompts, rounds)
MODELS = [
    ("toy-gpt2-2l", 16, 9),
    ("toy-gpt2-4l", 16, 7),
    ("toy-llama-4l", 16, 7),
    ("random:gpt2-small", 8, 3),
]
METHODS = ("eap", "atp-qk", "atp-graddrop", "atp*")


def _setup(name: str, n: int):
    import eap

    if not name.startswith("random:") and name not in eap.embedded_names():
        pytest.skip(f"embedded model {name} is not in eap/embedded/")
    torch.manual_seed(0)
    model = eap.load_model(name, device="cpu")
    return model, eap.Graph.from_model(model), eap.tasks.ioi(model, n, seed=0)


@pytest.mark.parametrize("name,n,rounds", MODELS, ids=[m[0] for m in MODELS])
def test_atp_cost(benchmark, name, n, rounds):
    import eap
    from eap.atp import AtP, atp_options

    model, graph, task = _setup(name, n)
    bare = bare_model(model)

    def forward():
        with torch.no_grad():
            bare.base_model(input_ids=task.clean)

    fns = {"forward": forward, "floor": lambda: floor_pass(model, task)}
    fns.update({m: (lambda m=m: eap.attribute(model, graph, task, m, progress=False, write_graph=False))
                for m in METHODS})
    times = benchmark.pedantic(time_interleaved, args=(fns,), kwargs=dict(repeats=rounds, warmup=1), rounds=1,
                               iterations=1)
    med = {k: median(v) for k, v in times.items()}
    live_peak_bytes(lambda: eap.attribute(model, graph, task, "eap", progress=False))  # profiler warm-up
    _, peak = live_peak_bytes(lambda: eap.attribute(model, graph, task, "atp*", progress=False, write_graph=False))
    atp = AtP(model, graph, atp_options("atp*"), torch.zeros(graph.n_senders, graph.n_receivers))
    plan = atp.plan(task, None, None)
    planned_mib = plan.peak_bytes / 2**20
    info = {f"{k}_s": round(v, 4) for k, v in med.items()}
    info.update({f"{m}_x_floor": round(med[m] / med["floor"], 3) for m in METHODS})
    info.update({f"{m}_forward_equivalents": round(med[m] / med["forward"], 2) for m in METHODS})
    info.update(model=name, prompts=n, edges=graph.n_edges, floor_kind=floor_kind(task), threads=1,
                atp_star_live_peak_mib=round(peak / 2**20, 1), atp_star_planned_mib=round(planned_mib, 1),
                prompts_per_batch=plan.prompts_per_batch, senders_per_chunk=plan.senders_per_chunk)
    benchmark.extra_info.update(info)
    print(f"\n{name}, {n} IOI prompts x {task.seq_len} tokens, {graph.n_edges} edges; forward {med['forward']:.3f} s, "
          f"floor {med['floor']:.3f} s ({med['floor'] / med['forward']:.1f} forwards)")
    for m in METHODS:
        print(f"  {m:13s} {med[m]:8.3f} s = {med[m] / med['floor']:5.2f} x floor = "
              f"{med[m] / med['forward']:6.1f} forward-equivalents")
    print(f"  atp* live tensor peak {peak / 2**20:.1f} MiB (planned {planned_mib:.1f} MiB: "
          f"{plan.prompts_per_batch} prompts per batch, {plan.senders_per_chunk} senders per QK-fix chunk)")
    assert all(v > 0 for v in med.values())
    assert peak <= plan.peak_bytes

