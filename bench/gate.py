"""The fidelity gate: check a run's agreement statistics against minimum thresholds.

Thresholds file (``bench/thresholds.json``)::

    {"schema_version": 1,
     "margin": {"spearman": 0.05, ...},           # how far below the measured value each rule sits
     "run": {"models": [...], "sizes": [...], ...},  # the cells ``gate --run`` computes
     "rules": [{"model": "toy-ioi-2l", "method": "eap", "n": 16,
                "min": {"spearman": 0.61, "recall@10": 0.6}, "measured": {...}}]}

A rule field left out (``model``, ``method``, ``n``, ``task``, ``edges_spec``) matches every
cell. Every rule must match at least one cell, otherwise it fails ("missing"). A statistic
passes when its point estimate is >= the minimum (NaN fails). Flags ``--min stat=value`` add a
rule that applies to every cell.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

DEFAULT_THRESHOLDS = Path(__file__).resolve().parent / "thresholds.json"
MATCH_KEYS = ("model", "method", "n", "task", "edges_spec")
DEFAULT_MARGIN = {"spearman": 0.05, "kendall": 0.05, "pearson": 0.05, "spearman_abs": 0.05,
                  "kendall_abs": 0.05, "pearson_abs": 0.05, "recall@10": 0.1, "recall@50": 0.1,
                  "recall@1%": 0.1, "sign@10": 0.1}


def load_thresholds(path: str | Path | None) -> dict[str, Any]:
    data = json.loads(Path(path or DEFAULT_THRESHOLDS).read_text())
    if data.get("schema_version") != 1:
        raise ValueError(f"{path}: unsupported thresholds schema {data.get('schema_version')!r}")
    return data


def _matches(rule: dict, cell: dict) -> bool:
    return all(k not in rule or rule[k] == cell.get(k) for k in MATCH_KEYS)


def check(cells: list[dict], rules: list[dict]) -> list[dict]:
    """One row per (rule, matching cell, statistic): measured value, minimum, pass."""
    rows = []
    for rule in rules:
        hit = [c for c in cells if _matches(rule, c)]
        if not hit:
            rows.append({"model": rule.get("model", "*"), "method": rule.get("method", "*"), "n": rule.get("n", "*"),
                         "stat": ",".join(rule["min"]), "value": float("nan"), "min": float("nan"),
                         "ok": False, "note": "missing: no cell matches this rule"})
            continue
        for c in hit:
            for stat, minimum in rule["min"].items():
                s = c["stats"].get(stat)
                v = float("nan") if s is None else s["value"]
                ok = math.isfinite(v) and v >= minimum
                rows.append({"model": c["model"], "method": c["method"], "n": c["n"], "stat": stat, "value": v,
                             "lo": s["lo"] if s else float("nan"), "min": minimum, "ok": ok,
                             "note": "" if s is not None else "statistic not in results"})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'model':<22} {'method':<16} {'n':>5} {'statistic':<12} {'measured':>9} {'min':>7}  result"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{str(r['model']):<22} {str(r['method']):<16} {str(r['n']):>5} {r['stat']:<12} "
                   f"{r['value']:>9.3f} {r['min']:>7.3f}  {'PASS' if r['ok'] else 'FAIL'} {r['note']}")
    n_fail = sum(not r["ok"] for r in rows)
    out.append(f"{len(rows) - n_fail}/{len(rows)} checks passed" + (f", {n_fail} FAILED" if n_fail else ""))
    return "\n".join(out)


def make_thresholds(results: dict, stats: list[str], margin: dict[str, float] | float,
                    run: dict | None = None) -> dict[str, Any]:
    """Thresholds from measured values: min = floor(measured - margin, 2 decimals) for every cell
    (statistics whose minimum would be <= 0 are left out)."""
    if not isinstance(margin, dict):
        margin = {s: float(margin) for s in stats}
    rules = []
    for c in results["cells"]:
        mins, measured = {}, {}
        for s in stats:
            v = c["stats"][s]["value"]
            m = math.floor((v - margin.get(s, DEFAULT_MARGIN.get(s, 0.05))) * 100) / 100 if math.isfinite(v) else 0
            if m > 0:  # a minimum at or below zero gates nothing
                measured[s] = round(v, 4)
                mins[s] = m
        rules.append({"model": c["model"], "task": c["task"], "method": c["method"], "n": c["n"],
                      "edges_spec": c["edges_spec"], "min": mins, "measured": measured})
    return {"schema_version": 1,
            "note": "min = measured point estimate - margin, rounded down to 0.01; regenerate with "
                    "`python -m bench thresholds RUN_DIR`",
            "margin": {s: margin.get(s, DEFAULT_MARGIN.get(s, 0.05)) for s in stats},
            "measured_on": results.get("environment", {}),
            "run": run or {},
            "rules": rules}
