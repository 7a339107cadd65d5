"""EAP-IG over activations (MIB's ``EAP-IG-activations``): integrated gradients along each
sender group's straight line from its clean to its replacement output.

Definition (per prompt batch; ``m = ig_steps``, ``G`` = the graph's sender groups: the input,
each layer's heads, each layer's MLP)::

    score(u -> v) = 1/(G m) sum_g sum_{k=1..m} (rep_u - clean_u) . d metric / d in_v |_(g, k/m)

where ``|_(g, a)`` is the clean run in which group g's output is ``clean_g + (1 - a)(rep_g -
clean_g)`` (every sender of the group at once, everything downstream recomputed) and ``rep`` is
the intervention's replacement (``eap.interventions``: the corrupted run's output for
'patching'). Sign and units as ``eap.attribute`` (metric units, noising). With ``m = 1`` every
pass is the clean run: EAP exactly. The ``k = m`` pass is the clean run for every group, so it runs
once with weight ``G``: ``G (m - 1) + 1`` forward+backward passes per batch.

Differences from hannamw/EAP-IG 795f5607 (``get_scores_ig_activations``), which otherwise this
follows: there the group's output is *replaced* by the detached constant ``a clean + (1 - a)
corrupted``, which cuts the gradient through the group (its own receivers get no gradient in
its passes, those upstream lose the paths through it: at ``m = 1`` only the edges into the logits
keep EAP's scores); here the output is shifted by a
constant, so the gradient flows through it. Under 'mean' EAP-IG interpolates toward zero while
its difference uses the mean; here both use the replacement.

``gradient_through_group=False`` (the registry option; default True) is EAP-IG's variant, to
reproduce its (MIB's) numbers: group g's output is replaced by the detached constant, and all
``G m`` passes run (none is shared, as the cut differs per group). 'patching' only (its 'mean'
interpolates toward zero, not toward the replacement); other interventions are refused.

Bridge engine only (hooks at the sender groups).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eap.passes import (
    AttributionError, Replacements, ScoreSink, auto_batch_size, fill_corrupted, metric_values, receiver_hooks,
)
from eap.graph import Graph, HookGroup
from eap.hooks import leaf_input_hook, run_until_stop, sender_difference_hooks, stop_hook
from eap.models import model_dtype
from eap.task import Task


class IGActivations:
    """The strategy of ``attribute(method='eap-ig-activations')`` (module docstring); adds into
    ``scores`` [n_senders, n_receivers]."""

    def __init__(self, model: Any, graph: Graph, steps: int, scores: Float[Tensor, "n_senders n_receivers"],
                 intervention: str = "patching", reference: Tensor | None = None,
                 gradient_through_group: bool = True) -> None:
        if steps < 1:
            raise AttributionError(f"ig_steps must be >= 1, got {steps}")
        if not gradient_through_group and intervention != "patching":
            raise AttributionError(f"eap-ig-activations with gradient_through_group=False (EAP-IG's variant) runs "
                                   f"under intervention='patching' only, got {intervention!r}")
        self.model, self.graph, self.steps, self.scores = model, graph, steps, scores
        self.cut = not gradient_through_group
        self.replacements = Replacements(model, graph, intervention, reference)

    def auto_batch_size(self, task: Task, budget: int | float | str | None) -> int:
        return auto_batch_size(self.model, self.graph, task, budget)

    def plan(self, task: Task, batch_size: int, budget: int | float | str | None) -> None:
        """Nothing to plan beyond the batch size (one pass at a time, as EAP)."""

    def result(self) -> Float[Tensor, "n_senders n_receivers"]:
        return self.scores

    def accumulate(self, task: Task, prompt_weight: float) -> None:
        """Add one prompt batch's contribution (``prompt_weight`` per prompt) into the scores."""
        model, graph, m = self.model, self.graph, self.steps
        b, p = task.clean.shape
        buf = torch.empty(graph.n_senders, b, p, model.cfg.d_model, device=self.scores.device, dtype=model_dtype(model))
        fill_corrupted(model, graph, task, buf, self.replacements.of(task))
        with torch.no_grad():  # buf = replacement - clean
            run_until_stop(model, task.clean, sender_difference_hooks(graph, buf, subtract=True)
                           + [(graph.sender_groups[-1].hook, stop_hook)])
        groups = graph.sender_groups
        sink = ScoreSink(self.scores)
        receivers = receiver_hooks(graph, buf, sink)
        passes: list[tuple[HookGroup | None, float, float]] = [(None, 0.0, len(groups))]  # the clean run, G times
        passes += [(g, 1.0 - k / m, 1.0) for g in groups for k in range(1, m)]
        if self.cut:  # every (group, step) pass is distinct: the gradient is cut at a different group
            passes = [(g, 1.0 - k / m, 1.0) for g in groups for k in range(1, m + 1)]
        for group, shift, count in passes:
            sink.weight = prompt_weight * count / (len(groups) * m)
            fwd = _shift_hooks(group, shift, buf, self.cut)
            with model.hooks(fwd_hooks=fwd + receivers):
                metric = metric_values(model, task, task.clean)
            metric.sum().backward()


def _shift_hooks(group: HookGroup | None, shift: float, buf: Float[Tensor, "n_senders b p d"],
                 cut: bool = False) -> list:
    """Forward hooks of one pass: the input residual as the leaf; ``group``'s output plus
    ``shift * (rep - clean)`` (None: the clean run), detached when ``cut`` (the input is a leaf
    either way)."""
    rows = None if group is None else buf[group.start : group.start + group.size]
    if group is not None and group.kind == "input":
        return [("blocks.0.hook_resid_pre", leaf_input_hook(shift * rows[0]))]
    fwd = [("blocks.0.hook_resid_pre", leaf_input_hook(None))]
    if group is None:
        return fwd
    delta = shift * (rows.permute(1, 2, 0, 3) if group.n_heads else rows[0])  # to the hook's layout

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        return (x + delta).detach() if cut else x + delta

    return fwd + [(group.hook, hook)]
