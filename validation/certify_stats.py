"""Statistics of a certificate: the error signal, strata, the sample and the bounds (no model).

Everything here is a plain function of tensors, so the calibration (``scripts/certify_calibration.py``,
``tests/test_certify_calibration.py``) runs it thousands of times against exhaustive truth used
as an oracle, without patching anything. docs/certify.md states the design; in short:

* the edges outside the verified candidate circuit are split into strata by a cheap error
  signal (:func:`error_signal`, :func:`make_strata`);
* the search budget is allocated to strata in proportion to ``N_h x mean signal`` (at least
  ``min_per_stratum`` each; :func:`allocate`), i.e. inclusion probability ``n_h / N_h`` that
  grows with the signal; inside a stratum a seeded permutation is taken in order, so a larger
  budget extends the same sample (:func:`draw`);
* the number of misses (``|effect| > tau``) among the unsampled edges of stratum h has the exact
  one-sided hypergeometric upper bound ``U_h - x_h`` at level ``alpha / H`` (Bonferroni over the
  H strata not fully sampled); their sum bounds the total at confidence ``1 - alpha``
  (:func:`bound`). The point estimate is the stratified (Horvitz-Thompson) estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from scipy.stats import hypergeom
from torch import Tensor

#: Default stratum shares of the outside edges, from the highest signal down (sum 1).
DEFAULT_SHARES = (0.05, 0.15, 0.3, 0.5)


class CertifyError(ValueError):
    """Bad arguments to a certificate."""


def error_signal(scores: Float[Tensor, "m n"], floor: float = 0.05) -> Float[Tensor, " n"]:
    """A cheap per-edge signal of "attribution may be wrong here", >= 0, from ``m`` score vectors
    of the same edges (one per attribution method, metric units):

        max_m |s_m| + (max_m s_m - min_m s_m) + floor * mean_e(max_m |s_m|)

    the largest size any method gives the edge, plus the disagreement between methods (0 with one
    method), plus a floor so that every edge keeps a positive inclusion probability."""
    s = scores.double().reshape(-1, scores.shape[-1])
    if not torch.isfinite(s).all():
        raise CertifyError("scores hold NaN or inf: the error signal needs finite scores for every edge")
    size = s.abs().max(0).values
    spread = s.max(0).values - s.min(0).values
    return size + spread + floor * size.mean().clamp_min(1e-300)


def make_strata(signal: Float[Tensor, " n"], shares: tuple[float, ...] = DEFAULT_SHARES) -> Int[Tensor, " n"]:
    """Stratum of each edge (0 = highest signal): edges sorted by signal (descending, ties by
    index) and cut into consecutive groups of ``shares`` of the edges (at least one edge each,
    fewer strata when there are fewer edges)."""
    n = signal.numel()
    if abs(sum(shares) - 1) > 1e-9 or min(shares) <= 0:
        raise CertifyError(f"stratum shares must be positive and sum to 1, got {shares}")
    order = sorted(range(n), key=lambda i: (-float(signal[i]), i))
    cuts = sorted({min(n, max(1, round(n * c))) for c in _cumsum(shares)[:-1]} | {n}) if n else []
    strata = torch.empty(n, dtype=torch.long)
    start = 0
    for h, stop in enumerate(cuts):
        strata[torch.tensor(order[start:stop], dtype=torch.long)] = h
        start = stop
    return strata


def _cumsum(xs: tuple[float, ...]) -> list[float]:
    out, t = [], 0.0
    for x in xs:
        t += x
        out.append(t)
    return out


def allocate(sizes: Int[Tensor, " H"], weights: Float[Tensor, " H"], budget: int, min_per_stratum: int = 2) -> Int[Tensor, " H"]:
    """Sample sizes ``n_h`` with ``sum n_h = min(budget, sum N_h)``, ``n_h <= N_h``, at least
    ``min(N_h, min_per_stratum)`` each when the budget allows, the rest in proportion to
    ``weights`` (``N_h x mean signal``) by largest remainders, capped strata's share passed on."""
    N = sizes.long().tolist()
    budget = min(int(budget), sum(N))
    n = [0] * len(N)
    floor_ = [min(Nh, min_per_stratum) for Nh in N]
    if sum(floor_) >= budget:  # not even the minimum: fill strata from the highest signal down
        for h in range(len(N)):
            n[h] = min(floor_[h], budget - sum(n))
        return torch.tensor(n, dtype=torch.long)
    n = floor_
    w = [max(float(x), 0.0) for x in weights.tolist()]
    while sum(n) < budget:
        open_ = [h for h in range(len(N)) if n[h] < N[h]]
        left = budget - sum(n)
        total_w = sum(w[h] for h in open_) or float(len(open_))
        want = {h: (w[h] if sum(w[h] for h in open_) > 0 else 1.0) * left / total_w for h in open_}
        add = {h: min(N[h] - n[h], int(math.floor(want[h]))) for h in open_}
        if sum(add.values()) == 0:  # hand out single edges by largest remainder
            h = max(open_, key=lambda h: (want[h] - math.floor(want[h]), -h))
            add[h] = 1
        for h, a in add.items():
            n[h] += a
    return torch.tensor(n, dtype=torch.long)


def draw(strata: Int[Tensor, " n"], n_h: Int[Tensor, " H"], seed: int) -> Int[Tensor, " k"]:
    """Positions (into ``strata``) of the sample: in every stratum the first ``n_h`` edges of a
    permutation seeded by ``seed`` (and the stratum), so a larger ``n_h`` extends the sample."""
    picks = []
    for h in range(len(n_h)):
        members = (strata == h).nonzero().flatten()
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + h)
        perm = members[torch.randperm(len(members), generator=g)]
        picks.append(perm[: int(n_h[h])])
    return torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long)


def hypergeom_upper(N: int, n: int, x: int, alpha: float) -> int:
    """Exact one-sided upper confidence bound on the number D of "successes" in a population of
    ``N`` from which a simple random sample of ``n`` without replacement held ``x``: the largest D
    with ``P(X <= x | N, D, n) > alpha`` (so ``P(D > bound) <= alpha`` for every true D)."""
    if n >= N:
        return x
    lo, hi = x, N - (n - x)  # D must leave n - x non-successes in the population
    if hypergeom.cdf(x, N, hi, n) > alpha:
        return hi
    while hi - lo > 1:  # invariant: cdf(lo) > alpha >= cdf(hi); the cdf decreases in D
        mid = (lo + hi) // 2
        if hypergeom.cdf(x, N, mid, n) > alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Stratum:
    """One stratum of the outside edges: ``size`` N_h, ``sampled`` n_h, ``found`` x_h sampled
    misses, ``upper`` U_h (bound on all misses in the stratum), ``alpha`` its share."""

    size: int
    sampled: int
    found: int
    upper: int
    alpha: float
    mean_signal: float

    @property
    def unsampled_upper(self) -> int:
        """Bound on the misses among the stratum's unsampled edges: ``U_h - x_h``."""
        return self.upper - self.found

    @property
    def unsampled_estimate(self) -> float:
        """Stratified (Horvitz-Thompson) estimate of the unsampled misses: ``(N_h - n_h) x_h / n_h``."""
        if self.sampled >= self.size:
            return 0.0
        return (self.size - self.sampled) * self.found / self.sampled if self.sampled else float("nan")


def bound(strata: Int[Tensor, " n"], sampled: Bool[Tensor, " n"], miss: Bool[Tensor, " n"],
          signal: Float[Tensor, " n"], alpha: float) -> list[Stratum]:
    """Per-stratum bounds: ``miss`` is read only where ``sampled``. Strata fully sampled are exact
    (bound = found); the others share ``alpha`` equally (Bonferroni), so that with probability
    >= 1 - alpha every stratum's bound holds at once and their sum bounds the total."""
    H = int(strata.max()) + 1 if strata.numel() else 0
    sizes = [int((strata == h).sum()) for h in range(H)]
    n_s = [int((sampled & (strata == h)).sum()) for h in range(H)]
    x = [int((sampled & miss & (strata == h)).sum()) for h in range(H)]
    open_ = sum(1 for h in range(H) if n_s[h] < sizes[h])
    share = alpha / open_ if open_ else alpha
    out = []
    for h in range(H):
        upper = x[h] if n_s[h] >= sizes[h] else hypergeom_upper(sizes[h], n_s[h], x[h], share)
        out.append(Stratum(sizes[h], n_s[h], x[h], upper, share if n_s[h] < sizes[h] else 0.0,
                           float(signal[strata == h].mean()) if sizes[h] else 0.0))
    return out


def naive_bound(sampled: Bool[Tensor, " n"], miss: Bool[Tensor, " n"], alpha: float) -> tuple[int, float]:
    """The WRONG estimator (a negative control, never used by :func:`validation.certify`): treat a
    weighted sample as a simple random one, i.e. the unweighted sample mean scaled to the
    population, and one pooled hypergeometric bound. Returns (bound, estimate) on unsampled misses."""
    N, n = sampled.numel(), int(sampled.sum())
    x = int((sampled & miss).sum())
    est = (N - n) * x / n if n else float("nan")
    return hypergeom_upper(N, n, x, alpha) - x, est
