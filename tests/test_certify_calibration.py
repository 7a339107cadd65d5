"""Calibration of certificates, with exhaustive truth (float64, toy-gpt2-2l, IOI) as the oracle:
the bound covers the true number of unsampled misses in >= the stated share of seeds and the
estimate is unbiased; a planted miss is found or counted; error-weighted sampling beats uniform.
Negative controls: the unweighted-mean estimator under weighted sampling, and a sampler that
ignores the weights, each fail the check that the correct design passes."""

from __future__ import annotations

import pytest
import torch

import eap
import validation
from validation.certify_oracle import budget_to_find, calibrate, found_curve, true_unsampled_misses
from validation.certify_stats import error_signal

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = 60
CONF = 0.95


@pytest.fixture(scope="module")
def oracle():
    model = eap.load_model("toy-gpt2-2l", dtype=torch.float64)
    graph = eap.Graph.from_model(model)
    task = eap.tasks.ioi(model, 8, seed=0)
    truth = validation.patch_edges(model, graph, task, "all", progress=False)
    scores = {m: eap.attribute(model, graph, task, method=m, progress=False, write_graph=False).double()
              for m in ("eap", "eap-ig")}
    tau = 0.02 * float(truth.abs().max())
    return truth, scores, tau


def calibrated(r: dict, seeds: int = SEEDS, conf: float = CONF) -> bool:
    """The calibration check: coverage at least the stated confidence (less two binomial standard
    errors of a share over ``seeds``) and an unbiased estimate (|z| < 3)."""
    slack = 2 * (conf * (1 - conf) / seeds) ** 0.5
    return r["coverage"] >= conf - slack and abs(r["bias_z"]) < 3


def anti_signal(scores: dict) -> torch.Tensor:
    """An error signal pointing the wrong way (largest where |score| is smallest)."""
    return 1 / (1e-3 + scores["eap"].abs())


@pytest.mark.parametrize("budget", [20, 40])
def test_bound_covers_and_estimate_is_unbiased(oracle, budget):
    truth, scores, tau = oracle
    r = calibrate(truth, scores, budget=budget, threshold=tau, confidence=CONF, seeds=SEEDS)
    assert r["mean_truth"] > 1  # there are misses to bound
    assert calibrated(r), r
    # validity does not depend on the signal being any good
    bad = calibrate(truth, scores, budget=budget, threshold=tau, confidence=CONF, seeds=SEEDS, signal=anti_signal(scores))
    assert calibrated(bad), bad


def test_wrong_estimator_breaks_calibration(oracle):
    truth, scores, tau = oracle
    weighted = calibrate(truth, scores, budget=30, threshold=tau, seeds=SEEDS, estimator="naive")
    assert not calibrated(weighted) and weighted["bias_z"] > 3  # over-counts: misses were over-sampled
    anti = calibrate(truth, scores, budget=30, threshold=tau, seeds=SEEDS, estimator="naive", signal=anti_signal(scores))
    assert not calibrated(anti) and anti["coverage"] < CONF - 0.1  # under-counts: the bound fails


def test_planted_miss_is_found_or_counted(oracle):
    truth, scores, tau = oracle
    e = int(truth.abs().argsort(descending=True)[2])  # the third-largest exact effect
    planted = {m: s.clone() for m, s in scores.items()}
    for s in planted.values():
        s[e] = 0.0
    ok = found = 0
    for seed in range(SEEDS):
        cert = validation.run_certificate(planted, lambda i: truth[i], budget=30, threshold=tau, seed=seed)
        assert e not in cert.verified.tolist()
        was_found = e in cert.found_misses.tolist()
        found += was_found
        ok += was_found or cert.missed_upper >= true_unsampled_misses(cert, truth)
    assert ok / SEEDS >= CONF - 2 * (CONF * (1 - CONF) / SEEDS) ** 0.5
    assert 0 < found < SEEDS  # it is sometimes found, sometimes only counted


def _ratio(truth, scores, tau, signal, budgets, verify=8):
    """Budget uniform sampling needs to find half the misses outside the verified block, over the
    budget the sampler under test needs (> 1: fewer patched edges)."""
    kw = dict(threshold=tau, seeds=SEEDS, patience=verify, verify_share=1e-9)
    cert = validation.run_certificate(scores, lambda i: truth[i], budget=verify, threshold=tau, patience=verify,
                                      verify_share=1e-9)
    outside = torch.ones(truth.numel(), dtype=torch.bool)
    outside[cert.verified] = False
    target = 0.5 * int((outside & (truth.abs() > tau)).sum())
    uniform = found_curve(truth, scores, budgets, signal=torch.ones(truth.numel()), **kw)
    tested = found_curve(truth, scores, budgets, signal=signal, **kw)
    return budget_to_find(uniform, budgets, target) / budget_to_find(tested, budgets, target)


def test_weighted_sampling_needs_fewer_edges_and_a_weightless_sampler_does_not(oracle):
    truth, scores, tau = oracle
    budgets = list(range(10, 111, 8))
    assert _ratio(truth, scores, tau, None, budgets) >= 1.5
    # negative control: a sampler that ignores the weights (every edge the same signal) loses it
    shuffled = torch.randperm(truth.numel(), generator=torch.Generator().manual_seed(0))
    ignoring = error_signal(torch.stack(list(scores.values())))[shuffled]
    assert _ratio(truth, scores, tau, ignoring, budgets) < 1.5
