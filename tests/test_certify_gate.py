"""``bench gate --certify``: passes a certificate whose bound on missed edges is within M, fails one
that is not (negative control), and exits 2 on bad input. Certificates come from
``validation.run_certificate`` on a synthetic oracle (no model needed)."""

from __future__ import annotations

import json

import torch

from bench.__main__ import main
from validation import run_certificate


def _truth_and_scores(n: int = 200, misses: int = 30):
    g = torch.Generator().manual_seed(0)
    truth = 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    truth[:20] = 1.0 + torch.rand(20, generator=g, dtype=torch.float64)  # found by attribution
    truth[20:20 + misses] = 0.5  # large, but attribution gives them ~0
    scores = truth.clone()
    scores[20:20 + misses] = 0.0
    return truth, scores


def _cert(tmp_path, name, budget, misses=30):
    truth, scores = _truth_and_scores(misses=misses)
    cert = run_certificate(scores, lambda e: truth[e], budget=budget, threshold=0.1, seed=0)
    path = tmp_path / f"{name}.json"
    cert.save_json(path)
    return cert, path


def test_gate_passes_within_m_and_fails_beyond(tmp_path, capsys):
    full, full_path = _cert(tmp_path, "full", budget=200)
    assert full.missed_upper == 0
    assert main(["gate", "--certify", str(full_path), "--max-missed", "0"]) == 0
    assert "PASS" in capsys.readouterr().out

    part, part_path = _cert(tmp_path, "part", budget=60)
    assert part.missed_upper > 5
    assert main(["gate", "--certify", str(part_path), "--max-missed", "5"]) == 1
    out = capsys.readouterr().out
    assert f"at most {part.missed_upper} unsampled" in out and "FAIL" in out
    assert main(["gate", "--certify", str(part_path), "--max-missed", str(part.missed_upper)]) == 0
    # a directory: every certificate in it is gated
    assert main(["gate", "--certify", str(tmp_path), "--max-missed", "5"]) == 1
    assert "1/2 certificates passed" in capsys.readouterr().out
    # a certificate made at a lower confidence than required fails
    assert main(["gate", "--certify", str(full_path), "--confidence", "0.99"]) == 1


def test_gate_certify_bad_input_exits_2(tmp_path, capsys):
    assert main(["gate", "--certify", str(tmp_path / "missing.json")]) == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cells": []}))
    assert main(["gate", "--certify", str(other)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["gate", "--certify", str(empty)]) == 2
    assert "no certificate" in capsys.readouterr().err
