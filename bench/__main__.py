"""Command line: ``python -m bench run|gate|thresholds|sensitivity|floor|report``.

    python -m bench run --models toy-gpt2-2l,random:gpt2-small --tasks ioi,mytasks:arith --sizes 16,64 \
        --methods eap,eap-ig,mymethods:fast_eap --edges sample:500 --out runs/mine
    python -m bench gate runs/mine                      # against bench/thresholds.json
    python -m bench gate --run                          # compute the cells the thresholds need
    python -m bench gate runs/mine --min spearman=0.5 --min recall@10=0.6
    python -m bench gate runs/mine --min cpr_gap=-0.2 --max cmd=0.3   # circuit faithfulness
    python -m bench gate runs/mine --intervention mean --min spearman=0.4   # thresholds per intervention
    python -m bench thresholds --run                    # = make thresholds (clean tree; see bench/gate.py)
    python -m bench sensitivity runs/gate               # smallest degradation the gate catches
    python -m bench floor --model random:gpt2-small     # EAP against the floors, interleaved
    python -m bench report runs/mine [--rescore]        # redo tables and figures

Exit status: 0 on success; ``gate`` exits 1 when any check fails; 2 on bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gate as gate_mod
from bench.gate import ThresholdError
from bench.matrix import DEFAULT_METHODS, METHOD_REGISTRY, REPO, Config, ConfigError, WorkerError, collect, default_tasks, rescore, run
from bench.plugins import PluginError
from eap.models import ModelLoadError
from eap.task import TaskError


def _list(text: str | None, conv=str):
    if text is None:
        return None
    return [conv(x) for x in text.replace(" ", ",").split(",") if x]


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object {...}")
    return value


def _add_matrix_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file with Config keys (flags override it)")
    p.add_argument("--models", help="comma-separated: embedded names, random:<shape>[@seed], local dirs, HF names")
    p.add_argument("--sizes", help="comma-separated numbers of prompts, e.g. 16,64,256")
    p.add_argument("--methods", help="comma-separated: " + ", ".join(m.describe() for m in METHOD_REGISTRY if m.builtin)
                   + " (quote atp* in a shell), module:function, or the name of an installed 'eap_bench.methods' "
                   "entry point; default " + ",".join(DEFAULT_METHODS))
    p.add_argument("--interventions", help="comma-separated: patching (default), zero, mean, mean-positional "
                   "(eap.interventions): a matrix axis; methods that need corrupted prompts run under patching only")
    p.add_argument("--tasks", help="comma-separated tasks: built-in names (eap.tasks.TASKS), module:function "
                   "(called as fn(model, n, seed=..., **task_kwargs) -> eap.Task), or 'eap_bench.tasks' entry points")
    p.add_argument("--task", help="a single task (same as --tasks with one entry)")
    p.add_argument("--task-kwargs", type=_json, help="JSON keyword arguments of the task builder; with several "
                   "tasks a JSON object per task: '{\"ioi\": {\"prompt_type\": \"BABA\"}}'")
    p.add_argument("--method-kwargs", type=_json, help="JSON object {method: {kwarg: value}} for plug-in methods")
    p.add_argument("--edges", help="'all' (exhaustive exact truth) or 'sample:K' / 'stratified:K'")
    p.add_argument("--seed", type=int)
    p.add_argument("--groups", type=int, help="prompt groups for the bootstrap (default 8)")
    p.add_argument("--repeats", type=int, help="timed repeats after one warm-up (0: no timing)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates (default 200)")
    p.add_argument("--ig-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--memory-budget", help="bytes or a size such as 2GiB for attribution and exact patching in the "
                   "workers (default: half of the free device memory; eap.budget)")
    p.add_argument("--device", help="default: the model's (CUDA when available)")
    p.add_argument("--dtype", help="e.g. float32, float64, bfloat16")
    p.add_argument("--threads", type=int, help="torch CPU threads in the workers (1: steadier timings under load)")
    p.add_argument("--isolate", choices=["model", "job", "none"],
                   help="fresh process per model (default), per measurement, or none")
    p.add_argument("--cache-dir", help="where exact truth is cached (default <run>/cache)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where exact truth is computed: this process (default) or Ray workers "
                        "(pip install 'eap-bench[ray]'); the numbers are the same")
    p.add_argument("--address", dest="ray_address", help="Ray cluster for --executor ray: auto, host:port or "
                   "ray://host:port (default: a local cluster)")
    p.add_argument("--workers", dest="ray_workers", type=int, help="Ray workers (default: as many as the cluster holds)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray worker (default 1 on CUDA, else 0)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-faithfulness", action="store_true",
                   help="skip the circuit faithfulness curves (CPR/CMD; see docs/faithfulness.md)")
    p.add_argument("--quiet", action="store_true")


def _config(args: argparse.Namespace, base: dict | None = None) -> Config:
    if args.task and args.tasks:
        raise SystemExit("give --task or --tasks, not both")
    over = dict(
        models=_list(args.models), sizes=_list(args.sizes, int), methods=_list(args.methods),
        tasks=[args.task] if args.task else _list(args.tasks), task_kwargs=args.task_kwargs,
        method_kwargs=args.method_kwargs, edges=args.edges, seed=args.seed, groups=args.groups, repeats=args.repeats, bootstrap=args.bootstrap,
        ig_steps=args.ig_steps, batch_size=args.batch_size, device=args.device, dtype=args.dtype, threads=args.threads,
        isolate=args.isolate, cache_dir=args.cache_dir, executor=args.executor, ray_address=args.ray_address,
        ray_workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
        interventions=_list(getattr(args, "interventions", None)),
        memory_budget=getattr(args, "memory_budget", None),
    )
    if args.no_figures:
        over["figures"] = False
    if args.no_faithfulness:
        over["faithfulness"] = False
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
    if args.rescore:
        rescore(cfg, out)
    else:
        collect(cfg, out)
    print((out / "summary.md").read_text())
    return 0


def _parse_pairs(items: list[str] | None, flag: str) -> dict[str, float]:
    """--min/--max/--floor/--band items, checked (``bench.gate.parse_bounds``; bad input exits 2)."""
    return gate_mod.parse_bounds(items, flag)


def _gate_run_spec(thresholds: dict | None) -> dict:
    """The cells ``gate --run`` computes: the thresholds file's ``run`` section, or the project's."""
    if thresholds is not None and thresholds.get("run"):
        return dict(thresholds["run"])
    return {**gate_mod.GATE_RUN, "tasks": default_tasks()}


def _run_gate_cells(spec: dict, run_dir: Path, quiet: bool, bootstrap: int | None = None,
                    rules: list[dict] | None = None) -> dict:
    """Compute the gate's cells; circuit faithfulness curves only when a rule gates them."""
    from bench.faithfulness import gated

    spec = dict(spec)
    spec.update(repeats=0, figures=False, isolate="none", progress=not quiet)
    spec.setdefault("faithfulness", gated(rules or []))
    if bootstrap is not None:
        spec["bootstrap"] = bootstrap
    return run(Config(**spec), run_dir)


def cmd_gate_certify(args: argparse.Namespace) -> int:
    """``gate --certify PATH...``: fail when a certificate bounds more than --max-missed misses."""
    try:
        rows = gate_mod.check_certificates(args.certify, args.max_missed, args.confidence)
    except (gate_mod.ThresholdError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(gate_mod.certificate_table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_gate(args: argparse.Namespace) -> int:
    if args.certify:
        return cmd_gate_certify(args)
    rules: list[dict] = []
    thresholds = None
    adhoc = bool(args.min or args.max)
    if not adhoc or args.thresholds:
        thresholds = gate_mod.load_thresholds(args.thresholds)
        rules += thresholds["rules"]
    if adhoc:
        rule = {"min": _parse_pairs(args.min, "--min"), "max": _parse_pairs(args.max, "--max")}
        if args.intervention:  # thresholds per intervention
            rule["intervention"] = args.intervention
        rules.append(rule)
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
        cells = _run_gate_cells(thresholds["run"], Path(args.run_dir or "runs/gate"), args.quiet, args.bootstrap,
                                rules)["cells"]
    if not adhoc:
        gate_mod.require_matches(cells, rules, f"the thresholds file {args.thresholds or gate_mod.DEFAULT_THRESHOLDS}")
    rows = gate_mod.check(cells, rules)
    print(gate_mod.table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def _git_dirty() -> str | None:
    """None for a clean git tree, else what makes it dirty (or why it cannot be told)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run git: {exc}"
    if out.returncode != 0:
        return f"not a git checkout ({out.stderr.strip()})"
    lines = out.stdout.splitlines()
    return None if not lines else f"{len(lines)} changed/untracked paths, e.g. {', '.join(l[3:] for l in lines[:5])}"


def cmd_thresholds(args: argparse.Namespace) -> int:
    if bool(args.run) == bool(args.run_dir):
        raise SystemExit("give a RUN_DIR or --run (compute the gate's cells now), not both")
    stats = _list(args.stats)
    if args.run:
        dirty = _git_dirty()
        if dirty and not args.allow_dirty:
            print(f"refusing to make thresholds from a dirty tree ({dirty}); commit first, or --allow-dirty "
                  "for a trial file", file=sys.stderr)
            return 2
        spec = _gate_run_spec(None)  # the project's gate cells (bench.gate.GATE_RUN, default tasks)
        with tempfile.TemporaryDirectory(prefix="eap-bench-thresholds-") as tmp:
            results = _run_gate_cells(spec, Path(tmp) / "run", args.quiet)
        run_spec = spec
    else:
        run_dir = Path(args.run_dir)
        results = json.loads((run_dir / "results.json").read_text())
        if results.get("environment", {}).get("git_dirty") and not args.allow_dirty:
            print(f"{run_dir} was run from a dirty tree; thresholds come from a clean one (or pass --allow-dirty)",
                  file=sys.stderr)
            return 2
        run_spec = {k: v for k, v in results["config"].items()
                    if k in ("models", "sizes", "methods", "tasks", "task_kwargs", "method_kwargs", "seed", "edges",
                             "groups", "bootstrap", "ig_steps", "batch_size", "device", "dtype", "threads")}
    data = gate_mod.make_thresholds(results, stats, _parse_pairs(args.floor, "--floor"),
                                    _parse_pairs(args.band, "--band"), run_spec, args.allow_below_floor)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data['rules'])} rules to {args.out} (floor {data['floor']}, band {data['band']})")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    thresholds = gate_mod.load_thresholds(args.thresholds)
    rows = gate_mod.sensitivity(args.run_dir, thresholds["rules"], _list(args.methods), args.steps)
    print(gate_mod.sensitivity_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def cmd_floor(args: argparse.Namespace) -> int:
    """Attribution vs the floors, interleaved in this process (see bench.measure)."""
    import torch

    import eap
    from bench.measure import bridge_floor_pass, floor_pass, full_logits, median, time_interleaved
    from bench.plugins import build_task, call_method, resolve_method, resolve_task

    if args.threads:
        torch.set_num_threads(args.threads)
    model = eap.load_model(args.model, device=args.device)
    graph = eap.Graph.from_model(model)
    task = build_task(resolve_task(args.task), model, args.n, args.seed, args.task_kwargs)
    method = resolve_method(args.method)
    fns = {"floor (readout)": lambda: floor_pass(model, task),
           f"{args.method} (readout)": lambda: call_method(method, model, graph, task)}
    if task.has_readout:
        ft = full_logits(task)
        fns.update({"floor (full logits)": lambda: floor_pass(model, ft),
                    f"{args.method} (full logits)": lambda: call_method(method, model, graph, ft)})
    fns["bridge floor (full logits)"] = lambda: bridge_floor_pass(model, task)
    if not task.has_readout:
        fns = {k.replace("(readout)", "(full logits)"): v for k, v in fns.items()}
    times = time_interleaved(fns, args.repeats, warmup=1, device=next(model.parameters()).device)
    med = {k: median(v) for k, v in times.items()}
    kind = "readout" if task.has_readout else "full logits"
    print(f"{args.model}, task {args.task}, n={args.n}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:<28} {v:8.3f} s")
    print(f"{args.method} / floor ({kind}): {med[f'{args.method} ({kind})'] / med[f'floor ({kind})']:.2f}x")
    if task.has_readout:
        print(f"{args.method} / floor (full logits): "
              f"{med[f'{args.method} (full logits)'] / med['floor (full logits)']:.2f}x")
    print(f"bridge floor / floor ({kind}): {med['bridge floor (full logits)'] / med[f'floor ({kind})']:.2f}x")
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
    p.add_argument("--min", action="append", metavar="STAT=VALUE", help="a minimum for every cell (repeatable), "
                   "e.g. spearman=0.5 or cpr_gap=-0.2 (circuit faithfulness gaps: higher is better, 0 = exact ranking)")
    p.add_argument("--max", action="append", metavar="STAT=VALUE", help="a maximum for every cell (repeatable), "
                   "e.g. cmd=0.3")
    p.add_argument("--intervention", help="apply --min/--max only to cells of this intervention "
                   "(patching, zero, mean, mean-positional)")
    p.add_argument("--run", action="store_true", help="compute the cells the thresholds file names (into run_dir)")
    p.add_argument("--bootstrap", type=int, help="bootstrap replicates with --run")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--certify", nargs="+", metavar="CERT", help="gate certificates instead (files or directories of "
                   "`python -m validation certify --json` output): fail when one bounds more than --max-missed "
                   "unsampled edges above its tau")
    p.add_argument("--max-missed", type=int, default=0, help="with --certify: misses allowed by the upper bound (M)")
    p.add_argument("--confidence", type=float, help="with --certify: the least confidence a certificate must state")
    p.set_defaults(fn=cmd_gate)
    p = sub.add_parser("thresholds", help="write a thresholds file by the protocol (bench/gate.py)")
    p.add_argument("run_dir", nargs="?", help="a run directory to take the measured values from")
    p.add_argument("--run", action="store_true", help="compute the gate's cells now (what `make thresholds` does)")
    p.add_argument("--stats", default=",".join(gate_mod.GATED_STATS))
    p.add_argument("--floor", action="append", metavar="STAT=VALUE", help="override an absolute quality floor")
    p.add_argument("--band", action="append", metavar="STAT=VALUE", help="override a regression band")
    p.add_argument("--allow-dirty", action="store_true", help="allow a dirty git tree (trial files only)")
    p.add_argument("--allow-below-floor", action="store_true",
                   help="gate statistics already below the floor by their band only (listed in the file)")
    p.add_argument("--out", default=str(gate_mod.DEFAULT_THRESHOLDS))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_thresholds)
    p = sub.add_parser("sensitivity", help="the smallest degradation of the attribution that fails the gate")
    p.add_argument("run_dir")
    p.add_argument("--thresholds", help=f"thresholds file (default {gate_mod.DEFAULT_THRESHOLDS})")
    p.add_argument("--methods", help="methods to degrade, one at a time (default: every method of the run)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(fn=cmd_sensitivity)
    p = sub.add_parser("floor", help="time a method against the floors (bare model, same read-out), interleaved")
    p.add_argument("--model", default="random:gpt2-small")
    p.add_argument("--task", default="ioi")
    p.add_argument("--task-kwargs", type=_json)
    p.add_argument("--method", default="eap")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device")
    p.set_defaults(fn=cmd_floor)
    p = sub.add_parser("report", help="rebuild results.json/csv/md and figures of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--rescore", action="store_true", help="recompute every cell's agreement from its files")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, PluginError, ThresholdError, WorkerError, ModelLoadError, TaskError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
