"""``bench.testing.agreement`` (issue 23 item 12f): scores you already have (one or more methods)
and the truth you already have -> agreement statistics with CIs and a scatter figure; nothing is
recomputed. Checked against scipy on the compared edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as st

from bench.testing import agreement


class FakeGraph:
    def __init__(self, n):
        kinds = ["q", "k", "v", "mlp", "logits"]
        self.edge_names = [f"e{i}" for i in range(n)]
        self.edge_kind = [kinds[i % 5] for i in range(n)]


def data(n=60, G=4, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(G, n))
    A = E + rng.normal(scale=0.5, size=(G, n))
    E[:, :5] = np.nan  # edges not patched
    return torch.from_numpy(A), torch.from_numpy(E)


def test_groups_give_prompt_cis_and_the_right_numbers(tmp_path):
    A, E = data()
    out = agreement({"eap": A, "flipped": -A}, E, FakeGraph(60), figure=tmp_path / "fig" / "scatter")
    assert out.ci_over == "prompt groups" and out.n_edges == 55
    a, e = A.mean(0).numpy()[5:], E.mean(0).numpy()[5:]
    s = out.stats["eap"]
    assert s["spearman"]["value"] == pytest.approx(st.spearmanr(a, e).statistic, abs=1e-12)
    assert s["kendall_abs"]["value"] == pytest.approx(st.kendalltau(np.abs(a), np.abs(e)).statistic, abs=1e-12)
    assert out.stats["flipped"]["spearman"]["value"] == pytest.approx(-s["spearman"]["value"], abs=1e-12)
    assert s["spearman"]["lo"] < s["spearman"]["value"] < s["spearman"]["hi"]
    assert "spearman[q]" in s  # kinds from the graph
    top = max(range(55), key=lambda i: abs(a[i] - e[i]))
    assert out.worst["eap"][0]["edge"] == f"e{top + 5}"
    assert {p.suffix for p in out.figure} == {".png", ".pdf"} and all(p.stat().st_size > 0 for p in out.figure)
    assert "eap" in out.table() and "95% CIs over prompt groups" in out.table()


def test_vectors_give_edge_cis():
    A, E = data()
    out = agreement(A.mean(0), E.mean(0), names=[f"x{i}" for i in range(60)], bootstrap=100)
    s = out.stats["scores"]
    assert out.ci_over == "edges"
    assert s["pearson"]["value"] == pytest.approx(st.pearsonr(A.mean(0)[5:], E.mean(0)[5:]).statistic, abs=1e-12)
    assert s["pearson"]["lo"] <= s["pearson"]["value"] <= s["pearson"]["hi"] and s["pearson"]["hi"] > s["pearson"]["lo"]
    assert out.figure == []


def test_bad_inputs_are_named():
    A, E = data()
    with pytest.raises(ValueError, match="has 59 edges, the truth 60"):
        agreement(A[:, :59], E)
    with pytest.raises(ValueError, match="only 0 edges"):
        agreement(A, torch.full_like(E, float("nan")))
