"""validation.certify on a tiny float64 model with exhaustive truth: exact effects, the exact
certificate at full budget, resuming and extending, bad input, the statistics against a naive
computation, and the CLIs (certify, circuit, --task)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import hypergeom

import validation
from eap.graph import Graph
from validation.certify_stats import CertifyError, allocate, draw, hypergeom_upper, make_strata

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_model):
    from conftest import random_task

    graph = Graph.from_model(tiny_model)
    task = random_task(tiny_model, n=4)
    truth = validation.patch_edges(tiny_model, graph, task, "all", progress=False)
    g = torch.Generator().manual_seed(0)
    scores = truth + 0.5 * truth.abs().mean() * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    tau = float(truth.abs().quantile(0.7))
    return tiny_model, graph, task, truth, scores, tau


def test_verified_and_sampled_effects_equal_patch_edges(setup, tmp_path):
    model, graph, task, truth, scores, tau = setup
    cert = validation.certify(model, graph, task, scores, budget=20, threshold=tau, seed=3, out=tmp_path, progress=False)
    assert cert.n_patched == 20 and cert.verified.numel() >= 1 and cert.sampled.numel() >= 1
    torch.testing.assert_close(cert.verified_effects, truth[cert.verified], rtol=0, atol=1e-12)
    torch.testing.assert_close(cert.sampled_effects, truth[cert.sampled], rtol=0, atol=1e-12)
    # verification follows |score| from the top; no verified edge is sampled again
    order = scores.abs().argsort(descending=True, stable=True)
    assert torch.equal(cert.verified, order[: cert.verified.numel()])
    assert not set(cert.verified.tolist()) & set(cert.sampled.tolist())
    # found misses and the recommended circuit follow from the exact effects
    want_found = sorted(e for e in cert.sampled.tolist() if abs(truth[e]) > tau)
    assert sorted(cert.found_misses.tolist()) == want_found
    want_rec = sorted(e for e in cert.verified.tolist() + cert.sampled.tolist() if abs(truth[e]) > tau)
    assert cert.recommended.tolist() == want_rec
    text = cert.summary()
    assert f"{cert.missed_upper} at 95% confidence" in text and graph.edge_names[int(cert.verified[0])] in text


def test_full_budget_is_exact(setup):
    model, graph, task, truth, scores, tau = setup
    cert = validation.certify(model, graph, task, scores, budget=graph.n_edges + 5, threshold=tau, progress=False)
    assert cert.n_patched == graph.n_edges
    assert cert.missed_upper == 0 and cert.missed_estimate == 0 and cert.mass_upper == 0
    assert cert.recommended.tolist() == (truth.abs() > tau).nonzero().flatten().tolist()


def test_resume_and_extend_reuse_the_store(setup, tmp_path):
    model, graph, task, truth, scores, tau = setup
    kw = dict(threshold=tau, seed=1, out=tmp_path, progress=False, patience=4, verify_share=0.25)
    a = validation.certify(model, graph, task, scores, budget=16, **kw)
    assert a.stats["n_patched_new"] == 16
    again = validation.certify(model, graph, task, scores, budget=16, **kw)
    assert again.stats["n_patched_new"] == 0
    assert torch.equal(again.sampled, a.sampled) and again.missed_upper == a.missed_upper
    more = validation.certify(model, graph, task, scores, budget=24, **kw)
    patched_a = set(a.verified.tolist()) | set(a.sampled.tolist())
    patched_more = set(more.verified.tolist()) | set(more.sampled.tolist())
    # only edges not measured before are patched (the verified prefix and much of the sample are reused)
    assert more.stats["n_patched_new"] == len(patched_more - patched_a) < 24 - 4
    # an exhaustive results file in the same directory answers everything
    validation.patch_edges(model, graph, task, "all", out=tmp_path / "edges-all.pt", progress=False)
    full = validation.certify(model, graph, task, scores, budget=40, **kw)
    assert full.stats["n_patched_new"] == 0
    torch.testing.assert_close(full.sampled_effects, truth[full.sampled], rtol=0, atol=1e-12)


def test_bad_input_is_refused(setup):
    model, graph, task, truth, scores, tau = setup
    with pytest.raises(CertifyError, match="edges"):
        validation.certify(model, graph, task, scores[:-1], budget=5, threshold=tau)
    bad = scores.clone()
    bad[3] = float("nan")
    with pytest.raises(CertifyError, match="NaN"):
        validation.certify(model, graph, task, bad, budget=5, threshold=tau)
    with pytest.raises(CertifyError, match="threshold"):
        validation.run_certificate(scores, lambda e: truth[e], budget=5, threshold=-1.0)
    with pytest.raises(CertifyError, match="P%"):
        validation.run_certificate(scores, lambda e: truth[e], budget=5, threshold="x%")
    with pytest.raises(CertifyError, match="confidence"):
        validation.run_certificate(scores, lambda e: truth[e], budget=5, threshold=tau, confidence=1.5)


def test_hypergeometric_bound_against_the_definition():
    # naive: scan every D, keep the largest whose P(X <= x) exceeds alpha
    for N, n, x, alpha in [(50, 10, 0, 0.05), (50, 10, 3, 0.05), (200, 30, 2, 0.0125), (12, 11, 1, 0.1), (30, 30, 4, 0.05)]:
        naive = max([D for D in range(x, N - (n - x) + 1) if hypergeom.cdf(x, N, D, n) > alpha] or [x]) if n < N else x
        assert hypergeom_upper(N, n, x, alpha) == naive
    # coverage by simulation: D = 7 misses among 60 edges, samples of 15
    g = torch.Generator().manual_seed(0)
    pop = torch.zeros(60, dtype=torch.bool)
    pop[:7] = True
    cover = sum(hypergeom_upper(60, 15, int(pop[torch.randperm(60, generator=g)[:15]].sum()), 0.1) >= 7
                for _ in range(400))
    assert cover / 400 >= 0.9


def test_strata_allocation_and_nested_draws():
    sig = torch.tensor([5.0, 0.1, 4.0, 0.2, 0.3, 3.0, 0.1, 0.1, 0.2, 0.1])
    strata = make_strata(sig, (0.2, 0.3, 0.5))
    assert strata[[0, 2]].tolist() == [0, 0] and strata[5].item() == 1 and (strata == 2).sum() == 5
    sizes = torch.tensor([2, 3, 5])
    n = allocate(sizes, torch.tensor([9.0, 3.5, 0.5]), 6, min_per_stratum=1)
    assert n.sum() == 6 and (n <= sizes).all() and (n >= 1).all() and n[0] == 2
    small, big = draw(strata, torch.tensor([1, 1, 2]), seed=4), draw(strata, torch.tensor([2, 2, 4]), seed=4)
    assert set(small.tolist()) <= set(big.tolist())  # a larger budget extends the same sample


def test_cli_certify_writes_a_certificate(tmp_path, capsys):
    from validation.__main__ import main

    out = tmp_path / "cert.json"
    rc = main(["certify", "--model", "toy-gpt2-2l", "--n", "4", "--methods", "eap", "--budget", "12",
               "--threshold", "5%", "--out", str(tmp_path / "store"), "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["n_patched"] == 12 and f"at most {data['missed_upper']} at 95% confidence" in text
    assert set(data["recommended"]) == {k for k, v in {**data["verified"], **data["found_misses"]}.items()
                                        if abs(v) > data["threshold"]}


def test_cli_task_flag_and_circuit_subcommand(tmp_path, capsys):
    import eap
    from validation.__main__ import main

    rc = main(["--model", "toy-gpt2-2l", "--task", "greater-than", "--n", "4", "--edges", "0,1",
               "--out", str(tmp_path / "gt.pt"), "--no-progress"])
    assert rc == 0 and "task greater-than" in capsys.readouterr().out
    rc = main(["--model", "toy-gpt2-2l", "--task", "conftest:random_task", "--n", "3", "--edges", "0",
               "--out", str(tmp_path / "r.pt"), "--no-progress"])
    assert rc == 0 and "task random n=3" in capsys.readouterr().out
    with pytest.raises(eap.TaskError, match="unknown task"):
        main(["--model", "toy-gpt2-2l", "--task", "nope", "--n", "2"])

    model = eap.load_model("toy-gpt2-2l")
    graph = Graph.from_model(model)
    task = eap.tasks.ioi(model, 4, seed=0)
    graph.set_edge_scores(eap.attribute(model, graph, task, progress=False, write_graph=False))
    graph.apply_topk(10)
    path = tmp_path / "c.json"
    graph.to_json(path)
    rc = main(["circuit", "--model", "toy-gpt2-2l", "--task", "ioi", "--n", "4", "--graph", str(path)])
    assert rc == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(str(path))][0]
    want = validation.evaluate_circuit(model, graph, task, graph)
    assert "10 of 110 edges" in line
    assert math.isclose(float(line.split("faithfulness ")[1]), float(want.faithfulness), abs_tol=1e-4)
