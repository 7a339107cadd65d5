"""Performance benchmarks (pytest-benchmark); skipped unless ``pytest --benchmark``.

    pytest tests/test_benchmarks.py --benchmark --benchmark-autosave
    pytest tests/test_benchmarks.py --benchmark --benchmark-compare          # vs the last save
    pytest tests/test_benchmarks.py --benchmark --benchmark-compare-fail=median:25%

Each benchmark records ``edges``, ``prompts`` and ``peak_mib`` (extra memory over the
pre-call baseline, MiB; see ``bench.measure``) in ``extra_info``. Attribution benchmarks also
record the floor (bare corrupted forward + clean forward + backward) and ``floor_ratio``
(attribution median / floor median), which is printed. Pedantic mode, few rounds: the whole
file takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch

from bench.measure import PeakMemory, floor_pass, median, time_call
from eap.attribute import auto_batch_size

pytestmark = pytest.mark.benchmark

#: (model name, prompts, exact-patching edge sample, rounds)
MODELS = [
    ("toy-ioi-2l", 16, "all", 3),
    ("toy-ioi-4l", 16, "sample:128", 3),
    ("random:gpt2-small", 8, "sample:32", 2),
]
METHODS = ("eap", "eap-ig", "clean-corrupted")
_CACHE: dict[str, tuple] = {}


def _setup(name: str, n: int):
    import eap

    if name not in _CACHE:
        if not name.startswith("random:") and name not in eap.embedded_names():
            pytest.skip(f"embedded model {name} is not in eap/embedded/")
        _CACHE.clear()
        torch.manual_seed(0)
        model = eap.load_model(name, device="cpu")
        _CACHE[name] = (model, eap.Graph.from_model(model), eap.tasks.ioi(model, n, seed=0))
    return _CACHE[name]


def _ids(models):
    return [m[0] for m in models]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,n,edges,rounds", MODELS, ids=_ids(MODELS))
def test_attribution(benchmark, name, n, edges, rounds, method):
    import eap

    model, graph, task = _setup(name, n)
    benchmark.group = f"attribution {name}"
    floor = median(time_call(lambda: floor_pass(model, task), repeats=rounds, warmup=1))
    with PeakMemory("cpu") as floor_pm:
        floor_pass(model, task)
    with PeakMemory("cpu") as pm:
        scores = benchmark.pedantic(eap.attribute, args=(model, graph, task), kwargs=dict(method=method, progress=False),
                                    rounds=rounds if method == "eap" else max(1, rounds - 1), iterations=1,
                                    warmup_rounds=1)
    assert scores.shape == (graph.n_edges,) and torch.isfinite(scores).all()
    ratio = benchmark.stats.stats.median / floor
    # the activation-difference buffer: [n_senders, batch, pos, d_model] in the model's dtype
    batch = min(n, auto_batch_size(model, graph, task))
    buffer_mib = graph.n_senders * batch * task.seq_len * model.cfg.d_model * scores.element_size() / 2**20
    extra_ratio = (pm.mib - floor_pm.mib) / buffer_mib
    benchmark.extra_info.update(edges=graph.n_edges, prompts=n, peak_mib=round(pm.mib, 2), floor_s=floor,
                                floor_ratio=round(ratio, 3), method=method, model=name,
                                floor_peak_mib=round(floor_pm.mib, 2), buffer_mib=round(buffer_mib, 2),
                                extra_memory_over_buffer=round(extra_ratio, 3))
    print(f"\n{name} {method}: {benchmark.stats.stats.median:.3f} s = {ratio:.2f} x floor ({floor:.3f} s), "
          f"{graph.n_edges} edges, {n} prompts, peak {pm.mib:.1f} MiB vs floor {floor_pm.mib:.1f} MiB: "
          f"extra {pm.mib - floor_pm.mib:.1f} MiB = {extra_ratio:.2f} x the {buffer_mib:.1f} MiB difference buffer")


@pytest.mark.parametrize("name,n,edges,rounds", MODELS, ids=_ids(MODELS))
def test_floor(benchmark, name, n, edges, rounds):
    """The bare-model floor itself, so --benchmark-compare tracks the baseline too."""
    model, graph, task = _setup(name, n)
    benchmark.group = f"attribution {name}"
    with PeakMemory("cpu") as pm:
        benchmark.pedantic(floor_pass, args=(model, task), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(edges=graph.n_edges, prompts=n, peak_mib=round(pm.mib, 2), model=name)


@pytest.mark.parametrize("name,n,edges,rounds", MODELS, ids=_ids(MODELS))
def test_exact_throughput(benchmark, name, n, edges, rounds):
    """Exact patching of a fixed edge selection; extra_info has edges/s."""
    import validation

    model, graph, task = _setup(name, n)
    idx = graph.select_edges(edges, seed=0)
    benchmark.group = f"exact {name}"
    with PeakMemory("cpu") as pm:
        res = benchmark.pedantic(validation.patch_edges, args=(model, graph, task),
                                 kwargs=dict(edges=idx, progress=False), rounds=max(1, rounds - 1), iterations=1,
                                 warmup_rounds=0)
    assert torch.isfinite(res[idx]).all()
    eps = len(idx) / benchmark.stats.stats.median
    benchmark.extra_info.update(edges=int(len(idx)), graph_edges=graph.n_edges, prompts=n,
                                peak_mib=round(pm.mib, 2), edges_per_s=round(eps, 2), model=name)
    print(f"\n{name} exact: {eps:.1f} edges/s ({len(idx)} of {graph.n_edges} edges, {n} prompts)")
