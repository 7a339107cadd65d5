"""Command line: ``python -m bench run|gate|thresholds|report``.

    python -m bench run --models toy-ioi-2l,random:gpt2-small --sizes 16,64 --methods eap,eap-ig \
        --edges sample:500 --out runs/mine
    python -m bench gate runs/mine                      # against bench/thresholds.json
    python -m bench gate --run                          # compute the cells the thresholds need
    python -m bench gate runs/mine --min spearman=0.5 --min recall@10=0.6
    python -m bench thresholds runs/mine --margin 0.05  # write thresholds from measured values
    python -m bench report runs/mine                    # redo tables and figures

Exit status: 0 on success; ``gate`` exits 1 when any check fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from bench import gate as gate_mod
from bench.matrix import Config, collect, run


def _list(text: str | None, conv=str):
    if text is None:
        return None
    return [conv(x) for x in text.replace(" ", ",").split(",") if x]


def _add_matrix_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file with Config keys (flags override it)")
    p.add_argument("--models", help="comma-separated: embedded names, random:<shape>[@seed], local dirs, HF names")
    p.add_argument("--sizes", help="comma-separated numbers of prompts, e.g. 16,64,256")
    p.add_argument("--methods", help="comma-separated: eap, eap-ig, clean-corrupted")
    p.add_argument("--task", help="task name (default ioi)")
    p.add_argument("--edges", help="'all' (exhaustive exact truth) or 'sample:K' / 'stratified:K'")
    p.add_argument("--seed", type=int)
    p.add_argument("--groups", type=int, help="prompt groups for the bootstrap (default 8)")
    p.add_argument("--repeats", type=int, help="timed repeats after one warm-up (0: no timing)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates (default 200)")
    p.add_argument("--ig-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="default: the model's (CUDA when available)")
    p.add_argument("--dtype", help="e.g. float32, float64, bfloat16")
    p.add_argument("--isolate", choices=["model", "job", "none"],
                   help="fresh process per model (default), per measurement, or none")
    p.add_argument("--cache-dir", help="where exact truth is cached (default <run>/cache)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _config(args: argparse.Namespace, base: dict | None = None) -> Config:
    over = dict(
        models=_list(args.models), sizes=_list(args.sizes, int), methods=_list(args.methods), task=args.task,
        edges=args.edges, seed=args.seed, groups=args.groups, repeats=args.repeats, bootstrap=args.bootstrap,
        ig_steps=args.ig_steps, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        isolate=args.isolate, cache_dir=args.cache_dir,
    )
    if args.no_figures:
        over["figures"] = False
    if args.quiet:
        over["progress"] = False
    over = {k: v for k, v in over.items() if v is not None}
    if args.config:
        return Config.from_file(args.config, **over)
    return Config(**{**(base or {}), **over})


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    results = run(cfg, out)
    print((out / "summary.md").read_text())
    st = results["run_stats"]
    print(f"run dir: {out}  ({time.perf_counter() - t0:.0f} s; cells computed {st['cells_computed']}, "
          f"reused {st['cells_reused']}; exact truths computed {st['exact_computed']}, reused {st['exact_reused']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.run_dir)
    cfg = Config(**json.loads((out / "config.json").read_text()))
    collect(cfg, out)
    print((out / "summary.md").read_text())
    return 0


def _parse_min(items: list[str]) -> dict[str, float]:
    mins = {}
    for item in items or []:
        stat, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--min wants stat=value, got {item!r}")
        mins[stat] = float(val)
    return mins


def cmd_gate(args: argparse.Namespace) -> int:
    rules: list[dict] = []
    thresholds = None
    if not args.min or args.thresholds:
        thresholds = gate_mod.load_thresholds(args.thresholds)
        rules += thresholds["rules"]
    if args.min:
        rules.append({"min": _parse_min(args.min)})
    if args.run_dir and not args.run:
        run_dir = Path(args.run_dir)
        if not (run_dir / "results.json").exists():
            print(f"{run_dir}: no results.json (run `python -m bench run --out {run_dir}` first)", file=sys.stderr)
            return 2
        cells = json.loads((run_dir / "results.json").read_text())["cells"]
    else:
        if thresholds is None or not thresholds.get("run"):
            print("gate --run needs a thresholds file with a 'run' section", file=sys.stderr)
            return 2
        spec = dict(thresholds["run"])
        spec.update(repeats=0, figures=False, isolate="none", progress=not args.quiet)
        if args.bootstrap is not None:
            spec["bootstrap"] = args.bootstrap
        cfg = Config(**spec)
        cells = run(cfg, Path(args.run_dir or "runs/gate"))["cells"]
    rows = gate_mod.check(cells, rules)
    print(gate_mod.table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_thresholds(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    stats = _list(args.stats)
    margin = float(args.margin) if args.margin is not None else dict(gate_mod.DEFAULT_MARGIN)
    run_spec = {k: v for k, v in results["config"].items()
                if k in ("models", "sizes", "methods", "task", "task_kwargs", "seed", "edges", "groups",
                         "bootstrap", "ig_steps", "batch_size", "device", "dtype")}
    data = gate_mod.make_thresholds(results, stats, margin, run_spec)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data['rules'])} rules to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="EAP vs exact patching benchmark")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run (or resume) a benchmark matrix")
    _add_matrix_flags(p)
    p.add_argument("--out", help="run directory (default runs/<timestamp>); re-running resumes it")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("gate", help="check agreement against thresholds; exit 1 on any failure")
    p.add_argument("run_dir", nargs="?", help="a run directory with results.json")
    p.add_argument("--thresholds", help=f"thresholds file (default {gate_mod.DEFAULT_THRESHOLDS})")
    p.add_argument("--min", action="append", metavar="STAT=VALUE", help="a minimum for every cell (repeatable)")
    p.add_argument("--run", action="store_true", help="compute the cells the thresholds file names (into run_dir)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates with --run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_gate)
    p = sub.add_parser("thresholds", help="write a thresholds file from a run's measured values")
    p.add_argument("run_dir")
    p.add_argument("--stats", default="spearman,kendall_abs,pearson_abs,recall@10")
    p.add_argument("--margin", help="one margin for every statistic (default: per-statistic, see bench/gate.py)")
    p.add_argument("--out", default=str(gate_mod.DEFAULT_THRESHOLDS))
    p.set_defaults(fn=cmd_thresholds)
    p = sub.add_parser("report", help="rebuild results.json/csv/md and figures of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
