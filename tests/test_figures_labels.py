"""Scatter plots (issue 23 item 6): the labels of the worst edges never collide (their bounding
boxes, measured with matplotlib's renderer, are disjoint), a rank-rank row shows the bulk of the
edges, a symlog option, and agreement_vs_n's top-k recall uses k >= 10 edges, stated in the panel."""

from __future__ import annotations

import numpy as np
import pytest

from bench import figures


def clustered(n=110, seed=0):
    """Most edges near zero, and the worst errors at almost one point (as the eap-ig panel of
    docs/sample/scatter_toy-llama-4l_ioi_n32.png had two input->a0.h*<k> labels on top of each other)."""
    rng = np.random.default_rng(seed)
    e = rng.normal(0, 0.01, n)
    a = e + rng.normal(0, 0.002, n)
    for i, shift in enumerate([0.0, 0.001, 0.002, 0.003]):
        e[i], a[i] = 0.5 + shift, -0.5 - shift
    kinds = np.array(["k"] * n)
    names = np.array([f"input->a0.h{i}<k>" for i in range(n)])
    return a, e, kinds, names


def boxes(ax, renderer):
    """The labels' text boxes (an Annotation's own window extent also covers its leader line)."""
    from matplotlib.text import Annotation, Text

    return [Text.get_window_extent(t, renderer) for t in ax.texts if isinstance(t, Annotation)]


def overlapping(bbs):
    return [(i, j) for i in range(len(bbs)) for j in range(i + 1, len(bbs)) if bbs[i].overlaps(bbs[j])]


@pytest.mark.parametrize("scale", ["linear", "symlog"])
def test_worst_edge_labels_do_not_collide(scale):
    a, e, kinds, names = clustered()
    fig = figures.scatter_figure([{"a": a, "e": e, "kinds": kinds, "names": names, "title": "eap-ig",
                                   "note": "edges: 110\nn=32 prompts"}], "t", n_labels=4, scale=scale)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    bbs = boxes(ax, renderer)
    assert len(bbs) >= 2  # more than one of the clustered worst edges is labelled ...
    assert not overlapping(bbs)  # ... and no two labels overlap
    note = next(t for t in ax.texts if t.get_text().startswith("edges")).get_window_extent(renderer)
    assert not any(b.overlaps(note) for b in bbs)
    assert (ax.get_xscale(), ax.get_yscale()) == ((scale, scale))
    figures.plt.close(fig)


def test_naive_placement_collides():
    """The negative control: main's placement (every label at (3, 3) points) overlaps on this data."""
    a, e, kinds, names = clustered()
    fig, ax = figures.plt.subplots(figsize=(3.3, 3.3))
    ax.scatter(e, a)
    for i in np.argsort(-np.abs(a - e))[:4]:
        ax.annotate(str(names[i]), (e[i], a[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    fig.canvas.draw()
    assert overlapping(boxes(ax, fig.canvas.get_renderer()))
    figures.plt.close(fig)


def test_rank_row_places_every_edge_on_its_ranks():
    a, e, kinds, names = clustered()
    fig = figures.scatter_figure([{"a": a, "e": e, "kinds": kinds, "names": names, "title": "x"}], "t")
    rank_ax = fig.axes[1]
    pts = np.concatenate([c.get_offsets() for c in rank_ax.collections])
    assert len(pts) == len(a)
    # independent ranks: position of each value in the sorted order (no ties here), as a fraction
    want = np.stack([(np.argsort(np.argsort(e)) + 1) / len(e), (np.argsort(np.argsort(a)) + 1) / len(a)], 1)
    assert np.allclose(np.sort(pts, axis=0), np.sort(want, axis=0))
    figures.plt.close(fig)


@pytest.mark.parametrize("n_selected, stat, k", [(110, "recall@10", 10), (1519, "recall@1%", 15), (949, "recall@10", 10), (999, "recall@1%", 10)])
def test_top_k_recall_has_at_least_ten_edges(n_selected, stat, k):
    got, note = figures.recall_k(n_selected)
    assert got == stat and note.startswith(f"k = {k} ")


def test_agreement_vs_n_states_k(tmp_path):
    def cell(n, model, n_edges):
        st = {s: {"value": 0.5, "lo": 0.4, "hi": 0.6} for s in ("spearman", "kendall", "recall@10", "recall@1%")}
        return {"model": model, "task": "ioi", "method": "eap", "n": n, "n_edges": n_edges,
                "n_edges_selected": n_edges, "stats": st}

    cells = [cell(n, "toy-gpt2-2l", 110) for n in (16, 32)] + [cell(n, "toy-gpt2-4l", 1519) for n in (16, 32)]
    captured = {}
    real_save = figures._save

    def keep(fig, out, name):
        captured["fig"] = fig
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        captured["texts"] = texts
        return real_save(fig, out, name)

    figures._save = keep
    try:
        figures.agreement_vs_n(cells, tmp_path)
    finally:
        figures._save = real_save
    joined = "\n".join(captured["texts"])
    assert "toy-gpt2-2l: k = 10 (1% of 110 edges is 1)" in joined
    assert "toy-gpt2-4l: k = 15 (1% of 1,519 edges)" in joined
