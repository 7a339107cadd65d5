"""Fast gradient edge attribution: EAP, EAP-IG and clean-corrupted, vectorised.

Sign and units
--------------
``score(u -> v) = mean over prompts of (out_u(corrupted) - out_u(clean)) . d metric / d in_v``,
summed over positions, the gradient taken on the clean run ("noising"). It is the first-order
estimate of ``metric(edge patched) - metric(clean)`` in the metric's units, the same quantity that
``validation.patch_edges`` measures exactly.

Methods
-------
``eap``              gradient at the clean run (the seed notebook's method).
``eap-ig``           gradient averaged over ``ig_steps`` inputs interpolated between the corrupted
                     and the clean input embedding, ``x_k = clean + (1 - k/m)(corrupted - clean)``,
                     k = 1..m (so m = 1 is EAP).
``clean-corrupted``  average of the gradients at the clean and at the corrupted run.
``atp-qk``           EAP, but q and k edges recompute the receiver head's attention pattern exactly
                     and are linear only from the pattern on (AtP*'s QK-fix; ``eap.atp``).
``atp-graddrop``     EAP averaged over gradients with one layer's residual-stream gradient dropped
                     (AtP*'s GradDrop; magnitudes per the paper, signed; ``eap.atp``).
``atp*``             both fixes (Kramar et al. 2024, adapted to edges; see ``eap.atp``, docs/atp.md).

How it is computed (per prompt batch)
-------------------------------------
1. corrupted forward, no grad: forward hooks write every sender's output into one preallocated
   buffer ``[n_senders, batch, pos, d_model]``; the forward stops after the last sender (no
   unembedding).
2. clean forward with grad: the same hooks subtract the clean outputs (buffer = corrupted - clean);
   the residual at ``blocks.0.hook_resid_pre`` is the only leaf.
3. backward: a tensor hook on each receiver's input contracts its gradient with the upstream prefix of the buffer in
   one matrix product and adds into the ``[n_senders, n_receivers]`` score matrix. Gradients are
   never stored, no parameter gradient is accumulated.
``eap-ig`` and ``clean-corrupted`` add one forward+backward per extra gradient point. The AtP
methods share steps 1-3 (``fill_corrupted``, ``receiver_hooks``, ``metric_values``) and add their
own work (``eap.atp.AtP``). ``attribute`` picks the strategy explicitly (``_strategy``).

Engines
-------
The passes above run on one of two engines, chosen once per call (``engine=``): ``fast``
(``eap.fast``: the same passes on the architecture adapter's plain-torch blocks, no per-head
copies of the residual stream) wherever ``eap.arch`` reproduces the model, else ``bridge`` (the
hooks above, through the TransformerLens bridge). Both give the same scores. The AtP
methods run on the bridge engine.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from eap.arch import Readout
from eap.budget import attribution_batch_size
from eap.fast import ENGINES, FastEngine, engine_for, refuse_bridge_for_post_norms
from eap.graph import Graph, HookGroup
from eap.hooks import (
    StopForward, check_edge_hooks, leaf_input_hook, require_edge_hooks, run_until_stop, sender_difference_hooks,
    stop_hook, with_grad_hook,
)
from eap.models import model_device, model_dtype
from eap.task import Task, TaskError

GRADIENT_METHODS = ("eap", "eap-ig", "clean-corrupted")
ATP_METHODS = ("atp-qk", "atp-graddrop", "atp*")
METHODS = GRADIENT_METHODS + ATP_METHODS

class AttributionError(ValueError):
    """Bad arguments to ``attribute``."""


def gradient_points(method: str, ig_steps: int = 5) -> list[tuple[float, float]]:
    """(alpha, weight) pairs: the input of each backward pass is
    ``clean + (1 - alpha) * (corrupted - clean)`` and its gradient counts with ``weight``."""
    if method == "eap":
        return [(1.0, 1.0)]
    if method == "eap-ig":
        if ig_steps < 1:
            raise AttributionError(f"ig_steps must be >= 1, got {ig_steps}")
        return [(k / ig_steps, 1.0 / ig_steps) for k in range(ig_steps, 0, -1)]
    if method == "clean-corrupted":
        return [(1.0, 0.5), (0.0, 0.5)]
    raise AttributionError(f"unknown gradient method {method!r}; choose one of {GRADIENT_METHODS}")


def auto_batch_size(
    model: Any, graph: Graph, task: Task, budget_bytes: int | float | str | None = None
) -> int:
    """Prompts per attribution batch within ``budget_bytes`` (default: a share of the free
    device memory), on either engine (the bridge's per-prompt estimate also bounds the fast
    engine, which keeps fewer activations; tests/test_memory.py); ``eap.budget.attribution_batch_size`` decides."""
    return attribution_batch_size(model, graph.n_senders, task.n_prompts, task.seq_len, task.has_readout, budget_bytes)


@torch.no_grad()
def _check_inputs(model: Any, graph: Graph, task: Task, method: str, level: str, engine: str = "auto") -> None:
    if engine not in ENGINES:
        raise AttributionError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    if level not in ("edge", "node"):
        raise AttributionError(f"level must be 'edge' or 'node', got {level!r}")
    if level == "node" and method in ATP_METHODS:
        raise AttributionError(
            f"{method!r} scores edges only (level='edge'): its QK-fix and GradDrop terms are not additive over a "
            "sender's edges, so a node score would not be the estimate of patching the node; use 'eap' for nodes"
        )
    if not isinstance(task, Task):
        raise AttributionError(f"task must be an eap.Task, got {type(task).__name__}")
    spec = check_edge_hooks(model, graph)  # hooks, and the architecture adapter's checks (eap.arch)
    if level == "node" and spec.whole_qk_norm:
        raise AttributionError(
            f"{spec.family}: a q/k norm over all heads couples the heads, so a node's first-order effect is not the "
            "sum of its edges' (each head's own view, eap.arch.mixednorm); node-level attribution is not offered "
            "for this family (validation.patch_nodes gives exact node effects)"
        )
    task.check_tokens(spec.d_vocab, model.cfg.n_ctx)


def attribute(
    model: Any,
    graph: Graph,
    task: Task,
    method: Literal["eap", "eap-ig", "clean-corrupted", "atp-qk", "atp-graddrop", "atp*"] = "eap",
    *,
    level: Literal["edge", "node"] = "edge",
    batch_size: int | None = None,
    ig_steps: int = 5,
    memory_budget: int | float | str | None = None,
    progress: bool = True,
    write_graph: bool = True,
    engine: Literal["auto", "fast", "bridge"] = "auto",
) -> Float[Tensor, " n"]:
    """Score every edge (``level='edge'``, a tensor ``[graph.n_edges]`` in the graph's edge order)
    or every sender (``level='node'``, ``[graph.n_senders]``).

    Units and sign: score ~= mean over prompts of metric(patched) - metric(clean), in the units of
    ``task.metric`` (e.g. logits for IOI's logit difference); patched = the sender's output
    replaced by its corrupted value (edge: at one receiver; node: everywhere). First order,
    gradient on the clean run for ``eap`` (see module docstring for the other methods; the AtP
    methods, ``eap.atp``, score edges only).

    Prompts are split into batches of ``batch_size`` (when None, as many as fit
    ``memory_budget``: bytes or a size such as ``"2GiB"``, default a share of the free device
    memory; see ``eap.budget``); the result does not depend on the split. The gradient methods
    peak at the same memory per batch (their gradient points run one after another); the AtP
    methods hold more per prompt and plan for it (``eap.budget.plan_atp``). A metric that closes
    over tensors of all prompts cannot be split: then a ``TaskError`` asks for ``per_prompt``
    data unless one batch holds every prompt. Scores come back on the CPU in the model's dtype
    (float32 at least); with ``write_graph`` they are also written into ``graph.scores``.

    ``engine``: ``"auto"`` (the fast engine of ``eap.fast`` where the architecture adapter
    reproduces the model and no hooks are attached, else the bridge's hooks), ``"fast"`` (or
    ``eap.arch.UnsupportedModel``) or ``"bridge"``; the scores are the same.
    """
    _check_inputs(model, graph, task, method, level, engine)
    device, dtype = model_device(model), model_dtype(model)
    task = task.to(device)
    # accumulate in at least float32 (a half-precision model would otherwise sum in half)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=device, dtype=torch.promote_types(dtype, torch.float32))
    strategy = _strategy(model, graph, method, ig_steps, scores, engine)
    chosen = batch_size is not None
    if batch_size is None:
        batch_size = strategy.auto_batch_size(task, memory_budget)
    else:
        strategy.plan(task, batch_size, memory_budget)
    if batch_size < task.n_prompts:
        problem = task.subset_problem(model.cfg.d_vocab)
        if problem is not None:
            why = (f"batch_size={batch_size}" if chosen else
                   f"the memory budget holds {batch_size} prompts per batch (eap.budget)")
            raise TaskError(
                f"{problem}: the metric seems to close over data of all {task.n_prompts} prompts, but {why} "
                f"splits them. Pass the per-prompt data (answer ids, positions, ...) through "
                f"Task(per_prompt=...) so the metric is called as metric(logits, **batch_data), or use "
                f"batch_size >= {task.n_prompts} (a larger memory_budget)."
            )
    batches = list(task.batches(batch_size))
    bar = tqdm(batches, desc=f"{method} attribution", unit="batch", disable=not progress or len(batches) == 1)
    for batch in bar:
        strategy.accumulate(batch, 1.0 / task.n_prompts)
    scores = strategy.result().cpu()
    if level == "node":
        return (scores * graph.mask).sum(dim=1)
    out = scores[graph.edge_sender, graph.edge_receiver]
    if write_graph:
        graph.scores = scores * graph.mask
    return out


def _strategy(model: Any, graph: Graph, method: str, ig_steps: int,
              scores: Float[Tensor, "n_senders n_receivers"], engine: str = "auto") -> "GradientMethod | Any":
    """The strategy that computes ``method`` (explicit: gradient points on the chosen engine, or
    an AtP variant on the bridge)."""
    if method in GRADIENT_METHODS:
        points = gradient_points(method, ig_steps)
        return GradientMethod(model, graph, points, scores, engine_for(model, engine))
    if engine == "fast":
        raise AttributionError(f"{method!r} runs on the bridge engine only (eap.atp); use engine='auto' or 'bridge'")
    refuse_bridge_for_post_norms(model)  # the AtP methods run on the bridge (no post-norm Jacobian)
    from eap.atp import AtP, atp_options  # eap.atp builds on this module's pieces

    require_edge_hooks(model, f"{method!r} runs on the bridge engine only (eap.atp)")
    return AtP(model, graph, atp_options(method), scores)


class GradientMethod:
    """EAP, EAP-IG and clean-corrupted: gradients at fixed points contracted at every receiver
    (module docstring, steps 1-3); adds into ``scores`` [n_senders, n_receivers]."""

    def __init__(self, model: Any, graph: Graph, points: list[tuple[float, float]],
                 scores: Float[Tensor, "n_senders n_receivers"], fast: FastEngine | None = None) -> None:
        """``fast``: the fast engine (``eap.fast``), or None for the bridge's hooks."""
        self.model, self.graph, self.points, self.scores, self.fast = model, graph, points, scores, fast

    def auto_batch_size(self, task: Task, budget: int | float | str | None) -> int:
        return auto_batch_size(self.model, self.graph, task, budget)

    def plan(self, task: Task, batch_size: int, budget: int | float | str | None) -> None:
        """Nothing to plan beyond the batch size the caller chose."""

    def accumulate(self, task: Task, prompt_weight: float) -> None:
        _accumulate(self.model, self.graph, task, self.points, self.scores, prompt_weight, self.fast)

    def result(self) -> Float[Tensor, "n_senders n_receivers"]:
        return self.scores


class ScoreSink:
    """Where the receiver hooks add their contractions: ``scores`` [n_senders, n_receivers]
    (switchable between passes) times ``weight``."""

    __slots__ = ("scores", "weight")

    def __init__(self, scores: Float[Tensor, "n_senders n_receivers"], weight: float = 0.0) -> None:
        self.scores, self.weight = scores, weight


def fill_corrupted(model: Any, graph: Graph, task: Task, buf: Float[Tensor, "n_senders batch pos d_model"]) -> None:
    """Step 1: a corrupted forward without grad writes every sender's output into ``buf``; it
    stops after the last sender (no unembedding)."""
    with torch.no_grad():
        fwd = sender_difference_hooks(graph, buf, subtract=False) + [(graph.sender_groups[-1].hook, stop_hook)]
        run_until_stop(model, task.corrupted, fwd)


def receiver_hooks(
    graph: Graph, buf: Float[Tensor, "n_senders batch pos d_model"], sink: ScoreSink,
    groups: list[HookGroup] | None = None,
) -> list[tuple[str, Any]]:
    """Step 3's forward hooks for the receiver ``groups`` (default all): each puts a tensor hook
    on its receiver's input that contracts the gradient with the upstream prefix of ``buf``
    (sender differences) in one matrix product and adds it, times ``sink.weight``, into
    ``sink.scores`` (units: metric per unit of gradient-weighted difference = metric units)."""

    def contract(group: HookGroup):
        n_up, size = group.n_upstream, group.size

        def on_grad(grad: Tensor) -> None:
            # grad [b, p, (H,) d] -> [(b p d), H]; buffer prefix [n_up, (b p d)]: one matmul
            g = grad.unsqueeze(-2) if group.n_heads is None else grad
            g = g.transpose(-1, -2).reshape(-1, size)
            block = buf[:n_up].reshape(n_up, -1) @ g
            scores = sink.scores
            scores[:n_up, group.start : group.start + size].add_(block.to(scores.dtype), alpha=sink.weight)

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            return with_grad_hook(act, on_grad)

        return hook

    return [(g.hook, contract(g)) for g in (graph.receiver_groups if groups is None else groups)]


def _accumulate(
    model: Any,
    graph: Graph,
    task: Task,
    points: list[tuple[float, float]],
    scores: Float[Tensor, "n_senders n_receivers"],
    prompt_weight: float,
    fast: FastEngine | None = None,
) -> None:
    """Add one batch's contribution (weighted by ``prompt_weight`` per prompt) into ``scores``:
    on the fast engine when given (``eap.fast``), else through the bridge's hooks (below)."""
    if fast is not None:
        fast.accumulate(graph, task, points, scores, prompt_weight)
        return
    b, p = task.clean.shape
    d = model.cfg.d_model
    buf = torch.empty(graph.n_senders, b, p, d, device=scores.device, dtype=model_dtype(model))

    # 1. corrupted forward: buffer <- corrupted sender outputs; stop after the last sender.
    fill_corrupted(model, graph, task, buf)

    # 2.+3. clean forward with grad (buffer -= clean outputs), backward into the score matrix.
    sink = ScoreSink(scores)
    receivers = receiver_hooks(graph, buf, sink)
    for i, (alpha, weight) in enumerate(points):
        sink.weight = weight * prompt_weight
        shift = None if alpha == 1.0 else (1.0 - alpha) * buf[0]
        fwd = [("blocks.0.hook_resid_pre", leaf_input_hook(shift))]
        if i == 0:
            if alpha != 1.0:
                raise AssertionError("the first gradient point must be the clean run")
            fwd += sender_difference_hooks(graph, buf, subtract=True)
        with model.hooks(fwd_hooks=fwd + receivers):
            metric = metric_values(model, task, task.clean)
        # backward outside the hook context: only tensor hooks are involved
        metric.sum().backward()


def metric_values(model: Any, task: Task, tokens: Tensor) -> Float[Tensor, " batch"]:
    """Per-prompt metric of a forward on ``tokens`` (hooks already attached by the caller).

    With a task readout only the needed logits are computed: the forward stops at the last
    residual stream and ``select_logits`` does the final LayerNorm and a slice of the unembedding.
    """
    if not task.has_readout:
        return task.metric(model(tokens))
    resid: list[Tensor] = []

    def grab(act: Tensor, hook: Any = None) -> Tensor:
        resid.append(act)
        raise StopForward

    # grab after the last block's output hook, so the logits receiver's tensor hook (put on
    # that hook's output) is on the path; nothing of the final LayerNorm or unembedding runs.
    with model.hooks(fwd_hooks=[("ln_final.hook_in", grab)]):
        try:
            model(tokens)
        except StopForward:
            pass
    return task.readout(select_logits(model, resid[0], task))


def select_logits(
    model: Any, resid: Float[Tensor, "batch pos d_model"], task: Task
) -> Float[Tensor, "batch k"]:
    """Logits of ``readout_tokens`` at ``readout_pos`` from the final residual stream: the final
    norm at that one position, then only those columns of the unembedding (and any final logit
    softcap), in float32 at least. The same ``eap.arch.Readout`` as validation's block runner."""
    pos = task.per_prompt["readout_pos"].long()
    toks = task.per_prompt["readout_tokens"].long()
    x = resid[torch.arange(resid.shape[0], device=resid.device), pos]  # [b, d]
    return Readout(model).selected(x, toks)
