"""Exact activation patching of edges and nodes: batched across edges, streamed over prompts.

Sign and units (same as ``eap.attribute``): the effect of edge u -> v is

    mean over prompts of  metric(patched) - metric(clean)       [metric units]

where "patched" is the clean run in which receiver v's input (only v's: one head's q, k or v
input, one MLP input, or the logits' residual) is replaced by
``clean_input_v + scale * (out_u(corrupted) - out_u(clean))``, everything else clean, the change
propagating downstream. ``scale=1`` is ordinary noising. Node patching replaces sender u's output
by ``clean_u + scale * (corrupted_u - clean_u)`` in the residual stream (all its receivers).

Memory: a budget, not the number of prompts
-------------------------------------------
Prompts are streamed in batches (``eap.budget.plan_patching`` picks the batch size and the
copies per forward from ``memory_budget``). For each prompt batch:

1. setup: one corrupted forward (sender outputs into a difference buffer, stopped after the
   last sender) and one clean forward (buffer -= clean sender outputs, clean residuals kept,
   stopped before the unembedding), through the model's hooks; only this batch is cached;
2. every unit of the batch (:class:`Unit`: the requested edges into one receiver, or the
   requested senders of one node group) is computed by :func:`compute_unit`, a plain function
   of the job, the batch's evaluator and the unit (an executor in another process can call it),
   and recorded in the results store at once (``validation.store``: resumable per unit). Who
   computes the units is the executor's choice (``validation.executor``: this process, or Ray
   workers that pull them); the numbers and the file are the same.

The per-item sums over each batch's prompts are float64; an item's value is their sum over the
batches divided by the number of prompts, so the result equals the unbatched one to float64
rounding whatever the batch size.

How a unit is computed fast (stacked copies, the block runner from the receiver's layer, only
the read-out logits): see ``validation.units``.

Metrics that close over the prompts
-----------------------------------
A metric that indexes tensors of all ``n`` prompts it closed over (``metric(logits)`` with fixed
``io``/``s`` answer ids) cannot see a subset of the prompts (``Task.subset_problem``). Exact
patching then caches all prompts as one batch and calls the metric once per patched copy on all
of them; if the budget cannot hold that, a ``TaskError`` says so and asks for ``per_prompt`` data.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.budget import BudgetError, PatchPlan, held_bytes, plan_patching, resolve_budget
from eap.graph import Graph
from eap.hooks import check_edge_hooks, require_edge_hooks
from eap.interventions import replacement_for
from eap.task import Task, TaskError
from validation.errors import PatchError
from validation.executor import resolve_executor
from validation.options import PatchOptions, PatchStats, path_name, resolve_engine
from validation.runner import BlockRunner, UnsupportedModel, refuse_hooks_for_post_norms
from validation.store import ResultStore, describe_request, fingerprint_of, fingerprint_parts
from validation.units import PatchJob, Unit, item_weights, unit_keys
from validation.units import compute_unit, prepare_batch  # noqa: F401  (re-exported: where they used to live)


# ------------------------------------------------------------------------------ planning
def shard_groups(keys: Int[Tensor, " k"], weights: Float[Tensor, " k"], i: int, n: int) -> Tensor:
    """Boolean mask of the items in shard ``i`` of ``n``: whole groups (same key) are assigned,
    heaviest first, each to the least-loaded shard (deterministic)."""
    uniq = keys.unique()
    w = torch.stack([weights[keys == u].sum() for u in uniq]) if len(uniq) else torch.zeros(0)
    order = sorted(range(len(uniq)), key=lambda j: (-float(w[j]), int(uniq[j])))
    load = [0.0] * n
    mine = []
    for j in order:
        s = min(range(n), key=lambda t: (load[t], t))
        load[s] += float(w[j])
        if s == i:
            mine.append(int(uniq[j]))
    return torch.isin(keys, torch.tensor(mine, dtype=keys.dtype))


def _check_inputs(model: Any, graph: Graph, task: Task, scale: float) -> None:
    if not isinstance(graph, Graph):
        raise PatchError(f"graph must be an eap.Graph, got {type(graph).__name__}")
    if not isinstance(task, Task):
        raise PatchError(f"task must be an eap.Task, got {type(task).__name__}")
    graph.check_model(model)
    check_edge_hooks(model, graph)
    task.check_tokens(model.cfg.d_vocab, getattr(model.cfg, "n_ctx", None))
    if not math.isfinite(float(scale)):
        raise PatchError(f"scale must be finite, got {scale}")


def resolve_options(model: Any, options: PatchOptions | None, overrides: dict) -> PatchOptions:
    """The call's options (``options`` with the keyword arguments given), with the memory budget
    resolved to bytes for the model's device, once, here at the public boundary."""
    opts = PatchOptions.of(options, **overrides)
    device = next(model.parameters()).device
    return replace(opts, memory_budget=resolve_budget(opts.memory_budget, device))


def prepare_call(model: Any, task: Task, engine: str, batch_size: int | None, readout: bool | None,
                 what: str) -> tuple[Task, BlockRunner | None, bool]:
    """Checks and choices shared by exact patching and circuit evaluation: ``engine`` ('auto',
    'fast', 'bridge'; the deprecated 'hooks' = 'bridge') and ``batch_size``, the task on the
    model's device, whether to read out only the needed logits, and the block runner (None: the
    hook path through the bridge; 'auto' falls back to it with a warning naming what the runner
    lacks)."""
    engine = resolve_engine(engine)
    if batch_size is not None and int(batch_size) < 1:
        raise PatchError(f"batch_size (prompts per batch) must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    if task.clean.device != device:
        task = task.to(device)
    use_readout = task.has_readout if readout is None else bool(readout)
    if use_readout and not task.has_readout:
        raise TaskError(f"task {task.name!r} has no readout; pass readout=None or False")
    runner = None
    if engine in ("auto", "fast"):
        try:
            runner = BlockRunner(model)
        except UnsupportedModel as exc:
            if engine == "fast":
                raise
            require_edge_hooks(model, str(exc))  # a model without edge hooks has no hook path to fall back to
            refuse_hooks_for_post_norms(model, what, exc)
            warnings.warn(f"{exc}; using the (slower) hook-based {what} path")
    else:
        require_edge_hooks(model)
        refuse_hooks_for_post_norms(model, what)
    return task, runner, use_readout and runner is not None


def plan_for_task(task: Task, d_vocab: int, batch_size: int | None,
                  plan: Callable[[bool, int | None], PatchPlan]) -> PatchPlan:
    """The prompt batches of a job over ``task``: ``plan(whole_task, prompts_per_batch)`` (an
    ``eap.budget`` planner) with the metric's needs: one batch of all prompts for a metric that
    cannot take a subset (a ``TaskError`` if ``batch_size`` splits them or the budget cannot
    hold them all). An explicit ``batch_size`` whose plan exceeds the budget is kept, with a
    warning (the budget only chooses the batch size when none is given)."""
    n = task.n_prompts
    problem = task.subset_problem(d_vocab) if n > 1 else None
    if problem is not None and batch_size is not None and batch_size < n:
        raise TaskError(
            f"{problem}: the metric seems to close over data of all {n} prompts, but batch_size={batch_size} "
            "splits them. Pass the per-prompt data through Task(per_prompt=...) or leave batch_size unset."
        )
    try:
        got = plan(problem is not None, batch_size)
    except BudgetError as exc:  # the whole task does not fit the budget
        raise TaskError(f"{problem}. {exc}") from exc
    if batch_size is not None and got.peak_bytes > got.budget:
        warnings.warn(f"batch_size={batch_size} prompts per batch needs about {got.peak_bytes / 2**20:.0f} MiB, more "
                      f"than the memory budget of {got.budget / 2**20:.0f} MiB: using it anyway (leave batch_size "
                      "unset to let the budget choose, or raise memory_budget)", stacklevel=4)
    return got


def _plan(model: Any, graph: Graph, task: Task, *, runner: BlockRunner | None, use_readout: bool,
          max_copies: int, batch_size: int | None, budget: int) -> PatchPlan:
    """The prompt batches and copies per forward (``eap.budget.plan_patching``), with the
    metric's needs (:func:`plan_for_task`)."""
    kw = dict(readout=use_readout, residuals=runner is not None, hooks=runner is None, max_copies=max_copies,
              budget=budget, fixed_bytes=held_bytes(runner, model) if runner is not None else 0)
    return plan_for_task(task, model.cfg.d_vocab, batch_size, lambda whole, nb: plan_patching(
        model, graph.n_senders, task.n_prompts, task.seq_len, whole_task=whole, prompts_per_batch=nb, **kw))


# ------------------------------------------------------------------------------ engine
class PatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during exact patching: the message says how many units are saved and how to resume."""


@dataclass
class _Request:
    """One exact-patching call: what is measured (``kind``, requested ``items`` of ``n_items``,
    the sender each item patches) and how (``opts``, memory budget in bytes)."""

    kind: str
    items: Int[Tensor, " k"]
    n_items: int
    item_sender: Int[Tensor, " n_items"]
    opts: PatchOptions


def _run(model: Any, graph: Graph, task: Task, req: _Request, stats: Any) -> Float[Tensor, " n"]:
    ex, owned = resolve_executor(req.opts.executor)  # before any work: a missing Ray fails at once
    try:
        return _execute(model, graph, task, req, ex, stats)
    finally:
        if owned:
            ex.close()


def _job(model: Any, graph: Graph, task: Task, req: _Request) -> tuple[PatchJob, Tensor, int]:
    """The job (task on the device, runner, plan), the items of this shard, and the most items
    of one unit."""
    opts = req.opts
    _check_inputs(model, graph, task, opts.scale)
    task, runner, use_readout = prepare_call(model, task, opts.engine, opts.batch_size, opts.readout, "patching")
    assigned = req.items
    if opts.shard is not None:
        keys = unit_keys(graph, req.kind, runner is not None, req.items)
        assigned = req.items[shard_groups(keys, item_weights(graph, req.kind, req.items), *opts.shard)]
    keys = unit_keys(graph, req.kind, runner is not None, assigned)
    max_copies = int(keys.unique(return_counts=True)[1].max()) if len(assigned) else 1
    plan = _plan(model, graph, task, runner=runner, use_readout=use_readout, max_copies=max_copies,
                 batch_size=opts.batch_size, budget=opts.memory_budget)
    replacement = replacement_for(model, graph, task, opts.intervention, opts.reference, opts.memory_budget)
    job = PatchJob(model, graph, task, req.kind, runner, use_readout, float(opts.scale),
                   req.item_sender.cpu().long(), plan, replacement)
    return job, assigned, max_copies


def _execute(model: Any, graph: Graph, task: Task, req: _Request, ex: Any, stats: Any) -> Float[Tensor, " n"]:
    """Plan the job, open the store, hand the units still to do to executor ``ex``, and report."""
    opts = req.opts
    job, assigned, max_copies = _job(model, graph, task, req)
    t0 = time.perf_counter()
    parts = fingerprint_parts(model, graph, job.task, req.items, opts.scale, req.kind)
    if job.replacement is not None:  # patching's fingerprints stay as they were
        parts["intervention"] = job.replacement.fingerprint()
    fp = fingerprint_of(parts)
    fingerprint_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    meta = dict(describe_request(model, graph, job.task, req.items, opts.scale, req.kind), parts=parts)
    store = ResultStore.open(opts.out, fp, req.n_items, req.items, assigned, opts.shard, meta, req.kind,
                             job.task.n_prompts, job.plan.prompts_per_batch)
    io_s = time.perf_counter() - t0
    all_units: list[Unit] = []
    try:
        if store.prompts_per_batch != job.plan.prompts_per_batch:
            job.plan = _adopt_batches(store, job, max_copies, opts.memory_budget, opts.batch_size)
        done_before = store.done.clone()
        all_units = job.units(assigned)  # units recorded before (by any executor, in any order) are skipped
        units = [u for u in all_units if not store.unit_done(u.batch, torch.tensor(u.items))]
        bar = _progress(sum(len(u.items) for u in units), req.kind, opts.progress, len(job.batches))
        try:
            times = ex.run(job, units, store, bar, parts)
        finally:
            bar.close()
        store.meta["threads"] = times.threads  # the numerics' thread count, in the results file
    except KeyboardInterrupt:
        raise _interrupted(store, all_units) from None
    finally:
        t0 = time.perf_counter()
        store.close()
        io_s += time.perf_counter() - t0
    n_measured = int((store.done & ~done_before)[assigned].sum())
    plan, engine = job.plan, "fast" if job.runner is not None else "bridge"
    PatchStats(
        kind=req.kind, n_measured=n_measured, n_requested=int(len(req.items)), n_assigned=int(len(assigned)),
        setup_s=times.setup_s, patch_s=times.patch_s, fingerprint_s=fingerprint_s, io_s=io_s + times.io_s,
        items_per_s=(n_measured / times.patch_s if times.patch_s > 0 else float("nan")),
        n_forwards=times.n_forwards, n_units=len(units), n_units_resumed=len(all_units) - len(units),
        n_batches=len(job.batches), rows_per_forward=plan.rows_per_forward, copies_per_forward=plan.copies_per_forward,
        prompts_per_batch=plan.prompts_per_batch, memory_budget=plan.budget, planned_peak_bytes=plan.peak_bytes,
        engine=engine, path=path_name(engine), readout=job.readout, fingerprint=fp, executor=times.executor,
        n_workers=times.n_workers, wall_s=times.wall_s, n_units_retried=times.n_retried,
        workers_lost=times.workers_lost, threads=times.threads,
    ).fill(stats)
    result = torch.full((req.n_items,), float("nan"), dtype=torch.float64)
    result[assigned] = store.values[assigned]
    return result


def _interrupted(store: ResultStore, units: list[Unit]) -> PatchInterrupted:
    """What to tell a user who pressed Ctrl-C: units saved, and how to resume."""
    saved = sum(store.unit_done(u.batch, torch.tensor(u.items)) for u in units)
    if store.path is None:
        return PatchInterrupted(f"exact patching interrupted: {saved} of {len(units)} units were computed, but "
                                "nothing is kept without a results file (pass out=... to make a run resumable)")
    return PatchInterrupted(f"exact patching interrupted: {saved} of {len(units)} units are saved in {store.path}; "
                            "re-run the same command to resume (saved units are not recomputed)")


def _adopt_batches(store: ResultStore, job: PatchJob, max_copies: int, budget: int, batch_size: int | None) -> PatchPlan:
    """A resumed file was measured with other prompt batches: keep them if they fit the budget
    (its partial sums stay valid), else start the unfinished items' batches afresh."""
    plan = job.plan
    if batch_size is None and store.has_partial:
        kept = _plan(job.model, job.graph, job.task, runner=job.runner, use_readout=job.readout,
                     max_copies=max_copies, batch_size=store.prompts_per_batch, budget=budget)
        if kept.peak_bytes <= budget:
            return kept
    dropped = store.set_batches(plan.prompts_per_batch)
    if dropped:
        warnings.warn(f"{store.path}: recomputing {dropped} (item, prompt batch) sums measured with other "
                      f"prompt batches ({plan.prompts_per_batch} prompts per batch now)")
    store.save()
    return plan


def _progress(total: int, kind: str, enabled: bool, n_batches: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, k): pass
            def set_postfix_str(self, s, refresh=True): pass
            def close(self): pass
        return _Null()
    unit = f"{kind[:-1]}" + ("×batch" if n_batches > 1 else "")
    return tqdm(total=total, unit=unit, desc=f"exact {kind} ({n_batches} prompt batches)", dynamic_ncols=True,
                smoothing=0.05)


# ------------------------------------------------------------------------------ public API
def patch_edges(
    model: Any,
    graph: Graph,
    task: Task,
    edges: Any = None,
    scores: Tensor | None = None,
    seed: int = 0,
    *,
    options: PatchOptions | None = None,
    stats: dict | PatchStats | None = None,
    **kwargs: Any,
) -> Float[Tensor, " n_edges"]:
    """Exact effect of patching each requested edge, in graph edge order (float64, CPU).

    ``result[e] = mean_prompts[metric(patched_e) - metric(clean)]`` in metric units, where
    patched_e adds ``scale * (replacement_u - clean_u)`` to receiver v's input only (replacement:
    the corrupted output, or another ``intervention``, see ``PatchOptions``; module
    docstring). Same sign/units as ``eap.attribute``. Edges not requested (or not in this shard)
    are NaN.

    edges: None/'all', list/tensor of indices or names, 'topk:K' (by ``scores``), 'sample:K',
        'stratified:K' (seeded by ``seed``); see ``Graph.select_edges``. None: ``options.edges``.
    options: a :class:`~validation.options.PatchOptions`; keyword arguments (``scale``,
        ``memory_budget``, ``batch_size``, ``engine``, ``executor``, ``out``, ``shard``,
        ``progress``, ``readout``; the deprecated ``method``) override its fields:
    memory_budget: bytes (or '2GiB', ...) the cache of one prompt batch and one patched forward
        may use together; default a share of the free device memory (``eap.budget``).
    batch_size: prompts per batch (default: from ``memory_budget``; one beyond the budget is
        used with a warning); copies per forward always come from the budget. The result does
        not depend on either (float64 sums).
    readout: use ``task.readout`` (only the needed logits); default when the task has one.
    engine: 'auto' (fast runner, the bridge for unsupported architectures), 'fast', 'bridge'.
    out: results file: every finished (receiver, prompt batch) unit is journalled at once,
        resumed if it exists (refused if it was written for other arguments; see
        ``validation.store``). shard: (i, n) or 'i/n': only part i of n (whole receivers).
        Ctrl-C raises :class:`PatchInterrupted` saying how many units are saved.
    executor: where the units are computed: 'local' (this process, the default), 'ray', a dict
        spec, or an executor object (``LocalExecutor()``, ``RayExecutor(address=..., workers=...)``;
        reusable across calls); see ``validation.executor_from_spec``. Every executor gives the
        same numbers bit for bit at equal torch thread counts, and the same results file.
    stats: a dict (filled with the keys of :class:`~validation.options.PatchStats`) or a
        ``PatchStats`` (filled in place).
    """
    opts = resolve_options(model, options, kwargs)
    spec = edges if edges is not None else opts.edges
    items = graph.select_edges(spec, scores, seed)  # a bad spec is a GraphError; nothing else is disguised as one
    req = _Request("edges", items, graph.n_edges, graph.edge_sender, opts)
    return _run(model, graph, task, req, stats)


def patch_nodes(
    model: Any,
    graph: Graph,
    task: Task,
    nodes: Any = None,
    *,
    options: PatchOptions | None = None,
    stats: dict | PatchStats | None = None,
    **kwargs: Any,
) -> Float[Tensor, " n_senders"]:
    """Exact effect of patching each sender node's output in the residual stream (all its
    receivers at once, everything downstream recomputed), in ``graph.senders`` order.

    ``result[u] = mean_prompts[metric(clean with out_u -> clean_u + scale*(corr_u - clean_u)) -
    metric(clean)]``, metric units; the truth for node-level attribution. ``nodes``: None/'all'
    or a list of sender names/indices; NaN for senders not requested. ``options``, keyword
    arguments and ``stats`` as for :func:`patch_edges`."""
    opts = resolve_options(model, options, kwargs)
    items = graph.select_senders(nodes)
    req = _Request("nodes", items, graph.n_senders, torch.arange(graph.n_senders), opts)
    return _run(model, graph, task, req, stats)
