"""Architecture benchmarks (pytest-benchmark); skipped unless ``pytest --benchmark``.

    pytest tests/test_benchmarks_arch.py --benchmark -q -s

Real shapes with random weights (``random:gpt2-small``, ``random:qwen2.5-0.5b``,
``random:pythia-160m``; Qwen2.5-0.5B ungrouped, see ``eap.arch``), 8 IOI prompts, float32, CPU,
one torch thread. Printed per model, side by side:

* EAP x floor: median EAP time / median ``bench.measure.floor_pass`` time (bare model, same
  task, same read-out), timed interleaved (``eap.measure.time_interleaved``) so machine load
  hits both alike;
* exact forward-equivalents per edge on ``stratified:300`` edges (``validation.throughput``:
  patching seconds per edge / one plain forward), and which path ran (fast / hooks);
* peak memory (MiB over the resident baseline) of EAP, of the
  floor and of exact patching (``eap.measure.PeakMemory``).

Figures, not a timed test: the only assertions are that the results are finite.
"""

from __future__ import annotations

import pytest
import torch

from bench.measure import floor_pass
from eap.measure import PeakMemory, median, time_interleaved

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread", "_free_models")]

MODELS = ["random:gpt2-small", "random:qwen2.5-0.5b", "random:pythia-160m"]
N_PROMPTS = 8
EDGES = "stratified:300"
ROUNDS = 3
_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def _free_models():
    yield
    _CACHE.clear()


def _setup(name: str):
    import eap

    if name not in _CACHE:
        _CACHE.clear()  # one model in memory at a time
        model = eap.load_model(name, device="cpu")
        _CACHE[name] = (model, eap.Graph.from_model(model), eap.tasks.ioi(model, N_PROMPTS, seed=0))
    return _CACHE[name]


@pytest.mark.parametrize("name", MODELS)
def test_arch_eap_vs_floor(benchmark, name):
    import eap

    model, graph, task = _setup(name)
    run_eap = lambda: eap.attribute(model, graph, task, progress=False)  # noqa: E731
    times = time_interleaved({"floor": lambda: floor_pass(model, task), "eap": run_eap}, repeats=ROUNDS)
    eap_s, floor_s = median(times["eap"]), median(times["floor"])
    with PeakMemory("cpu") as floor_pm:
        floor_pass(model, task)
    with PeakMemory("cpu") as pm:
        scores = benchmark.pedantic(run_eap, rounds=1, iterations=1)
    assert scores.shape == (graph.n_edges,) and torch.isfinite(scores).all()
    ratio = eap_s / floor_s
    benchmark.group = "architectures: EAP"
    benchmark.extra_info.update(model=name, edges=graph.n_edges, prompts=N_PROMPTS, seq_len=task.seq_len,
                                eap_s=eap_s, floor_s=floor_s,
                                floor_ratio=round(ratio, 3), peak_mib=round(pm.mib, 1),
                                floor_peak_mib=round(floor_pm.mib, 1))
    print(f"\n{name}: EAP {eap_s:.2f} s = {ratio:.2f} x floor ({floor_s:.2f} s); "
          f"{graph.n_edges} edges, {N_PROMPTS} prompts x {task.seq_len} tokens; peak {pm.mib:.0f} MiB "
          f"(floor {floor_pm.mib:.0f} MiB)")


@pytest.mark.parametrize("name", MODELS)
def test_arch_exact_forward_equivalents(benchmark, name):
    import validation

    model, graph, task = _setup(name)
    with PeakMemory("cpu") as pm:
        res = benchmark.pedantic(validation.throughput, args=(model, graph, task), kwargs=dict(edges=EDGES),
                                 rounds=1, iterations=1)
    assert res["n_edges"] > 0 and res["forward_equivalents_per_edge"] > 0
    benchmark.group = "architectures: exact"
    keep = ("path", "n_edges", "forward_s", "seconds_per_edge", "forward_equivalents_per_edge", "setup_s",
            "rows_per_forward")
    benchmark.extra_info.update(model=name, peak_mib=round(pm.mib, 1), **{k: res[k] for k in keep})
    print(f"\n{name}: exact {res['forward_equivalents_per_edge']:.3f} forward-equivalents per edge "
          f"({res['path']} path, {res['n_edges']} edges of {graph.n_edges}, {res['seconds_per_edge']:.3f} s/edge, "
          f"forward {res['forward_s']:.2f} s, setup {res['setup_s']:.1f} s); peak {pm.mib:.0f} MiB")
