"""The attribution passes every gradient method shares, and the loop over prompt batches.

``eap.attribute`` (the public entry), ``eap.methods`` (the registry of methods) and ``eap.atp``
(AtP*) all build on this module; it imports none of them. Sign and units as everywhere in eap:
``score(u -> v) ~= mean over prompts of metric(edge patched) - metric(clean)``, metric units,
sender difference ``corrupted - clean``, gradient on the clean run ("noising").

* ``check_task_inputs``: the model, graph and task fit together (hooks, the architecture
  adapter's checks, token ids and length).
* ``fill_corrupted`` / ``receiver_hooks`` / ``metric_values``: steps 1-3 of ``eap.attribute``'s
  module docstring (corrupted forward into the sender buffer; receiver tensor hooks contracting
  gradients with the buffer; the metric with only the needed logits).
* ``GradientMethod``: the strategy of EAP, EAP-IG and clean-corrupted (gradients at fixed
  points), on the fast engine (``eap.fast``) or the bridge's hooks.
* ``run_strategy``: the prompt-batch loop that drives any strategy into one score vector.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from eap.arch import Readout, arch_spec
from eap.budget import attribution_batch_size
from eap.fast import FastEngine, bridge_reason
from eap.graph import Graph, HookGroup
from eap.interventions import Intervention, Replacement, replacement_for
from eap.hooks import (
    StopForward, check_edge_hooks, leaf_input_hook, run_until_stop, sender_difference_hooks, stop_hook, with_grad_hook,
)
from eap.models import model_device, model_dtype
from eap.task import Task

LEVELS = ("edge", "node")

#: ``eap.attribute`` logs the engine of each call at INFO under its own name; the record carries
#: ``eap_engine`` ('fast' or 'bridge') and ``eap_engine_reason`` (why the bridge; '' for fast),
#: for tools (bench records them per cell).
log = logging.getLogger("eap.attribute")


class AttributionError(ValueError):
    """Bad arguments to ``attribute``."""


class Strategy(Protocol):
    """How one method computes: plans its batches, adds each batch into its score matrix, and
    returns the matrix ``[n_senders, n_receivers]`` (metric units, noising sign)."""

    def auto_batch_size(self, task: Task, budget: Any) -> int: ...

    def plan(self, task: Task, batch_size: int, budget: Any) -> Any: ...

    def accumulate(self, task: Task, prompt_weight: float) -> None: ...

    def result(self) -> Float[Tensor, "n_senders n_receivers"]: ...


def auto_batch_size(
    model: Any, graph: Graph, task: Task, budget_bytes: int | float | str | None = None
) -> int:
    """Prompts per attribution batch within ``budget_bytes`` (default: a share of the free
    device memory), on either engine (the bridge's per-prompt estimate also bounds the fast
    engine, which keeps fewer activations; tests/test_memory.py); ``eap.budget.attribution_batch_size`` decides."""
    return attribution_batch_size(model, graph.n_senders, task.n_prompts, task.seq_len, task.has_readout, budget_bytes)


@torch.no_grad()
def check_task_inputs(model: Any, graph: Graph, task: Task) -> None:
    """The task is an ``eap.Task`` whose tokens fit the model, and the model has the graph's hooks
    (``eap.hooks.check_edge_hooks``: also the architecture adapter's checks)."""
    if not isinstance(task, Task):
        raise AttributionError(f"task must be an eap.Task, got {type(task).__name__}")
    spec = check_edge_hooks(model, graph)  # hooks, and the architecture adapter's checks (eap.arch)
    task.check_tokens(spec.d_vocab, model.cfg.n_ctx)


def run_strategy(
    model: Any, graph: Graph, task: Task, make_strategy: Callable[[Tensor], Strategy], *,
    level: str, batch_size: int | None, memory_budget: int | float | str | None, progress: bool,
    write_graph: bool, label: str, engine: str = "auto",
) -> Float[Tensor, " n"]:
    """Score every edge (``level='edge'``) or sender (``'node'``) with the strategy that
    ``make_strategy(scores)`` builds around a zero score matrix ``[n_senders, n_receivers]``
    (at least float32, on the model's device): batches of ``batch_size`` prompts (None: as many
    as fit ``memory_budget``), each weighted ``1 / n_prompts``. See ``eap.attribute``."""
    if level == "node" and arch_spec(model).whole_qk_norm:
        raise AttributionError(
            f"{arch_spec(model).family}: a q/k norm over all heads couples the heads, so a node's first-order effect "
            "is not the sum of its edges' (each head's own view, eap.arch.mixednorm); node-level attribution is not "
            "offered for this family (validation.patch_nodes gives exact node effects)"
        )
    device, dtype = model_device(model), model_dtype(model)
    task = task.to(device)
    # accumulate in at least float32 (a half-precision model would otherwise sum in half)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=device, dtype=torch.promote_types(dtype, torch.float32))
    strategy = make_strategy(scores)
    used, reason = engine_used(model, strategy, label, engine)
    log.info("eap.attribute %s: %s engine%s", label, used, f" ({reason})" if reason else "",
             extra={"eap_engine": used, "eap_engine_reason": reason})
    chosen = batch_size is not None
    if batch_size is None:
        batch_size = strategy.auto_batch_size(task, memory_budget)
    else:
        strategy.plan(task, batch_size, memory_budget)
    if batch_size < task.n_prompts:
        why = (f"batch_size={batch_size}" if chosen else
               f"the memory budget holds {batch_size} prompts per batch (eap.budget)")
        task.check_split(model.cfg.d_vocab, why, f"use batch_size >= {task.n_prompts} (a larger memory_budget)")
    batches = list(task.batches(batch_size))
    bar = tqdm(batches, desc=f"{label} attribution", unit="batch", disable=not progress or len(batches) == 1)
    for batch in bar:
        strategy.accumulate(batch, 1.0 / task.n_prompts)
    scores = strategy.result().cpu()
    if level == "node":
        return (scores * graph.mask).sum(dim=1)
    out = scores[graph.edge_sender, graph.edge_receiver]
    if write_graph:
        graph.scores = scores * graph.mask
    return out


def engine_used(model: Any, strategy: Any, label: str, engine: str) -> tuple[str, str]:
    """('fast' | 'bridge', why the bridge: '' for fast) of one attribution call's strategy."""
    if not isinstance(strategy, GradientMethod):
        return "bridge", f"{label!r} runs on the bridge engine only (eap.atp)"
    if strategy.fast is not None:
        return "fast", ""
    return "bridge", bridge_reason(model, engine)


class GradientMethod:
    """EAP, EAP-IG and clean-corrupted: gradients at fixed points contracted at every receiver
    (module docstring, steps 1-3); adds into ``scores`` [n_senders, n_receivers]."""

    def __init__(self, model: Any, graph: Graph, points: list[tuple[float, float]],
                 scores: Float[Tensor, "n_senders n_receivers"], fast: FastEngine | None = None,
                 intervention: str = "patching", reference: Tensor | None = None) -> None:
        """``fast``: the fast engine (``eap.fast``), or None for the bridge's hooks;
        ``intervention``, ``reference``: what replaces a sender's output (``eap.interventions``;
        'patching': the corrupted run's)."""
        self.model, self.graph, self.points, self.scores, self.fast = model, graph, points, scores, fast
        self.replacements = Replacements(model, graph, intervention, reference)

    def auto_batch_size(self, task: Task, budget: int | float | str | None) -> int:
        return auto_batch_size(self.model, self.graph, task, budget)

    def plan(self, task: Task, batch_size: int, budget: int | float | str | None) -> None:
        """Nothing to plan beyond the batch size the caller chose."""

    def accumulate(self, task: Task, prompt_weight: float) -> None:
        _accumulate(self.model, self.graph, task, self.points, self.scores, prompt_weight, self.fast,
                    self.replacements.of(task))

    def result(self) -> Float[Tensor, "n_senders n_receivers"]:
        return self.scores


class ScoreSink:
    """Where the receiver hooks add their contractions: ``scores`` [n_senders, n_receivers]
    (switchable between passes) times ``weight``."""

    __slots__ = ("scores", "weight")

    def __init__(self, scores: Float[Tensor, "n_senders n_receivers"], weight: float = 0.0) -> None:
        self.scores, self.weight = scores, weight


class Replacements:
    """A strategy's replacement sender outputs (``eap.interventions.Replacement``), made at its
    first prompt batch (the batch keeps the task's whole reference set); None for 'patching'."""

    def __init__(self, model: Any, graph: Graph, intervention: str = "patching",
                 reference: Tensor | None = None) -> None:
        self.model, self.graph, self.reference = model, graph, reference
        self.intervention = Intervention.parse(intervention)
        self._made: Replacement | None = None

    def of(self, task: Task) -> Replacement | None:
        if self.intervention is Intervention.PATCHING:
            return None
        if self._made is None:
            self._made = replacement_for(self.model, self.graph, task, self.intervention, self.reference)
        return self._made


def fill_corrupted(model: Any, graph: Graph, task: Task, buf: Float[Tensor, "n_senders batch pos d_model"],
                   replacement: Replacement | None = None) -> None:
    """Step 1: a corrupted forward without grad writes every sender's output into ``buf``; it
    stops after the last sender (no unembedding). With ``replacement`` (an intervention other
    than patching) its outputs are written instead, without a forward."""
    if replacement is not None:
        replacement.fill(buf)
        return
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
    replacement: Replacement | None = None,
) -> None:
    """Add one batch's contribution (weighted by ``prompt_weight`` per prompt) into ``scores``:
    on the fast engine when given (``eap.fast``), else through the bridge's hooks (below)."""
    if fast is not None:
        fast.accumulate(graph, task, points, scores, prompt_weight, replacement)
        return
    b, p = task.clean.shape
    d = model.cfg.d_model
    buf = torch.empty(graph.n_senders, b, p, d, device=scores.device, dtype=model_dtype(model))

    # 1. corrupted forward: buffer <- corrupted sender outputs; stop after the last sender.
    fill_corrupted(model, graph, task, buf, replacement)

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
