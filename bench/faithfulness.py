"""Faithfulness curves, MIB's CPR and CMD, and circuit-level fidelity against the exact ranking.

For a ranking of the edges (an attribution method's scores, or exact patching's effects: the
*oracle* ranking), circuits are the top-k edges for a grid of sizes k; each is evaluated exactly
(``validation.evaluate_circuit``: every edge outside it patched, MIB/EAP-IG semantics) and
normalised as MIB does, from means over prompts:

    f(k) = (metric(circuit_k) - metric(corrupted)) / (metric(clean) - metric(corrupted))

(1 = the full model, 0 = the corrupted run = the empty circuit).

Two rankings per method, as MIB (``MIB_circuit_track/evaluation.py::evaluate_area_under_curve``
and ``print_results.py``, hannamw/MIB-circuit-track at b759df3):

* ``abs``: top-k by |score| (MIB's ``--absolute``), at the sizes of a log grid from one edge to
  all edges (``LOG_POINTS_PER_DECADE``) and at MIB's sizes ``int(fraction * n_edges)`` for
  ``MIB_FRACTIONS`` = 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%;
* ``signed``: top-k of the edges that most *support* the clean behaviour (MIB without
  ``--absolute``: its scores are gradients of the loss -metric, so its highest scores are our
  most negative effects; here ``-score * sign(clean - corrupted)``), at MIB's sizes only.

Circuits are chosen by ``eap.Graph.apply_topn`` (EAP-IG's selection, ties to the earlier edge);
not pruned, which never changes the metric (see ``validation.circuit``) and does not change
MIB's x axis (the requested fraction, not the count after pruning).

Scores (MIB's definitions, trapezoid rule over the fractions, linear x, from 0.1% to 100%):

* ``cpr`` = sum_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2 on the ``signed`` curve (MIB's leaderboard
  takes CPR from its non-absolute run); higher is better;
* ``cmd`` = sum_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2 on the ``abs`` curve (MIB takes
  CMD from its absolute run); lower is better;
* ``cpr_abs``: the CPR formula on the ``abs`` curve (the curve this project plots).

Circuit-level fidelity (the exact ranking as the reference; every gap: higher is better, 0 = as
good as the exact ranking, > 0 = better, which can happen: single-edge effects are not
additive): ``cpr_gap = cpr - cpr(exact)``, ``cmd_gap = cmd(exact) - cmd``, ``cpr_abs_gap``,
and ``curve_gap`` = mean over the log grid of ``f_method(k) - f_exact(k)`` (``abs`` curves; the
signed area between the curves on log x, divided by its width). With sampled exact truth
(``--edges sample:K`` / ``stratified:K`` below every edge) there is no exact ranking of the
graph: the oracle curve and every gap are left out (NaN); each method's own curve, CPR and CMD
are still computed (attribution ranks every edge).

Confidence intervals: percentile bootstrap over *prompts* of the per-prompt circuit metrics,
with the circuits fixed (chosen from all prompts' scores); ranking variability is not in them.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LOG_POINTS_PER_DECADE = 4
#: Changes whenever the grid or the circuit selection changes: stored curves of another version
#: are recomputed.
CURVE_VERSION = 1
ORACLE = "exact"
STATS = ("cpr", "cmd", "cpr_abs", "cpr_gap", "cmd_gap", "cpr_abs_gap", "curve_gap")
ORACLE_STATS = ("oracle_cpr", "oracle_cmd", "oracle_cpr_abs")


def gated(rules: list[dict]) -> bool:
    """Whether gate rules (``bench.gate``) bound any faithfulness statistic (then the curves
    must be computed)."""
    names = set(STATS) | set(ORACLE_STATS)
    return any(stat in names for rule in rules for key in ("min", "max") for stat in rule.get(key, {}))


# ------------------------------------------------------------------------------ sizes
def mib_sizes(n_edges: int) -> list[int]:
    """MIB's circuit sizes ``int(fraction * n_edges)``, one per ``MIB_FRACTIONS`` entry."""
    return [int(f * n_edges) for f in MIB_FRACTIONS]


def log_sizes(n_edges: int, per_decade: int = LOG_POINTS_PER_DECADE) -> list[int]:
    """A log grid of circuit sizes from 1 edge to all ``n_edges`` (rounded, distinct)."""
    if n_edges < 1:
        return []
    num = max(2, int(math.ceil(math.log10(n_edges) * per_decade)) + 1)
    return sorted({int(round(k)) for k in np.geomspace(1, n_edges, num)})


def abs_sizes(n_edges: int) -> list[int]:
    """Sizes of the ``abs`` curve: the log grid and MIB's sizes."""
    return sorted(set(log_sizes(n_edges)) | set(mib_sizes(n_edges)))


def mean_scores(path: str | Path) -> torch.Tensor:
    """The ranking scores of a ``[G, n_edges]`` file of per-group scores (attribution's
    ``attr/<cell>.pt`` or exact's ``exact.pt``): their mean over groups, float64 (the full-data
    scores: groups are of equal size)."""
    return torch.load(path).double().mean(0)


def ranking_sha(scores: torch.Tensor) -> str:
    """Fingerprint of a ranking's scores (float32 bytes): a stored curve belongs to these scores."""
    return hashlib.sha1(scores.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------ circuits
def topk_masks(graph: Any, scores: torch.Tensor, sizes: list[int], absolute: bool) -> torch.Tensor:
    """``[len(sizes), n_edges]`` masks of the top-k edges (``Graph.apply_topn`` without pruning:
    EAP-IG's/MIB's selection, ties to the earlier edge) by ``scores`` (|scores| if ``absolute``)."""
    from eap.graph import Graph

    g = Graph(graph.spec)
    g.set_edge_scores(scores.detach().double().cpu())
    out = torch.zeros(len(sizes), graph.n_edges, dtype=torch.bool)
    for i, k in enumerate(sizes):
        g.apply_topn(int(k), absolute=absolute, prune=False)
        out[i] = g.in_graph[g.edge_sender, g.edge_receiver]
    return out


def curve_circuits(graph: Any, scores: torch.Tensor, direction: float) -> dict[str, tuple[list[int], torch.Tensor]]:
    """The circuits of one ranking: ``{"abs": (sizes, masks), "signed": (sizes, masks)}``.
    ``direction`` = sign(clean metric - corrupted metric): signed circuits take the edges whose
    patching moves the metric most towards the corrupted run (scores ``-score * direction``)."""
    n = graph.n_edges
    a, s = abs_sizes(n), mib_sizes(n)
    return {"abs": (a, topk_masks(graph, scores, a, True)),
            "signed": (s, topk_masks(graph, -direction * scores.double(), s, False))}


def compute_curves(model: Any, graph: Any, task: Any, rankings: dict[str, torch.Tensor], *,
                   memory_budget: Any = None, progress: bool = False, intervention: str = "patching") -> dict[str, Any]:
    """Evaluate the curves of every ranking (``{name: scores [n_edges]}``, metric units, noising
    sign) in one ``validation.evaluate_circuit`` call (identical circuits once). Returns a JSON-able
    dict: per-prompt ``clean`` and ``corrupted`` metrics, ``direction``, per ranking and curve the
    sizes and per-prompt metrics of its circuits, the ranking's fingerprint, and the cost
    (``n_circuits`` evaluated, ``eval_s``, ``setup_s``, ``forward_s`` of one plain forward,
    ``fwd_eq_per_circuit``). ``intervention``: what out-of-circuit edges carry (``eap.interventions``)."""
    import validation

    t0 = time.perf_counter()
    base = validation.evaluate_circuit(model, graph, task, [[]], memory_budget=memory_budget, stats=(st0 := {}),
                                       intervention=intervention)
    clean, corrupted = base.clean, base.corrupted
    direction = 1.0 if float(clean.mean()) >= float(corrupted.mean()) else -1.0
    plans = {name: curve_circuits(graph, s, direction) for name, s in rankings.items()}
    masks = [m for plan in plans.values() for _, m in plan.values()]
    allm = torch.cat(masks) if masks else torch.zeros(0, graph.n_edges, dtype=torch.bool)
    full, empty = allm.all(1), ~allm.any(1)
    todo = allm[~(full | empty)]
    uniq, inverse = (torch.unique(todo, dim=0, return_inverse=True) if len(todo)
                     else (todo, torch.zeros(0, dtype=torch.long)))
    st: dict[str, Any] = {}
    values = (validation.evaluate_circuit(model, graph, task, uniq, baselines=False, memory_budget=memory_budget,
                                          progress=progress, stats=st, intervention=intervention).per_prompt
              if len(uniq) else torch.zeros(0, task.n_prompts, dtype=torch.float64))
    per_row = torch.empty(len(allm), task.n_prompts, dtype=torch.float64)
    per_row[full] = clean
    per_row[empty] = corrupted
    per_row[~(full | empty)] = values[inverse] if len(uniq) else per_row[~(full | empty)]
    out: dict[str, Any] = {
        "version": CURVE_VERSION, "n_edges": graph.n_edges, "n_prompts": task.n_prompts, "direction": direction,
        "clean": clean.tolist(), "corrupted": corrupted.tolist(), "rankings": {},
    }
    row = 0
    for name, plan in plans.items():
        entry: dict[str, Any] = {"sha": ranking_sha(rankings[name])}
        mine = torch.zeros(graph.n_edges, dtype=torch.bool).unsqueeze(0)
        for curve, (sizes, m) in plan.items():
            entry[curve] = {"k": list(sizes), "per_prompt": per_row[row : row + len(sizes)].tolist()}
            mine = torch.cat([mine, m])
            row += len(sizes)
        nontrivial = mine[~(mine.all(1) | ~mine.any(1))]
        entry["n_circuits"] = int(torch.unique(nontrivial, dim=0).shape[0]) if len(nontrivial) else 0
        out["rankings"][name] = entry
    fwd = validation.forward_seconds(model, task)
    n_eval = int(len(uniq)) + 3  # + the base call's empty, full and one empty circuit
    eval_s = st.get("eval_s", 0.0) + st0["eval_s"]
    out["cost"] = {
        "n_circuits": n_eval, "eval_s": eval_s, "setup_s": st.get("setup_s", 0.0) + st0["setup_s"],
        "wall_s": time.perf_counter() - t0, "forward_s": fwd,
        "fwd_eq_per_circuit": eval_s / n_eval / fwd if fwd > 0 else float("nan"),
        "path": st0.get("path"), "circuits_per_forward": st.get("circuits_per_forward"),
        "prompts_per_batch": st.get("prompts_per_batch"),
    }
    return out


# ------------------------------------------------------------------------------ scores
def areas(fractions: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    """MIB's trapezoid areas over ``fractions`` (linear x): (area under f, area of |1 - f|)."""
    x, f = np.asarray(fractions, np.float64), np.asarray(f, np.float64)
    dx = np.diff(x)
    under = float(np.sum(dx * (f[:-1] + f[1:]) / 2))
    from_1 = float(np.sum(dx * (np.abs(1 - f[:-1]) + np.abs(1 - f[1:])) / 2))
    return under, from_1


def _normalise(per_prompt: np.ndarray, clean: np.ndarray, corrupted: np.ndarray, idx: np.ndarray | None = None):
    if idx is not None:
        per_prompt, clean, corrupted = per_prompt[..., idx], clean[idx], corrupted[idx]
    lo, hi = corrupted.mean(), clean.mean()
    return (per_prompt.mean(-1) - lo) / (hi - lo)


def _scores(entry: dict, clean: np.ndarray, corrupted: np.ndarray, idx: np.ndarray | None):
    """(cpr, cmd, cpr_abs, f on the log grid) of one ranking's curves (prompts ``idx``)."""
    k = list(entry["abs"]["k"])
    n = k[-1]
    fa = _normalise(np.asarray(entry["abs"]["per_prompt"]), clean, corrupted, idx)
    fs = _normalise(np.asarray(entry["signed"]["per_prompt"]), clean, corrupted, idx)
    x = np.asarray(MIB_FRACTIONS)
    cpr, _ = areas(x, fs)
    cpr_abs, cmd = areas(x, np.asarray([fa[k.index(m)] for m in mib_sizes(n)]))
    return cpr, cmd, cpr_abs, np.asarray([fa[k.index(m)] for m in log_sizes(n)])


def _point_stats(entry: dict, oracle: dict | None, clean: np.ndarray, corrupted: np.ndarray,
                 idx: np.ndarray | None = None) -> dict[str, float]:
    cpr, cmd, cpr_abs, grid = _scores(entry, clean, corrupted, idx)
    out = {"cpr": cpr, "cmd": cmd, "cpr_abs": cpr_abs}
    if oracle is not None:
        ocpr, ocmd, ocpr_abs, ogrid = _scores(oracle, clean, corrupted, idx)
        out.update(cpr_gap=cpr - ocpr, cmd_gap=ocmd - cmd, cpr_abs_gap=cpr_abs - ocpr_abs,
                   curve_gap=float(np.mean(grid - ogrid)), oracle_cpr=ocpr, oracle_cmd=ocmd, oracle_cpr_abs=ocpr_abs)
    else:
        nan = float("nan")
        out.update(cpr_gap=nan, cmd_gap=nan, cpr_abs_gap=nan, curve_gap=nan, oracle_cpr=nan, oracle_cmd=nan,
                   oracle_cpr_abs=nan)
    return out


def summarize(curves: dict, name: str, oracle: str | None = ORACLE, n_boot: int = 200, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """Scores of ranking ``name`` from ``compute_curves``' output (and of the oracle ranking when
    present): ``stats`` ``{stat: {value, lo, hi}}`` (percentile bootstrap over prompts, circuits
    fixed; NaN bounds with ``n_boot`` 0 or one prompt) and the plotted curves ``{"k", "fraction",
    "faithfulness"}`` (``abs`` ranking) of the method and of the oracle."""
    entry = curves["rankings"][name]
    orc = curves["rankings"].get(oracle) if oracle else None
    clean, corrupted = np.asarray(curves["clean"]), np.asarray(curves["corrupted"])
    point = _point_stats(entry, orc, clean, corrupted)
    n = len(clean)
    reps: dict[str, list[float]] = {k: [] for k in point}
    if n > 1 and n_boot > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            s = _point_stats(entry, orc, clean, corrupted, rng.integers(0, n, n))
            for k, v in s.items():
                reps[k].append(v)
    alpha = (1 - level) / 2
    stats = {}
    for k, v in point.items():
        r = np.asarray(reps[k], np.float64)
        r = r[np.isfinite(r)]
        lo, hi = (np.quantile(r, [alpha, 1 - alpha]) if r.size and math.isfinite(v) else (float("nan"),) * 2)
        stats[k] = {"value": float(v), "lo": float(lo), "hi": float(hi)}

    def plotted(e: dict) -> dict[str, list]:
        k = e["abs"]["k"]
        f = _normalise(np.asarray(e["abs"]["per_prompt"]), clean, corrupted)
        return {"k": list(k), "fraction": [x / curves["n_edges"] for x in k], "faithfulness": f.tolist()}

    return {"stats": stats, "curve": plotted(entry), "oracle_curve": plotted(orc) if orc else None,
            "n_circuits": entry["n_circuits"], "direction": curves["direction"],
            "clean_mean": float(clean.mean()), "corrupted_mean": float(corrupted.mean())}
