"""Every family side by side (pytest-benchmark); skipped unless ``pytest --benchmark``.

    pytest tests/test_families_benchmarks.py --benchmark -q -s

Each family's published random shape (``eap.models.RANDOM_SHAPES``: width, heads, KV heads, head
size, MLP width, vocabulary, rope, windows) with its layers cut to ``N_LAYERS`` (the full depths,
up to 6B parameters, do not fit this 2-core CPU's time; the per-edge figures are per layer
anyway), random weights, 8 IOI prompts, float32, CPU, one torch thread. Per family:

* EAP x floor: median EAP time / median ``bench.measure.floor_pass`` time, timed interleaved
  (``eap.measure.time_interleaved``), as in ``tests/test_benchmarks_arch.py``;
* exact forward-equivalents per edge on ``stratified:300`` edges (``validation.throughput``)
  and the path that ran (fast / hooks).

The last test prints the table. Figures, not a timed test: the assertions only check that the
results are finite.
"""

from __future__ import annotations

import pytest
import torch

from bench.measure import floor_pass
from eap.measure import median, time_interleaved

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]

SHAPES = ["gpt2-small", "pythia-160m", "llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "qwen3-0.6b", "phi-3-mini",
          "gemma-2b", "gpt-j-6b", "gemma-3-1b", "olmo-2-1b"]
N_LAYERS = 2
N_PROMPTS = 8
EDGES = "stratified:300"
ROUNDS = 3
_ROWS: dict[str, dict] = {}


def _model(shape: str):
    import eap
    from eap.arch import family_named
    from eap.models import RANDOM_SHAPES

    fam_name, fields = RANDOM_SHAPES[shape]
    fam = family_named(fam_name)
    model = eap.random_model(dict(fields, **{fam.n_layers: N_LAYERS}), arch=fam_name, device="cpu")
    return model, eap.Graph.from_model(model), eap.tasks.ioi(model, N_PROMPTS, seed=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_family_eap_and_exact(benchmark, shape):
    import eap
    import validation
    from eap.arch import UnsupportedModel

    model, graph, task = _model(shape)
    run_eap = lambda: eap.attribute(model, graph, task, progress=False)  # noqa: E731
    try:
        scores = run_eap()
    except UnsupportedModel as exc:
        _ROWS[shape] = {"refused": str(exc).split(";")[0][:90]}
        pytest.skip(f"{shape}: {exc}")
    assert torch.isfinite(scores).all()
    times = time_interleaved({"floor": lambda: floor_pass(model, task), "eap": run_eap}, repeats=ROUNDS)
    eap_s, floor_s = median(times["eap"]), median(times["floor"])
    res = benchmark.pedantic(validation.throughput, args=(model, graph, task), kwargs=dict(edges=EDGES),
                             rounds=1, iterations=1)
    assert res["forward_equivalents_per_edge"] > 0
    row = dict(edges=graph.n_edges, eap_s=eap_s, floor_s=floor_s, eap_x_floor=eap_s / floor_s,
               exact_fe_per_edge=res["forward_equivalents_per_edge"], path=res["path"], forward_s=res["forward_s"])
    _ROWS[shape] = row
    benchmark.group = "families"
    benchmark.extra_info.update(shape=shape, layers=N_LAYERS, prompts=N_PROMPTS, **row)
    print(f"\n{shape} ({N_LAYERS} layers): EAP {eap_s:.2f} s = {eap_s / floor_s:.2f} x floor ({floor_s:.2f} s); "
          f"exact {row['exact_fe_per_edge']:.3f} forward-equivalents per edge ({res['path']} path)")


def test_family_table():
    """The side-by-side table of the figures above (run after them)."""
    if not _ROWS:
        pytest.skip("no family measured")
    print(f"\n| shape ({N_LAYERS} layers) | edges | EAP s | floor s | EAP x floor | exact fwd-eq/edge | path |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        r = _ROWS.get(shape)
        if r is None:
            continue
        if "refused" in r:
            print(f"| {shape} | refused: {r['refused']} | | | | | |")
            continue
        print(f"| {shape} | {r['edges']} | {r['eap_s']:.2f} | {r['floor_s']:.2f} | {r['eap_x_floor']:.2f} | "
              f"{r['exact_fe_per_edge']:.3f} | {r['path']} |")
