"""The floor: the bare HuggingFace model under the bridge, with the read-out of the run it is
compared with; and the one timing module (eap.measure) that validation and bench share."""

from __future__ import annotations

import pytest
import torch

import eap
from bench.measure import bare_model, bridge_floor_pass, floor_kind, floor_pass, full_logits
from eap.measure import time_interleaved


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bare_model_is_the_bridges_model_without_the_bridge(tiny_model):
    bare = bare_model(tiny_model)
    assert bare is bare_model(tiny_model)  # built once
    assert "transformer_lens" not in {type(m).__module__.split(".")[0] for m in bare.modules()}
    shared = {p.data_ptr() for p in tiny_model.parameters()}
    assert all(p.data_ptr() in shared for p in bare.parameters())  # the same weights, no copy
    assert not any(p.requires_grad for p in bare.parameters())
    toks = torch.randint(3, tiny_model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bare(toks).logits, tiny_model(toks), rtol=1e-9, atol=1e-9)


def test_bare_model_of_a_parallel_rotary_model():
    neox = eap.random_model(dict(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=64), seed=2,
                            device="cpu", dtype=torch.float64, arch="gpt-neox")
    toks = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(bare_model(neox)(toks).logits, neox(toks), rtol=1e-9, atol=1e-9)


def test_floor_computes_the_clean_metric(tiny_model, make_random_task):
    """The floor's returned value is the summed clean metric, equal to the bridge's (float64)."""
    task = make_random_task(tiny_model, n=4, seq=7, seed=2)
    with torch.no_grad():
        ref = float(task.metric(tiny_model(task.clean)).sum())
    assert floor_kind(task) == "full-logits"
    assert abs(floor_pass(tiny_model, task) - ref) < 1e-9
    assert abs(bridge_floor_pass(tiny_model, task) - ref) < 1e-9


def test_readout_floor_reads_only_the_needed_logits():
    """With a read-out the floor never runs the unembedding module nor the final norm module over
    the sequence: EAP's own read-out (eap.arch.Readout) normalises one position per prompt and
    takes the read-out columns; with full logits the unembedding runs once (the clean run: the corrupted
    run stops at the final residual, as EAP's does)."""
    model = eap.load_model("toy-gpt2-2l", device="cpu")
    task = eap.tasks.ioi(model, 4, seed=0)
    bare = bare_model(model)
    norm = bare.get_submodule(model.adapter.component_mapping["ln_final"].name)
    calls = {"unembed": 0, "norm": []}
    h1 = bare.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.__setitem__("unembed", calls["unembed"] + 1))
    h2 = norm.register_forward_hook(lambda m, i, o: calls["norm"].append(tuple(i[0].shape)))
    try:
        with torch.no_grad():
            ref = float(task.metric(model(task.clean)).sum())
        got = floor_pass(model, task)
        assert floor_kind(task) == "readout"
        assert calls["unembed"] == 0 and calls["norm"] == []
        assert abs(got - ref) < 1e-3 * max(1.0, abs(ref))
        calls["norm"].clear()
        ft = full_logits(task)
        assert floor_kind(ft) == "full-logits" and not ft.has_readout
        assert abs(floor_pass(model, ft) - ref) < 1e-3 * max(1.0, abs(ref))
        assert calls["unembed"] == 1 and calls["norm"] == [(4, task.seq_len, model.cfg.d_model)]
    finally:
        h1.remove()
        h2.remove()


def test_full_logits_keeps_the_scores(tiny_model, make_random_task):
    """Stripping the read-out changes only the cost: EAP scores are the same."""
    task = make_random_task(tiny_model, n=3, seq=6, seed=5)
    end, toks = task.per_prompt["end"], task.per_prompt["toks"]

    def readout(selected, **_):
        lp = selected.log_softmax(-1)  # not the same as the metric: only used to show it is stripped
        return lp[:, 0]

    graph = eap.Graph.from_model(tiny_model)
    ro = eap.Task(task.clean, task.corrupted, task.metric_fn, readout=readout,
                  per_prompt={**task.per_prompt, "readout_pos": end, "readout_tokens": toks})
    stripped = full_logits(ro)
    torch.testing.assert_close(eap.attribute(tiny_model, graph, stripped, progress=False),
                               eap.attribute(tiny_model, graph, task, progress=False))


def test_time_interleaved_takes_turns():
    order = []
    times = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_validation_and_bench_share_one_timer():
    import bench.measure
    import eap.measure
    import validation.speed

    assert bench.measure.time_call is eap.measure.time_call and bench.measure.PeakMemory is eap.measure.PeakMemory
    assert validation.speed.time_call is eap.measure.time_call
