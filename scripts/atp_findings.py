"""Tables for docs/atp.md from a bench run with EAP and the AtP methods (read-only on the run).

    python -m bench run --models toy-gpt2-2l,toy-gpt2-4l,toy-llama-4l \\
        --methods 'eap,atp-qk,atp-graddrop,atp*' --tasks ioi,greater-than --sizes 16 --threads 1 --out runs/atp
    python scripts/atp_findings.py runs/atp

Per (model, task, method), against exact patching of every edge (scores = mean over the run's
prompt groups; units: the task's metric):

* Spearman rho on q and on k edges (from ``results.json``, 95% bootstrap CI over prompt groups);
* q/k error: sum |attribution - exact| / sum |exact| over all q and k edges;
* on the top 1% of edges by |exact| (at least one edge): how many are q/k edges, recall (share
  of them in the method's top 1% by |score|), error (sum |attribution - exact| / sum |exact| over
  them) and sign agreement;
* all edges: Spearman rho signed and on |values| (GradDrop's magnitudes are the paper's ranking).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def _ci(s: dict) -> str:
    return f"{s['value']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def rows(run: Path) -> list[list[str]]:
    results = json.loads((run / "results.json").read_text())
    out = []
    for c in sorted(results["cells"], key=lambda c: (c["model"], c["task"], c["method"] != "eap", c["method"])):
        edir = Path(c["exact"]["cache"])
        if not edir.is_absolute():
            edir = Path.cwd() / edir
        kinds = np.asarray(json.loads((edir / "edges.json").read_text())["kinds"])
        e = torch.load(edir / "exact.pt").double().mean(0).numpy()
        a = torch.load(run / "attr" / f"{c['id']}.pt").double().mean(0).numpy()
        qk = np.isin(kinds, ["q", "k"])
        k = max(1, int(round(0.01 * e.size)))
        top_e = np.argsort(-np.abs(e), kind="stable")[:k]
        top_a = np.argsort(-np.abs(a), kind="stable")[:k]
        recall = len(np.intersect1d(top_e, top_a)) / k
        err_top = np.abs(a[top_e] - e[top_e]).sum() / np.abs(e[top_e]).sum()
        sign_top = np.mean(np.sign(a[top_e]) == np.sign(e[top_e]))
        err_qk = np.abs(a[qk] - e[qk]).sum() / np.abs(e[qk]).sum()
        st = c["stats"]
        out.append([c["model"], c["task"], c["method"], _ci(st["spearman[q]"]), _ci(st["spearman[k]"]),
                    f"{err_qk:.2f}", f"{int(qk[top_e].sum())}/{k}", f"{recall:.2f}", f"{err_top:.2f}",
                    f"{sign_top:.2f}", f"{st['spearman']['value']:.2f}", f"{st['spearman_abs']['value']:.2f}"])
    return out


def main(run: str) -> None:
    head = ["model", "task", "method", "Spearman q", "Spearman k", "q/k error", "top-1%: q/k", "top-1% recall",
            "top-1% error", "top-1% sign", "Spearman all", "Spearman |all|"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows(Path(run)):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/atp")
