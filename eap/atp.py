"""AtP* (Kramár, Lieberum, Shah & Nanda 2024, arXiv 2403.00745) adapted from nodes to edges.

Sign and units
--------------
As every attribution here: ``score(u -> v) ~= mean over prompts of metric(edge patched) -
metric(clean)``, in the metric's units, the sender's difference ``corrupted - clean`` and the
gradient taken on the clean run ("noising"); one score per edge in the graph's edge order.

Methods (``eap.attribute(method=...)``)
---------------------------------------
``atp-qk``        QK-fix: q and k edges are scored by recomputing the receiver head's attention
                  pattern exactly, then linearly from the pattern on; every other edge is EAP.
``atp-graddrop``  GradDrop: EAP estimates with one layer's residual-stream gradient dropped,
                  averaged over the layers (magnitude as in the paper), with a sign (below).
``atp*``          both: the GradDrop average of the QK-fixed estimates (the paper's AtP*).

QK-fix (paper §3.1.1, for one edge)
-----------------------------------
Receiver ``aL.hH<q>`` reads the clean residual ``x`` before block L. Patching the edge from ``u``
gives it ``x + d_u`` (``d_u`` = the sender's corrupted - clean output, at every position). The
new queries ``q' = rot(norm(x + d_u) W_Q[H] + b_Q[H])`` meet the clean keys ``k`` of head H in
the layer's exact attention (scaling, softcap, causal mask, sliding window, the family's float32
softmax): ``A' = softmax(q' k^T)``. Then

    score = mean over prompts of  sum_{t, s} (A'[t, s] - A[t, s]) * dmetric / dA[t, s]

with ``A`` the clean pattern of head H and ``dmetric/dA`` its gradient on the clean run (the same
backward as EAP; a tensor hook on ``attn.hook_pattern``). ``<k>`` edges: the same with the keys
patched and the clean queries. This is exact up to the pattern and linear after it, where EAP
is linear from the receiver's input on (through norm, projection, rotary and softmax).
Adaptation from the paper's nodes: the paper patches one query or key *position* of a head (so a
key patch changes one logit per query and its softmax has a closed form); an edge here patches
the sender's output at *every* position of one head's q or k input, so the whole pattern is
recomputed. Every sender of a layer is done at once (chunks of ``eap.budget.plan_atp``): one norm
and one q/k projection of all heads per chunk, no per-edge loop. Under grouped-query attention
(ungrouped by ``eap.load_model``) the ``<k>`` edge is the key seen by that query head only, as
everywhere else in eap-bench.

GradDrop (paper §3.1.2)
-----------------------
``c_l(e)`` is the EAP (or QK-fixed) estimate of edge ``e`` with the gradient through layer ``l``'s
writes to the residual stream dropped: ``metric`` differentiated as if block ``l``'s attention
and MLP outputs were constants. For a receiver in layer ``r(e)``: ``c_l = c`` (the undropped
estimate) when ``l < r(e)``; ``c_l = 0`` when ``l = r(e)`` (the receiver acts only through that
layer's writes); for ``l > r(e)`` the paths through layer ``l`` are missing. The paper (nodes)
averages ``|c_l|`` over the layers, dividing by ``L - 1`` for the one layer whose drop zeroes the
node; for edges that is

    magnitude(e) = mean over l != r(e) of |c_l(e)|      (L - 1 layers; all L for logits edges,
                                                         where every c_l = c)

in the metric's units. The paper ranks nodes by this magnitude and has no sign. Our scores are
signed, so the GradDrop score is ``sign(c_m(e)) * magnitude(e)``, where ``c_m`` is the term with
the largest ``|c_l|`` among the averaged ones (the first such ``l``): when paths do not cancel all
terms share the sign of ``c``; when they do (the case GradDrop is for, ``c ~ 0``) the sign of the
dominant path is the better guess of the sign of the real effect than the sign of ``c``.
Terms are means over prompts before the absolute value (cancellation across paths, not across
prompts). ``layer_dropped`` returns the ``c_l`` themselves.

Cost (passes per prompt batch; docs/atp.md has the measured numbers)
--------------------------------------------------------------------
EAP's corrupted forward, clean forward and backward, plus: QK-fix: per layer, for each of its
``n_up`` upstream senders a norm, one q and one k projection of all heads and two attention
patterns (about ``n_up * (2 d^2 + 2 H p dh) / (12 d^2 + 2 H p dh)`` layer-forwards: for GPT-2
small about ``870 / 6`` = 12 forward-equivalents); GradDrop: ``L - 1`` partial backward passes,
the one for layer ``l`` only from layer ``l`` down (``(L - 1) / 2`` full backwards in all), on
the graph kept from the clean forward; atp*: both, with the QK-fix contracted against all the
gradients of a layer at once (the patterns are computed once per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.arch import Arch, UnsupportedModel
from eap.budget import AtPPlan, held_bytes, plan_atp
from eap.graph import Graph, HookGroup
from eap.hooks import leaf_input_hook, sender_difference_hooks, with_grad_hook
from eap.models import model_device, model_dtype
from eap.passes import (
    AttributionError, ScoreSink, check_task_inputs, fill_corrupted, metric_values, receiver_hooks,
)
from eap.task import Task

__all__ = ["VARIANTS", "AtP", "AtPOptions", "atp_options", "combine_grad_drop", "layer_dropped", "layer_terms"]


@dataclass(frozen=True)
class AtPOptions:
    """Which of AtP*'s two fixes to apply."""

    qk_fix: bool
    grad_drop: bool


#: The AtP variants ``eap.methods`` registers: name -> (fixes, one-line summary).
VARIANTS: dict[str, tuple[AtPOptions, str]] = {
    "atp-qk": (AtPOptions(qk_fix=True, grad_drop=False), "EAP with AtP*'s QK-fix on q/k edges"),
    "atp-graddrop": (AtPOptions(qk_fix=False, grad_drop=True), "EAP with AtP*'s GradDrop"),
    "atp*": (AtPOptions(qk_fix=True, grad_drop=True), "QK-fix and GradDrop (AtP*)"),
}


def atp_options(method: str) -> AtPOptions:
    """The fixes of ``method``: 'atp-qk', 'atp-graddrop' or 'atp*'."""
    if method not in VARIANTS:
        raise AttributionError(f"unknown AtP method {method!r}; choose one of {tuple(VARIANTS)}")
    return VARIANTS[method][0]


def layer_terms(
    full: Float[Tensor, "n_senders n_receivers"],
    dropped: Float[Tensor, "n_layers n_senders n_receivers"],
    receiver_layer: Int[Tensor, " n_receivers"],
) -> Float[Tensor, "n_layers n_senders n_receivers"]:
    """GradDrop's terms ``c_l`` (module docstring) from the undropped estimate ``full`` and the
    backward passes with layer ``l`` dropped (``dropped[l]``, read only for receivers below
    ``l``): ``full`` for receivers above ``l`` (logits: layer L), 0 for receivers in layer ``l``."""
    lay = torch.arange(dropped.shape[0], device=full.device)[:, None, None]
    r = receiver_layer.to(full.device)[None, None, :]
    return torch.where(lay < r, full.unsqueeze(0), torch.where(lay > r, dropped, torch.zeros_like(dropped)))


def combine_grad_drop(
    full: Float[Tensor, "n_senders n_receivers"],
    dropped: Float[Tensor, "n_layers n_senders n_receivers"],
    receiver_layer: Int[Tensor, " n_receivers"],
) -> Float[Tensor, "n_senders n_receivers"]:
    """GradDrop's signed score ``sign(c_m) * mean over l != r of |c_l|`` (metric units; the
    terms of :func:`layer_terms`, ``r`` the receiver's layer, ``c_m`` the first largest term)."""
    terms = layer_terms(full, dropped, receiver_layer)
    lay = torch.arange(terms.shape[0], device=full.device)[:, None, None]
    counted = (lay != receiver_layer.to(full.device)[None, None, :]).to(full.dtype)  # [L, 1, n_r]
    size = terms.abs() * counted
    magnitude = size.sum(0) / counted.sum(0).clamp_min(1)
    pick = size.argmax(0, keepdim=True)  # first layer with the largest |c_l|
    signed = torch.sign(terms.gather(0, pick.expand(1, *terms.shape[1:]))[0]) * magnitude
    # a one-layer model has no other layer to drop for its block receivers: the estimate itself
    return torch.where(counted.sum(0) > 0, signed, full)


@dataclass
class _Batch:
    """What one prompt batch keeps between its passes (all detached)."""

    buf: Tensor  # [n_senders, b, p, d] corrupted - clean sender outputs
    x_in: dict[int, Tensor] = field(default_factory=dict)  # layer -> clean attention input [b, p, d]
    model_pattern: dict[int, Tensor] = field(default_factory=dict)  # layer -> the model's pattern [b, H, p, p]
    grads: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)  # layer -> [(target, dmetric/dA)]
    resid: dict[int, Tensor] = field(default_factory=dict)  # layer -> the residual entering it (in the graph)
    resid_grad: dict[int, Tensor] = field(default_factory=dict)  # layer -> its full gradient (L: the final one)
    target: Tensor | None = None  # the score matrix the current backward pass writes into
    full_pass: bool = True


class AtP:
    """The AtP strategy of ``eap.attribute`` (see module docstring): accumulates the undropped
    estimate into ``scores`` and, with GradDrop, one matrix per dropped layer; ``result`` combines."""

    def __init__(self, model: Any, graph: Graph, options: AtPOptions,
                 scores: Float[Tensor, "n_senders n_receivers"]) -> None:
        self.model, self.graph, self.opt, self.scores = model, graph, options, scores
        self.n_layers = graph.spec.n_layers
        self.arch = Arch(model, fused_qkv=False) if options.qk_fix else None
        self.receiver_layer = torch.tensor(
            [g.layer for g in graph.receiver_groups for _ in range(g.size)], dtype=torch.long)
        self.dropped = (torch.zeros((self.n_layers,) + tuple(scores.shape), dtype=scores.dtype, device=scores.device)
                        if options.grad_drop else None)
        self.qk_groups: dict[int, tuple[HookGroup, HookGroup]] = {}
        if options.qk_fix:
            by = {(g.layer, g.kind): g for g in graph.receiver_groups}
            self.qk_groups = {layer: (by[layer, "q"], by[layer, "k"]) for layer in range(self.n_layers)}
        self.chunk = 1
        self.compute_dtype = scores.dtype  # float32 at least

    # ------------------------------------------------------------------ planning
    def plan(self, task: Task, batch_size: int | None, budget: Any) -> AtPPlan:
        """Prompts per batch (``batch_size``, or as many as fit) and senders per QK-fix chunk
        within ``budget`` (``eap.budget.plan_atp``; fixed: the adapter's own tensors and
        GradDrop's score matrix per layer). Sets the chunk used by ``accumulate``."""
        fixed = held_bytes(self.arch, self.model) if self.arch is not None else 0
        if self.dropped is not None:
            fixed += self.dropped.numel() * self.dropped.element_size()
        plan = plan_atp(self.model, self.graph.n_senders, task.n_prompts, task.seq_len, task.has_readout,
                        qk_fix=self.opt.qk_fix, grad_drop=self.opt.grad_drop, budget=budget,
                        prompts_per_batch=batch_size, fixed_bytes=fixed,
                        max_chunk=max((g.n_upstream for g, _ in self.qk_groups.values()), default=1))
        self.chunk = plan.senders_per_chunk
        return plan

    def auto_batch_size(self, task: Task, budget: Any) -> int:
        return self.plan(task, None, budget).prompts_per_batch

    # ------------------------------------------------------------------ one batch
    def accumulate(self, task: Task, prompt_weight: float) -> None:
        """Add one batch's contribution (``prompt_weight`` per prompt) to every estimate."""
        model, graph, opt, L = self.model, self.graph, self.opt, self.n_layers
        b, p = task.clean.shape
        st = _Batch(buf=torch.empty(graph.n_senders, b, p, model.cfg.d_model, device=self.scores.device,
                                    dtype=model_dtype(model)), target=self.scores)
        fill_corrupted(model, graph, task, st.buf)
        sink = ScoreSink(self.scores, prompt_weight)
        contracted = [g for g in graph.receiver_groups if not (opt.qk_fix and g.kind in ("q", "k"))]
        fwd = [("blocks.0.hook_resid_pre", leaf_input_hook())] + sender_difference_hooks(graph, st.buf, subtract=True)
        fwd += receiver_hooks(graph, st.buf, sink, contracted)
        if opt.qk_fix:
            for layer in range(L):
                fwd += [(f"blocks.{layer}.hook_q_input", self._keep_input(st, layer)),
                        (f"blocks.{layer}.attn.hook_pattern", self._pattern_hook(st, layer))]
        if opt.grad_drop:
            fwd += [(f"blocks.{layer}.hook_resid_pre", self._resid_hook(st, layer)) for layer in range(1, L)]
            fwd.append((f"blocks.{L - 1}.hook_resid_post", self._resid_hook(st, L)))
        with model.hooks(fwd_hooks=fwd):
            metric = metric_values(model, task, task.clean)
        metric.sum().backward(retain_graph=opt.grad_drop)
        del metric
        if opt.qk_fix:
            self._check_pattern_grads(st)
            for layer in ([L - 1] if opt.grad_drop else range(L)):
                self._qk_fix(st, layer, prompt_weight)
        if opt.grad_drop:
            st.full_pass = False
            for drop in range(L - 1, 0, -1):  # from the top: layer drop - 1 is complete after variant drop
                st.target = sink.scores = self.dropped[drop]
                torch.autograd.backward(st.resid[drop], grad_tensors=st.resid_grad[drop + 1], retain_graph=True)
                if opt.qk_fix:
                    self._qk_fix(st, drop - 1, prompt_weight)
        # the kept residuals hold the autograd graph, whose tensor hooks hold ``st``: break the cycle
        # so the batch's memory goes now, not at the next garbage collection
        st.resid.clear()
        st.resid_grad.clear()

    def _keep_input(self, st: _Batch, layer: int):
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            # [b, p, H, d]: every head's q input is the same clean residual in the clean run
            st.x_in[layer] = act[:, :, 0].detach().clone()
            return act

        return hook

    def _pattern_hook(self, st: _Batch, layer: int):
        def on_grad(grad: Tensor) -> None:
            st.grads.setdefault(layer, []).append((st.target, grad.detach()))

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            st.model_pattern[layer] = act.detach()
            return with_grad_hook(act, on_grad)

        return hook

    def _resid_hook(self, st: _Batch, layer: int):
        """Keeps the residual stream entering ``layer`` (``layer = L``: after the last block) as it
        is used downstream, and its gradient in the full backward pass."""

        def on_grad(grad: Tensor) -> None:
            if st.full_pass:
                st.resid_grad[layer] = grad.detach()

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            st.resid[layer] = with_grad_hook(act, on_grad)
            return st.resid[layer]

        return hook

    def _check_pattern_grads(self, st: _Batch) -> None:
        missing = [layer for layer in range(self.n_layers) if layer not in st.grads or layer not in st.x_in]
        if missing:
            raise UnsupportedModel(
                f"QK-fix: the model's attn.hook_pattern (or hook_q_input) of layers {missing} is not on the path to "
                "the metric, so the gradient of the metric with respect to the attention pattern is unavailable; "
                "this model's attention bridge computes its pattern outside the hooked path"
            )

    # ------------------------------------------------------------------ QK-fix
    def _qk_fix(self, st: _Batch, layer: int, prompt_weight: float) -> None:
        """Score layer ``layer``'s q and k edges against every gradient of its pattern collected so
        far (undropped and dropped variants), then free them."""
        arch, cdt = self.arch, self.compute_dtype
        x = st.x_in.pop(layer)
        Q, K = (t.to(cdt) for t in arch.head_inputs(layer, "qk", x))  # [b, H, p, dh]
        A = arch.pattern(layer, Q, K).to(cdt)  # [b, H, p, p]
        model_A = st.model_pattern.pop(layer)
        err = float((A - model_A.to(cdt)).abs().max())
        tol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(model_A.dtype, 5e-2)
        if not err <= tol:
            raise UnsupportedModel(
                f"QK-fix: the adapter's attention pattern of layer {layer} differs from the model's own by {err:.2e} "
                f"(> {tol:g}); eap.arch does not reproduce this model's attention"
            )
        targets, grads = zip(*st.grads.pop(layer))
        G = torch.stack([g.to(cdt) for g in grads])  # [V, b, H, p, p]
        qg, kg = self.qk_groups[layer]
        n_up, H = qg.n_upstream, qg.size
        for s0 in range(0, n_up, self.chunk):
            s1 = min(n_up, s0 + self.chunk)
            q_patched, k_patched = arch.head_inputs(layer, "qk", x.unsqueeze(0) + st.buf[s0:s1])  # [c, b, H, p, dh]
            dq = arch.pattern(layer, q_patched.to(cdt), K).to(cdt) - A  # [c, b, H, p, p]
            del q_patched
            on_q = torch.einsum("cbhts,vbhts->vch", dq, G)
            del dq
            dk = arch.pattern(layer, Q, k_patched.to(cdt)).to(cdt) - A
            del k_patched
            on_k = torch.einsum("cbhts,vbhts->vch", dk, G)
            del dk
            for v, target in enumerate(targets):
                target[s0:s1, qg.start: qg.start + H].add_(on_q[v], alpha=prompt_weight)
                target[s0:s1, kg.start: kg.start + H].add_(on_k[v], alpha=prompt_weight)

    # ------------------------------------------------------------------ results
    def layer_scores(self) -> Float[Tensor, "n_layers n_senders n_receivers"]:
        """GradDrop's terms ``c_l`` for every dropped layer ``l`` (:func:`layer_terms`)."""
        if self.dropped is None:
            raise AttributionError("layer scores exist only with GradDrop ('atp-graddrop', 'atp*')")
        return layer_terms(self.scores, self.dropped, self.receiver_layer)

    def result(self) -> Float[Tensor, "n_senders n_receivers"]:
        if self.dropped is None:
            return self.scores
        return combine_grad_drop(self.scores, self.dropped, self.receiver_layer)


def layer_dropped(
    model: Any, graph: Graph, task: Task, *, qk_fix: bool = False, batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
) -> Float[Tensor, "n_layers n_edges"]:
    """GradDrop's terms ``c_l(e)`` (module docstring) for every layer ``l`` and edge ``e`` in edge
    order, on the CPU: the EAP (``qk_fix``: QK-fixed) estimate of ``metric(patched) -
    metric(clean)`` with the gradient through layer ``l``'s residual-stream writes dropped (metric
    units; 0 where the receiver is in layer ``l``). ``eap.attribute(method='atp-graddrop')``
    combines them (``combine_grad_drop``)."""
    check_task_inputs(model, graph, task)
    task = task.to(model_device(model))
    dtype = torch.promote_types(model_dtype(model), torch.float32)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=model_device(model), dtype=dtype)
    atp = AtP(model, graph, AtPOptions(qk_fix=qk_fix, grad_drop=True), scores)
    size = atp.plan(task, batch_size, memory_budget).prompts_per_batch
    for batch in task.batches(size):
        atp.accumulate(batch, 1.0 / task.n_prompts)
    return atp.layer_scores().cpu()[:, graph.edge_sender, graph.edge_receiver]
