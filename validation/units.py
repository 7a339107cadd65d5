"""The per-unit engine of exact patching: one prompt batch's cache, its evaluator, and units.

A *unit* (:class:`Unit`) is the requested edges into one receiver (or the requested senders of
one node group) on one prompt batch. :func:`prepare_batch` runs the batch's setup (one
corrupted and one clean forward through the model's hooks, only this batch cached) and
:func:`compute_unit` computes a unit: per item, the float64 sum over the batch's prompts of
``metric(patched) - metric(clean)`` (metric units; sign as ``eap.attribute``). Both are plain
functions of a :class:`PatchJob`, so any executor (``validation.executor``: this process or Ray
workers) can call them; ``validation.patch`` plans jobs, ``validation.store`` records units.

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
  (``engine='bridge'``): same stacking, full forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.budget import PatchPlan
from eap.graph import Graph, GraphError
from eap.hooks import (
    StopForward, edge_hooks_unavailable, require_edge_hooks, run_until_stop, sender_difference_hooks, stop_hook,
)
from eap.interventions import InterventionError, Replacement
from eap.task import Task
from validation.runner import BlockRunner


# ------------------------------------------------------------------------------ batch cache
@dataclass
class _Cache:
    """Clean residuals and sender differences of one prompt batch (model device/dtype)."""

    pre: list[Tensor]  # resid_pre[L] [nb,p,d] (empty on the hook path)
    mlp_in: list[Tensor]  # hook_mlp_in[L] [nb,p,d] (empty for attn-only and on the hook path)
    post: list[Tensor]  # resid_post[L] [nb,p,d] (empty on the hook path)
    delta: Tensor  # [n_senders, nb, p, d] corrupted - clean sender outputs


def _collect(model: Any, graph: Graph, task: Task, residuals: bool, differences: bool = True,
             runner: BlockRunner | None = None, replacement: Replacement | None = None) -> _Cache:
    """One corrupted and one clean forward of ``task``'s prompts through the model's hooks.

    The corrupted forward writes the sender outputs into the difference buffer and stops after
    the last sender; the clean forward subtracts the clean outputs, keeps the clean residuals
    (with ``residuals``) and stops after the last block (no unembedding).

    ``differences=False`` (circuit evaluation): ``delta`` keeps the *corrupted* sender outputs
    themselves and the clean forward only records ``pre[0]``, the clean input embedding, and
    stops there.

    ``replacement`` (an intervention other than patching, ``eap.interventions``): its sender
    outputs take the corrupted forward's place.

    A model whose TransformerLens adapter has no per-head hooks (``eap.hooks.edge_hooks_unavailable``,
    GPT-J) gets the same cache from ``runner`` (``BlockRunner.collect``: the adapter's blocks; the
    model computes only the input embeddings)."""
    if edge_hooks_unavailable(model) is not None:
        if replacement is not None:  # the means are taken through the hooks too
            raise InterventionError(f"intervention {replacement.intervention.value!r} needs the model's per-head hooks, "
                                    f"which its TransformerLens adapter lacks: {edge_hooks_unavailable(model)}")
        if runner is None:
            require_edge_hooks(model, "exact patching was asked for on the hook path")
        return _Cache(*runner.collect(model, graph, task.clean, task.corrupted, residuals, differences))
    L = graph.spec.n_layers
    nb, p = task.clean.shape
    param = next(model.parameters())
    delta = torch.empty(graph.n_senders, nb, p, model.cfg.d_model, device=param.device, dtype=param.dtype)
    last_sender = graph.sender_groups[-1].hook
    if replacement is None:
        run_until_stop(model, task.corrupted, sender_difference_hooks(graph, delta, subtract=False) + [(last_sender, stop_hook)])
    else:
        replacement.fill(delta)

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
    replacement: Replacement | None = None  # None: interchange patching (the corrupted run)

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
        cache = _collect(job.model, job.graph, t, residuals=job.runner is not None, runner=job.runner,
                         replacement=job.replacement)
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
