"""Exact activation patching of edges and nodes, batched across edges.

Sign and units (same as ``eap.attribute``): the effect of edge u -> v is

    mean over prompts of  metric(patched) - metric(clean)       [metric units]

where "patched" is the clean run in which receiver v's input (only v's: one head's q, k or v
input, one MLP input, or the logits' residual) is replaced by
``clean_input_v + scale * (out_u(corrupted) - out_u(clean))``, everything else clean, the change
propagating downstream. ``scale=1`` is ordinary noising. Node patching replaces sender u's output
by ``clean_u + scale * (corrupted_u - clean_u)`` in the residual stream (all its receivers).

How it is fast
--------------
* The clean and corrupted runs are made once (through the model's hooks) and the sender
  differences ``corr_u - clean_u`` cached.
* Edges are grouped by receiver; for one receiver a chunk of ``m`` incoming edges becomes one
  forward over ``m x n_prompts`` stacked rows (copy i = the prompts with sender i's difference
  added to the receiver's input).
* That forward starts at the receiver's layer from the cached clean residual and runs only the
  remaining blocks in plain torch (``validation.runner.BlockRunner``); at the receiver layer
  only the patched head (or MLP) is recomputed. With ``task.has_readout`` only the read-out
  position of the last block and only the read-out logits are computed.
* Architectures the runner does not implement use the hook-based path through the bridge
  (``method='hooks'``): same stacking, full forwards.
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

from eap.graph import Graph, GraphError
from eap.hooks import as_nodes, check_edge_hooks
from eap.task import Task, TaskError
from validation.runner import BlockRunner, UnsupportedModel
from validation.store import ResultStore, describe_request, fingerprint, fingerprint_parts

#: rows (copies x prompts) per forward on CPU; measured fastest range 80-320 for a small model.
CPU_MAX_ROWS = 256
CPU_MEMORY_BUDGET = 512 * 2**20


class PatchError(ValueError):
    """Bad arguments to exact patching."""


# ------------------------------------------------------------------------------ clean cache
@dataclass
class _Cache:
    """Clean residuals and sender differences for all prompts (model device/dtype)."""

    pre: list[Tensor]  # resid_pre[L] [n,p,d]
    mlp_in: list[Tensor]  # hook_mlp_in[L] [n,p,d] (empty for attn-only)
    post: list[Tensor]  # resid_post[L] [n,p,d]
    delta: Tensor  # [n_senders, n, p, d] corrupted - clean sender outputs


def _collect(model: Any, graph: Graph, task: Task, rows: int) -> _Cache:
    """Clean + corrupted forwards through the bridge's hooks (in prompt batches of ``rows``)."""
    L = graph.spec.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    if not graph.spec.attn_only:
        names += [f"blocks.{i}.hook_mlp_in" for i in range(L)]
    names += [g.hook for g in graph.sender_groups]
    names = list(dict.fromkeys(names))

    def run(tokens: Tensor) -> dict[str, Tensor]:
        store: dict[str, list[Tensor]] = {k: [] for k in names}
        for start in range(0, tokens.shape[0], rows):
            got: dict[str, Tensor] = {}

            def save(key):
                def hook(x, hook=None):
                    got[key] = x.detach().clone()
                    return x

                return hook

            with torch.no_grad():
                model.run_with_hooks(tokens[start : start + rows], fwd_hooks=[(k, save(k)) for k in names])
            for k in names:
                store[k].append(got[k])
        return {k: torch.cat(v) for k, v in store.items()}

    clean, corr = run(task.clean), run(task.corrupted)
    delta = torch.cat(
        [as_nodes(corr[g.hook], g) - as_nodes(clean[g.hook], g) for g in graph.sender_groups]
    )
    pre = [clean[f"blocks.{i}.hook_resid_pre"] for i in range(L)]
    post = pre[1:] + [clean[f"blocks.{L - 1}.hook_resid_post"]]
    mlp_in = [] if graph.spec.attn_only else [clean[f"blocks.{i}.hook_mlp_in"] for i in range(L)]
    return _Cache(pre, mlp_in, post, delta)


# ------------------------------------------------------------------------------ evaluators
class _Evaluator:
    """Metric differences of stacked patched copies for one prompt batch."""

    def __init__(self, model: Any, graph: Graph, task: Task, cache: _Cache, use_readout: bool, runner: BlockRunner | None):
        self.model, self.graph, self.task, self.cache = model, graph, task, cache
        self.use_readout = use_readout
        self.rn = runner
        self._tasks: dict[tuple, Task] = {}
        self._base: dict[tuple, Tensor] = {}
        self._head: dict[tuple, tuple] = {}

    # -------------------------------------------------------------- metric
    def _rep_task(self, P: slice, m: int) -> Task:
        key = (P.start, P.stop, m)
        if key not in self._tasks:
            idx = torch.arange(P.start, P.stop).repeat(m)
            self._tasks[key] = self.task.subset(idx)
        return self._tasks[key]

    def _metric_from_resid(self, x: Tensor, point: tuple[str, int], P: slice, m: int) -> Float[Tensor, "m nb"]:
        t = self._rep_task(P, m)
        rn = self.rn
        if self.use_readout:
            pos = t.per_prompt["readout_pos"].to(x.device).long()
            final = rn.run(x, point, pos)
            vals = t.readout(rn.selected_logits(final, t.per_prompt["readout_tokens"].to(x.device).long()))
        else:
            vals = t.metric(rn.logits(rn.run(x, point)))
        return vals.view(m, -1)

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

        t = self._rep_task(P, m)
        with torch.no_grad():
            logits = self.model.run_with_hooks(self.task.clean[P].repeat(m, 1), fwd_hooks=[(hook, add)])
        key = ("hooks", P.start)
        if key not in self._base:
            with torch.no_grad():
                self._base[key] = self._rep_task(P, 1).metric(self.model(self.task.clean[P]))
        return t.metric(logits).view(m, -1) - self._base[key]


# ------------------------------------------------------------------------------ planning
def _row_bytes(model: Any, task: Task, use_readout: bool) -> int:
    cfg = model.cfg
    p, d = task.seq_len, cfg.d_model
    item = next(model.parameters()).element_size()
    per = p * (12 * d + 3 * (getattr(cfg, "d_mlp", None) or 4 * d) + 3 * cfg.n_heads * p)
    if not use_readout:
        per += 2 * p * cfg.d_vocab
    return per * item


def auto_rows(model: Any, task: Task, use_readout: bool, memory_budget: int | None = None) -> int:
    """Stacked rows (copies x prompts) per forward from a memory budget (bytes).

    CPU: budget 512 MiB, at most 256 rows (fastest measured range 80-320). CUDA: a quarter of
    the free memory unless ``memory_budget`` is given."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        budget = memory_budget or int(torch.cuda.mem_get_info(dev)[0] * 0.25)
        cap = 16384
    else:
        budget = memory_budget or CPU_MEMORY_BUDGET
        cap = CPU_MAX_ROWS
    return int(max(1, min(cap, budget // _row_bytes(model, task, use_readout))))


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


# ------------------------------------------------------------------------------ engine
def _check_inputs(model: Any, graph: Graph, task: Task, scale: float) -> None:
    if not isinstance(graph, Graph):
        raise PatchError(f"graph must be an eap.Graph, got {type(graph).__name__}")
    if not isinstance(task, Task):
        raise PatchError(f"task must be an eap.Task, got {type(task).__name__}")
    graph.check_model(model)
    check_edge_hooks(model, graph)
    if not math.isfinite(float(scale)):
        raise PatchError(f"scale must be finite, got {scale}")


def _run(
    model: Any, graph: Graph, task: Task, kind: str, items: Tensor, n_items: int,
    item_sender: Tensor, item_key: Tensor, key_layer: Callable[[int], int],
    *, scale: float, batch_size: int | None, memory_budget: int | None, readout: bool | None,
    method: str, out: Any, shard: Any, progress: bool, stats: dict | None,
) -> Float[Tensor, " n"]:
    _check_inputs(model, graph, task, scale)
    if method not in ("auto", "fast", "hooks"):
        raise PatchError(f"method must be 'auto', 'fast' or 'hooks', got {method!r}")
    shard = _parse_shard(shard)
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
            warnings.warn(f"{exc}; using the (slower) hook-based patching path")
    if runner is None:
        use_readout = False
    evaluate_name = {("edges", True): "receiver", ("edges", False): "_hooked_receiver",
                     ("nodes", True): "_node", ("nodes", False): "_hooked_node"}[(kind, runner is not None)]

    fp = fingerprint(model, graph, task, items, scale, kind)
    assigned = items
    if shard is not None:
        keys = item_key[items]
        layers = torch.tensor([key_layer(int(k)) for k in keys.tolist()], dtype=torch.float64)
        weights = graph.spec.n_layers - layers + 1.0
        assigned = items[shard_groups(keys, weights, *shard)]
    meta = describe_request(model, graph, task, items, scale, kind)
    meta["parts"] = fingerprint_parts(model, graph, task, items, scale, kind)
    store = ResultStore.open(out, fp, n_items, items, assigned, shard, meta, kind)
    todo = store.todo()

    rows = int(batch_size) if batch_size else auto_rows(model, task, use_readout, memory_budget)
    n = task.n_prompts
    nb = min(n, rows)
    per_chunk = max(1, rows // nb)
    batches = [slice(s, min(s + nb, n)) for s in range(0, n, nb)]
    t0 = time.perf_counter()
    n_forwards = 0
    if len(todo):
        with torch.no_grad():
            cache = _collect(model, graph, task, nb)
            ev = _Evaluator(model, graph, task, cache, use_readout, runner)
            setup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            eval_key = item_key
            if kind == "nodes" and runner is not None:
                # senders of one hook group inject at the same residual point: stack them together
                eval_key = torch.cat([torch.full((g.size,), gi) for gi, g in enumerate(graph.sender_groups)])
            keys = eval_key[todo]
            order = torch.argsort(keys * (n_items + 1) + todo, stable=True)
            todo, keys = todo[order], keys[order]
            groups = torch.unique_consecutive(keys, return_counts=True)
            bar = _progress(len(todo), kind, progress)
            start = 0
            try:
                for key, count in zip(groups[0].tolist(), groups[1].tolist()):
                    ids_all = todo[start : start + count]
                    start += count
                    for c0 in range(0, count, per_chunk):
                        ids = ids_all[c0 : c0 + per_chunk]
                        senders = item_sender[ids].to(device)
                        total = torch.zeros(len(ids), dtype=torch.float64, device=device)
                        for P in batches:
                            D = cache.delta[senders, P]
                            if scale != 1.0:
                                D = D * scale
                            total += getattr(ev, evaluate_name)(key, D, P).double().sum(1)
                            n_forwards += 1
                        store.record(ids, total / n)
                        store.save()
                        bar.update(len(ids))
            finally:
                bar.close()
            patch_s = time.perf_counter() - t1
    else:
        setup_s = patch_s = 0.0
    if stats is not None:
        stats.update(
            kind=kind, n_measured=int(len(todo)), n_requested=int(len(items)), n_assigned=int(len(assigned)),
            setup_s=setup_s, patch_s=patch_s, items_per_s=(len(todo) / patch_s if patch_s > 0 else float("nan")),
            n_forwards=n_forwards, rows_per_forward=rows, copies_per_forward=per_chunk, prompts_per_forward=nb,
            path="fast" if runner is not None else "hooks", readout=use_readout, fingerprint=fp,
        )
    result = torch.full((n_items,), float("nan"), dtype=torch.float64)
    result[assigned] = store.values[assigned]
    return result


def _progress(total: int, kind: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def update(self, k): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, unit=kind[:-1], desc=f"exact {kind}", dynamic_ncols=True, smoothing=0.05)


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
    memory_budget: int | None = None,
    readout: bool | None = None,
    method: str = "auto",
    out: Any = None,
    shard: Any = None,
    progress: bool = True,
    stats: dict | None = None,
) -> Float[Tensor, " n_edges"]:
    """Exact effect of patching each requested edge, in graph edge order (float64, CPU).

    ``result[e] = mean_prompts[metric(patched_e) - metric(clean)]`` in metric units, where
    patched_e adds ``scale * (corrupted_u - clean_u)`` to receiver v's input only (see module
    docstring). Same sign/units as ``eap.attribute``. Edges not requested (or not in this shard)
    are NaN.

    edges: None/'all', list/tensor of indices or names, 'topk:K' (by ``scores``), 'sample:K',
        'stratified:K' (seeded by ``seed``); see ``Graph.select_edges``.
    batch_size: stacked rows (copies x prompts) per forward; default from ``memory_budget``.
    readout: use ``task.readout`` (only the needed logits); default when the task has one.
    method: 'auto' (fast runner, hook path for unsupported architectures), 'fast', 'hooks'.
    out: results file: saved after every chunk, resumed if it exists (refused if it was written
        for other arguments). shard: (i, n) or 'i/n': only part i of n (whole receivers).
    stats: dict filled with timing facts (setup_s, patch_s, items_per_s, rows_per_forward, path).
    """
    try:
        items = graph.select_edges(edges, scores, seed)
    except GraphError:
        raise
    except Exception as exc:
        raise GraphError(f"cannot interpret edge spec {edges!r}: {exc}") from exc
    rec_layer = [g.layer for g in graph.receiver_groups for _ in range(g.size)]
    return _run(
        model, graph, task, "edges", items, graph.n_edges, graph.edge_sender, graph.edge_receiver,
        lambda r: rec_layer[r], scale=scale, batch_size=batch_size, memory_budget=memory_budget,
        readout=readout, method=method, out=out, shard=shard, progress=progress, stats=stats,
    )


def patch_nodes(
    model: Any,
    graph: Graph,
    task: Task,
    nodes: Any = None,
    *,
    scale: float = 1.0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    readout: bool | None = None,
    method: str = "auto",
    out: Any = None,
    shard: Any = None,
    progress: bool = True,
    stats: dict | None = None,
) -> Float[Tensor, " n_senders"]:
    """Exact effect of patching each sender node's output in the residual stream (all its
    receivers at once, everything downstream recomputed), in ``graph.senders`` order.

    ``result[u] = mean_prompts[metric(clean with out_u -> clean_u + scale*(corr_u - clean_u)) -
    metric(clean)]``, metric units; the truth for node-level attribution. ``nodes``: None/'all'
    or a list of sender names/indices; NaN for senders not requested."""
    items = graph.select_senders(nodes)
    ids = torch.arange(graph.n_senders)
    sender_layer = []
    for g in graph.sender_groups:
        sender_layer += [g.layer] * g.size
    return _run(
        model, graph, task, "nodes", items, graph.n_senders, ids, ids,
        lambda s: sender_layer[s], scale=scale, batch_size=batch_size, memory_budget=memory_budget,
        readout=readout, method=method, out=out, shard=shard, progress=progress, stats=stats,
    )


def _node(self: _Evaluator, group: int, D: Tensor, P: slice) -> Tensor:
    return self.inject(self.sender_point(self.graph.sender_groups[group].start), D, P)


def _hooked_receiver(self: _Evaluator, r: int, D: Tensor, P: slice) -> Tensor:
    g = self.graph.receiver_group_of(r)
    return self.hooked(g.hook, (r - g.start) if g.n_heads else None, D, P)


def _hooked_node(self: _Evaluator, s: int, D: Tensor, P: slice) -> Tensor:
    for g in self.graph.sender_groups:
        if g.start <= s < g.start + g.size:
            return self.hooked(g.hook, (s - g.start) if g.n_heads else None, D, P)
    raise GraphError(f"sender index {s} out of range")


_Evaluator._node = _node
_Evaluator._hooked_receiver = _hooked_receiver
_Evaluator._hooked_node = _hooked_node
