"""Tables of a run: ``results.csv`` (one row per cell, every number) and a markdown summary.

Cost columns (times in seconds, memory in MiB over the pre-call baseline):

* ``floor``: which floor the attribution is compared with: ``readout`` (the task reads a few
  logits; the floor reads the same) or ``full-logits`` (see ``bench.measure``);
* ``×floor``: attribution median / floor median, measured interleaved; ``×floor full`` the same
  with the task's read-out stripped (both the method and the floor compute all logits), for
  tasks with a read-out;
* ``exact warm s``: exact patching's patched forwards of the selected edges, a second (warm) call
  on all prompts with no results file; ``exact setup+I/O s``: caching forwards, fingerprint and
  results-file I/O of a real run; ``fwd-eq/edge``: patched-forward seconds per edge / one plain
  forward of the prompts;
* ``speed-up (warm/warm)``: exact warm setup + patched forwards scaled to every edge of the graph,
  over the attribution's warm median.

Agreement statistics are point estimates with 95% bootstrap CIs over prompt groups ``[lo, hi]``.

Circuit faithfulness (``bench.faithfulness``; in ``results.csv`` as statistics with ``_lo``/``_hi``):
``cpr``, ``cmd`` (MIB), ``cpr_abs``, the exact ranking's ``oracle_cpr`` / ``oracle_cmd`` /
``oracle_cpr_abs`` and the gaps ``cpr_gap``, ``cmd_gap``, ``cpr_abs_gap``, ``curve_gap`` (higher is
better, 0 = the exact ranking), with 95% bootstrap CIs over prompts (circuits fixed); cost columns
``faith_circuits`` (circuits of the method's curves), ``faith_fwd_eq_per_circuit`` (one circuit
evaluation / one plain forward of the prompts), ``faith_curve_fwd_eq`` (their product: the cost of
the method's curves in forward-equivalents), ``faith_eval_s`` (the curves of every ranking of the
cell's model/task/n, one call).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

SUMMARY_STATS = ("spearman", "kendall", "pearson_abs", "recall@10", "recall@50", "recall@1%", "sign@10")
FAITH_STATS = ("cpr", "cmd", "cpr_abs", "oracle_cpr", "oracle_cmd", "cpr_gap", "cmd_gap", "curve_gap")


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits and ``._-``
    become ``_``, at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80]


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


def _full(a: dict, key: str) -> float:
    return (a.get("full_logits") or {}).get(key, float("nan"))


def rows(results: dict) -> list[dict[str, Any]]:
    out = []
    for c in results["cells"]:
        a, cost = c["attribution"], c["exact"]["cost"]
        cold = c["exact"].get("cold", {})
        row = {
            "model": c["model"], "task": c["task"], "n": c["n"], "method": c["method"], "seed": c["seed"],
            "edges_spec": c["edges_spec"], "n_edges": c["n_edges"], "n_edges_selected": c["n_edges_selected"],
            "groups": c["groups"], "attr_engine": a.get("engine"), "attr_time_s": a["time_s"], "attr_repeats": a["repeats"],
            "attr_peak_mib": a["peak_mib"], "floor_kind": a.get("floor_kind"), "floor_s": a["floor_s"],
            "floor_ratio": a["floor_ratio"], "floor_peak_mib": a.get("floor_peak_mib"),
            "full_logits_time_s": _full(a, "time_s"), "full_logits_floor_s": _full(a, "floor_s"),
            "full_logits_floor_ratio": _full(a, "floor_ratio"),
            "exact_warm_compute_s": cost["compute_s"], "exact_setup_io_s": cost["setup_io_s"],
            "exact_all_edges_s": cost["all_edges_s"], "exact_fwd_eq_per_edge": cost["fwd_eq_per_edge"],
            "exact_edges_per_s": cost["edges_per_s"], "exact_warm_peak_mib": cost["peak_mib"],
            "exact_cold_wall_s": cost["cold_wall_s"], "exact_cold_peak_mib": cold.get("peak_mib"),
            "speedup_warm": c["speedup"],
        }
        faith = c.get("faithfulness")
        if faith:
            cost = faith.get("cost") or {}
            row.update(faith_stale=bool(faith.get("stale")), faith_circuits=faith.get("n_circuits"),
                       faith_fwd_eq_per_circuit=cost.get("fwd_eq_per_circuit"),
                       faith_curve_fwd_eq=cost.get("curve_fwd_eq"), faith_eval_s=cost.get("eval_s"))
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


def _speedup(x: float) -> str:
    return f"{x:,.0f}×" if math.isfinite(x) and x >= 10 else (f"{x:.2g}×" if math.isfinite(x) else "–")


def markdown(results: dict, worst: int = 5) -> str:
    """The summary printed after a run and saved as ``summary.md``."""
    cells = results["cells"]
    env = results.get("environment", {})
    cfg = results["config"]
    tasks = cfg.get("tasks") or [cfg.get("task")]
    parts = [
        "# eap-bench results",
        "",
        f"Tasks {', '.join(f'`{t}`' for t in tasks)}, seed {cfg['seed']}, device {env.get('device')}"
        f" ({env.get('cuda') or env.get('platform', '')}), torch {env.get('packages', {}).get('torch')},"
        f" {env.get('torch_threads')} torch thread(s),"
        f" commit {(env.get('git_commit') or 'none')[:10]}{' (dirty)' if env.get('git_dirty') else ''}.",
        "Scores are in metric units (mean over prompts of metric(patched) − metric(clean)); "
        "agreement is attribution vs exact patching per edge, with 95% bootstrap CIs over prompt groups.",
        "",
        "## Cost",
        "",
        "Engine: the one `eap.attribute` reported (fast or bridge; results.json says why the bridge). Times in s "
        "(attribution: median of interleaved repeats; ×floor: against the bare model's corrupted forward + clean "
        "forward + backward with the same read-out; ×floor full: both with full logits). "
        "Exact: warm patched forwards of the selected edges; setup+I/O: caching forwards, fingerprint and "
        "results files; speed-up: warm exact for all edges / warm attribution. MiB over the pre-call baseline.",
        "",
    ]
    body = []
    for c in cells:
        a, cost = c["attribution"], c["exact"]["cost"]
        body.append([
            c["model"], c["task"], str(c["n"]), c["method"], edges_label(c), str(a.get("engine", "–")),
            str(a.get("floor_kind", "–")), _f(a["time_s"]), _f(a["floor_ratio"], 2), _f(_full(a, "floor_ratio"), 2),
            _f(a["peak_mib"]), _f(cost["compute_s"]), _f(cost["setup_io_s"]), _f(cost["fwd_eq_per_edge"], 2),
            _f(cost["peak_mib"]), _speedup(c["speedup"]),
        ])
    parts.append(_table(["model", "task", "n", "method", "edges", "engine", "floor", "attr s", "×floor", "×floor full",
                         "attr MiB", "exact warm s", "exact setup+I/O s", "fwd-eq/edge", "exact MiB",
                         "speed-up (warm/warm)"], body))
    parts += ["", "## Agreement with exact patching", ""]
    body = [[c["model"], c["task"], str(c["n"]), c["method"], edges_label(c)] + [_ci(c["stats"][s]) for s in SUMMARY_STATS]
            for c in cells]
    parts.append(_table(["model", "task", "n", "method", "edges"] + list(SUMMARY_STATS), body))
    faith = [c for c in cells if c.get("faithfulness")]
    if faith:
        parts += ["", "## Circuit faithfulness (MIB CPR / CMD; the exact ranking as reference)", "",
                  "Circuits of each method's top-k edges, evaluated exactly (every other edge patched), normalised "
                  "to 1 = full model, 0 = corrupted run. CPR: area under the curve of the edges that most support "
                  "the clean behaviour, CMD: area between the |score| curve and 1, over 0.1%–100% of the edges "
                  "(MIB); exact: the same for the exact patching ranking. Gaps: method − exact (CMD: exact − "
                  "method), higher is better, 0 = as good as the exact ranking. 95% CIs over prompts, circuits "
                  "fixed. Cost: circuit evaluations of the method's curves × forward-equivalents each.",
                  ""]
        body = []
        for c in faith:
            f = c["faithfulness"]
            cost = f.get("cost") or {}
            stale = " (stale)" if f.get("stale") else ""
            body.append([c["model"], c["task"], str(c["n"]), c["method"] + stale, edges_label(c)]
                        + [_ci(c["stats"][s]) if s in c["stats"] else "–" for s in FAITH_STATS]
                        + [f"{f.get('n_circuits', '–')} × {_f(cost.get('fwd_eq_per_circuit'), 2)}"])
        parts.append(_table(["model", "task", "n", "method", "edges", "CPR", "CMD", "CPR abs", "exact CPR",
                             "exact CMD", "CPR gap", "CMD gap", "curve gap", "cost (circuits × fwd-eq)"], body))
    parts += ["", "## Spearman ρ by receiver type", ""]
    kinds = ["q", "k", "v", "mlp", "logits"]
    body = []
    for c in cells:
        body.append([c["model"], c["task"], str(c["n"]), c["method"]] + [
            _ci(c["stats"][f"spearman[{k}]"]) + f" ({c['by_kind_n'].get(k, 0)})" if f"spearman[{k}]" in c["stats"] else "–"
            for k in kinds
        ])
    parts.append(_table(["model", "task", "n", "method"] + [f"{k} (edges)" for k in kinds], body))
    if cells:
        parts += ["", "## Where attribution is most wrong (largest |attribution − exact|, largest n per model/task/method)", ""]
        best: dict[tuple, dict] = {}
        for c in cells:
            key = (c["model"], c["task"], c["method"])
            if key not in best or c["n"] > best[key]["n"]:
                best[key] = c
        body = []
        for c in best.values():
            for w in c["worst"][:worst]:
                body.append([c["model"], c["task"], c["method"], str(c["n"]), w["edge"], w["kind"],
                             f"{w['attribution']:+.3g}", f"{w['exact']:+.3g}", str(w["rank_exact"]),
                             str(w["rank_attribution"])])
        parts.append(_table(["model", "task", "method", "n", "edge", "kind", "attribution", "exact", "rank exact",
                             "rank attr"], body))
    return "\n".join(parts) + "\n"
