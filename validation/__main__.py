"""CLI: exact edge patching with a progress bar, resumable results files, shards and merge.

    python -m validation --model toy-gpt2-4l --n 64 --seed 0 --edges all --out results/x.pt [--shard i/n]
    python -m validation --model random:gpt2-small --n 1024 --edges stratified:100 --memory-budget 2GiB
    python -m validation --model toy-gpt2-4l --edges all --intervention mean   # zero, mean, mean-positional
    python -m validation merge results/x.0.pt results/x.1.pt --out results/x.pt
    python -m validation --model toy-gpt2-4l --task greater-than --edges all   # or --task mypkg.tasks:my_task
    python -m validation certify --model toy-gpt2-4l --budget 300 --threshold 2% --out results/cert
    python -m validation circuit --model toy-gpt2-4l --graph circuit.json     # faithfulness of circuits
    python -m validation --model random:gpt2-small --edges all --executor ray [--address auto|ray://host:port]
        [--workers K] [--gpus-per-worker F]     # Ray workers (pip install 'eap-bench[ray]')

Memory is bounded by --memory-budget (default: half of the free memory), whatever --n is:
prompts are streamed in batches; each finished (receiver, prompt batch) unit is journalled.
With --executor ray the units are computed by Ray actors (each makes the model once) and
recorded here; the numbers and the results file are the same as with the local executor.
"""

from __future__ import annotations

import argparse
import sys

import torch

from eap.interventions import INTERVENTIONS
from validation.cli_commands import SUBCOMMANDS, add_task_args, dtype_arg as _dtype


def _edges_arg(spec: str):
    if spec.startswith("file:"):
        return [line.strip() for line in open(spec[5:]) if line.strip()]
    if "," in spec or spec.isdigit():
        return [int(x) if x.strip().isdigit() else x.strip() for x in spec.split(",") if x.strip()]
    return spec


def _summary(values: torch.Tensor, names: list[str], k: int = 10) -> str:
    done = ~torch.isnan(values)
    if not done.any():
        return "no edges measured"
    idx = done.nonzero().flatten()
    top = idx[values[idx].abs().argsort(descending=True)[:k]]
    lines = [f"{int(done.sum())} measured; top {len(top)} by |effect| (metric(patched) - metric(clean)):"]
    lines += [f"  {values[i].item():+.5f}  {names[i]}" for i in top.tolist()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import validation

    if argv[:1] and argv[0] in SUBCOMMANDS:  # certify, circuit (validation.cli_commands)
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv[:1] == ["merge"]:
        p = argparse.ArgumentParser(prog="python -m validation merge", description="merge shard results files")
        p.add_argument("paths", nargs="+")
        p.add_argument("--out", default=None, help="write the merged results file here")
        a = p.parse_args(argv[1:])
        values = validation.merge(a.paths, out=a.out)
        print(f"merged {len(a.paths)} shards: {int((~torch.isnan(values)).sum())} items" + (f" -> {a.out}" if a.out else ""))
        return 0

    p = argparse.ArgumentParser(prog="python -m validation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-gpt2-4l")
    p.add_argument("--n", type=int, default=64, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of sampled edge selections")
    add_task_args(p)
    p.add_argument("--prompt-type", default=None, help="IOI only (default: mixed)")
    p.add_argument("--metric", default=None, help="the task's metric (default: the task's raw metric)")
    p.add_argument("--edges", default="all", help="all | topk:K (needs --scores) | sample:K | stratified:K | "
                   "comma-separated indices/names | file:PATH (one name per line)")
    p.add_argument("--scores", default=None, help="graph file (.pt or .json) whose scores rank topk:K")
    p.add_argument("--nodes", action="store_true", help="patch sender nodes instead of edges")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--intervention", default="patching", choices=list(INTERVENTIONS),
                   help="what a patched sender output becomes: the corrupted run's (patching), zeros, or its mean "
                        "over the task's reference prompts (IOI: its ABC prompts), overall or per position")
    p.add_argument("--out", default=None, help="results file (resumed if it exists); default: the cache path")
    p.add_argument("--shard", default=None, help="i/n: only part i of n (whole receivers)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: from the memory budget)")
    p.add_argument("--memory-budget", default=None,
                   help="bytes or a size such as 2GiB, 512MiB: cache + patched forward stay within it "
                        "(default: half of the free device memory)")
    p.add_argument("--engine", default=None, choices=["auto", "fast", "bridge"],
                   help="auto: the fast block runner, or the bridge (hooks) where it lacks the architecture")
    p.add_argument("--method", default=None, choices=["auto", "fast", "hooks"], help=argparse.SUPPRESS)  # deprecated
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("executor", "where the units are computed (same numbers, same file either way)")
    g.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process; ray: Ray actors (pip install 'eap-bench[ray]')")
    g.add_argument("--address", default=None, help="Ray cluster: 'auto' (the one `ray start` runs here), host:port "
                   "or ray://host:port; default: start a local cluster")
    g.add_argument("--workers", type=int, default=None, help="Ray workers (default: as many as the cluster holds)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (fractions share one); default 1 when --device is CUDA, else 0")
    g.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs (torch threads) per Ray worker")
    a = p.parse_args(argv)
    if a.method is not None:
        if a.engine is not None:
            p.error("--method is the deprecated name of --engine: pass --engine only")
        a.engine = {"hooks": "bridge"}.get(a.method, a.method)
        print(f"warning: --method is deprecated, use --engine {a.engine}", file=sys.stderr)
    a.engine = a.engine or "auto"
    if a.executor != "ray":
        given = [f for f, v in (("--address", a.address), ("--workers", a.workers),
                                ("--gpus-per-worker", a.gpus_per_worker)) if v is not None]
        if given:
            p.error(f"{', '.join(given)} only apply to --executor ray")
    if a.threads:
        torch.set_num_threads(a.threads)
    executor = "local"
    if a.executor == "ray":
        from validation.executor import RayExecutor

        # before loading the model: a missing Ray or a bad address fails at once
        executor = RayExecutor(address=a.address, workers=a.workers, gpus_per_worker=a.gpus_per_worker,
                               cpus_per_worker=a.cpus_per_worker)
        executor.connect()
    try:
        return _run(a, executor)
    finally:
        if a.executor == "ray":
            executor.close()


def _run(a: argparse.Namespace, executor) -> int:
    import validation

    import eap
    from eap.graph import Graph

    model = eap.load_model(a.model, device=a.device, dtype=_dtype(a.dtype))
    graph = Graph.from_model(model)
    from eap.task import TaskError
    from validation.cli_commands import make_task

    if a.prompt_type is not None and a.task != "ioi":
        raise TaskError(f"--prompt-type is an IOI option; for --task {a.task!r} use --task-kwargs")
    extra = {k: v for k, v in (("prompt_type", a.prompt_type), ("metric", a.metric)) if v is not None}
    task = make_task(model, a, extra)
    scores = None
    if a.scores:
        read = Graph.from_json if a.scores.endswith(".json") else Graph.from_pt
        g = read(a.scores, model)  # a file recorded for another model is refused
        g.check_model(model)  # a graph file (ours or EAP-IG's/MIB's) of another model is refused
        scores = g.edge_scores()
    from eap.budget import parse_size

    budget = parse_size(a.memory_budget) if a.memory_budget is not None else None
    opts = validation.PatchOptions(scale=a.scale, batch_size=a.batch_size, memory_budget=budget, engine=a.engine,
                                   shard=a.shard, progress=not a.no_progress, executor=executor,
                                   intervention=a.intervention)
    stats: dict = {}
    if a.nodes:
        items = graph.select_senders(None if a.edges == "all" else _edges_arg(a.edges))
        kind, names = "nodes", graph.senders
    else:
        items = graph.select_edges(_edges_arg(a.edges), scores, a.seed)
        kind, names = "edges", graph.edge_names
    out = a.out
    if out is None:
        out = validation.default_path(model, graph, task, items, a.scale, kind)
        if a.intervention != "patching":
            out = out.with_name(out.stem + f".{a.intervention}.pt")
        if a.shard:
            out = out.with_name(out.stem + f".shard{a.shard.replace('/', 'of')}.pt")
    print(f"{a.model}: {graph}; task {task.name} n={task.n_prompts}; intervention {a.intervention}; "
          f"{len(items)} {kind} requested -> {out}")
    if a.nodes:
        values = validation.patch_nodes(model, graph, task, items, options=opts, out=out, stats=stats)
    else:
        values = validation.patch_edges(model, graph, task, items, options=opts, out=out, stats=stats)
    if stats.get("n_measured"):
        from validation.speed import forward_seconds

        fwd = forward_seconds(model, task)
        per_item = stats["patch_s"] / stats["n_measured"]
        if stats["executor"] != "local":
            print(f"{stats['executor']} executor: {stats['n_workers']} workers, {stats['n_units']} units in "
                  f"{stats['wall_s']:.1f}s wall ({stats['n_measured'] / max(stats['wall_s'], 1e-9):.1f} {kind}/s), "
                  f"{stats['n_units_retried']} units retried, {stats['workers_lost']} workers lost; worker-seconds below")
        print(f"measured {stats['n_measured']} {kind} in {stats['patch_s']:.1f}s ({stats['items_per_s']:.1f}/s, "
              f"engine {stats['engine']}, {stats['threads']} torch threads, {stats['n_batches']} prompt batches of {stats['prompts_per_batch']}, "
              f"{stats['rows_per_forward']} rows/forward, budget {stats['memory_budget'] / 2**30:.2f} GiB); "
              f"{per_item / fwd:.3f} forward-equivalents per {kind[:-1]}; setup {stats['setup_s']:.1f}s = "
              f"{stats['setup_s'] / fwd:.2f} plain forwards; fingerprint {stats['fingerprint_s']:.1f}s, "
              f"results file {stats['io_s']:.1f}s (one plain forward of the {task.n_prompts} prompts: {fwd:.3f}s)")
    print(_summary(values, names))
    return 0


def _cli() -> int:
    from eap.graph import GraphError
    from eap.hooks import HookError
    from eap.models import ModelLoadError
    from eap.task import TaskError
    from validation.patch import PatchError
    from eap.budget import BudgetError
    from validation.runner import UnsupportedModel
    from validation.store import StoreError
    from eap.interventions import InterventionError
    from validation.certify_stats import CertifyError
    from validation.circuit import CircuitError

    try:
        return main()
    except KeyboardInterrupt as exc:  # Ctrl-C: say what is saved (PatchInterrupted), no traceback
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return 130
    except (BudgetError, GraphError, HookError, ModelLoadError, TaskError, PatchError, StoreError,
            UnsupportedModel, InterventionError, CertifyError, CircuitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
