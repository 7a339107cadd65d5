"""Paper-style figures of a run (PNG and PDF, matplotlib Agg backend).

* ``scatter_<model>_<task>_n<n>``: attribution vs exact per edge, one panel per method, y = x
  line, points coloured by receiver type, the worst outliers labelled, ρ and τ in the title, the
  number of edges (and sample size when edges were sampled) in the panel.
* ``agreement_vs_n``: Spearman ρ, Kendall τ-b and top-1% recall vs dataset size with 95%
  bootstrap CI bands, one row of panels per task, one line per model/method.
* ``cost_vs_n`` / ``cost_vs_edges``: wall time and peak memory (log-log), attribution (warm
  median) and exact (warm patched forwards) side by side, one line per model/task/method.
* ``faithfulness``: circuit faithfulness (1 = full model, 0 = corrupted run) vs circuit size
  (edges, log x) of each method's top-|score| circuits, the exact ranking's dashed; one panel
  per model/task at its largest n; CPR and CMD (MIB) in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import edges_label, slug  # noqa: E402

KIND_COLORS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "mlp": "#d62728", "logits": "#9467bd"}
METHOD_STYLE = {"eap": "-", "eap-ig": "--", "clean-corrupted": ":"}

plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "figure.dpi": 120, "savefig.dpi": 200,
                     "axes.spines.top": False, "axes.spines.right": False})


def _log_axes(ax: Any, xs: list[float], logy: bool = True) -> None:
    """Log x (ticks at the measured values, plain numbers), optional log y without minor labels."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    xs = sorted(set(float(x) for x in xs))
    if len(xs) <= 8:
        ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return paths


def scatter(cells: list[dict], run_dir: Path, out: Path, n_labels: int = 4) -> list[Path]:
    """One figure per (model, task, n), one panel per method."""
    paths = []
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["task"], c["n"]), []).append(c)
    for (model, task, n), cs in groups.items():
        fig, axes = plt.subplots(1, len(cs), figsize=(3.3 * len(cs), 3.3), squeeze=False)
        for ax, c in zip(axes[0], cs):
            d = np.load(Path(run_dir) / "cells" / f"{c['id']}.npz")
            a, e, kinds, names = d["attribution"], d["exact"], d["kinds"], d["names"]
            for kd, col in KIND_COLORS.items():
                sel = kinds == kd
                if sel.any():
                    ax.scatter(e[sel], a[sel], s=6, alpha=0.6, color=col, label=kd, linewidths=0)
            lim = float(np.nanmax(np.abs(np.concatenate([a, e])))) * 1.08 or 1.0
            ax.plot([-lim, lim], [-lim, lim], color="0.4", lw=0.8, ls="--", zorder=0)
            ax.axhline(0, color="0.85", lw=0.5, zorder=0)
            ax.axvline(0, color="0.85", lw=0.5, zorder=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            for i in np.argsort(-np.abs(a - e))[:n_labels]:
                ax.annotate(str(names[i]), (e[i], a[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            s = c["stats"]
            ax.set_title(f"{c['method']}: ρ={s['spearman']['value']:.2f}  τ={s['kendall']['value']:.2f}")
            ax.set_xlabel("exact patching effect (metric units)")
            ax.text(0.02, 0.98, f"edges: {edges_label(c)}\nn={c['n']} prompts", transform=ax.transAxes,
                    va="top", fontsize=7)
        axes[0][0].set_ylabel("attribution score (metric units)")
        axes[0][-1].legend(title="receiver", fontsize=7, title_fontsize=7, loc="lower right", markerscale=2)
        fig.suptitle(f"{model}, task {task}: attribution vs exact per edge", y=1.02)
        paths += _save(fig, out, f"scatter_{slug(model)}_{slug(task)}_n{n}")
    return paths


def _lines(cells: list[dict]) -> dict[tuple, list[dict]]:
    """Cells by (model, method) (tasks told apart in the label when there are several)."""
    several = len({c["task"] for c in cells}) > 1
    lines: dict[tuple, list[dict]] = {}
    for c in cells:
        lines.setdefault((c["model"], f"{c['task']} / {c['method']}" if several else c["method"]), []).append(c)
    return {k: sorted(v, key=lambda c: c["n"]) for k, v in lines.items()}


def _model_colors(cells: list[dict]) -> dict[str, Any]:
    models = list(dict.fromkeys(c["model"] for c in cells))
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def agreement_vs_n(cells: list[dict], out: Path) -> list[Path]:
    """One row of panels per task; in each, one line per model (colour) and method (style)."""
    stats = [("spearman", "Spearman ρ"), ("kendall", "Kendall τ-b"), ("recall@1%", "top-1% recall")]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    fig, axes = plt.subplots(len(tasks), len(stats), figsize=(3.4 * len(stats), 3.0 * len(tasks)), squeeze=False)
    colors = _model_colors(cells)
    for row, task in zip(axes, tasks):
        tcells = [c for c in cells if c["task"] == task]
        for ax, (key, label) in zip(row, stats):
            for (model, method), cs in _lines(tcells).items():
                x = np.array([c["n"] for c in cs])
                v = np.array([c["stats"][key]["value"] for c in cs])
                lo = np.array([c["stats"][key]["lo"] for c in cs])
                hi = np.array([c["stats"][key]["hi"] for c in cs])
                edge_note = "" if cs[0]["n_edges_selected"] == cs[0]["n_edges"] else f", {cs[0]['n_edges_selected']} sampled"
                ax.plot(x, v, METHOD_STYLE.get(method, "-."), marker="o", ms=3, color=colors[model],
                        label=f"{model} / {method}{edge_note}")
                if np.isfinite(lo).all():
                    ax.fill_between(x, lo, hi, color=colors[model], alpha=0.12, lw=0)
            _log_axes(ax, [c["n"] for c in cells], logy=False)
            ax.set_xlabel("prompts (n)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} — task {task}" if len(tasks) > 1 else label)
        row[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("agreement with exact patching vs dataset size (bands: 95% bootstrap CI over prompts)", y=1.01)
    fig.tight_layout()
    return _save(fig, out, "agreement_vs_n")


def _cost_value(c: dict, which: str, key: str) -> float:
    if which == "attribution":
        return c["attribution"][key]
    return c["exact"]["cost"]["compute_s" if key == "time_s" else "peak_mib"]


def cost(cells: list[dict], out: Path, x_key: str) -> list[Path]:
    """Time (top) and memory (bottom); attribution (left) and exact (right); log-log."""
    xlabel = {"n": "prompts (n)", "n_edges": "edges in graph"}[x_key]
    several = len({c["task"] for c in cells}) > 1
    fig, axes = plt.subplots(2, 2, figsize=(7.4, 5.6))
    colors = _model_colors(cells)
    for col, which in enumerate(("attribution", "exact")):
        for row, (key, ylabel) in enumerate((("time_s", "wall time (s)"), ("peak_mib", "peak memory (MiB over baseline)"))):
            ax = axes[row][col]
            series: dict[tuple, list[dict]] = {}
            for c in cells:
                g = c["model"] if x_key == "n" else f"n={c['n']}"
                if several:
                    g = f"{g} / {c['task']}"
                series.setdefault((g, c["model"], c["method"]), []).append(c)
            seen = set()
            for (g, model, method), cs in series.items():
                if which == "exact":  # one exact measurement per (model, task, n): not per method
                    if g in seen:
                        continue
                    seen.add(g)
                cs = sorted(cs, key=lambda c: c[x_key])
                x = np.array([c[x_key] for c in cs], float)
                y = np.array([_cost_value(c, which, key) for c in cs], float)
                ok = np.isfinite(y) & (y > 0)
                if not ok.any():
                    continue
                color = colors[model] if x_key == "n" else None
                label = f"{g} / {method}" if which == "attribution" else g
                ax.plot(x[ok], y[ok], METHOD_STYLE.get(method, "-.") if which == "attribution" else "-", marker="o",
                        ms=3, color=color, label=label)
            _log_axes(ax, [c[x_key] for c in cells])
            if row == 0:
                ax.set_title(f"{which}{' (warm patched forwards, selected edges)' if which == 'exact' else ' (warm median)'}",
                             fontsize=8)
            if row == 1:
                ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5.5)
    sampled = [c for c in cells if c["n_edges_selected"] != c["n_edges"]]
    if sampled:
        fig.text(0.5, -0.01, "exact on sampled edges: " + ", ".join(sorted({f"{c['model']}: {edges_label(c)}" for c in sampled})),
                 ha="center", fontsize=7)
    fig.suptitle(f"cost vs {xlabel}", y=1.0)
    fig.tight_layout()
    return _save(fig, out, f"cost_vs_{'n' if x_key == 'n' else 'edges'}")


def faithfulness(cells: list[dict], out: Path) -> list[Path]:
    """One panel per (model, task) at its largest n: faithfulness vs edges in the circuit."""
    best: dict[tuple, int] = {}
    for c in cells:
        key = (c["model"], c["task"])
        best[key] = max(best.get(key, 0), c["n"])
    panels = list(best)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False)
    methods = list(dict.fromkeys(c["method"] for c in cells))
    cmap = plt.get_cmap("tab10")
    for ax, (model, task) in zip(axes.flat, panels):
        cs = [c for c in cells if (c["model"], c["task"], c["n"]) == (model, task, best[(model, task)])]
        oracle = None
        for c in cs:
            f, st = c["faithfulness"], c["stats"]
            k, y = np.asarray(f["curve"]["k"], float), np.asarray(f["curve"]["faithfulness"], float)
            ok = k >= 1
            ax.plot(k[ok], y[ok], "-", marker="o", ms=2.5, lw=1.2, color=cmap(methods.index(c["method"]) % 10),
                    label=f"{c['method']} (CPR {st['cpr']['value']:.2f}, CMD {st['cmd']['value']:.2f})")
            if f.get("oracle_curve") and oracle is None:
                oracle = (f["oracle_curve"], st["oracle_cpr"]["value"], st["oracle_cmd"]["value"])
        if oracle is not None:
            curve, cpr, cmd = oracle
            k, y = np.asarray(curve["k"], float), np.asarray(curve["faithfulness"], float)
            ok = k >= 1
            ax.plot(k[ok], y[ok], "--", color="black", lw=1.4, label=f"exact ranking (CPR {cpr:.2f}, CMD {cmd:.2f})")
        else:
            ax.text(0.02, 0.02, "no exact ranking (sampled exact truth)", transform=ax.transAxes, fontsize=7)
        ax.axhline(1, color="0.6", lw=0.7, ls=":")
        ax.axhline(0, color="0.6", lw=0.7, ls=":")
        ax.set_xscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(f"edges in circuit (top-k by |score|, of {cs[0]['n_edges']:,})")
        ax.set_ylabel("faithfulness (1 = model, 0 = corrupted)")
        ax.set_title(f"{model}, {task}, n={best[(model, task)]}")
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("circuit faithfulness vs circuit size (circuits evaluated exactly; curves: top-|score| circuits, "
                 "as CMD; CPR: MIB's signed ranking)", y=1.01, fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "faithfulness")


def all_figures(results: dict, run_dir: str | Path, out: str | Path) -> list[Path]:
    cells, out = results["cells"], Path(out)
    paths = scatter(cells, Path(run_dir), out)
    paths += agreement_vs_n(cells, out)
    timed = [c for c in cells if c["attribution"].get("repeats")]
    if timed:
        paths += cost(timed, out, "n")
        paths += cost(timed, out, "n_edges")
    faith = [c for c in cells if c.get("faithfulness") and not c["faithfulness"].get("stale")]
    if faith:
        paths += faithfulness(faith, out)
    return paths
