"""Faithfulness curves, MIB's CPR/CMD and the gaps to the exact ranking (bench.faithfulness):
the areas by hand, every curve point against an independent top-k + evaluate_circuit, and end
to end through the bench matrix, report, figure and gate, with negative controls (a flipped
ranking fails ``--min cpr_gap``; replaced attribution files make the curves stale, not wrong)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import validation
from bench import faithfulness as fa
from eap import Graph

from conftest import random_task

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ plug-in methods
def exact_method(model, graph, task, **_):
    """A "method" whose scores are exact patching itself: its curves must be the oracle's."""
    return validation.patch_edges(model, graph, task, progress=False).float()


def flipped_method(model, graph, task, **_):
    """Exact patching with every sign flipped: the same |score| ranking, the worst signed one."""
    return -exact_method(model, graph, task)


# ------------------------------------------------------------------------------ pieces
def mib_trapezoid(x, f):
    """MIB's loop (evaluate_area_under_curve, log_scale=False), written out."""
    under = from_1 = 0.0
    for i in range(len(f) - 1):
        under += (x[i + 1] - x[i]) * ((f[i] + f[i + 1]) / 2)
        from_1 += (x[i + 1] - x[i]) * ((abs(1.0 - f[i]) + abs(1.0 - f[i + 1])) / 2)
    return under, from_1


def test_mib_areas_by_hand():
    x = np.asarray(fa.MIB_FRACTIONS)
    assert fa.areas(x, np.ones(10)) == pytest.approx((0.999, 0.0), abs=1e-15)
    assert fa.areas(x, x) == pytest.approx(((1 - 0.001**2) / 2, 0.999 - (1 - 0.001**2) / 2), abs=1e-15)
    f = np.asarray([0, 0.1, -0.3, 0.2, 0.5, 1.4, 0.9, 1.0, 1.2, 1.0])  # |1 - f| matters above 1
    assert fa.areas(x, f) == pytest.approx(mib_trapezoid(list(x), list(f)), abs=1e-15)


def test_sizes():
    assert fa.mib_sizes(110) == [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]
    for n in (5, 110, 1519, 32491):
        grid = fa.log_sizes(n)
        assert grid[0] == 1 and grid[-1] == n and grid == sorted(set(grid))
        assert len(grid) >= math.log10(n) * fa.LOG_POINTS_PER_DECADE
        assert set(fa.mib_sizes(n)) <= set(fa.abs_sizes(n)) and set(grid) <= set(fa.abs_sizes(n))


@pytest.fixture(scope="module")
def curves(tiny3_model):
    graph = Graph.from_model(tiny3_model)
    task = random_task(tiny3_model, n=5, seq=6, seed=21)
    exact = validation.patch_edges(tiny3_model, graph, task, progress=False)
    noisy = exact + 0.5 * exact.abs().mean() * torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1),
                                                           dtype=torch.float64)
    out = fa.compute_curves(tiny3_model, graph, task, {fa.ORACLE: exact, "noisy": noisy})
    return tiny3_model, graph, task, {fa.ORACLE: exact, "noisy": noisy}, out


def test_every_curve_point_is_an_independent_circuit_evaluation(curves):
    model, graph, task, rankings, out = curves
    clean = torch.tensor(out["clean"], dtype=torch.float64)
    corrupted = torch.tensor(out["corrupted"], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(clean, task.metric(model(task.clean)).double(), atol=1e-9, rtol=0)
        torch.testing.assert_close(corrupted, task.metric(model(task.corrupted)).double(), atol=1e-9, rtol=0)
    direction = 1.0 if clean.mean() >= corrupted.mean() else -1.0
    assert out["direction"] == direction
    for name, scores in rankings.items():
        for curve, key in (("abs", scores.abs()), ("signed", -direction * scores)):
            order = torch.argsort(key, descending=True, stable=True)
            ks = out["rankings"][name][curve]["k"]
            masks = torch.zeros(len(ks), graph.n_edges, dtype=torch.bool)
            for i, k in enumerate(ks):
                masks[i, order[:k]] = True
            want = validation.evaluate_circuit(model, graph, task, masks, baselines=False).per_prompt
            got = torch.tensor(out["rankings"][name][curve]["per_prompt"], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_scores_follow_mibs_definitions(curves):
    *_, out = curves
    clean, corrupted = np.asarray(out["clean"]).mean(), np.asarray(out["corrupted"]).mean()

    def f(entry, curve):
        return (np.asarray(entry[curve]["per_prompt"]).mean(1) - corrupted) / (clean - corrupted)

    x = list(fa.MIB_FRACTIONS)
    res = {}
    for name in (fa.ORACLE, "noisy"):
        e = out["rankings"][name]
        fa_ = dict(zip(e["abs"]["k"], f(e, "abs")))
        cpr, _ = mib_trapezoid(x, list(f(e, "signed")))
        cpr_abs, cmd = mib_trapezoid(x, [fa_[k] for k in fa.mib_sizes(out["n_edges"])])
        res[name] = (cpr, cmd, cpr_abs, np.asarray([fa_[k] for k in fa.log_sizes(out["n_edges"])]))
    s = fa.summarize(out, "noisy", n_boot=50)["stats"]
    (ocpr, ocmd, ocpr_abs, ogrid), (cpr, cmd, cpr_abs, grid) = res[fa.ORACLE], res["noisy"]
    for key, want in (("cpr", cpr), ("cmd", cmd), ("cpr_abs", cpr_abs), ("oracle_cpr", ocpr), ("oracle_cmd", ocmd),
                      ("cpr_gap", cpr - ocpr), ("cmd_gap", ocmd - cmd), ("cpr_abs_gap", cpr_abs - ocpr_abs),
                      ("curve_gap", float(np.mean(grid - ogrid)))):
        assert s[key]["value"] == pytest.approx(want, abs=1e-12), key
        assert s[key]["lo"] <= s[key]["hi"], key
    assert abs(s["cpr_gap"]["value"]) > 1e-3  # the noisy ranking's curves differ from the oracle's
    own = fa.summarize(out, fa.ORACLE, n_boot=0)["stats"]
    for key in ("cpr_gap", "cmd_gap", "cpr_abs_gap", "curve_gap"):
        assert own[key]["value"] == 0.0 and math.isnan(own[key]["lo"])
    alone = fa.summarize({**out, "rankings": {"noisy": out["rankings"]["noisy"]}}, "noisy", n_boot=0)["stats"]
    assert alone["cpr"]["value"] == s["cpr"]["value"] and math.isnan(alone["cpr_gap"]["value"])


def test_plotted_curve_is_normalised(curves):
    *_, out = curves
    summ = fa.summarize(out, "noisy", n_boot=0)
    c = summ["curve"]
    assert c["k"][0] == 0 and c["k"][-1] == out["n_edges"] and c["fraction"][-1] == 1.0
    assert c["faithfulness"][0] == pytest.approx(0.0, abs=1e-12)
    assert c["faithfulness"][-1] == pytest.approx(1.0, abs=1e-12)
    assert summ["oracle_curve"]["k"] == c["k"]


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def faith_run(tmp_path_factory):
    from bench.matrix import Config, run

    out = tmp_path_factory.mktemp("faith")
    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[8], groups=2, repeats=0, bootstrap=20,
                 methods=["eap", "test_bench_faithfulness:exact_method", "test_bench_faithfulness:flipped_method"],
                 isolate="none", progress=False, threads=1)
    return cfg, out, run(cfg, out)


def _cell(results, method):
    return next(c for c in results["cells"] if c["method"].endswith(method))


def test_run_reports_faithfulness_everywhere(faith_run):
    cfg, out, results = faith_run
    for c in results["cells"]:
        f = c["faithfulness"]
        assert not f.get("stale") and f["oracle_curve"] is not None
        for key in fa.STATS:
            assert math.isfinite(c["stats"][key]["value"]), (c["method"], key)
        assert f["cost"]["fwd_eq_per_circuit"] > 0 and f["n_circuits"] > 0
    assert (out / "figures" / "faithfulness.png").stat().st_size > 1000
    assert (out / "figures" / "faithfulness.pdf").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "## Circuit faithfulness" in summary and "| toy-gpt2-2l | ioi | 8 | eap | 110 |" in summary
    header = (out / "results.csv").read_text().splitlines()[0]
    for col in ("cpr", "cmd_lo", "cpr_gap_hi", "curve_gap", "faith_curve_fwd_eq", "faith_circuits"):
        assert col in header.split(","), col
    # exact scores as a method reproduce the oracle exactly: every gap is 0
    ex = _cell(results, "exact_method")["stats"]
    for key in ("cpr_gap", "cmd_gap", "cpr_abs_gap", "curve_gap"):
        assert ex[key]["value"] == 0.0, key
    # flipped signs: the same |score| circuits, the worst signed ones
    fl = _cell(results, "flipped_method")["stats"]
    assert fl["cmd_gap"]["value"] == 0.0 and fl["curve_gap"]["value"] == 0.0
    assert fl["cpr_gap"]["value"] < -0.2 and fl["cpr"]["value"] < ex["cpr"]["value"]


def test_gate_on_cpr_gap_fails_a_bad_ranking(faith_run, capsys):
    from bench.__main__ import main

    _, out, results = faith_run
    args = ["gate", str(out), "--min", "cpr_gap=-0.05", "--max", "cmd=100"]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any("exact_method" in ln and "cpr_gap" in ln and "PASS" in ln for ln in lines)
    assert any("flipped_method" in ln and "cpr_gap" in ln and "FAIL" in ln for ln in lines)
    assert any("cmd" in ln and "<=100.000" in ln and "PASS" in ln for ln in lines)
    worst_cmd = max(c["stats"]["cmd"]["value"] for c in results["cells"])
    assert main(["gate", str(out), "--max", f"cmd={worst_cmd - 1e-6}"]) == 1
    assert main(["gate", str(out), "--max", f"cmd={worst_cmd + 1e-6}", "--min", "cpr_gap=-100"]) == 0
    capsys.readouterr()


def test_replaced_attribution_makes_curves_stale_not_wrong(faith_run, tmp_path, capsys):
    """Curves belong to the ranking they were computed from: after the attribution files change
    (here: a negative control's degradation), the cell's faithfulness is stale (NaN), and a gate
    on it fails rather than passing on the old curves."""
    from bench.__main__ import main
    from bench.gate import degrade_run

    _, out, _ = faith_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    degrade_run(copy, lambda a, kinds, c: -a, methods=["test_bench_faithfulness:exact_method"])
    results = json.loads((copy / "results.json").read_text())
    ex = _cell(results, "exact_method")
    assert ex["faithfulness"]["stale"] and math.isnan(ex["stats"]["cpr"]["value"])
    assert not _cell(results, "eap")["faithfulness"].get("stale")
    assert main(["gate", str(copy), "--min", "cpr=-100"]) == 1
    assert "(stale)" in (copy / "summary.md").read_text()
    capsys.readouterr()


def test_sampled_exact_truth_has_no_oracle(tmp_path):
    """With sampled exact truth the method's own curve is computed, the gaps are NaN."""
    from bench.matrix import Config, run

    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[4], groups=1, repeats=0, bootstrap=0,
                 methods=["eap"], edges="sample:30", isolate="none", progress=False, threads=1, figures=False)
    (cell,) = run(cfg, tmp_path)["cells"]
    f, s = cell["faithfulness"], cell["stats"]
    assert f["oracle_curve"] is None and math.isfinite(s["cpr"]["value"]) and math.isfinite(s["cmd"]["value"])
    assert math.isnan(s["cpr_gap"]["value"]) and math.isnan(s["oracle_cpr"]["value"])


def test_gate_run_computes_curves_only_when_a_rule_needs_them():
    assert not fa.gated([{"min": {"spearman": 0.3}}, {"min": {}, "max": {"kendall": 1.0}}])
    assert fa.gated([{"min": {"spearman": 0.3}}, {"min": {}, "max": {"cmd": 0.3}}])
    assert fa.gated([{"min": {"cpr_gap": -0.2}}]) and fa.gated([{"min": {"oracle_cpr": 0.1}}])
