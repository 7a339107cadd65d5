"""bench.testing: fidelity() against an independent computation, the exact-truth cache, and
assert_fidelity's message."""

from __future__ import annotations

import pytest

import eap
import validation
from bench import agreement as ag
from bench import testing


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh():
    testing.clear_cache()
    yield
    testing.clear_cache()


def test_fidelity_equals_an_independent_computation():
    """One prompt group: the statistics are those of eap.attribute vs validation.patch_edges on the
    selected edges, computed here directly."""
    fid = testing.fidelity("toy-gpt2-2l", "ioi", "eap", edges="stratified:40", n=6, groups=1, bootstrap=0)
    model = eap.load_model("toy-gpt2-2l", device="cpu")
    graph = eap.Graph.from_model(model)
    task = eap.tasks.ioi(model, 6, seed=0)
    idx = graph.select_edges("stratified:40", seed=0)
    a = eap.attribute(model, graph, task, progress=False)[idx].double().numpy()
    e = validation.patch_edges(model, graph, task, edges=idx, progress=False)[idx].numpy()
    assert fid["spearman"] == pytest.approx(ag.spearman(a, e), abs=1e-6)
    assert fid["recall@10"] == pytest.approx(ag.topk_precision_recall(a, e, 10)[1])
    assert fid.n_edges_selected == len(idx) and fid.n == 6 and fid.method == "eap" and fid.task == "ioi"
    assert fid.worst and fid.worst[0]["edge"] in graph.edge_names


def test_exact_truth_is_cached_between_calls(monkeypatch, tmp_path):
    first = testing.fidelity("toy-gpt2-2l", "ioi", "eap", edges="stratified:30", n=4, groups=2, bootstrap=10,
                             cache_dir=tmp_path)
    assert not first.exact_cached and len(list(tmp_path.glob("edges-*.pt"))) == 2  # one file per prompt group

    def no_patching(*a, **k):
        raise AssertionError("exact patching ran again")

    monkeypatch.setattr(validation, "patch_edges", no_patching)
    second = testing.fidelity("toy-gpt2-2l", "ioi", "clean-corrupted", edges="stratified:30", n=4, groups=2,
                              bootstrap=10, cache_dir=tmp_path)
    assert second.exact_cached
    monkeypatch.undo()
    # a fresh process (here: a cleared in-process cache) finds the truth on disk
    testing.clear_cache()
    third = testing.fidelity("toy-gpt2-2l", "ioi", "eap", edges="stratified:30", n=4, groups=2, bootstrap=10,
                             cache_dir=tmp_path)
    assert third.exact_cached and third["spearman"] == first["spearman"]
    # other prompts are another truth
    other = testing.fidelity("toy-gpt2-2l", "ioi", "eap", edges="stratified:30", seed=1, n=4, groups=2,
                             bootstrap=10, cache_dir=tmp_path)
    assert not other.exact_cached


def test_assert_fidelity_messages():
    def flipped(model, graph, task):
        return -eap.attribute(model, graph, task, progress=False)

    ok = testing.assert_fidelity("toy-gpt2-2l", "ioi", "eap", n=4, groups=2, edges="stratified:30", bootstrap=20,
                                 min_spearman=0.0)
    assert ok["spearman"] > 0
    with pytest.raises(AssertionError) as err:
        testing.assert_fidelity("toy-gpt2-2l", "ioi", flipped, n=4, groups=2, edges="stratified:30", bootstrap=20,
                                min_spearman=0.3, min_recall_at_10=0.0)
    msg = str(err.value)
    assert "method 'test_assert_fidelity_messages.<locals>.flipped' on task 'ioi'" in msg
    assert "FAIL spearman" in msg and "< min 0.300" in msg and "pass recall@10" in msg
    assert "[" in msg.split("FAIL spearman")[1].splitlines()[0]  # the CI is shown
    assert "worst edges" in msg and "->" in msg
    with pytest.raises(AssertionError, match="not a statistic"):
        testing.assert_fidelity("toy-gpt2-2l", "ioi", n=4, groups=1, edges="stratified:20", bootstrap=0,
                                min_bogus=0.1)
    with pytest.raises(TypeError, match="at least one minimum"):
        testing.assert_fidelity("toy-gpt2-2l", "ioi")


def test_task_objects_and_builders_are_accepted(tiny_model, make_random_task):
    task = make_random_task(tiny_model, n=4, seq=6, seed=1)
    fid = testing.fidelity(tiny_model, task, "eap", edges="all", groups=2, bootstrap=0)
    assert fid.task == "random" and fid.n_edges_selected == fid.n_edges
    fid2 = testing.fidelity(tiny_model, lambda model, n, seed=0: make_random_task(model, n=n, seq=6, seed=1),
                            "eap", edges="all", n=4, groups=2, bootstrap=0)
    assert fid2["spearman"] == fid["spearman"] and fid2.exact_cached  # same prompts: same truth
