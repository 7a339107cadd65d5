"""Agreement statistics between attribution scores and exact patching effects.

Both inputs are per-edge vectors in the metric's units (a score ~= mean over prompts of
metric(edge patched) - metric(clean)). Every statistic here is symmetric in sign conventions
only where stated: all correlations are on the *signed* values unless the name ends in
``_abs`` (then on ``|score|``, as the published EAP-IG comparisons do).

Top-k statistics rank edges by absolute value:

* ``precision@k``: share of attribution's top-k edges that are among the exact top-k.
* ``recall@k``: share of the exact top-k edges that attribution puts in its top-k. With both
  sets of size k this equals precision@k; both are reported because thresholds are usually
  phrased as recall.
* ``mass@k``: share of the exact |effect| of the exact top-k edges that attribution's top-k
  edges carry: sum_{e in A_k} |exact_e| / sum_{e in E_k} |exact_e| (1 = nothing important missed).
* ``sign@k``: share of the exact top-k edges on which attribution has the same sign as exact.

Confidence intervals (:func:`bootstrap`) are over *prompts*: the prompts are split into G equal
groups, each method gives one score vector per group, and a bootstrap replicate resamples the
groups with replacement and averages their vectors before computing the statistic.

Resampling groups with replacement duplicates some groups, which makes each replicate's
averaged scores noisier than the full-data average (about twice the variance). Correlations of
noisier vectors are lower, so raw replicate values sit systematically below the point estimate
(with many groups the plain percentile interval can even exclude it). The reported interval is
therefore *median-centred*: ``[value - (median - q_2.5), value + (q_97.5 - median)]`` of the
replicates, clipped to the statistic's range, i.e. the prompt-resampling spread of the
statistic placed on the point estimate. The mean shift of the replicates is reported as
``boot_bias`` (negative = the statistic grows with more prompts). These intervals describe
variability over prompt samples; they are not bias-corrected estimates of an infinite-prompt
value.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from scipy import stats as _st

KINDS = ("q", "k", "v", "mlp", "logits")
CORR_STATS = ("spearman", "kendall", "pearson", "spearman_abs", "kendall_abs", "pearson_abs")


def _finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _nan_if_constant(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0


def pearson(a, b) -> float:
    """Pearson r (NaN when either side is constant or has < 2 finite pairs)."""
    a, b = _finite(a, b)
    if _nan_if_constant(a, b):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def spearman(a, b) -> float:
    """Spearman rho: Pearson r of the average ranks (ties get mean ranks)."""
    a, b = _finite(a, b)
    if _nan_if_constant(a, b):
        return float("nan")
    return pearson(_st.rankdata(a), _st.rankdata(b))


def kendall(a, b) -> float:
    """Kendall tau-b (tie-corrected), O(n log n) via scipy."""
    a, b = _finite(a, b)
    if _nan_if_constant(a, b):
        return float("nan")
    return float(_st.kendalltau(a, b, variant="b").statistic)


def _topk_idx(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |x| (stable: ties broken by edge order)."""
    order = np.argsort(-np.abs(x), kind="stable")
    return order[:k]


def topk_precision_recall(attr, exact, k: int) -> tuple[float, float]:
    """(precision@k, recall@k) of attribution's top-k against the exact top-k, by |value|."""
    a, e = _finite(attr, exact)
    k = min(int(k), a.size)
    if k < 1:
        return float("nan"), float("nan")
    hit = len(np.intersect1d(_topk_idx(a, k), _topk_idx(e, k)))
    return hit / k, hit / k


def topk_mass(attr, exact, k: int) -> float:
    """Share of the exact top-k |effect| carried by attribution's top-k edges (see module doc)."""
    a, e = _finite(attr, exact)
    k = min(int(k), a.size)
    if k < 1:
        return float("nan")
    best = np.abs(e[_topk_idx(e, k)]).sum()
    if best == 0:
        return float("nan")
    return float(np.abs(e[_topk_idx(a, k)]).sum() / best)


def sign_agreement(attr, exact, k: int) -> float:
    """Share of the exact top-k edges (by |exact|) where sign(attr) == sign(exact)."""
    a, e = _finite(attr, exact)
    k = min(int(k), a.size)
    if k < 1:
        return float("nan")
    idx = _topk_idx(e, k)
    return float(np.mean(np.sign(a[idx]) == np.sign(e[idx])))


def k_values(n_edges: int) -> dict[str, int]:
    """The k of the top-k statistics: 10, 50 and 1% of the edges (at least 1)."""
    return {"10": 10, "50": 50, "1%": max(1, int(round(0.01 * n_edges)))}


def statistics(attr, exact, kinds: Iterable[str] | None = None) -> dict[str, float]:
    """All point statistics of one (attribution, exact) pair of edge vectors.

    With ``kinds`` (receiver kind per edge), correlations are also given per receiver kind
    under ``"<stat>[<kind>]"`` for the kinds present.
    """
    a, e = np.asarray(attr, np.float64), np.asarray(exact, np.float64)
    out: dict[str, float] = {
        "spearman": spearman(a, e),
        "kendall": kendall(a, e),
        "pearson": pearson(a, e),
        "spearman_abs": spearman(np.abs(a), np.abs(e)),
        "kendall_abs": kendall(np.abs(a), np.abs(e)),
        "pearson_abs": pearson(np.abs(a), np.abs(e)),
    }
    for name, k in k_values(a.size).items():
        p, r = topk_precision_recall(a, e, k)
        out[f"precision@{name}"] = p
        out[f"recall@{name}"] = r
        out[f"mass@{name}"] = topk_mass(a, e, k)
        out[f"sign@{name}"] = sign_agreement(a, e, k)
    if kinds is not None:
        kinds = np.asarray(list(kinds))
        for kd in KINDS:
            sel = kinds == kd
            if sel.sum() < 2:
                continue
            out[f"spearman[{kd}]"] = spearman(a[sel], e[sel])
            out[f"kendall[{kd}]"] = kendall(a[sel], e[sel])
            out[f"pearson[{kd}]"] = pearson(a[sel], e[sel])
            out[f"sign@10[{kd}]"] = sign_agreement(a[sel], e[sel], 10)
    return out


def bootstrap(
    attr_groups: np.ndarray,
    exact_groups: np.ndarray,
    stat_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Point estimates and percentile bootstrap CIs over prompt groups.

    ``attr_groups`` and ``exact_groups`` are ``[G, n_edges]``: row g is the score vector of
    prompt group g (each a mean over that group's prompts; groups have equal size, so the mean
    over rows is the full-data score). The point estimate uses the mean over all groups; each
    replicate resamples G groups with replacement. Returns ``{stat: {value, lo, hi, boot_bias}}``;
    ``lo``/``hi`` are NaN with G < 2 or n_boot = 0.
    """
    A, E = np.asarray(attr_groups, np.float64), np.asarray(exact_groups, np.float64)
    if A.shape != E.shape or A.ndim != 2:
        raise ValueError(f"expected two [G, n_edges] arrays of one shape, got {A.shape} and {E.shape}")
    G = A.shape[0]
    point = stat_fn(A.mean(0), E.mean(0))
    reps: dict[str, list[float]] = {k: [] for k in point}
    if G >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            idx = rng.integers(0, G, G)
            s = stat_fn(A[idx].mean(0), E[idx].mean(0))
            for k in point:
                reps[k].append(s.get(k, float("nan")))
    return _intervals(point, reps, level)


def bootstrap_edges(
    attr: np.ndarray,
    exact: np.ndarray,
    stat_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Point estimates and bootstrap CIs over *edges*, for score vectors without prompt groups:
    each replicate resamples the compared edges with replacement (how much a statistic depends on
    which edges were compared; not the prompt-sampling variability of :func:`bootstrap`). The same
    median-centred interval and output as :func:`bootstrap`."""
    a, e = np.asarray(attr, np.float64), np.asarray(exact, np.float64)
    if a.shape != e.shape or a.ndim != 1:
        raise ValueError(f"expected two [n_edges] vectors of one shape, got {a.shape} and {e.shape}")
    point = stat_fn(a, e)
    reps: dict[str, list[float]] = {k: [] for k in point}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot if a.size >= 2 else 0):
        idx = rng.integers(0, a.size, a.size)
        s = stat_fn(a[idx], e[idx])
        for k in point:
            reps[k].append(s.get(k, float("nan")))
    return _intervals(point, reps, level)


def _intervals(point: dict[str, float], reps: dict[str, list[float]], level: float) -> dict[str, dict[str, float]]:
    """``{stat: {value, lo, hi, boot_bias}}`` from point estimates and bootstrap replicates."""
    alpha = (1 - level) / 2
    out = {}
    for k, v in point.items():
        r = np.asarray(reps[k], np.float64)
        r = r[np.isfinite(r)]
        lo = hi = bias = float("nan")
        if r.size and np.isfinite(v):
            q_lo, med, q_hi = np.quantile(r, [alpha, 0.5, 1 - alpha])
            # Median-centred percentile interval: the spread of the replicates around their
            # median, moved onto the point estimate (see module docstring), clipped to [-1, 1].
            lo, hi = max(-1.0, v - (med - q_lo)), min(1.0, v + (q_hi - med))
            if v >= 0 and k.split("[")[0].split("@")[0] in ("precision", "recall", "mass", "sign"):
                lo = max(0.0, lo)
            bias = float(r.mean() - v)
        out[k] = {"value": float(v), "lo": float(lo), "hi": float(hi), "boot_bias": bias}
    return out


def worst_edges(attr, exact, names: list[str], kinds: list[str], n: int = 10) -> list[dict]:
    """The n edges where attribution is most wrong, by |attr - exact| (metric units)."""
    a, e = np.asarray(attr, np.float64), np.asarray(exact, np.float64)
    err = np.abs(a - e)
    err = np.where(np.isfinite(err), err, -np.inf)
    order = np.argsort(-err, kind="stable")[:n]
    rank_e = _st.rankdata(-np.abs(e), method="min")
    rank_a = _st.rankdata(-np.abs(a), method="min")
    return [
        {
            "edge": names[i],
            "kind": kinds[i],
            "attribution": float(a[i]),
            "exact": float(e[i]),
            "error": float(a[i] - e[i]),
            "rank_exact": int(rank_e[i]),
            "rank_attribution": int(rank_a[i]),
        }
        for i in order
        if np.isfinite(err[i])
    ]
