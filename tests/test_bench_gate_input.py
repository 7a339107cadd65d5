"""The gate's exit codes say what went wrong (issue 23 item 9): bad input exits 2 with the valid
statistics listed, a run no rule matches exits 2 saying what to pass, a failed check exits 1.
A synthetic results.json (no model run) is enough: only the parsing and the error path are tested."""

from __future__ import annotations

import json

import pytest

from bench import gate as gate_mod
from bench.__main__ import main


def stat(v):
    return {"value": v, "lo": v - 0.1, "hi": v + 0.1}


@pytest.fixture
def run_dir(tmp_path):
    cells = [{"model": "my-model", "task": "mytasks:arith", "method": "eap", "n": 16, "edges_spec": "all",
              "stats": {"spearman": stat(0.62), "recall@10": stat(0.7)}}]
    (tmp_path / "results.json").write_text(json.dumps({"cells": cells}))
    return tmp_path


def test_bounds_pass_and_fail_with_exit_0_and_1(run_dir, capsys):
    assert main(["gate", str(run_dir), "--min", "spearman=0.5"]) == 0
    assert main(["gate", str(run_dir), "--min", "spearman=0.7"]) == 1  # the control: a real failure is 1
    assert "FAIL" in capsys.readouterr().out


def test_misspelled_statistic_exits_2_listing_the_statistics(run_dir, capsys):
    assert main(["gate", str(run_dir), "--min", "spearmn=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown statistic 'spearmn'" in err and "did you mean spearman" in err
    for name in ("spearman", "kendall_abs", "recall@10", "cpr_gap", "spearman[q]"):
        assert name in err.split("statistics: ")[1]


@pytest.mark.parametrize("item", ["spearman=abc", "spearman", "spearman=nan"])
def test_non_numbers_exit_2(run_dir, capsys, item):
    assert main(["gate", str(run_dir), "--max", item]) == 2
    assert "error:" in capsys.readouterr().err


def test_no_rule_matching_any_cell_exits_2_saying_what_to_pass(run_dir, capsys):
    assert main(["gate", str(run_dir)]) == 2  # the project's thresholds, a user's own task
    captured = capsys.readouterr()
    assert "nan" not in captured.out and "FAIL" not in captured.out
    assert "--min STAT=VALUE" in captured.err and "thresholds" in captured.err
    assert "my-model/mytasks:arith/eap/n=16" in captured.err


def test_statistic_names_are_what_cells_hold():
    """Every statistic the agreement code writes is accepted, computed independently of the list."""
    import numpy as np

    from bench.agreement import statistics

    names = gate_mod.statistic_names()
    x = np.random.default_rng(0).standard_normal(300)
    kinds = np.array(["q", "k", "v", "mlp", "logits"] * 60)
    assert set(statistics(x, x[::-1].copy(), kinds)) <= set(names)
    assert gate_mod.parse_bounds(["recall@10=0.5", "cpr_gap=-0.2"], "--min") == {"recall@10": 0.5, "cpr_gap": -0.2}
