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

How a unit is fast
------------------
* For one receiver a chunk of ``m`` incoming edges becomes one forward over ``m x n_batch``
  stacked rows (copy i = the batch's prompts with sender i's difference added to the receiver's
  input); the metric is called once per copy, on exactly the batch's prompts.
* That forward starts at the receiver's layer from the cached clean residual and runs only the
  remaining blocks in plain torch (``validation.runner.BlockRunner``); at the receiver layer
  only the patched head (or MLP) is recomputed. With ``task.has_readout`` only the read-out
  position of the last block and only the read-out logits are computed.
* Architectures the runner does not implement use the hook-based path through the bridge
  (``method='hooks'``): same stacking, full forwards.

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
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.budget import BudgetError, PatchPlan, held_bytes, plan_patching, resolve_budget
from eap.graph import Graph, GraphError
from eap.hooks import (
    StopForward, check_edge_hooks, edge_hooks_unavailable, require_edge_hooks, run_until_stop, sender_difference_hooks,
    stop_hook,
)
from eap.measure import sync
from eap.task import Task, TaskError
from validation.runner import BlockRunner, UnsupportedModel, refuse_hooks_for_post_norms
from validation.store import ResultStore, describe_request, fingerprint_of, fingerprint_parts


class PatchError(ValueError):
    """Bad arguments to exact patching."""


# ------------------------------------------------------------------------------ batch cache
@dataclass
class _Cache:
    """Clean residuals and sender differences of one prompt batch (model device/dtype)."""

    pre: list[Tensor]  # resid_pre[L] [nb,p,d] (empty on the hook path)
    mlp_in: list[Tensor]  # hook_mlp_in[L] [nb,p,d] (empty for attn-only and on the hook path)
    post: list[Tensor]  # resid_post[L] [nb,p,d] (empty on the hook path)
    delta: Tensor  # [n_senders, nb, p, d] corrupted - clean sender outputs


def _collect(model: Any, graph: Graph, task: Task, residuals: bool, differences: bool = True,
             runner: BlockRunner | None = None) -> _Cache:
    """One corrupted and one clean forward of ``task``'s prompts through the model's hooks.

    The corrupted forward writes the sender outputs into the difference buffer and stops after
    the last sender; the clean forward subtracts the clean outputs, keeps the clean residuals
    (with ``residuals``) and stops after the last block (no unembedding).

    ``differences=False`` (circuit evaluation): ``delta`` keeps the *corrupted* sender outputs
    themselves and the clean forward only records ``pre[0]``, the clean input embedding, and
    stops there.

    A model whose TransformerLens adapter has no per-head hooks (``eap.hooks.edge_hooks_unavailable``,
    GPT-J) gets the same cache from ``runner`` (the adapter's blocks; the bridge computes only
    the input embeddings)."""
    if edge_hooks_unavailable(model) is not None:
        if runner is None:
            require_edge_hooks(model, "exact patching was asked for on the hook path")
        return _Cache(*runner.collect(model, graph, task.clean, task.corrupted, residuals, differences))
    L = graph.spec.n_layers
    nb, p = task.clean.shape
    param = next(model.parameters())
    delta = torch.empty(graph.n_senders, nb, p, model.cfg.d_model, device=param.device, dtype=param.dtype)
    last_sender = graph.sender_groups[-1].hook
    run_until_stop(model, task.corrupted, sender_difference_hooks(graph, delta, subtract=False) + [(last_sender, stop_hook)])

    if not differences:
        got: dict[str, Tensor] = {}

        def embed(x: Tensor, hook: Any = None) -> Tensor:
            got["pre"] = x.detach().clone()
            raise StopForward

        run_until_stop(model, task.clean, [("blocks.0.hook_resid_pre", embed)])
        return _Cache([got["pre"]], [], [], delta)

    names = []
    if residuals:
        names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
        if not graph.spec.attn_only:
            names += [f"blocks.{i}.hook_mlp_in" for i in range(L)]
    got = {}

    def save(key: str):
        def hook(x: Tensor, hook: Any = None) -> Tensor:
            got[key] = x.detach().clone()
            return x

        return hook

    stop_at = f"blocks.{L - 1}.hook_resid_post" if residuals else last_sender
    hooks = sender_difference_hooks(graph, delta, subtract=True) + [(k, save(k)) for k in names] + [(stop_at, stop_hook)]
    run_until_stop(model, task.clean, hooks)
    if not residuals:
        return _Cache([], [], [], delta)
    pre = [got[f"blocks.{i}.hook_resid_pre"] for i in range(L)]
    post = pre[1:] + [got[f"blocks.{L - 1}.hook_resid_post"]]
    mlp_in = [] if graph.spec.attn_only else [got[f"blocks.{i}.hook_mlp_in"] for i in range(L)]
    return _Cache(pre, mlp_in, post, delta)


# ------------------------------------------------------------------------------ readout
def per_copy(task: Task, out: Tensor, m: int, readout: bool) -> Float[Tensor, "m nb"]:
    """``task``'s metric (or, with ``readout``, its readout) called once per stacked copy on that
    copy's rows of ``out`` (logits ``[m * nb, ...]``, or selected logits ``[m * nb, k]``):
    metric functions always see exactly the task's prompts."""
    nb = task.n_prompts
    fn = task.readout if readout else task.metric
    return torch.stack([fn(out[i * nb : (i + 1) * nb]) for i in range(m)])


def readout_positions(task: Task, m: int, device: torch.device) -> Int[Tensor, " m_nb"]:
    """The read-out position of every row of ``m`` stacked copies of ``task``'s prompts."""
    return task.per_prompt["readout_pos"].to(device).long().repeat(m)


def metric_of_final(
    task: Task, runner: BlockRunner, final: Float[Tensor, "m_nb ..."], m: int, use_readout: bool
) -> Float[Tensor, "m nb"]:
    """The metric of ``m`` stacked copies of ``task``'s prompts from their final residual (before
    the final norm): ``[m * nb, p, d]``, or with ``use_readout`` ``[m * nb, d]`` at the read-out
    positions (or ``[m * nb, p, d]``, then taken there). With ``use_readout`` only the read-out
    tokens' logits are computed (``eap.arch.Readout``); exact patching and circuit evaluation
    both read out through here."""
    if use_readout:
        if final.ndim == 3:
            final = final[torch.arange(final.shape[0], device=final.device), readout_positions(task, m, final.device)]
        toks = task.per_prompt["readout_tokens"].to(final.device).long().repeat(m, 1)
        return per_copy(task, runner.selected_logits(final, toks), m, readout=True)
    return per_copy(task, runner.logits(final), m, readout=False)


# ------------------------------------------------------------------------------ evaluators
class _Evaluator:
    """Metric differences of stacked patched copies for one prompt batch.

    ``task`` holds exactly the batch's prompts and ``cache`` their clean run; ``P`` arguments
    are slices into the batch (the whole batch: ``slice(0, n_batch)``)."""

    def __init__(self, model: Any, graph: Graph, task: Task, cache: _Cache, use_readout: bool, runner: BlockRunner | None):
        self.model, self.graph, self.task, self.cache = model, graph, task, cache
        self.use_readout = use_readout
        self.rn = runner
        self._base: dict[tuple, Tensor] = {}
        self._attn_sums: dict[int, Tensor] = {}

    # -------------------------------------------------------------- metric
    def _task_of(self, P: slice) -> Task:
        return self.task if (P.start, P.stop) == (0, self.task.n_prompts) else self.task.subset(P)

    def _per_copy(self, out: Tensor, m: int, P: slice, readout: bool) -> Float[Tensor, "m nb"]:
        """The metric (or readout) called once per patched copy on that copy's rows."""
        return per_copy(self._task_of(P), out, m, readout)

    def _metric_from_resid(self, x: Tensor, point: tuple[str, int], P: slice, m: int) -> Float[Tensor, "m nb"]:
        t = self._task_of(P)
        pos = readout_positions(t, m, x.device) if self.use_readout else None
        return metric_of_final(t, self.rn, self.rn.run(x, point, pos), m, self.use_readout)

    def baseline(self, point: tuple[str, int], P: slice) -> Float[Tensor, " nb"]:
        """Clean metric computed through the same path as the patched copies."""
        key = (point, P.start)
        if key not in self._base:
            self._base[key] = self._metric_from_resid(self._clean_at(point)[P], point, P, 1)[0]
        return self._base[key]

    def _clean_at(self, point: tuple[str, int]) -> Tensor:
        where, L = point
        c = self.cache
        return {"pre": c.pre, "mid": c.mlp_in, "post": c.post}[where][L]

    def through_post_norms(self, senders: Int[Tensor, " m"], D: Float[Tensor, "m nb p d"]) -> Float[Tensor, "m nb p d"]:
        """The residual-stream change of each copy's sender (``D``: its output difference times
        ``scale``): ``D`` itself, except in a post-norm family (``BlockRunner.through_post_norms``)."""
        if self.rn is None or not self.rn.arch.spec.post_norms:
            return D
        return self.rn.through_post_norms(self.graph, senders, D, self.cache.pre, self._attn_sums)

    # -------------------------------------------------------------- fast
    def inject(self, point: tuple[str, int], D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """Residual at ``point`` += D (one copy per leading index); metric(patched) - metric(clean)."""
        m = D.shape[0]
        x = (self._clean_at(point)[P].unsqueeze(0) + D).flatten(0, 1)
        return self._metric_from_resid(x, point, P, m) - self.baseline(point, P)

    def receiver(self, r: int, D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """Receiver ``r``'s input += D (one copy per leading index); the runner recomputes it."""
        g = self.graph.receiver_group_of(r)
        c = self.cache
        x_in = {"q": c.pre, "k": c.pre, "v": c.pre, "mlp": c.mlp_in, "logits": c.post}[g.kind]
        x_in = x_in[min(g.layer, self.graph.spec.n_layers - 1)][P]
        point, delta = self.rn.patch_receiver(g.kind, g.layer, (r - g.start) if g.n_heads else None, x_in, D)
        return self.inject(point, delta, P)

    def sender_point(self, s: int) -> tuple[str, int]:
        """Where sender ``s`` writes into the residual stream (node patching)."""
        for g in self.graph.sender_groups:
            if g.start <= s < g.start + g.size:
                return self.rn.sender_point(g.kind, g.layer)
        raise GraphError(f"sender index {s} out of range")

    def node(self, group: int, D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """Every sender of hook group ``group``: its output += D (where it enters the residual)."""
        return self.inject(self.sender_point(self.graph.sender_groups[group].start), D, P)

    # -------------------------------------------------------------- hooks
    def hooked(self, hook: str, head: int | None, D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """General path: full stacked forward through the bridge, D added at ``hook`` (head slice)."""
        m = D.shape[0]
        flat = D.flatten(0, 1)

        def add(x, hook=None):
            x = x.clone()
            if head is None:
                x += flat
            else:
                x[:, :, head] += flat
            return x

        with torch.no_grad():
            logits = self.model.run_with_hooks(self.task.clean[P].repeat(m, 1), fwd_hooks=[(hook, add)])
        key = ("hooks", P.start)
        if key not in self._base:
            with torch.no_grad():
                self._base[key] = self._per_copy(self.model(self.task.clean[P]), 1, P, readout=False)[0]
        return self._per_copy(logits, m, P, readout=False) - self._base[key]

    def hooked_receiver(self, r: int, D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """Receiver ``r``'s input += D at its hook (hook path)."""
        g = self.graph.receiver_group_of(r)
        return self.hooked(g.hook, (r - g.start) if g.n_heads else None, D, P)

    def hooked_node(self, s: int, D: Float[Tensor, "m nb p d"], P: slice) -> Float[Tensor, "m nb"]:
        """Sender ``s``'s output += D at its hook (hook path)."""
        for g in self.graph.sender_groups:
            if g.start <= s < g.start + g.size:
                return self.hooked(g.hook, (s - g.start) if g.n_heads else None, D, P)
        raise GraphError(f"sender index {s} out of range")

    def measure(self, kind: str, key: int, D: Float[Tensor, "m nb p d"]) -> Float[Tensor, "m nb"]:
        """metric(patched) - metric(clean) of ``m`` copies of the batch: ``kind`` 'edges' (``key``
        a receiver) or 'nodes' (``key`` a sender group on the fast path, a sender on the hook path)."""
        P = slice(0, self.task.n_prompts)
        fast = self.rn is not None
        if kind == "edges":
            return self.receiver(key, D, P) if fast else self.hooked_receiver(key, D, P)
        return self.node(key, D, P) if fast else self.hooked_node(key, D, P)


# ------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """One piece of exact-patching work: the requested ``items`` (edge or sender indices) that
    share ``key`` (a receiver for edges; a sender group on the fast node path, a sender on the
    hook node path), on prompt batch ``batch``. Its result: per item, the float64 sum over the
    batch's prompts of metric(patched) - metric(clean)."""

    key: int
    batch: int
    items: tuple[int, ...]


@dataclass
class PatchJob:
    """What computing units needs: the model, graph and task (on the model's device), the kind
    ('edges' or 'nodes'), the runner (None: hook path), the readout flag, the scale, which
    sender each item patches, and the plan (prompt batches, copies per forward)."""

    model: Any
    graph: Graph
    task: Task
    kind: str
    runner: BlockRunner | None
    readout: bool
    scale: float
    item_sender: Int[Tensor, " n_items"]
    plan: PatchPlan

    @property
    def batches(self) -> list[slice]:
        return self.plan.batches(self.task.n_prompts)

    def unit_key(self, items: Int[Tensor, " k"]) -> Int[Tensor, " k"]:
        """The unit key of each item (see :class:`Unit`)."""
        return unit_keys(self.graph, self.kind, self.runner is not None, items)

    def units(self, items: Int[Tensor, " k"]) -> list[Unit]:
        """All units of ``items``: for each prompt batch, one per key (keys in increasing order)."""
        items = items.cpu().long().sort().values
        keys = self.unit_key(items)
        groups = [(int(k), tuple(items[keys == k].tolist())) for k in keys.unique().tolist()]
        return [Unit(k, b, its) for b in range(len(self.batches)) for k, its in groups]


def unit_keys(graph: Graph, kind: str, fast: bool, items: Int[Tensor, " k"]) -> Int[Tensor, " k"]:
    """The unit key of each item: its receiver (edges), its sender group (nodes, fast path: the
    senders of one hook group enter the residual stream at one point) or itself (nodes, hooks)."""
    if kind == "edges":
        return graph.edge_receiver[items]
    if not fast:
        return items
    group_of = torch.cat([torch.full((g.size,), gi) for gi, g in enumerate(graph.sender_groups)])
    return group_of[items]


def item_weights(graph: Graph, kind: str, items: Int[Tensor, " k"]) -> Float[Tensor, " k"]:
    """Relative cost of each item: the blocks a patched forward runs from its receiver's layer
    (edges) or its sender's layer (nodes), ``n_layers - layer + 1``. Used to balance shards and
    to hand out the expensive units first."""
    if kind == "edges":
        layer = torch.tensor([g.layer for g in graph.receiver_groups for _ in range(g.size)])
        layers = layer[graph.edge_receiver[items]].double()
    else:
        layer = torch.tensor([g.layer for g in graph.sender_groups for _ in range(g.size)])
        layers = layer[items].double()
    return graph.spec.n_layers - layers + 1.0


def prepare_batch(job: PatchJob, batch: int) -> _Evaluator:
    """The evaluator of prompt batch ``batch``: its clean and corrupted forwards (the setup)."""
    P = job.batches[batch]
    t = job.task if (P.start, P.stop) == (0, job.task.n_prompts) else job.task.subset(P)
    with torch.no_grad():
        cache = _collect(job.model, job.graph, t, residuals=job.runner is not None, runner=job.runner)
    return _Evaluator(job.model, job.graph, t, cache, job.readout, job.runner)


def compute_unit(job: PatchJob, ev: _Evaluator, unit: Unit) -> Float[Tensor, " k"]:
    """Per item of ``unit``, the float64 sum over the batch's prompts of metric(patched) -
    metric(clean): ``ceil(k / copies_per_forward)`` stacked forwards. ``ev`` must be
    ``prepare_batch(job, unit.batch)``. A plain function: an executor can run it anywhere."""
    items = torch.tensor(unit.items, dtype=torch.long)
    out = torch.empty(len(items), dtype=torch.float64)
    m = job.plan.copies_per_forward
    device = ev.cache.delta.device
    with torch.no_grad():
        for c0 in range(0, len(items), m):
            senders = job.item_sender[items[c0 : c0 + m]].to(device)
            D = ev.cache.delta[senders]
            if job.scale != 1.0:
                D = D * job.scale
            D = ev.through_post_norms(senders, D)
            out[c0 : c0 + m] = ev.measure(job.kind, unit.key, D).double().sum(1).cpu()
    return out


def forwards_of(job: PatchJob, unit: Unit) -> int:
    """Stacked forwards :func:`compute_unit` runs for ``unit``."""
    return -(-len(unit.items) // job.plan.copies_per_forward)


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


def _parse_shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise PatchError(f"bad shard {shard!r}: use 'i/n' with 0 <= i < n")
        shard = (int(a), int(b))
    i, n = (int(v) for v in shard)
    if n < 1 or not 0 <= i < n:
        raise PatchError(f"bad shard {(i, n)}: need 0 <= i < n")
    return (i, n)


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


def prepare_call(model: Any, task: Task, method: str, batch_size: int | None, readout: bool | None,
                 what: str) -> tuple[Task, BlockRunner | None, bool]:
    """Checks and choices shared by exact patching and circuit evaluation: ``method`` ('auto',
    'fast', 'hooks') and ``batch_size``, the task on the model's device, whether to read out
    only the needed logits, and the block runner (None: the hook path through the bridge; 'auto'
    falls back to it with a warning naming what the runner lacks)."""
    if method not in ("auto", "fast", "hooks"):
        raise PatchError(f"method must be 'auto', 'fast' or 'hooks', got {method!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise PatchError(f"batch_size (prompts per batch) must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    if task.clean.device != device:
        task = task.to(device)
    use_readout = task.has_readout if readout is None else bool(readout)
    if use_readout and not task.has_readout:
        raise TaskError(f"task {task.name!r} has no readout; pass readout=None or False")
    runner = None
    if method in ("auto", "fast"):
        try:
            runner = BlockRunner(model)
        except UnsupportedModel as exc:
            if method == "fast":
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
    hold them all)."""
    n = task.n_prompts
    problem = task.subset_problem(d_vocab) if n > 1 else None
    if problem is not None and batch_size is not None and batch_size < n:
        raise TaskError(
            f"{problem}: the metric seems to close over data of all {n} prompts, but batch_size={batch_size} "
            "splits them. Pass the per-prompt data through Task(per_prompt=...) or leave batch_size unset."
        )
    try:
        return plan(problem is not None, batch_size)
    except BudgetError as exc:  # the whole task does not fit the budget
        raise TaskError(f"{problem}. {exc}") from exc


def _plan(model: Any, graph: Graph, task: Task, *, runner: BlockRunner | None, use_readout: bool,
          max_copies: int, batch_size: int | None, budget: int) -> PatchPlan:
    """The prompt batches and copies per forward (``eap.budget.plan_patching``), with the
    metric's needs (:func:`plan_for_task`)."""
    kw = dict(readout=use_readout, residuals=runner is not None, hooks=runner is None, max_copies=max_copies,
              budget=budget, fixed_bytes=held_bytes(runner, model) if runner is not None else 0)
    return plan_for_task(task, model.cfg.d_vocab, batch_size, lambda whole, nb: plan_patching(
        model, graph.n_senders, task.n_prompts, task.seq_len, whole_task=whole, prompts_per_batch=nb, **kw))


# ------------------------------------------------------------------------------ engine
def _run(
    model: Any, graph: Graph, task: Task, kind: str, items: Tensor, n_items: int, item_sender: Tensor,
    *, scale: float, batch_size: int | None, memory_budget: Any, readout: bool | None,
    method: str, out: Any, shard: Any, progress: bool, stats: dict | None, executor: Any,
) -> Float[Tensor, " n"]:
    # validation.executor builds on this module (prepare_batch, compute_unit), so it is imported here
    from validation.executor import resolve_executor

    ex, owned = resolve_executor(executor)  # before any work: a missing Ray fails at once
    try:
        return _execute(model, graph, task, kind, items, n_items, item_sender, ex, scale=scale,
                        batch_size=batch_size, memory_budget=memory_budget, readout=readout, method=method,
                        out=out, shard=shard, progress=progress, stats=stats)
    finally:
        if owned:
            ex.close()


def _execute(
    model: Any, graph: Graph, task: Task, kind: str, items: Tensor, n_items: int, item_sender: Tensor, ex: Any,
    *, scale: float, batch_size: int | None, memory_budget: Any, readout: bool | None,
    method: str, out: Any, shard: Any, progress: bool, stats: dict | None,
) -> Float[Tensor, " n"]:
    """Plan the job, open the store, hand the units still to do to executor ``ex``, and report."""
    _check_inputs(model, graph, task, scale)
    task, runner, use_readout = prepare_call(model, task, method, batch_size, readout, "patching")
    shard = _parse_shard(shard)
    device = next(model.parameters()).device
    budget = resolve_budget(memory_budget, device)

    t0 = time.perf_counter()
    parts = fingerprint_parts(model, graph, task, items, scale, kind)
    fp = fingerprint_of(parts)
    fingerprint_s = time.perf_counter() - t0

    assigned = items
    if shard is not None:
        keys = unit_keys(graph, kind, runner is not None, items)
        assigned = items[shard_groups(keys, item_weights(graph, kind, items), *shard)]
    keys = unit_keys(graph, kind, runner is not None, assigned)
    max_copies = int(keys.unique(return_counts=True)[1].max()) if len(assigned) else 1
    plan = _plan(model, graph, task, runner=runner, use_readout=use_readout, max_copies=max_copies,
                 batch_size=batch_size, budget=budget)
    job = PatchJob(model, graph, task, kind, runner, use_readout, float(scale), item_sender.cpu().long(), plan)

    t0 = time.perf_counter()
    meta = describe_request(model, graph, task, items, scale, kind)
    meta["parts"] = parts
    store = ResultStore.open(out, fp, n_items, items, assigned, shard, meta, kind, task.n_prompts,
                             job.plan.prompts_per_batch)
    io_s = time.perf_counter() - t0
    try:
        if store.prompts_per_batch != job.plan.prompts_per_batch:
            job.plan = _adopt_batches(store, job, max_copies, budget, batch_size)
        done_before = store.done.clone()
        all_units = job.units(assigned)  # units recorded before (by any executor, in any order) are skipped
        units = [u for u in all_units if not store.unit_done(u.batch, torch.tensor(u.items))]
        n_resumed = len(all_units) - len(units)
        bar = _progress(sum(len(u.items) for u in units), kind, progress, len(job.batches))
        try:
            times = ex.run(job, units, store, bar, parts)
        finally:
            bar.close()
    finally:
        t0 = time.perf_counter()
        store.close()
        io_s += time.perf_counter() - t0
    io_s += times.io_s
    n_measured = int((store.done & ~done_before)[assigned].sum())
    if stats is not None:
        plan = job.plan
        stats.update(
            kind=kind, n_measured=n_measured, n_requested=int(len(items)), n_assigned=int(len(assigned)),
            setup_s=times.setup_s, patch_s=times.patch_s, fingerprint_s=fingerprint_s, io_s=io_s,
            items_per_s=(n_measured / times.patch_s if times.patch_s > 0 else float("nan")),
            n_forwards=times.n_forwards, n_units=len(units), n_units_resumed=n_resumed, n_batches=len(job.batches),
            rows_per_forward=plan.rows_per_forward, copies_per_forward=plan.copies_per_forward,
            prompts_per_batch=plan.prompts_per_batch, memory_budget=plan.budget, planned_peak_bytes=plan.peak_bytes,
            path="fast" if runner is not None else "hooks", readout=use_readout, fingerprint=fp,
            executor=times.executor, n_workers=times.n_workers, wall_s=times.wall_s,
            n_units_retried=times.n_retried, workers_lost=times.workers_lost,
        )
    result = torch.full((n_items,), float("nan"), dtype=torch.float64)
    result[assigned] = store.values[assigned]
    return result


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
    scale: float = 1.0,
    batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
    readout: bool | None = None,
    method: str = "auto",
    out: Any = None,
    shard: Any = None,
    progress: bool = True,
    stats: dict | None = None,
    executor: Any = "local",
) -> Float[Tensor, " n_edges"]:
    """Exact effect of patching each requested edge, in graph edge order (float64, CPU).

    ``result[e] = mean_prompts[metric(patched_e) - metric(clean)]`` in metric units, where
    patched_e adds ``scale * (corrupted_u - clean_u)`` to receiver v's input only (see module
    docstring). Same sign/units as ``eap.attribute``. Edges not requested (or not in this shard)
    are NaN.

    edges: None/'all', list/tensor of indices or names, 'topk:K' (by ``scores``), 'sample:K',
        'stratified:K' (seeded by ``seed``); see ``Graph.select_edges``.
    memory_budget: bytes (or '2GiB', ...) the cache of one prompt batch and one patched forward
        may use together; default a share of the free device memory (``eap.budget``).
    batch_size: prompts per batch (default: from ``memory_budget``); copies per forward always
        come from the budget. The result does not depend on either (float64 sums).
    readout: use ``task.readout`` (only the needed logits); default when the task has one.
    method: 'auto' (fast runner, hook path for unsupported architectures), 'fast', 'hooks'.
    out: results file: every finished (receiver, prompt batch) unit is journalled at once,
        resumed if it exists (refused if it was written for other arguments; see
        ``validation.store``). shard: (i, n) or 'i/n': only part i of n (whole receivers).
    stats: dict filled with ``setup_s`` (caching forwards), ``patch_s`` (patched forwards only),
        ``fingerprint_s``, ``io_s`` (results file), ``n_measured``, ``items_per_s``
        (= n_measured / patch_s), ``n_forwards``, ``rows_per_forward``, ``prompts_per_batch``,
        ``copies_per_forward``, ``n_batches``, ``n_units``, ``n_units_resumed``,
        ``memory_budget``, ``planned_peak_bytes`` (bytes), ``path``, ``readout``, ``fingerprint``;
        and ``executor``, ``n_workers``, ``wall_s`` (computing the units), ``n_units_retried``
        (units given to another worker after one died), ``workers_lost``. With several workers
        ``setup_s``/``patch_s`` are summed over them (worker-seconds).
    executor: where the units are computed: 'local' (this process, the default), 'ray' (a
        ``validation.executor.RayExecutor()`` for this call: a local Ray cluster, or the one
        ``ray.init`` connected to), or an executor object (``LocalExecutor()``,
        ``RayExecutor(address=..., workers=...)``; reusable across calls). Every executor gives
        the same numbers bit for bit and the same results file (see ``validation.executor``).
    """
    try:
        items = graph.select_edges(edges, scores, seed)
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"cannot interpret edge spec {edges!r}: {exc}") from exc
    return _run(
        model, graph, task, "edges", items, graph.n_edges, graph.edge_sender,
        scale=scale, batch_size=batch_size, memory_budget=memory_budget,
        readout=readout, method=method, out=out, shard=shard, progress=progress, stats=stats,
        executor=executor,
    )


def patch_nodes(
    model: Any,
    graph: Graph,
    task: Task,
    nodes: Any = None,
    *,
    scale: float = 1.0,
    batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
    readout: bool | None = None,
    method: str = "auto",
    out: Any = None,
    shard: Any = None,
    progress: bool = True,
    stats: dict | None = None,
    executor: Any = "local",
) -> Float[Tensor, " n_senders"]:
    """Exact effect of patching each sender node's output in the residual stream (all its
    receivers at once, everything downstream recomputed), in ``graph.senders`` order (``executor``
    as for :func:`patch_edges`).

    ``result[u] = mean_prompts[metric(clean with out_u -> clean_u + scale*(corr_u - clean_u)) -
    metric(clean)]``, metric units; the truth for node-level attribution. ``nodes``: None/'all'
    or a list of sender names/indices; NaN for senders not requested. Other arguments and
    ``stats`` as for :func:`patch_edges`."""
    items = graph.select_senders(nodes)
    return _run(
        model, graph, task, "nodes", items, graph.n_senders, torch.arange(graph.n_senders),
        scale=scale, batch_size=batch_size, memory_budget=memory_budget,
        readout=readout, method=method, out=out, shard=shard, progress=progress, stats=stats,
        executor=executor,
    )
