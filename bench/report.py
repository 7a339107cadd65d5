"""Tables of a run: ``results.csv`` (one row per cell, every number) and a markdown summary.

Columns: times in seconds, memory in MiB over the pre-call baseline, ``speedup`` = exact time
(extrapolated to all edges when edges were sampled) / attribution time; agreement statistics
are point estimates with 95% bootstrap CIs over prompt groups ``[lo, hi]``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

SUMMARY_STATS = ("spearman", "kendall", "pearson_abs", "recall@10", "recall@50", "recall@1%", "sign@10")


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}g}"
    return str(x)


def _ci(s: dict) -> str:
    v, lo, hi = s["value"], s["lo"], s["hi"]
    if not math.isfinite(v):
        return "–"
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{v:.2f}"


def edges_label(cell: dict) -> str:
    """'479' for exhaustive truth, '200/32,491 (sample)' for sampled edges."""
    if cell["n_edges_selected"] == cell["n_edges"]:
        return f"{cell['n_edges']:,}"
    return f"{cell['n_edges_selected']:,}/{cell['n_edges']:,} ({cell['edges_spec']})"


def rows(results: dict) -> list[dict[str, Any]]:
    out = []
    for c in results["cells"]:
        a, e = c["attribution"], c["exact"]
        row = {
            "model": c["model"], "task": c["task"], "n": c["n"], "method": c["method"], "seed": c["seed"],
            "edges_spec": c["edges_spec"], "n_edges": c["n_edges"], "n_edges_selected": c["n_edges_selected"],
            "groups": c["groups"], "attr_time_s": a["time_s"], "attr_repeats": a["repeats"],
            "attr_peak_mib": a["peak_mib"], "floor_s": a["floor_s"], "floor_ratio": a["floor_ratio"],
            "exact_time_s": e["time_s"], "exact_edges_per_s": e["edges_per_s"], "exact_peak_mib": e["peak_mib"],
            "speedup": c["speedup"],
        }
        for name, s in c["stats"].items():
            row[name] = s["value"]
            row[f"{name}_lo"] = s["lo"]
            row[f"{name}_hi"] = s["hi"]
        out.append(row)
    return out


def write_csv(results: dict, path: str | Path) -> None:
    rs = rows(results)
    keys: list[str] = []
    for r in rs:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rs)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def markdown(results: dict, worst: int = 5) -> str:
    """The summary printed after a run and saved as ``summary.md``."""
    cells = results["cells"]
    env = results.get("environment", {})
    parts = [
        "# eap-bench results",
        "",
        f"Task `{results['config']['task']}`, seed {results['config']['seed']}, device {env.get('device')}"
        f" ({env.get('cuda') or env.get('platform', '')}), torch {env.get('packages', {}).get('torch')},"
        f" commit {(env.get('git_commit') or 'none')[:10]}{' (dirty)' if env.get('git_dirty') else ''}.",
        "Scores are in metric units (mean over prompts of metric(patched) − metric(clean)); "
        "agreement is attribution vs exact patching per edge, with 95% bootstrap CIs over prompt groups.",
        "",
        "## Cost",
        "",
    ]
    body = []
    for c in cells:
        a, e = c["attribution"], c["exact"]
        body.append([
            c["model"], str(c["n"]), c["method"], edges_label(c), _f(a["time_s"]), _f(a["floor_ratio"], 2),
            _f(a["peak_mib"]), _f(e["time_s"]), _f(e["edges_per_s"]), _f(e["peak_mib"]), _f(c["speedup"]),
        ])
    parts.append(_table(["model", "n", "method", "edges", "attr s", "×floor", "attr MiB", "exact s",
                         "exact edges/s", "exact MiB", "speedup"], body))
    parts += ["", "## Agreement with exact patching", ""]
    body = [[c["model"], str(c["n"]), c["method"], edges_label(c)] + [_ci(c["stats"][s]) for s in SUMMARY_STATS]
            for c in cells]
    parts.append(_table(["model", "n", "method", "edges"] + list(SUMMARY_STATS), body))
    parts += ["", "## Spearman ρ by receiver type", ""]
    kinds = ["q", "k", "v", "mlp", "logits"]
    body = []
    for c in cells:
        body.append([c["model"], str(c["n"]), c["method"]] + [
            _ci(c["stats"][f"spearman[{k}]"]) + f" ({c['by_kind_n'].get(k, 0)})" if f"spearman[{k}]" in c["stats"] else "–"
            for k in kinds
        ])
    parts.append(_table(["model", "n", "method"] + [f"{k} (edges)" for k in kinds], body))
    if cells:
        parts += ["", "## Where attribution is most wrong (largest |attribution − exact|, largest n per model/method)", ""]
        best: dict[tuple, dict] = {}
        for c in cells:
            key = (c["model"], c["method"])
            if key not in best or c["n"] > best[key]["n"]:
                best[key] = c
        body = []
        for c in best.values():
            for w in c["worst"][:worst]:
                body.append([c["model"], c["method"], str(c["n"]), w["edge"], w["kind"], f"{w['attribution']:+.3g}",
                             f"{w['exact']:+.3g}", str(w["rank_exact"]), str(w["rank_attribution"])])
        parts.append(_table(["model", "method", "n", "edge", "kind", "attribution", "exact", "rank exact",
                             "rank attr"], body))
    return "\n".join(parts) + "\n"
