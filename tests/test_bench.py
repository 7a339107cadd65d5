"""bench: agreement statistics, bootstrap CIs, threshold protocol, an end-to-end run with its cost columns
and exact cache, the gate CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from bench import agreement as ag
from bench import gate as gate_mod


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ statistics vs scipy / by hand
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=200)
    b = a + rng.normal(size=200)
    b[:20] = np.round(b[:20])  # some ties
    a[5:15] = 0.5
    assert ag.spearman(a, b) == pytest.approx(st.spearmanr(a, b).statistic, abs=1e-12)
    assert ag.kendall(a, b) == pytest.approx(st.kendalltau(a, b, variant="b").statistic, abs=1e-12)
    assert ag.pearson(a, b) == pytest.approx(st.pearsonr(a, b).statistic, abs=1e-12)


def test_correlations_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert ag.spearman(a, a ** 3) == 1.0
    assert ag.spearman(a, -a) == -1.0
    # concordant pairs: (1,2),(1,3),(1,4),(2,4),(3,4); discordant: (2,3) -> tau = (5-1)/6
    assert ag.kendall(a, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)
    assert math.isnan(ag.pearson(a, np.ones(4)))  # constant side
    assert ag.pearson([1, 2, np.nan, 4], [2, 4, 5, 8]) == pytest.approx(1.0)  # NaN pairs dropped


def test_topk_by_hand():
    exact = np.array([5.0, -4.0, 3.0, 0.1, -0.2, 0.0])
    attr = np.array([4.0, 0.1, -6.0, 3.0, 0.0, 0.0])
    # attr top-2 by |.|: {2, 0}; exact top-2: {0, 1} -> overlap 1
    assert ag.topk_precision_recall(attr, exact, 2) == (0.5, 0.5)
    # attr top-3 {2,0,3}, exact top-3 {0,1,2}: overlap 2
    assert ag.topk_precision_recall(attr, exact, 3) == pytest.approx((2 / 3, 2 / 3))
    # mass@2: exact |.| of attr's top-2 (edges 2, 0) = 3 + 5 over best 5 + 4
    assert ag.topk_mass(attr, exact, 2) == pytest.approx(8 / 9)
    # sign on exact top-3 {0: +/+, 1: -/+, 2: +/-} -> 1/3
    assert ag.sign_agreement(attr, exact, 3) == pytest.approx(1 / 3)
    assert ag.topk_precision_recall(exact, exact, 4) == (1.0, 1.0)


def test_statistics_keys_and_kinds():
    rng = np.random.default_rng(0)
    a, e = rng.normal(size=300), rng.normal(size=300)
    kinds = (["q", "k", "v", "mlp", "logits"] * 60)
    s = ag.statistics(a, e, kinds)
    for key in ("spearman", "kendall", "pearson", "recall@10", "recall@50", "recall@1%", "sign@10",
                "spearman[q]", "kendall[mlp]", "pearson[logits]"):
        assert key in s
    assert ag.k_values(300)["1%"] == 3
    sel = np.array(kinds) == "v"
    assert s["spearman[v]"] == pytest.approx(ag.spearman(a[sel], e[sel]))


def test_worst_edges():
    names = ["e0", "e1", "e2"]
    w = ag.worst_edges(np.array([1.0, 0.0, 2.0]), np.array([1.0, 3.0, 2.5]), names, ["q", "k", "v"], n=2)
    assert [x["edge"] for x in w] == ["e1", "e2"]
    assert w[0]["error"] == -3.0 and w[0]["rank_exact"] == 1


# --------------------------------------------------------------------------------- bootstrap
def _groups(G, n_edges=200, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=n_edges)
    E = truth + noise * rng.normal(size=(G, n_edges))
    A = truth + noise * rng.normal(size=(G, n_edges))
    return A, E


def test_bootstrap_interval_matches_an_independent_computation():
    """The interval is [v - (median - q2.5), v + (q97.5 - median)] of the replicates, each replicate
    the statistic of group means resampled with replacement (recomputed here from the same seed)."""
    A, E = _groups(6, seed=3)
    fn = lambda a, e: {"spearman": ag.spearman(a, e)}  # noqa: E731
    got = ag.bootstrap(A, E, fn, n_boot=150, seed=7)["spearman"]
    rng = np.random.default_rng(7)
    reps = []
    for _ in range(150):
        idx = rng.integers(0, 6, 6)
        reps.append(st.spearmanr(A[idx].mean(0), E[idx].mean(0)).statistic)
    q_lo, med, q_hi = np.quantile(reps, [0.025, 0.5, 0.975])
    v = st.spearmanr(A.mean(0), E.mean(0)).statistic
    assert got["value"] == pytest.approx(v, abs=1e-12)
    assert got["lo"] == pytest.approx(v - (med - q_lo), abs=1e-12)
    assert got["hi"] == pytest.approx(v + (q_hi - med), abs=1e-12)
    assert got["boot_bias"] == pytest.approx(np.mean(reps) - v, abs=1e-12)


def test_bootstrap_interval_is_calibrated_over_prompt_samples():
    """Simulate many data sets from one population (same true edge effects, fresh prompt noise):
    the intervals must cover the centre of the statistic's sampling distribution about 95% of
    the time, and their width must match the spread of the point estimate across data sets."""
    rng = np.random.default_rng(0)
    n_edges, G, n_sets = 150, 16, 120
    t_a, t_e = rng.normal(size=n_edges), rng.normal(size=n_edges)
    t_a = 0.7 * t_e + 0.7 * t_a  # correlated true effects
    fn = lambda a, e: {"spearman": ag.spearman(a, e)}  # noqa: E731
    points, intervals = [], []
    for _ in range(n_sets):
        A = t_a + 2.0 * rng.normal(size=(G, n_edges))
        E = t_e + 2.0 * rng.normal(size=(G, n_edges))
        s = ag.bootstrap(A, E, fn, n_boot=100, seed=int(rng.integers(1 << 30)))["spearman"]
        points.append(s["value"])
        intervals.append((s["lo"], s["hi"]))
    centre = float(np.median(points))
    lo, hi = np.array(intervals).T
    coverage = float(np.mean((lo <= centre) & (centre <= hi)))
    true_width = float(np.subtract(*np.quantile(points, [0.975, 0.025])))
    assert 0.85 <= coverage <= 1.0, coverage
    assert 0.6 <= float(np.median(hi - lo)) / true_width <= 1.6, (np.median(hi - lo), true_width)


def test_bootstrap_narrows_with_more_groups():
    fn = lambda a, e: {"spearman": ag.spearman(a, e)}  # noqa: E731
    small = ag.bootstrap(*_groups(4), fn, n_boot=300)["spearman"]
    big = ag.bootstrap(*_groups(32), fn, n_boot=300)["spearman"]
    assert (big["hi"] - big["lo"]) < (small["hi"] - small["lo"])


def test_bootstrap_one_group_has_no_ci():
    A, E = _groups(1)
    s = ag.bootstrap(A, E, lambda a, e: {"r": ag.pearson(a, e)}, n_boot=50)["r"]
    assert math.isfinite(s["value"]) and math.isnan(s["lo"]) and math.isnan(s["hi"])


def test_group_vectors_average_to_the_full_data_scores(tiny_model, make_random_task):
    """The bootstrap resamples per-group score vectors; their mean must be the full-data score, for
    attribution and for exact patching alike (both are means over prompts), float64."""
    import torch

    import eap
    import validation
    from bench.worker import groups_of

    task = make_random_task(tiny_model, n=6, seq=6, seed=4)
    graph = eap.Graph.from_model(tiny_model)
    parts = [task.subset(p) for p in groups_of(6, 3)]
    for score in (lambda t: eap.attribute(tiny_model, graph, t, progress=False),
                  lambda t: validation.patch_edges(tiny_model, graph, t, progress=False)):
        full = score(task)
        mean = torch.stack([score(t) for t in parts]).mean(0)
        torch.testing.assert_close(mean, full, rtol=1e-6, atol=1e-9 * float(full.abs().max()))


def test_groups_of():
    from bench.worker import groups_of

    g = groups_of(12, 8)
    assert len(g) == 6 and all(len(x) == 2 for x in g)
    assert sorted(np.concatenate([x.numpy() for x in g]).tolist()) == list(range(12))
    assert len(groups_of(16, 8)) == 8 and len(groups_of(7, 8)) == 7


# ------------------------------------------------------------------------------------- gate
def _cell(model="m", method="eap", n=8, rho=0.8, recall=0.5, task="ioi"):
    return {"model": model, "method": method, "n": n, "task": task, "edges_spec": "all",
            "stats": {"spearman": {"value": rho, "lo": rho - 0.1, "hi": rho + 0.1},
                      "recall@10": {"value": recall, "lo": 0.0, "hi": 1.0}}}


def test_gate_check_rules():
    cells = [_cell(), _cell(method="eap-ig", rho=0.3)]
    rows = gate_mod.check(cells, [{"method": "eap", "min": {"spearman": 0.7, "recall@10": 0.5}}])
    assert [r["ok"] for r in rows] == [True, True]
    rows = gate_mod.check(cells, [{"min": {"spearman": 0.5}}])
    assert [r["ok"] for r in rows] == [True, False]
    rows = gate_mod.check(cells, [{"model": "other", "min": {"spearman": 0.0}}])
    assert not rows[0]["ok"] and "missing" in rows[0]["note"]
    assert "FAILED" in gate_mod.table(rows)
    nan = _cell(rho=float("nan"))
    assert not gate_mod.check([nan], [{"min": {"spearman": -1.0}}])[0]["ok"]  # NaN never passes


def test_threshold_protocol_floor_and_band():
    """min = max(floor, measured - band rounded down to 0.01): the band binds for a good cell,
    the floor for a cell just above it; a cell below the floor is refused."""
    floor, band = {"spearman": 0.3, "recall@10": 0.5}, {"spearman": 0.05, "recall@10": 0.1}
    cells = [_cell(rho=0.8312, recall=0.9), _cell(method="b", rho=0.33, recall=0.55)]
    data = gate_mod.make_thresholds({"cells": cells}, ["spearman", "recall@10"], floor, band)
    good, low = data["rules"]
    assert good["min"] == {"spearman": 0.78, "recall@10": 0.8}
    assert low["min"] == {"spearman": 0.3, "recall@10": 0.5}
    assert data["floor"] == floor and data["band"] == band
    # a regression by more than the band fails, by less passes
    assert not all(r["ok"] for r in gate_mod.check([_cell(rho=0.77, recall=0.9)], [good]))
    assert all(r["ok"] for r in gate_mod.check([_cell(rho=0.79, recall=0.9)], [good]))
    with pytest.raises(gate_mod.ThresholdError, match="below the quality floor"):
        gate_mod.make_thresholds({"cells": [_cell(rho=0.2)]}, ["spearman"], floor, band)
    waived = gate_mod.make_thresholds({"cells": [_cell(rho=0.2)]}, ["spearman"], floor, band, allow_below_floor=True)
    assert waived["rules"][0]["min"] == {"spearman": 0.15} and waived["rules"][0]["below_floor"] == ["spearman"]


def test_degradations_do_what_they_say():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    kinds = np.array(["q", "k", "v", "mlp"] * 10)
    flipped = gate_mod.flip_signs(a, kinds, 1.0, rng)
    assert np.array_equal(flipped, -a)
    half = gate_mod.flip_signs(a, kinds, 0.5, np.random.default_rng(1))
    assert int((np.sign(half) != np.sign(a)).sum()) == 20
    shuffled = gate_mod.shuffle_within_kind(a, kinds, 1.0, np.random.default_rng(2))
    for kd in "q", "k", "v", "mlp":
        assert sorted(shuffled[kinds == kd]) == sorted(a[kinds == kd])  # same values per kind
    assert not np.array_equal(shuffled, a)
    noisy = gate_mod.add_noise(a, kinds, 0.5, np.random.default_rng(3))
    assert 0.2 < np.std(noisy - a) / np.std(a) < 0.8
    e = a + 0.3 * rng.normal(size=40)
    s = gate_mod.noise_for_drop(a, e, 0.1, seed=4)
    z = np.random.default_rng(4).standard_normal(40) * np.std(a)
    assert ag.spearman(a + s * z, e) == pytest.approx(ag.spearman(a, e) - 0.1, abs=0.02)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A tiny real run: toy-gpt2-2l, 8 IOI prompts, EAP, timed once, through the default worker subprocess."""
    from bench.matrix import Config, run

    out = tmp_path_factory.mktemp("run")
    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[8], methods=["eap"], groups=2, repeats=1,
                 bootstrap=20, isolate="model", progress=False, threads=1)
    first = run(cfg, out)
    return cfg, out, first


def test_run_writes_everything(small_run):
    cfg, out, results = small_run
    for name in ("results.json", "results.csv", "summary.md", "config.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 2
    assert {"packages", "device", "git_commit"} <= set(data["environment"])
    (cell,) = data["cells"]
    assert cell["task"] == "ioi" and cell["n_edges"] == cell["n_edges_selected"] > 0
    for key in ("spearman", "kendall", "pearson", "recall@10", "sign@10", "spearman[v]"):
        assert key in cell["stats"]
    assert len(cell["worst"]) > 0
    assert results["run_stats"]["exact_computed"] == 1
    for stem in ("scatter_toy-gpt2-2l_ioi_n8", "agreement_vs_n", "cost_vs_n", "cost_vs_edges"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert "| toy-gpt2-2l | ioi | 8 | eap |" in (out / "summary.md").read_text()
    header = (out / "results.csv").read_text().splitlines()[0]
    for col in ("spearman_lo", "floor_kind", "full_logits_floor_ratio", "exact_warm_compute_s", "exact_setup_io_s",
                "exact_fwd_eq_per_edge", "speedup_warm"):
        assert col in header, col


def test_cost_columns_are_consistent(small_run):
    """The cost numbers of a cell hang together: the floor matches the task's read-out, the
    speed-up is warm exact over warm attribution, forward-equivalents use the warm compute."""
    _, out, _ = small_run
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    a, exact = cell["attribution"], cell["exact"]
    assert a["floor_kind"] == "readout" and a["repeats"] == 1
    assert a["floor_ratio"] == pytest.approx(a["time_s"] / a["floor_s"])
    full = a["full_logits"]
    assert full["floor_ratio"] == pytest.approx(full["time_s"] / full["floor_s"])
    warm, cost = exact["warm"], exact["cost"]
    assert warm["patch_s"] > 0 and warm["setup_s"] > 0 and warm["forward_s"] > 0
    assert cost["compute_s"] == warm["patch_s"]
    assert cost["fwd_eq_per_edge"] == pytest.approx(warm["patch_s"] / cell["n_edges_selected"] / warm["forward_s"])
    assert cost["setup_io_s"] >= warm["setup_s"]
    assert cell["speedup"] == pytest.approx((warm["setup_s"] + warm["patch_s"]) / a["time_s"])  # all edges selected
    assert exact["cold"]["wall_s"] >= exact["cold"]["patch_s"] + exact["cold"]["setup_s"]
    assert "| readout |" in (out / "summary.md").read_text()


def test_rerun_reuses_exact_cache(small_run, tmp_path):
    """Adding a method to a finished run reuses the cached exact truth (no recomputation)."""
    from bench.matrix import Config, run

    cfg, out, _ = small_run
    meta = next((out / "cache" / "exact").glob("*/meta.json"))
    before = (meta.stat().st_mtime_ns, meta.read_text())
    cfg2 = Config(**{**cfg.__dict__, "methods": ["eap", "clean-corrupted"], "figures": False, "repeats": 0})
    res = run(cfg2, out)
    assert res["run_stats"] == {"exact_computed": 0, "exact_reused": 1, "exact_stale": 0, "cells_computed": 1,
                                "cells_reused": 1}
    assert (meta.stat().st_mtime_ns, meta.read_text()) == before
    assert len(res["cells"]) == 2
    # a second identical run does nothing at all
    res = run(cfg2, out)
    assert res["run_stats"]["cells_computed"] == 0 and res["run_stats"]["exact_reused"] == 0


def test_gate_cli_on_run_dir(small_run, tmp_path, capsys):
    from bench.__main__ import main

    _, out, _ = small_run
    cells = json.loads((out / "results.json").read_text())["cells"]  # other tests may add cells
    rho = min(c["stats"]["spearman"]["value"] for c in cells)
    assert main(["gate", str(out), "--min", f"spearman={rho - 0.05}"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["gate", str(out), "--min", f"spearman={rho + 0.001}"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # thresholds written from the run (the test tree may be dirty) pass on the same run, fail when raised
    th = tmp_path / "th.json"
    assert main(["thresholds", str(out), "--out", str(th), "--allow-dirty", "--allow-below-floor"]) == 0
    assert main(["gate", str(out), "--thresholds", str(th)]) == 0
    data = json.loads(th.read_text())
    data["rules"][0]["min"]["spearman"] = 1.01
    th.write_text(json.dumps(data))
    assert main(["gate", str(out), "--thresholds", str(th)]) == 1


def test_gate_cli_subprocess_exit_code(small_run):
    """The exit status CI sees."""
    import subprocess
    import sys

    _, out, _ = small_run
    r = subprocess.run([sys.executable, "-m", "bench", "gate", str(out), "--min", "spearman=1.5"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout
