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
``eap-ig`` and ``clean-corrupted`` add one forward+backward per extra gradient point.

Engines
-------
The passes above run on one of two engines, chosen once per call (``engine=``): ``fast``
(``eap.fast``: the same passes on the architecture adapter's plain-torch blocks, no per-head
copies of the residual stream) wherever ``eap.arch`` reproduces the model, else ``bridge`` (the
hooks above, through the TransformerLens bridge). Both give the same scores.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from eap.arch import Readout
from eap.budget import attribution_batch_size
from eap.fast import ENGINES, FastEngine, engine_for
from eap.graph import Graph, HookGroup
from eap.hooks import (
    StopForward, check_edge_hooks, leaf_input_hook, run_until_stop, sender_difference_hooks, stop_hook,
)
from eap.models import model_device, model_dtype
from eap.task import Task, TaskError

METHODS = ("eap", "eap-ig", "clean-corrupted")

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
    raise AttributionError(f"unknown attribution method {method!r}; choose one of {METHODS}")


def auto_batch_size(
    model: Any, graph: Graph, task: Task, budget_bytes: int | float | str | None = None, fast: bool = False
) -> int:
    """Prompts per attribution batch within ``budget_bytes`` (default: a share of the free
    device memory) on the fast (``fast``) or the bridge engine; ``eap.budget.attribution_batch_size`` decides."""
    return attribution_batch_size(model, graph.n_senders, task.n_prompts, task.seq_len, task.has_readout, budget_bytes,
                                  fast=fast)


@torch.no_grad()
def _check_inputs(model: Any, graph: Graph, task: Task, method: str, level: str, engine: str = "auto") -> None:
    if engine not in ENGINES:
        raise AttributionError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    if level not in ("edge", "node"):
        raise AttributionError(f"level must be 'edge' or 'node', got {level!r}")
    if not isinstance(task, Task):
        raise AttributionError(f"task must be an eap.Task, got {type(task).__name__}")
    spec = check_edge_hooks(model, graph)  # hooks, and the architecture adapter's checks (eap.arch)
    task.check_tokens(spec.d_vocab, model.cfg.n_ctx)


def attribute(
    model: Any,
    graph: Graph,
    task: Task,
    method: Literal["eap", "eap-ig", "clean-corrupted"] = "eap",
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
    gradient on the clean run for ``eap`` (see module docstring for the other methods).

    Prompts are split into batches of ``batch_size`` (when None, as many as fit
    ``memory_budget``: bytes or a size such as ``"2GiB"``, default a share of the free device
    memory; see ``eap.budget``); the result does not depend on the split. Every method peaks at
    the same memory per batch (the gradient points run one after another). A metric that closes
    over tensors of all prompts cannot be split: then a ``TaskError`` asks for ``per_prompt``
    data unless one batch holds every prompt. Scores come back on the CPU in the model's dtype
    (float32 at least); with ``write_graph`` they are also written into ``graph.scores``.

    ``engine``: ``"auto"`` (the fast engine of ``eap.fast`` where the architecture adapter
    reproduces the model and no hooks are attached, else the bridge's hooks), ``"fast"`` (or
    ``eap.arch.UnsupportedModel``) or ``"bridge"``; the scores are the same.
    """
    _check_inputs(model, graph, task, method, level, engine)
    points = gradient_points(method, ig_steps)
    device, dtype = model_device(model), model_dtype(model)
    task = task.to(device)
    fast = engine_for(model, engine)  # None: the bridge engine
    chosen = batch_size is not None
    if batch_size is None:
        batch_size = auto_batch_size(model, graph, task, memory_budget, fast=fast is not None)
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
    # accumulate in at least float32 (a half-precision model would otherwise sum in half)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=device, dtype=torch.promote_types(dtype, torch.float32))
    batches = list(task.batches(batch_size))
    bar = tqdm(batches, desc=f"{method} attribution", unit="batch", disable=not progress or len(batches) == 1)
    for batch in bar:
        _accumulate(model, graph, batch, points, scores, 1.0 / task.n_prompts, fast)
    scores = scores.cpu()
    if level == "node":
        return (scores * graph.mask).sum(dim=1)
    out = scores[graph.edge_sender, graph.edge_receiver]
    if write_graph:
        graph.scores = scores * graph.mask
    return out


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
    with torch.no_grad():
        fwd = sender_difference_hooks(graph, buf, subtract=False) + [(graph.sender_groups[-1].hook, stop_hook)]
        run_until_stop(model, task.corrupted, fwd)

    # 2.+3. clean forward with grad (buffer -= clean outputs), backward into the score matrix.
    current_weight = [0.0]

    def contract(group: HookGroup):
        n_up, size = group.n_upstream, group.size

        def on_grad(grad: Tensor) -> None:
            # grad [b, p, (H,) d] -> [(b p d), H]; buffer prefix [n_up, (b p d)]: one matmul
            g = grad.unsqueeze(-2) if group.n_heads is None else grad
            g = g.transpose(-1, -2).reshape(-1, size)
            block = buf[:n_up].reshape(n_up, -1) @ g
            scores[:n_up, group.start : group.start + size].add_(block.to(scores.dtype), alpha=current_weight[0])

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            # A tensor hook (not a module backward hook: those clone every gradient). It goes on
            # a fresh view, because the hook's input can be shared with other paths (the bridge
            # passes resid_mid itself through hook_mlp_in); only this receiver uses the view.
            if not act.requires_grad:
                return act
            out = act.view_as(act)
            out.register_hook(on_grad)
            return out

        return hook

    receivers = [(g.hook, contract(g)) for g in graph.receiver_groups]
    for i, (alpha, weight) in enumerate(points):
        current_weight[0] = weight * prompt_weight
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
