"""Certified circuits without exhaustive truth: verify the top edges exactly, then search the rest.

    certify(model, graph, task, scores, budget=K, threshold=tau, confidence=0.95, seed=0, ...)
        -> Certificate

Given attribution scores (one tensor, or a dict of several methods' tensors), exactly ``budget``
edges (fewer when the graph has fewer) are patched exactly (``validation.patch_edges``), in two parts:

1. **Verify.** Edges in order of decreasing |score| (of the first method), in blocks of
   ``patience`` edges, at most ``verify_share x budget`` of them. The verified set is *stable*
   when a whole block holds no edge with exact ``|effect| > tau``: the set
   ``{verified e : |effect_e| > tau}`` then gained nothing over the last ``patience`` edges of
   the ranking. Verification stops there (or at its cap); the edges verified so far are the
   *candidate circuit*.
2. **Search for misses.** The remaining budget samples the edges outside the candidate circuit,
   stratified by a cheap error signal (``validation.certify_stats``; docs/certify.md): strata
   with a larger signal (a larger |score| by some method, methods disagreeing) get a larger
   inclusion probability. Sampled edges with ``|effect| > tau`` are *found misses*; the stratified
   estimator and an exact hypergeometric bound per stratum (Bonferroni over strata) give the
   estimate and a one-sided upper bound, at ``confidence``, on the number of *unsampled* outside
   edges with ``|effect| > tau``.

Sign and units as ``patch_edges``: effect = mean over prompts of metric(patched) - metric(clean),
metric units; ``tau`` is compared with |effect|. Results are kept in ``out`` (a directory of
``patch_edges`` results files): re-running resumes, and a larger budget (same seed) reuses every
edge measured before (any results file of the same model, task, metric and scale in ``out``
counts, an exhaustive one included).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from validation.certify_stats import DEFAULT_SHARES, CertifyError, Stratum, allocate, bound, draw, error_signal, make_strata

#: exact effects of the given edge indices (float64, same order)
Measure = Callable[[Int[Tensor, " k"]], Float[Tensor, " k"]]


@dataclass
class Certificate:
    """What :func:`certify` found. Edge indices are in ``graph.edge_names`` order; effects are
    exact (metric(patched) - metric(clean), metric units)."""

    budget: int
    threshold: float
    confidence: float
    seed: int
    n_edges: int
    verified: Int[Tensor, " v"]  #: the candidate circuit, in verification order (|score| descending)
    verified_effects: Float[Tensor, " v"]
    stable: bool  #: verification stopped because a block of ``patience`` edges added nothing above tau
    sampled: Int[Tensor, " s"]  #: the search sample (outside the candidate circuit), sorted
    sampled_effects: Float[Tensor, " s"]
    strata: list[Stratum]
    missed_upper: int  #: upper bound on unsampled outside edges with |effect| > tau, at ``confidence``
    missed_estimate: float  #: stratified (Horvitz-Thompson) estimate of that number
    mass_upper: float  #: missed_upper x max_effect (assumes no unpatched edge exceeds max_effect)
    mass_estimate: float  #: stratified estimate of their total |effect|
    max_effect: float  #: the largest |effect| of any patched edge
    names: list[str] | None = None
    stats: dict = field(default_factory=dict)

    @property
    def n_patched(self) -> int:
        return int(self.verified.numel() + self.sampled.numel())

    @property
    def circuit(self) -> Int[Tensor, " c"]:
        """Verified edges with |effect| > tau."""
        return self.verified[self.verified_effects.abs() > self.threshold]

    @property
    def found_misses(self) -> Int[Tensor, " f"]:
        """Sampled edges outside the candidate circuit with |effect| > tau."""
        return self.sampled[self.sampled_effects.abs() > self.threshold]

    @property
    def recommended(self) -> Int[Tensor, " r"]:
        """The recommended circuit: verified edges and found misses above tau (sorted)."""
        return torch.cat([self.circuit, self.found_misses]).sort().values

    def effect_of(self, edges: Int[Tensor, " k"]) -> Float[Tensor, " k"]:
        lookup = dict(zip(self.verified.tolist() + self.sampled.tolist(),
                          self.verified_effects.tolist() + self.sampled_effects.tolist()))
        return torch.tensor([lookup[int(e)] for e in edges], dtype=torch.float64)

    def _name(self, e: int) -> str:
        return self.names[e] if self.names else f"edge {e}"

    def summary(self, k: int = 20) -> str:
        lines = [
            f"certificate: budget {self.budget} exactly patched edges of {self.n_edges} "
            f"({self.verified.numel()} verified, {self.sampled.numel()} sampled), tau = {self.threshold:.4g} "
            f"(|effect| in metric units), confidence {self.confidence:.0%}, seed {self.seed}",
            f"verified (candidate circuit): {self.verified.numel()} edges by |score|, "
            + ("stable" if self.stable else "NOT stable: the verification cap was reached")
            + f"; {self.circuit.numel()} above tau",
        ]
        for e in self.circuit[:k].tolist():
            lines.append(f"  {self.effect_of(torch.tensor([e]))[0]:+.5f}  {self._name(e)}")
        if self.circuit.numel() > k:
            lines.append(f"  ... {self.circuit.numel() - k} more")
        fm = self.found_misses
        lines.append(f"found misses (sampled outside the candidate circuit, |effect| > tau): {fm.numel()}")
        for e in fm[:k].tolist():
            lines.append(f"  {self.effect_of(torch.tensor([e]))[0]:+.5f}  {self._name(e)}")
        outside = sum(s.size for s in self.strata)
        lines.append(
            f"unsampled outside edges with |effect| > tau: at most {self.missed_upper} at {self.confidence:.0%} "
            f"confidence (estimate {self.missed_estimate:.1f}) among {outside - self.sampled.numel()} unsampled; "
            f"their total |effect|: estimate {self.mass_estimate:.4g}, at most {self.mass_upper:.4g} "
            f"if no unpatched edge exceeds the largest patched |effect| {self.max_effect:.4g}"
        )
        lines.append("strata (highest error signal first): N, sampled, misses found, bound on misses:")
        for h, s in enumerate(self.strata):
            lines.append(f"  {h}: N={s.size} n={s.sampled} found={s.found} bound={s.upper} "
                         f"(alpha {s.alpha:.3g}, mean signal {s.mean_signal:.3g})")
        lines.append(f"recommended circuit: {self.recommended.numel()} edges (verified + found misses above tau)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready record (``bench gate --certify`` reads it)."""
        names = self.names or [str(i) for i in range(self.n_edges)]
        return {
            "kind": "eap-bench/certificate/1", "budget": self.budget, "threshold": self.threshold,
            "confidence": self.confidence, "seed": self.seed, "n_edges": self.n_edges, "n_patched": self.n_patched,
            "stable": self.stable, "missed_upper": self.missed_upper, "missed_estimate": self.missed_estimate,
            "mass_upper": self.mass_upper, "mass_estimate": self.mass_estimate, "max_effect": self.max_effect,
            "verified": {names[e]: v for e, v in zip(self.verified.tolist(), self.verified_effects.tolist())},
            "found_misses": {names[e]: float(self.effect_of(torch.tensor([e]))[0]) for e in self.found_misses.tolist()},
            "recommended": [names[e] for e in self.recommended.tolist()],
            "strata": [vars(s) for s in self.strata], "stats": self.stats,
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=float))


def _as_matrix(scores: Any, n_edges: int | None) -> Float[Tensor, "m n"]:
    """Scores (a tensor ``[n]``, a list, or a dict method -> tensor) as ``[m, n]`` float64, first
    method first."""
    if isinstance(scores, dict):
        if not scores:
            raise CertifyError("scores is an empty dict: give at least one method's scores")
        rows = list(scores.values())
    elif isinstance(scores, (list, tuple)):
        rows = list(scores)
    else:
        rows = [scores]
    mat = torch.stack([torch.as_tensor(r).detach().double().cpu().reshape(-1) for r in rows])
    if n_edges is not None and mat.shape[1] != n_edges:
        raise CertifyError(f"scores have {mat.shape[1]} entries but the graph has {n_edges} edges")
    if not torch.isfinite(mat).all():
        raise CertifyError("scores hold NaN or inf; certify needs a score for every edge")
    return mat


def resolve_threshold(threshold: float | str, first_effects: Float[Tensor, " k"]) -> float:
    """``threshold``: a number (|effect| in metric units) or ``'P%'``: P percent of the largest
    |effect| in the first verified block (fixed before any edge is sampled)."""
    if isinstance(threshold, str) and threshold.strip().endswith("%"):
        try:
            frac = float(threshold.strip()[:-1]) / 100
        except ValueError:
            raise CertifyError(f"threshold {threshold!r}: 'P%' wants a number P") from None
        if not 0 <= frac < 1:
            raise CertifyError(f"threshold {threshold!r}: P must be in [0, 100)")
        return frac * float(first_effects.abs().max()) if first_effects.numel() else 0.0
    tau = float(threshold)
    if not math.isfinite(tau) or tau < 0:
        raise CertifyError(f"threshold must be a finite |effect| >= 0 (metric units) or 'P%', got {threshold!r}")
    return tau


def run_certificate(
    scores: Any, measure: Measure, *, budget: int, threshold: float | str, confidence: float = 0.95, seed: int = 0,
    patience: int | None = None, verify_share: float = 0.5, signal: Float[Tensor, " n"] | None = None,
    shares: tuple[float, ...] = DEFAULT_SHARES, min_per_stratum: int = 2, names: list[str] | None = None,
    n_edges: int | None = None,
) -> Certificate:
    """The certificate's logic on any ``measure`` (exact effects of edge indices): patching, or
    exhaustive truth used as an oracle (the calibration). Arguments as :func:`certify`."""
    mat = _as_matrix(scores, n_edges)
    n = mat.shape[1]
    if not 0 < confidence < 1:
        raise CertifyError(f"confidence must be in (0, 1), got {confidence}")
    if int(budget) < 1:
        raise CertifyError(f"budget (exactly patched edges) must be >= 1, got {budget}")
    if not 0 < verify_share <= 1:
        raise CertifyError(f"verify_share must be in (0, 1], got {verify_share}")
    budget = min(int(budget), n)
    patience = int(patience) if patience else max(8, budget // 50)
    order = torch.sort(mat[0].abs(), descending=True, stable=True).indices
    cap = min(budget, max(patience, int(verify_share * budget)))
    verified, effects, stable, tau, j = [], [], False, None, 0
    while j < cap:
        block = order[j: min(j + patience, cap)]
        vals = measure(block).double().cpu()
        tau = resolve_threshold(threshold, vals) if tau is None else tau
        verified.append(block)
        effects.append(vals)
        j += len(block)
        if not bool((vals.abs() > tau).any()):
            stable = True
            break
    ver = torch.cat(verified)
    ver_eff = torch.cat(effects)
    if len(ver) == n:  # everything verified: nothing outside
        stable = True
    outside_mask = torch.ones(n, dtype=torch.bool)
    outside_mask[ver] = False
    outside = outside_mask.nonzero().flatten()
    sig = error_signal(mat) if signal is None else torch.as_tensor(signal).double().reshape(-1)
    if sig.numel() != n or bool((sig < 0).any()) or not bool(torch.isfinite(sig).all()):
        raise CertifyError(f"signal must hold {n} finite values >= 0")
    sig_out = sig[outside]
    strata = make_strata(sig_out, shares) if len(outside) else torch.zeros(0, dtype=torch.long)
    H = int(strata.max()) + 1 if len(outside) else 0
    sizes = torch.tensor([int((strata == h).sum()) for h in range(H)], dtype=torch.long)
    weights = torch.tensor([float(sig_out[strata == h].sum()) for h in range(H)], dtype=torch.float64)
    n_h = allocate(sizes, weights, budget - len(ver), min_per_stratum) if H else torch.zeros(0, dtype=torch.long)
    pos = draw(strata, n_h, seed) if H else torch.zeros(0, dtype=torch.long)
    sampled = outside[pos]
    s_eff = measure(sampled).double().cpu() if len(sampled) else torch.zeros(0, dtype=torch.float64)
    in_sample = torch.zeros(len(outside), dtype=torch.bool)
    in_sample[pos] = True
    miss = torch.zeros(len(outside), dtype=torch.bool)
    miss[pos] = s_eff.abs() > tau
    mass = torch.zeros(len(outside), dtype=torch.float64)
    mass[pos] = torch.where(s_eff.abs() > tau, s_eff.abs(), torch.zeros_like(s_eff))
    st = bound(strata, in_sample, miss, sig_out, 1 - confidence) if H else []
    mass_est = sum(((s.size - s.sampled) / s.sampled if s.sampled else 0.0)
                   * float(mass[(strata == h) & in_sample].sum()) for h, s in enumerate(st))
    max_eff = float(torch.cat([ver_eff, s_eff]).abs().max())
    missed_upper = sum(s.unsampled_upper for s in st)
    return Certificate(
        budget=budget, threshold=float(tau), confidence=confidence, seed=seed, n_edges=n,
        verified=ver, verified_effects=ver_eff, stable=stable, sampled=sampled, sampled_effects=s_eff,
        strata=st, missed_upper=missed_upper, missed_estimate=sum(s.unsampled_estimate for s in st),
        mass_upper=missed_upper * max_eff, mass_estimate=mass_est, max_effect=max_eff, names=names,
    )


class PatchMeasure:
    """Exact effects through ``validation.patch_edges``, one results file per call in ``out``
    (a directory; None: nothing kept). Before patching, every complete value in a results file in
    ``out`` written for the same model, task, metric and scale (any edge list) is reused, so a
    certificate resumes and extends at the cost of the new edges only."""

    def __init__(self, model: Any, graph: Any, task: Any, out: str | Path | None = None, scale: float = 1.0,
                 **patch_kwargs: Any) -> None:
        from validation.store import fingerprint_parts

        self.model, self.graph, self.task, self.scale = model, graph, task, float(scale)
        self.out = Path(out) if out is not None else None
        self.kw = patch_kwargs
        parts = fingerprint_parts(model, graph, task, torch.zeros(0, dtype=torch.long), self.scale, "edges")
        self._key = {k: v for k, v in parts.items() if k != "items"}
        self.known = torch.full((graph.n_edges,), float("nan"), dtype=torch.float64)
        self.n_patched_new = 0
        self.patch_s = 0.0
        self.wall_s = 0.0
        self._read_dir()

    def _read_dir(self) -> None:
        from validation.store import StoreError, load_file

        if self.out is None or not self.out.is_dir():
            return
        for path in sorted(self.out.glob("edges-*.pt")):
            try:
                data = load_file(path)
            except StoreError:
                continue
            parts = data.get("meta", {}).get("parts", {})
            if data.get("kind") != "edges" or {k: v for k, v in parts.items() if k != "items"} != self._key:
                continue
            done = data["done"]
            self.known[done] = data["values"][done].double()

    def __call__(self, edges: Int[Tensor, " k"]) -> Float[Tensor, " k"]:
        from validation.patch import patch_edges
        from validation.store import default_path

        edges = torch.as_tensor(edges, dtype=torch.long)
        todo = edges[torch.isnan(self.known[edges])].unique()
        if len(todo):
            out = default_path(self.model, self.graph, self.task, todo, self.scale, "edges", root=self.out) if self.out else None
            stats: dict = {}
            t0 = time.perf_counter()
            vals = patch_edges(self.model, self.graph, self.task, todo, scale=self.scale, out=out, stats=stats, **self.kw)
            self.wall_s += time.perf_counter() - t0
            self.patch_s += stats.get("patch_s", 0.0) + stats.get("setup_s", 0.0)
            self.n_patched_new += int(stats.get("n_measured", len(todo)))
            self.known[todo] = vals[todo]
        return self.known[edges].clone()


def certify(
    model: Any, graph: Any, task: Any, scores: Any, *, budget: int, threshold: float | str,
    confidence: float = 0.95, seed: int = 0, patience: int | None = None, verify_share: float = 0.5,
    signal: Float[Tensor, " n_edges"] | None = None, out: str | Path | None = None, scale: float = 1.0,
    **patch_kwargs: Any,
) -> Certificate:
    """Verify the top edges of ``scores`` exactly and bound what attribution missed (module docstring).

    scores: ``[n_edges]`` tensor (graph edge order, metric units), or a dict method -> tensor
        (the first ranks the candidate circuit; all feed the error signal).
    budget: exactly patched edges in all (verify + search), ``min(budget, n_edges)``.
    threshold: tau, |effect| in metric units above which an edge matters, or ``'P%'`` of the
        largest |effect| in the first verified block.
    confidence: of the one-sided upper bound on unsampled misses.
    seed: of the search sample (same seed + larger budget = the same sample extended).
    patience: verification block (default ``max(8, budget // 50)``); ``verify_share``: at most
        this share of the budget is spent verifying.
    signal: per-edge error signal >= 0 overriding :func:`validation.certify_stats.error_signal`.
    out: directory of results files (resumable, extendable; see :class:`PatchMeasure`).
    patch_kwargs: passed to ``validation.patch_edges`` (``batch_size``, ``memory_budget``,
        ``executor``, ``progress``, ...).
    """
    t0 = time.perf_counter()
    measure = PatchMeasure(model, graph, task, out, scale, **patch_kwargs)
    cert = run_certificate(scores, measure, budget=budget, threshold=threshold, confidence=confidence, seed=seed,
                           patience=patience, verify_share=verify_share, signal=signal, names=graph.edge_names,
                           n_edges=graph.n_edges)
    cert.stats = {"wall_s": time.perf_counter() - t0, "patch_s": measure.patch_s, "patch_wall_s": measure.wall_s,
                  "n_patched_new": measure.n_patched_new, "out": str(out) if out is not None else None}
    return cert
