"""Paper-style figures of a run (PNG and PDF, matplotlib Agg backend).

* ``scatter_<model>_<task>_n<n>``: attribution vs exact per edge, one column per method: values
  (y = x line, points coloured by receiver type, the worst outliers labelled where their labels
  do not collide, ρ and τ in the title, the number of edges and sample size in the panel;
  ``scale='symlog'`` spreads the bulk near zero) and, below, rank vs rank, where every edge is
  visible.
* ``agreement_vs_n``: Spearman ρ, Kendall τ-b and top-k recall vs dataset size with 95%
  bootstrap CI bands, one row of panels per task, one line per model/method; k is 1% of the
  compared edges when that is at least 10, else 10, stated in the panel.
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


def save_figure(fig: Any, out: Path, name: str) -> list[Path]:
    """Write ``out/name.png`` and ``.pdf`` and close the figure."""
    return _save(fig, Path(out), name)


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return paths


SCALES = ("linear", "symlog")


def place_labels(ax: Any, xy: list[tuple[float, float]], texts: list[str], fontsize: float = 6) -> list[Any]:
    """Annotate points without collisions: each label (in the order given: most important first)
    takes the first of 8 directions x 4 distances where its box (measured with the figure's
    renderer) overlaps no label placed before and no other text of the panel, and stays inside
    the panel; a label that fits nowhere is left out. Returns the annotations placed. Call after
    the panel's limits, aspect and texts are final."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.apply_aspect()
    inside = ax.get_window_extent(renderer)
    taken = [Text.get_window_extent(t, renderer) for t in ax.texts]
    placed = []
    dirs = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for (x, y), text in zip(xy, texts):
        for r in (4, 12, 22, 34):
            done = False
            for dx, dy in dirs:
                ann = ax.annotate(text, (x, y), xytext=(r * dx, r * dy), textcoords="offset points", fontsize=fontsize,
                                  ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                                  va="bottom" if dy > 0 else ("top" if dy < 0 else "center"),
                                  arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if r > 4 else None)
                ann.update_positions(renderer)
                bb = Text.get_window_extent(ann, renderer)  # the text's box (an Annotation's own includes its arrow)
                pad = Bbox.from_extents(bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
                fits = inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1
                if fits and not any(pad.overlaps(o) for o in taken):
                    taken.append(bb)
                    placed.append(ann)
                    done = True
                    break
                ann.remove()
            if done:
                break
    return placed


def _by_kind(kinds: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(receiver kind, colour, mask) for the kinds present; edges of no known kind in grey."""
    out = [(kd, col, kinds == kd) for kd, col in KIND_COLORS.items() if (kinds == kd).any()]
    other = ~np.isin(kinds, list(KIND_COLORS))
    return out + ([("other", "0.5", other)] if other.any() else [])


def value_panel(ax: Any, a: np.ndarray, e: np.ndarray, kinds: np.ndarray, names: np.ndarray, *, title: str,
                note: str = "", n_labels: int = 4, scale: str = "linear") -> None:
    """Attribution (y) vs exact (x) per edge, metric units, coloured by receiver kind; y = x
    dashed; the ``n_labels`` edges with the largest |attribution - exact| labelled without
    collisions (:func:`place_labels`). ``scale='symlog'``: both axes linear within the lower
    quartile of the nonzero |values| and logarithmic beyond, so the bulk near zero is spread out."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    for kd, col, sel in _by_kind(kinds):
        ax.scatter(e[sel], a[sel], s=6, alpha=0.6, color=col, label=kd, linewidths=0)
    both = np.abs(np.concatenate([a, e]))
    lim = float(np.nanmax(both)) * 1.08 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.4", lw=0.8, ls="--", zorder=0)
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    if scale == "symlog":
        nz = both[np.isfinite(both) & (both > 0)]
        thresh = float(np.quantile(nz, 0.25)) if nz.size else 1.0
        ax.set_xscale("symlog", linthresh=thresh)
        ax.set_yscale("symlog", linthresh=thresh)
        note = f"{note}\nsymlog axes, linear within ±{thresh:.2g}".strip()
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel("exact patching effect (metric units)")
    if note:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", fontsize=7)
    worst = np.argsort(-np.abs(a - e))[:n_labels]
    place_labels(ax, [(float(e[i]), float(a[i])) for i in worst], [str(names[i]) for i in worst])


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x) / len(x)


def rank_panel(ax: Any, a: np.ndarray, e: np.ndarray, kinds: np.ndarray) -> None:
    """Rank of the attribution score vs rank of the exact effect (signed, as a fraction of the
    edges: 0 = most negative, 1 = most positive; the ranks Spearman's ρ correlates), coloured by
    receiver kind: every edge visible, not only the outliers."""
    ra, re = _ranks(a), _ranks(e)
    for _, col, sel in _by_kind(kinds):
        ax.scatter(re[sel], ra[sel], s=5, alpha=0.6, color=col, linewidths=0)
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls="--", zorder=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("rank of exact effect (fraction of edges)")


def scatter_figure(panels: list[dict], title: str, n_labels: int = 4, scale: str = "linear", ranks: bool = True) -> Any:
    """One column per panel (``{"a", "e", "kinds", "names", "title", "note"}``: attribution and
    exact vectors of the same edges): values on top (:func:`value_panel`), ranks below
    (:func:`rank_panel`) when ``ranks``. Returns the figure."""
    rows = 2 if ranks else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(3.3 * len(panels), 3.3 * rows), squeeze=False)
    for col, p in enumerate(panels):
        kinds, names = np.asarray(p["kinds"]), np.asarray(p["names"])
        value_panel(axes[0][col], np.asarray(p["a"], float), np.asarray(p["e"], float), kinds, names,
                    title=p["title"], note=p.get("note", ""), n_labels=n_labels, scale=scale)
        if ranks:
            rank_panel(axes[1][col], np.asarray(p["a"], float), np.asarray(p["e"], float), kinds)
    axes[0][0].set_ylabel("attribution score (metric units)")
    if ranks:
        axes[1][0].set_ylabel("rank of attribution score")
    axes[0][-1].legend(title="receiver", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       markerscale=2)  # outside the panel: it never covers points or labels
    fig.suptitle(title, y=0.99 if ranks else 1.02)
    return fig


def scatter(cells: list[dict], run_dir: Path, out: Path, n_labels: int = 4, scale: str = "linear",
            ranks: bool = True) -> list[Path]:
    """One figure per (model, task, n), one column per method (values, and ranks below)."""
    paths = []
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["task"], c["n"]), []).append(c)
    for (model, task, n), cs in groups.items():
        panels = []
        for c in cs:
            d = np.load(Path(run_dir) / "cells" / f"{c['id']}.npz")
            s = c["stats"]
            panels.append({"a": d["attribution"], "e": d["exact"], "kinds": d["kinds"], "names": d["names"],
                           "title": f"{c['method']}: ρ={s['spearman']['value']:.2f}  τ={s['kendall']['value']:.2f}",
                           "note": f"edges: {edges_label(c)}\nn={c['n']} prompts"})
        fig = scatter_figure(panels, f"{model}, task {task}: attribution vs exact per edge", n_labels, scale, ranks)
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


#: The third panel of :func:`agreement_vs_n`: top-k recall with k of at least 10 edges.
TOPK = "top-k"
MIN_K = 10


def recall_k(n_selected: int) -> tuple[str, str]:
    """(statistic, note) of the top-k recall shown for ``n_selected`` compared edges: recall@1%
    where 1% of the edges is at least :data:`MIN_K`, else recall@10 (top-1% of 110 edges would
    be one edge: recall 0 or 1)."""
    from bench.agreement import k_values

    k1 = k_values(n_selected)["1%"]
    return ("recall@1%", f"k = {k1} (1% of {n_selected:,} edges)") if k1 >= MIN_K else \
        ("recall@10", f"k = 10 (1% of {n_selected:,} edges is {k1})")


def agreement_vs_n(cells: list[dict], out: Path) -> list[Path]:
    """One row of panels per task; in each, one line per model (colour) and method (style)."""
    stats = [("spearman", "Spearman ρ"), ("kendall", "Kendall τ-b"), (TOPK, "top-k recall")]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    fig, axes = plt.subplots(len(tasks), len(stats), figsize=(3.4 * len(stats), 3.0 * len(tasks)), squeeze=False)
    colors = _model_colors(cells)
    for row, task in zip(axes, tasks):
        tcells = [c for c in cells if c["task"] == task]
        for ax, (key, label) in zip(row, stats):
            ks = []
            for (model, method), cs in _lines(tcells).items():
                stat, k_note = (key, "") if key != TOPK else recall_k(cs[0]["n_edges_selected"])
                if k_note:
                    ks.append(f"{model}: {k_note}")
                x = np.array([c["n"] for c in cs])
                v = np.array([c["stats"][stat]["value"] for c in cs])
                lo = np.array([c["stats"][stat]["lo"] for c in cs])
                hi = np.array([c["stats"][stat]["hi"] for c in cs])
                edge_note = "" if cs[0]["n_edges_selected"] == cs[0]["n_edges"] else f", {cs[0]['n_edges_selected']} sampled"
                ax.plot(x, v, METHOD_STYLE.get(method, "-."), marker="o", ms=3, color=colors[model],
                        label=f"{model} / {method}{edge_note}")
            if ks:
                ax.text(0.02, 0.02, "\n".join(dict.fromkeys(ks)), transform=ax.transAxes, fontsize=6, va="bottom")
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
