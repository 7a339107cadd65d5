"""Benchmarks of circuit evaluation and faithfulness curves (``pytest --benchmark``).

    pytest tests/test_benchmarks_circuit.py --benchmark -s

``test_faithfulness_curve``: one method's full faithfulness curves (``bench.faithfulness``: the
``abs`` curve on the log grid and MIB's sizes, the ``signed`` curve on MIB's sizes, plus the
baselines) for an EAP ranking, on IOI; records the number of circuit evaluations, seconds, one
plain forward of the prompts through the bridge, forward-equivalents per circuit and for the
whole curve (the cost the issue asks for), and the peak memory. ``test_circuit_paths``: the fast
block runner against the hook path through the bridge, the same circuits, interleaved. One
torch thread; numbers are only good as ratios on a busy machine.
"""

from __future__ import annotations

import pytest
import torch

from eap.measure import PeakMemory, median, time_interleaved

pytestmark = [pytest.mark.benchmark, pytest.mark.usefixtures("one_thread")]

#: (model name, prompts, rounds)
MODELS = [
    ("toy-gpt2-2l", 16, 3),
    ("toy-gpt2-4l", 16, 3),
    ("toy-llama-4l", 16, 3),
    ("random:gpt2-small", 8, 1),
]
_SCORES: dict[str, torch.Tensor] = {}


def _setup(name: str, n: int):
    """Model, graph, IOI task (``test_benchmarks``' cache) and the EAP scores to rank by."""
    import eap
    from test_benchmarks import _setup as load

    model, graph, task = load(name, n)
    key = f"{name}/{n}"
    if key not in _SCORES:
        _SCORES.clear()
        _SCORES[key] = eap.attribute(model, graph, task, progress=False)
    return model, graph, task, _SCORES[key]


@pytest.mark.parametrize("name,n,rounds", MODELS, ids=[m[0] for m in MODELS])
def test_faithfulness_curve(benchmark, name, n, rounds):
    from bench import faithfulness as fa

    model, graph, task, scores = _setup(name, n)
    benchmark.group = "faithfulness curve"
    with PeakMemory("cpu") as pm:
        out = benchmark.pedantic(fa.compute_curves, args=(model, graph, task, {"eap": scores}), rounds=rounds,
                                 iterations=1, warmup_rounds=0 if rounds == 1 else 1)
    cost = out["cost"]
    n_curve = out["rankings"]["eap"]["n_circuits"]
    curve_fwd_eq = n_curve * cost["fwd_eq_per_circuit"]
    benchmark.extra_info.update(
        model=name, edges=graph.n_edges, prompts=n, seq_len=task.seq_len, circuits=cost["n_circuits"],
        curve_circuits=n_curve, eval_s=round(cost["eval_s"], 3), setup_s=round(cost["setup_s"], 3),
        forward_s=round(cost["forward_s"], 4), fwd_eq_per_circuit=round(cost["fwd_eq_per_circuit"], 3),
        curve_fwd_eq=round(curve_fwd_eq, 1), circuits_per_forward=cost["circuits_per_forward"],
        prompts_per_batch=cost["prompts_per_batch"], peak_mib=round(pm.mib, 1), path=cost["path"])
    print(f"\n{name} ({graph.n_edges} edges, {n} prompts x {task.seq_len} tokens): one method's curves = "
          f"{n_curve} circuits (+ baselines; {cost['n_circuits']} evaluated) in {cost['eval_s']:.2f} s, "
          f"{cost['fwd_eq_per_circuit']:.2f} forward-equivalents per circuit (forward {cost['forward_s'] * 1e3:.1f} ms), "
          f"curve = {curve_fwd_eq:.1f} forward-equivalents; {cost['circuits_per_forward']} circuits per forward; "
          f"peak {pm.mib:.0f} MiB")
    assert cost["path"] == "fast" and n_curve > 10


@pytest.mark.parametrize("name", ["toy-gpt2-4l", "toy-llama-4l"])
def test_circuit_paths(benchmark, name):
    import validation

    model, graph, task, _ = _setup(name, 16)
    circuits = torch.stack([torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(i)) < 0.1 * (i + 1)
                            for i in range(8)])
    fns = {"fast": lambda: validation.evaluate_circuit(model, graph, task, circuits, baselines=False, engine="fast"),
           "hooks": lambda: validation.evaluate_circuit(model, graph, task, circuits, baselines=False, engine="bridge")}
    times = time_interleaved(fns, 3, warmup=1, device=torch.device("cpu"))
    fast, hooks = median(times["fast"]), median(times["hooks"])
    benchmark.group = "circuit evaluation paths"
    got = benchmark.pedantic(fns["fast"], rounds=1, iterations=1)
    ref = fns["hooks"]()  # the hook path is the reference semantics: both paths give the same metrics
    torch.testing.assert_close(got.per_prompt, ref.per_prompt, rtol=1e-4, atol=1e-4 * float(ref.per_prompt.abs().max()))
    benchmark.extra_info.update(model=name, circuits=8, fast_s=round(fast, 3), hooks_s=round(hooks, 3),
                                hooks_over_fast=round(hooks / fast, 2))
    print(f"\n{name}: 8 circuits x 16 prompts: fast {fast:.3f} s, hooks {hooks:.3f} s ({hooks / fast:.1f}x)")
    assert hooks / fast > 1.0, f"the fast path ({fast:.3f} s) is not faster than the hook path ({hooks:.3f} s)"
