"""Calibration of certificates against exhaustive truth used as an oracle (nothing is patched).

With every edge's exact effect known (``validation.patch_edges(..., 'all')`` once), a
certificate's ``measure`` is a table look-up, so hundreds of sampler seeds cost milliseconds.
:func:`calibrate` runs :func:`validation.certify.run_certificate` over seeds and reports how
often the upper bound covers the true number of unsampled misses (it must, in at least
``confidence`` of the seeds) and whether the estimate is unbiased; :func:`found_curve` gives
the misses found against the search budget, for the error-weighted and the uniform sampler.
``estimator='naive'`` is the negative control: the unweighted mean of a weighted sample
(``validation.certify_stats.naive_bound``), which a correct calibration check must reject.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from validation.certify import Certificate, run_certificate
from validation.certify_stats import CertifyError, naive_bound


def true_unsampled_misses(cert: Certificate, truth: Float[Tensor, " n"]) -> int:
    """Edges outside the candidate circuit, not sampled, with true ``|effect| > tau``."""
    rest = torch.ones(truth.numel(), dtype=torch.bool)
    rest[cert.verified] = False
    rest[cert.sampled] = False
    return int((rest & (truth.abs() > cert.threshold)).sum())


def true_unsampled_mass(cert: Certificate, truth: Float[Tensor, " n"]) -> float:
    rest = torch.ones(truth.numel(), dtype=torch.bool)
    rest[cert.verified] = False
    rest[cert.sampled] = False
    big = rest & (truth.abs() > cert.threshold)
    return float(truth[big].abs().sum())


def calibrate(truth: Float[Tensor, " n"], scores: Any, *, budget: int, threshold: float | str,
              confidence: float = 0.95, seeds: int = 50, signal: Tensor | None = None,
              estimator: str = "stratified", **kw: Any) -> dict:
    """Certificates over ``seeds`` sampler seeds with ``truth`` as the oracle.

    Returns ``coverage`` (share of seeds whose bound >= the true unsampled misses), ``mass_coverage``,
    ``mean_bound``, ``mean_truth`` (true unsampled misses), ``mean_estimate``, ``bias_z`` (mean
    estimate minus mean truth over its standard error; |z| > 3 means a biased estimator),
    ``mean_found`` and the per-seed lists ``bounds``, ``truths``, ``estimates``, ``found``."""
    if estimator not in ("stratified", "naive"):
        raise CertifyError(f"estimator must be 'stratified' or 'naive', got {estimator!r}")
    truth = torch.as_tensor(truth).double()
    if torch.isnan(truth).any():
        raise CertifyError("truth holds NaN: the oracle needs every edge's exact effect")
    rows: dict[str, list] = {k: [] for k in ("bounds", "truths", "estimates", "found", "mass_ok")}
    for seed in range(seeds):
        cert = run_certificate(scores, lambda e: truth[e], budget=budget, threshold=threshold,
                               confidence=confidence, seed=seed, signal=signal, n_edges=truth.numel(), **kw)
        t = true_unsampled_misses(cert, truth)
        if estimator == "naive":
            outside = torch.ones(truth.numel(), dtype=torch.bool)
            outside[cert.verified] = False
            idx = outside.nonzero().flatten()
            sampled = torch.isin(idx, cert.sampled)
            miss = truth[idx].abs() > cert.threshold
            b, est = naive_bound(sampled, miss, 1 - confidence)
        else:
            b, est = cert.missed_upper, cert.missed_estimate
        rows["bounds"].append(b)
        rows["truths"].append(t)
        rows["estimates"].append(est)
        rows["found"].append(int(cert.found_misses.numel()))
        rows["mass_ok"].append(cert.mass_upper >= true_unsampled_mass(cert, truth) - 1e-12)
    diffs = [e - t for e, t in zip(rows["estimates"], rows["truths"]) if not math.isnan(e)]
    mean_d = sum(diffs) / len(diffs) if diffs else float("nan")
    sd = (sum((d - mean_d) ** 2 for d in diffs) / max(len(diffs) - 1, 1)) ** 0.5 if diffs else float("nan")
    se = sd / max(len(diffs), 1) ** 0.5
    bias_z = 0.0 if diffs and se == 0 and mean_d == 0 else (mean_d / se if diffs and se > 0 else float("inf"))
    return dict(
        rows,
        coverage=sum(b >= t for b, t in zip(rows["bounds"], rows["truths"])) / seeds,
        mass_coverage=sum(rows["mass_ok"]) / seeds,
        mean_bound=sum(rows["bounds"]) / seeds, mean_truth=sum(rows["truths"]) / seeds,
        mean_estimate=(sum(e for e in rows["estimates"] if not math.isnan(e)) / len(diffs) if diffs else float("nan")),
        bias_z=bias_z, mean_found=sum(rows["found"]) / seeds, n_estimates=len(diffs),
    )


def found_curve(truth: Float[Tensor, " n"], scores: Any, budgets: list[int], *, threshold: float | str,
                seeds: int = 50, signal: Tensor | None = None, **kw: Any) -> list[float]:
    """Mean number of true misses found (sampled outside edges above tau) at each budget."""
    truth = torch.as_tensor(truth).double()
    out = []
    for K in budgets:
        found = [int(run_certificate(scores, lambda e: truth[e], budget=K, threshold=threshold, seed=s, signal=signal,
                                     n_edges=truth.numel(), **kw).found_misses.numel()) for s in range(seeds)]
        out.append(sum(found) / seeds)
    return out


def budget_to_find(curve: list[float], budgets: list[int], target: float) -> float:
    """The smallest budget at which ``curve`` (misses found) reaches ``target``, linearly
    interpolated between grid points; inf when never reached."""
    prev_k, prev_v = None, None
    for k, v in zip(budgets, curve):
        if v >= target:
            if prev_k is None or v == prev_v:
                return float(k)
            return prev_k + (target - prev_v) * (k - prev_k) / (v - prev_v)
        prev_k, prev_v = k, v
    return float("inf")
