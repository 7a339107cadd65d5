"""Calibration of ``validation.certify`` on the embedded models, with exhaustive truth as the oracle.

    python scripts/certify_calibration.py [--cache /tmp/certify_truth] [--seeds 100] [--n 32]

For each embedded model (toy-gpt2-2l, toy-gpt2-4l, toy-llama-4l), IOI with ``--n`` prompts in
float64: exact effects of every edge (``validation.patch_edges(..., 'all')``, cached under
``--cache``, computed once) and EAP + EAP-IG scores. tau = 1% of the largest |exact effect|.
Then, with the truth as the oracle (nothing patched again), over ``--seeds`` sampler seeds:

* table 1, per budget K: the true number of unsampled misses (outside the candidate circuit,
  |effect| > tau) against the 95% upper bound (coverage = share of seeds with bound >= truth),
  the stratified estimate and its bias z, misses found by the error-weighted and by the uniform
  sampler, and the negative control (unweighted mean of the weighted sample): its coverage and bias;
* table 2: patched search edges needed to find half of the misses outside a fixed verified
  block (the top 1% of edges by |EAP score|, at least 5), uniform / weighted (the efficiency ratio);
* figures ``docs/figures/certify_bound.png`` (bound vs truth per seed) and
  ``docs/figures/certify_found.png`` (misses found vs search budget, weighted vs uniform).

Markdown tables go to stdout (pasted into docs/certify.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import eap
import validation
from validation.certify_oracle import budget_to_find, calibrate, found_curve

MODELS = ("toy-gpt2-2l", "toy-gpt2-4l", "toy-llama-4l")
FIG_DIR = Path(__file__).resolve().parent.parent / "docs" / "figures"


def load_truth(name: str, n: int, cache: Path) -> tuple[torch.Tensor, dict]:
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / f"{name}_ioi_n{n}_scores.pt"
    model = eap.load_model(name, dtype=torch.float64)
    graph = eap.Graph.from_model(model)
    task = eap.tasks.ioi(model, n, seed=0)
    truth = validation.patch_edges(model, graph, task, "all", out=cache / f"{name}_ioi_n{n}_exact.pt", progress=False)
    if f.exists():
        scores = torch.load(f)
    else:
        scores = {m: eap.attribute(model, graph, task, method=m, progress=False, write_graph=False).double()
                  for m in ("eap", "eap-ig")}
        torch.save(scores, f)
    return truth, scores


def _z(r: dict) -> str:
    z = r["bias_z"]
    if r["n_estimates"] < len(r["truths"]):
        return "n/a (a stratum unsampled)"
    return f"{z:+.1f}" if abs(z) < 99 else (">+99" if z > 0 else "<-99")


def _num(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def calibration_rows(name: str, truth: torch.Tensor, scores: dict, seeds: int, tau: float) -> tuple[list[str], dict]:
    n = truth.numel()
    rows, per_seed = [], {}
    for frac in (0.1, 0.2, 1 / 3):
        K = max(10, round(frac * n))
        w = calibrate(truth, scores, budget=K, threshold=tau, seeds=seeds)
        u = calibrate(truth, scores, budget=K, threshold=tau, seeds=seeds, signal=torch.ones(n))
        bad = calibrate(truth, scores, budget=K, threshold=tau, seeds=seeds, estimator="naive")
        anti = calibrate(truth, scores, budget=K, threshold=tau, seeds=seeds, estimator="naive",
                         signal=1 / (1e-3 + next(iter(scores.values())).abs()))
        cert = validation.run_certificate(scores, lambda e: truth[e], budget=K, threshold=tau)
        rows.append(f"| {name} | {n} | {K} | {cert.verified.numel()} | {w['mean_truth']:.2f} | {w['mean_bound']:.1f} | "
                    f"{w['coverage']:.2f} | {w['mass_coverage']:.2f} | {_num(w['mean_estimate'])} | {_z(w)} | "
                    f"{w['mean_found']:.2f} | {u['mean_found']:.2f} | {_z(bad)} | {anti['coverage']:.2f} |")
        per_seed[K] = w
    return rows, per_seed


def efficiency(truth: torch.Tensor, scores: dict, seeds: int, tau: float) -> tuple[str, list[int], list[float], list[float], float]:
    n = truth.numel()
    verify = max(5, round(0.01 * n))
    kw = dict(threshold=tau, seeds=seeds, patience=verify, verify_share=1e-9)
    cert = validation.run_certificate(scores, lambda e: truth[e], budget=verify, threshold=tau, patience=verify,
                                      verify_share=1e-9)
    outside = torch.ones(n, dtype=torch.bool)
    outside[cert.verified] = False
    n_miss = int((outside & (truth.abs() > tau)).sum())
    step = max(2, (n - verify) // 25)
    budgets = list(range(verify + step, n + 1, step))
    wc = found_curve(truth, scores, budgets, signal=None, **kw)
    uc = found_curve(truth, scores, budgets, signal=torch.ones(n), **kw)
    bw, bu = budget_to_find(wc, budgets, n_miss / 2), budget_to_find(uc, budgets, n_miss / 2)
    ratio = (bu - verify) / (bw - verify) if n_miss else float("nan")
    return (f"| {verify} | {n_miss} | {bw - verify:.0f} | {bu - verify:.0f} | {ratio:.2f} |",
            [b - verify for b in budgets], wc, uc, n_miss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/certify_truth")
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--no-figures", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    table1 = ["| model | edges | K | verified | true unsampled misses | 95% bound | coverage | mass coverage | "
              "estimate | bias z | found (weighted) | found (uniform) | naive bias z | naive coverage, anti signal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table2 = ["| model | verified block | misses outside | search edges to find half (weighted) | (uniform) | ratio |",
              "|---|---|---|---|---|---|"]
    curves, scatter = {}, {}
    for name in MODELS:
        truth, scores = load_truth(name, a.n, Path(a.cache))
        tau = 0.01 * float(truth.abs().max())
        rows, per_seed = calibration_rows(name, truth, scores, a.seeds, tau)
        table1 += rows
        row, budgets, wc, uc, n_miss = efficiency(truth, scores, a.seeds, tau)
        table2.append(f"| {name} " + row)
        curves[name] = (budgets, wc, uc, n_miss)
        scatter[name] = per_seed
    print(f"tau = 1% of the largest |exact effect|; {a.seeds} sampler seeds; IOI, {a.n} prompts, float64; confidence 0.95\n")
    print("\n".join(table1) + "\n\n" + "\n".join(table2))
    if not a.no_figures:
        figures(curves, scatter)


def figures(curves: dict, scatter: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIG_DIR.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(scatter), figsize=(4.2 * len(scatter), 3.6))
    for ax, (name, per_k) in zip(axes, scatter.items()):
        top = 1
        for K, r in per_k.items():
            jitter = torch.linspace(-0.2, 0.2, len(r["truths"])).tolist()
            ax.scatter([t + j for t, j in zip(r["truths"], jitter)], r["bounds"], s=8, alpha=0.5, label=f"K={K}")
            top = max(top, max(r["bounds"]), max(r["truths"]))
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="bound = truth")
        ax.set_xlabel("true unsampled misses")
        ax.set_ylabel("95% upper bound")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG_DIR / "certify_bound.png", dpi=110)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6))
    for ax, (name, (budgets, wc, uc, n_miss)) in zip(axes, curves.items()):
        ax.plot(budgets, wc, label="error-weighted")
        ax.plot(budgets, uc, label="uniform")
        ax.axhline(n_miss, color="k", ls=":", lw=0.8, label="misses outside")
        ax.set_xlabel("search budget (patched edges)")
        ax.set_ylabel("true misses found (mean over seeds)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG_DIR / "certify_found.png", dpi=110)


if __name__ == "__main__":
    main()
