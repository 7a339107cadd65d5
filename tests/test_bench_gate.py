"""The project gates itself: EAP/EAP-IG fidelity on the embedded models must not degrade.

Runs ``python -m bench gate --run`` with the committed ``bench/thresholds.json``: it computes the
cells the thresholds name (embedded models, 16 prompts, exhaustive or stratified exact truth,
point estimates only) and checks each statistic against its minimum. The minima were set from a
measured run minus a stated margin (see the file's ``margin`` and ``measured`` fields and
docs/bench.md); regenerate them with ``python -m bench thresholds RUN_DIR`` after an intended
change.
"""

from __future__ import annotations

import pytest

from bench import gate as gate_mod


def test_thresholds_file_is_sane():
    data = gate_mod.load_thresholds(None)
    assert data["rules"] and data["run"]["models"]
    for rule in data["rules"]:
        assert rule["min"], rule
        for stat, minimum in rule["min"].items():
            assert minimum < rule["measured"][stat], (rule, stat)  # minimum sits below the measurement


def test_self_gate(tmp_path, capsys):
    import eap

    from bench.__main__ import main

    data = gate_mod.load_thresholds(None)
    missing = [m for m in data["run"]["models"] if m not in eap.embedded_names()]
    if missing:
        pytest.skip(f"embedded models missing: {missing}")
    rc = main(["gate", str(tmp_path / "gate"), "--run", "--quiet"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
