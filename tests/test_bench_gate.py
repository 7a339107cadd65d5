"""The project gates itself, and the gate is shown to catch what it exists to catch.

``python -m bench gate --run`` with the committed ``bench/thresholds.json`` computes the cells the
thresholds name (embedded models, 16 prompts, stratified exact truth, point estimates, one torch
thread) and checks each statistic against its minimum. The minima follow the protocol of
``bench/gate.py`` (absolute floor and regression band; ``make thresholds`` from a clean tree).

Negative controls: the same run with its attribution scores sign-flipped, shuffled within
receiver type, or noised until Spearman drops by 0.1 must make the gate exit non-zero with the
committed thresholds.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import gate as gate_mod


def test_thresholds_file_follows_the_protocol():
    """Every minimum is max(floor, measured - band rounded down to 0.01), recomputed here from the
    file's own floor, band and measurements; the file was made from a clean tree; its run section
    is the project's gate run, so `make thresholds` regenerates the same cells."""
    from bench.matrix import default_tasks

    data = gate_mod.load_thresholds(None)
    assert data["measured_on"]["git_dirty"] is False, "thresholds must come from a clean tree (make thresholds)"
    assert data["run"] == {**gate_mod.GATE_RUN, "tasks": default_tasks()}
    floor, band = data["floor"], data["band"]
    assert set(floor) == set(band) == set(gate_mod.GATED_STATS)
    assert data["rules"]
    seen = set()
    for rule in data["rules"]:
        seen.add((rule["model"], rule["task"], rule["method"], rule["n"]))
        assert set(rule["min"]) == set(gate_mod.GATED_STATS), rule
        for stat, minimum in rule["min"].items():
            v = rule["measured"][stat]
            expect = math.floor(round((v - band[stat]) * 100, 6)) / 100
            if stat not in rule.get("below_floor", ()):
                expect = max(floor[stat], expect)
            assert minimum == pytest.approx(expect, abs=1e-9), (rule, stat)
    run = data["run"]
    assert seen == {(m, t, meth, n) for m in run["models"] for t in run["tasks"] for meth in run["methods"]
                    for n in run["sizes"]}


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """The self-gate: `bench gate --run` with the committed thresholds (computed once per module)."""
    import eap

    from bench.__main__ import main

    data = gate_mod.load_thresholds(None)
    missing = [m for m in data["run"]["models"] if m not in eap.embedded_names()]
    if missing:
        pytest.skip(f"embedded models missing: {missing}")
    out = tmp_path_factory.mktemp("gate") / "run"
    rc = main(["gate", str(out), "--run", "--quiet"])
    return out, rc


def test_self_gate(gate_run):
    _, rc = gate_run
    assert rc == 0


def _degraded_copy(gate_run, tmp_path, transform):
    src, _ = gate_run
    dst = tmp_path / "degraded"
    shutil.copytree(src, dst)
    gate_mod.degrade_run(dst, transform)
    return dst


def _gate_rc(run_dir, capsys) -> tuple[int, str]:
    from bench.__main__ import main

    capsys.readouterr()
    rc = main(["gate", str(run_dir)])
    return rc, capsys.readouterr().out


def test_untouched_copy_passes(gate_run, tmp_path, capsys):
    """Control for the controls: re-scoring an unchanged copy passes (the machinery alone fails nothing)."""
    run_dir = _degraded_copy(gate_run, tmp_path, lambda a, kinds, cell: a)
    rc, out = _gate_rc(run_dir, capsys)
    assert rc == 0, out


def test_sign_flipped_scores_fail_the_gate(gate_run, tmp_path, capsys):
    run_dir = _degraded_copy(gate_run, tmp_path, lambda a, kinds, cell: -a)
    rc, out = _gate_rc(run_dir, capsys)
    assert rc == 1 and "spearman" in out and "FAIL" in out


def test_scores_shuffled_within_receiver_type_fail_the_gate(gate_run, tmp_path, capsys):
    run_dir = _degraded_copy(gate_run, tmp_path, lambda a, kinds, cell: gate_mod.shuffle_within_kind(
        a, kinds, 1.0, np.random.default_rng(0)))
    rc, out = _gate_rc(run_dir, capsys)
    assert rc == 1 and "FAIL" in out


def test_noise_that_drops_spearman_by_a_tenth_fails_the_gate(gate_run, tmp_path, capsys):
    """Noise scaled per cell so that its Spearman falls by exactly 0.1 (checked after the fact)."""
    import json
    from pathlib import Path

    import torch

    src, _ = gate_run
    cells = json.loads((src / "results.json").read_text())["cells"]
    before = {c["id"]: c["stats"]["spearman"]["value"] for c in cells}
    exact = {}
    for c in cells:
        cache = Path(c["exact"]["cache"])
        idx = np.asarray(json.loads((cache / "edges.json").read_text())["index"])
        exact[c["id"]] = torch.load(cache / "exact.pt").double().numpy()[:, idx].mean(0)

    def noise(a, kinds, cell):
        s = gate_mod.noise_for_drop(a, exact[cell["id"]], 0.1, seed=1)
        z = np.random.default_rng(1).standard_normal(a.size) * float(np.std(a))
        return a + s * z

    run_dir = _degraded_copy(gate_run, tmp_path, noise)
    after = {c["id"]: c["stats"]["spearman"]["value"] for c in json.loads((run_dir / "results.json").read_text())["cells"]}
    for cid, v in before.items():
        assert after[cid] == pytest.approx(v - 0.1, abs=0.01), cid
    rc, out = _gate_rc(run_dir, capsys)
    assert rc == 1 and "FAIL" in out


def test_gate_cli_exit_status_on_a_degraded_run(gate_run, tmp_path):
    """What CI sees: `python -m bench gate` in a fresh process exits 1 on sign-flipped EAP only."""
    run_dir = _degraded_copy(gate_run, tmp_path,
                             lambda a, kinds, cell: -a if cell["method"] == "eap" else a)
    r = subprocess.run([sys.executable, "-m", "bench", "gate", str(run_dir)], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [ln for ln in r.stdout.splitlines() if "FAIL" in ln and "checks passed" not in ln]
    assert failed and all(" eap " in ln for ln in failed)


def test_sensitivity_finds_a_failing_strength_for_every_degradation(gate_run):
    """`bench sensitivity` (the numbers quoted in docs/bench.md): for EAP every degradation fails
    the gate at some strength; a partial sign flip or shuffle is enough (strength < 1)."""
    run_dir, _ = gate_run
    rules = gate_mod.load_thresholds(None)["rules"]
    rows = gate_mod.sensitivity(run_dir, rules, ["eap"], steps=30)
    assert {r["degradation"] for r in rows} == set(gate_mod.DEGRADATIONS)
    for r in rows:
        assert math.isfinite(r["strength"]) and r["strength"] > 0, r
        if r["degradation"] != "noise":
            assert r["strength"] < 1, r
    assert "sign-flip" in gate_mod.sensitivity_table(rows)
