"""The fast attribution engine: EAP's passes on ``eap.arch``'s plain-torch blocks.

``eap.attribute`` computes the same scores on two engines, chosen once per call
(:func:`engine_for`; ``attribute(..., engine=...)`` forces one):

* ``fast`` (this module) runs the model's blocks as :class:`eap.arch.Arch` computes them, from
  views of the bridge's own weights; the bridge computes only the input embedding.
* ``bridge`` runs the TransformerLens bridge with its edge hooks (``eap.attribute._accumulate``).
  With split q/k/v inputs and per-head results switched on, the bridge copies the residual
  stream once per head and runs per-head norms and projections; that made EAP cost 1.6-1.8x an
  honest floor (``bench.measure.floor_pass``). It stays the general path: for a model the
  adapter does not reproduce (``UnsupportedModel`` from :class:`~eap.arch.Arch` or its
  :meth:`~eap.arch.Arch.verify`; a warning says so, once per model), and for a model with
  TransformerLens hooks attached to its hook points (only the bridge runs them).

Sign and units are ``eap.attribute``'s: ``score(u -> v) = mean over prompts of
(out_u(corrupted) - out_u(clean)) . d metric / d in_v``, summed over positions and features.

How the fast engine computes one prompt batch
---------------------------------------------
1. Corrupted forward, no grad: every sender's output (the input residual, each head's result
   ``z_h @ W_O[h]`` without ``b_O``, each MLP's output) is written straight into the difference
   buffer ``[n_senders, batch, pos, d_model]`` (the heads' results by one batched product into
   their rows); the residual stream adds them up; the pass stops after the last sender.
2. Clean forward with grad from the input residual (the only leaf; weights frozen, no parameter
   gradient): the same outputs are subtracted (buffer = corrupted - clean); the heads' results
   are the same batched product, summed over heads into the residual stream.
3. Backward. Receiver gradients without per-head copies of the residual stream: query head
   ``h``'s q input is the residual ``x`` read by ``ln1`` and ``W_Q[h]``, so its gradient is
   ``J_ln1(x)^T (dmetric/dq_h @ W_Q[h]^T)``, with ``dq_h`` the gradient at head ``h``'s
   projection (before rotary). :class:`_HeadProjections` is ``ln1`` plus the q/k/v projections
   as one autograd function whose backward forms ``dq_h @ W_Q[h]^T`` for every head and kind in
   one batched product per kind (``[3H, batch*pos, d]``) with the norm's backward in closed form
   folded in (``eap.arch.NormBackward.through_linear``: eps, weight and offset as the adapter's
   norm; one pass over the stack after the product),
   contracts the ``3H`` receiver gradients with the upstream prefix of the buffer in one matrix
   product and returns their sum, which *is* the residual gradient (the q/k/v inputs are copies
   of the residual), so the fused projection's own backward is not computed twice. MLP
   receivers: a tensor hook on a view of the MLP input used only by the MLP branch; logits: on
   the final residual. Nothing is stored beyond what autograd keeps for the backward.

Post-norm families (Gemma-2; ``eap.arch.postnorm``): the residual stream gets each layer's
post-normed attention sum; a head's row of the buffer is its pre-norm difference ``d_u`` until the
clean pass reaches its layer, which replaces it by ``J_PN(S) d_u`` (``S`` the clean pre-norm sum):
the first-order term of exact patching's ``PN(S + d_u) - PN(S)``. With several gradient points
(``eap-ig``, ``clean-corrupted``) each point's pass uses the Jacobian at its own ``S`` (the pre-norm
differences are kept for that). ``FastEngine(post_norm='ignore')``
keeps the raw ``d_u`` (EAP-IG's ``attribute.py``), on request only. The bridge's hooks cannot
apply the Jacobian, so post-norm families never fall back to the bridge
(:func:`refuse_bridge_for_post_norms`).

With a task read-out (one position per prompt) the last block's MLP runs at the read-out
positions only, in both passes: the metric reads the final residual there alone and the MLP is
position-wise, so its output elsewhere (buffer row zero there) and its receiver's gradient
elsewhere (zero) reach no score. The read-out floor runs that MLP everywhere.

``eap-ig`` shifts the leaf input toward the corrupted input; ``clean-corrupted`` adds a gradient
point at the corrupted input. Both run steps 2-3 once per gradient point (buffer untouched after
the first), as on the bridge.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from eap.arch import Arch, UnsupportedModel
from eap.arch.mixednorm import own_block_backward, whole_normed
from eap.arch.postnorm import post_norm_jvp, refuse_hook_path
from eap.graph import Graph
from eap.hooks import StopForward, require_edge_hooks, run_until_stop
from eap.models import model_device, model_dtype
from eap.task import Task

#: ``eap.attribute``'s ``engine`` values: ``auto`` (fast where the adapter reproduces the model),
#: ``fast`` (this module, or ``UnsupportedModel``), ``bridge`` (the bridge's hooks).
ENGINES = ("auto", "fast", "bridge")

#: per model: {(dtype, device): None if the adapter reproduces it, else the reason it does not}
_VERDICTS: "weakref.WeakKeyDictionary[Any, dict[tuple, str | None]]" = weakref.WeakKeyDictionary()


def hooks_attached(model: Any) -> bool:
    """Whether any TransformerLens hook point of ``model`` has a hook attached (``add_hook``,
    ``model.hooks(...)``): only the bridge engine runs them."""
    return any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


#: ``FastEngine``'s ``post_norm`` values (the gradient methods' ``post_norm`` option, ``eap.methods``)
POST_NORMS = ("jacobian", "ignore")


def engine_for(model: Any, engine: str = "auto", post_norm: str = "jacobian") -> "FastEngine | None":
    """The engine for one ``eap.attribute`` call: a :class:`FastEngine`, or None for the bridge.

    ``auto``: the fast engine unless the model has hooks attached (silently the bridge, which
    runs them) or the adapter does not reproduce it (the bridge, with a warning naming the
    reason the first time). ``fast``: the fast engine, else ``UnsupportedModel``. ``bridge``: None.
    Whether the adapter reproduces a model (``Arch.verify`` against the bridge's forward) is
    checked once per model, dtype and device; the engine itself (views of the weights) is
    built per call, so weights changed in place are seen. ``post_norm``: the fast engine's
    (:class:`FastEngine`); the bridge has only 'ignore''s arithmetic and is refused for post-norm
    families whatever the value."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "bridge":
        require_edge_hooks(model)  # GPT-J: TransformerLens has no per-head hooks, the fast engine is the only one
        refuse_bridge_for_post_norms(model)
        return None
    if hooks_attached(model):
        if engine == "fast":
            raise UnsupportedModel(
                "the model has TransformerLens hooks attached; the fast engine does not run them "
                "(use engine='auto' or 'bridge', which attribute through the bridge with its hooks)"
            )
        refuse_bridge_for_post_norms(model)
        return None
    verdicts = _VERDICTS.setdefault(model, {})
    key = (model_dtype(model), model_device(model))
    known = key in verdicts
    try:
        if known and verdicts[key] is not None:
            raise UnsupportedModel(verdicts[key])
        fast = FastEngine(model, post_norm=post_norm)
        if not known:
            fast.arch.verify(model)
            verdicts[key] = None
    except UnsupportedModel as exc:
        verdicts[key] = str(exc)
        if engine == "fast":
            raise
        require_edge_hooks(model, str(exc))
        refuse_bridge_for_post_norms(model, exc)
        if not known:
            warnings.warn(f"{exc}; attributing through the bridge's hooks (same scores, slower)", stacklevel=3)
        return None
    return fast


def bridge_reason(model: Any, engine: str = "auto") -> str:
    """Why :func:`engine_for` gives the bridge for ``model`` (after it was called): asked for,
    hooks attached, or the reason the fast engine does not reproduce the model (the adapter's
    check, or its fast/bridge agreement check ``Arch.verify``, failed)."""
    if engine == "bridge":
        return "engine='bridge' was asked for"
    if hooks_attached(model):
        return "TransformerLens hooks are attached to the model (the fast engine does not run them)"
    verdict = _VERDICTS.get(model, {}).get((model_dtype(model), model_device(model)))
    return f"the fast engine does not reproduce this model: {verdict}" if verdict else "not known"


def refuse_bridge_for_post_norms(model: Any, why: Exception | None = None) -> None:
    """Raise ``UnsupportedModel`` for a post-norm family (Gemma-2, ...): the bridge's hooks
    contract a head's *pre-norm* difference with the receiver gradient, which is not the
    first-order term of patching the edge (``eap.arch.postnorm``); only the fast engine applies
    the post-norm's Jacobian. ``why``: the reason the fast engine cannot run."""
    refuse_hook_path(model, "attribution", "the fast engine (the post-norm's Jacobian on each head's difference;"
                     " EAP-IG's variant without it: post_norm='ignore')", why)


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class _LayerRows:
    """Where one layer's nodes sit in the graph: sender rows and receiver columns."""

    heads: int  # first sender row of the layer's heads
    mlp: int | None  # sender row of the MLP
    qkv: int  # first receiver column of the layer's q, k, v receivers (3H consecutive)
    qkv_up: int  # senders upstream of them
    mlp_in: int | None  # receiver column of the MLP
    mlp_up: int


def _layout(graph: Graph, n_layers: int, n_heads: int) -> tuple[list[_LayerRows], int, int]:
    """Per layer rows/columns, and the logits receiver's column and upstream count."""
    send = {(g.kind, g.layer): g for g in graph.sender_groups}
    recv = {(g.kind, g.layer): g for g in graph.receiver_groups}
    rows = []
    for i in range(n_layers):
        q, k, v = recv["q", i], recv["k", i], recv["v", i]
        if (k.start, v.start) != (q.start + n_heads, q.start + 2 * n_heads) or q.n_heads != n_heads:
            raise AssertionError(f"layer {i}: q/k/v receivers are not consecutive per head")
        m_in, m_out = recv.get(("mlp", i)), send.get(("mlp", i))
        rows.append(_LayerRows(send["head", i].start, m_out.start if m_out else None, q.start, q.n_upstream,
                               m_in.start if m_in else None, m_in.n_upstream if m_in else 0))
    logits = graph.receiver_groups[-1]
    return rows, logits.start, logits.n_upstream


#: (prompt rows, read-out position per prompt): one position per prompt, ``[b]`` each
_Where = tuple[Tensor, Tensor]


class _Scores:
    """Receiver gradients contracted with the difference buffer into the score matrix."""

    def __init__(self, buf: Float[Tensor, "n_senders b p d"], scores: Float[Tensor, "n_senders n_receivers"]) -> None:
        self.buf, self.scores, self.weight = buf, scores, 0.0
        self._workspace: Tensor | None = None

    def workspace(self, k: int) -> Float[Tensor, "k b*p d"]:
        """Room for ``k`` receiver gradients, one block shared by every layer of a backward (each
        layer's are contracted before the next layer's are formed): a fresh ``[3H, b, p, d]``
        block per layer would page-fault its memory in again every time (several ms each).
        Kept until :meth:`release`."""
        _, b, p, d = self.buf.shape
        if self._workspace is None or self._workspace.shape[0] < k:
            self._workspace = self.buf.new_empty(k, b * p, d)
        return self._workspace[:k]

    def release(self) -> None:
        """Free the workspace (after a backward: the next forward keeps its activations there)."""
        self._workspace = None

    def add(self, start: int, n_up: int, grads: Float[Tensor, "k b *p d"], where: "_Where | None" = None) -> None:
        """``scores[:n_up, start:start+k] += weight * buf[:n_up] . grads[j]`` (summed over batch,
        positions, features): one matrix product for ``k`` receivers. With ``where`` the
        gradients ``[k, b, d]`` are those at one position per prompt (zero elsewhere)."""
        k = grads.shape[0]
        senders = self.buf[:n_up] if where is None else self.buf[:n_up, where[0], where[1]]
        block = grads.reshape(k, -1) @ senders.reshape(n_up, -1).T  # [k, n_up]; faster than buf @ grads.T
        self.scores[:n_up, start : start + k].add_(block.T.to(self.scores.dtype), alpha=self.weight)

    def receiver(self, start: int, n_up: int, where: "_Where | None" = None) -> Callable[[Tensor], None]:
        """A tensor hook for one receiver's input (``[b, p, d]``, or ``[b, d]`` at ``where``):
        adds its gradient's scores."""
        return lambda grad: self.add(start, n_up, grad.unsqueeze(0), where)


class _HeadProjections(torch.autograd.Function):
    """``ln1`` and every head's q, k, v projection of the residual ``x`` (``Arch.qkv``, each
    ``[B, H, P, dh]``), whose backward forms the 3H per-head input gradients ``[3H, B, P, d]``
    (q heads, k heads, v heads) in ``sink``'s workspace, adds their scores at the layer's q/k/v
    columns ``at`` and returns their sum as ``x``'s gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, arch: Arch, layer: int, sink: "_Scores", at: _LayerRows) -> tuple[Tensor, ...]:
        q, k, v = arch.qkv(layer, arch.layers[layer].ln1(x))
        ctx.save_for_backward(x, q, k, v)  # v and (without rotary) q, k are kept by attention anyway
        ctx.arch, ctx.layer, ctx.sink, ctx.at = arch, layer, sink, at
        return q, k, v

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, *outs = ctx.saved_tensors
        lw = ctx.arch.layers[ctx.layer]
        B, P, d = x.shape
        H = ctx.arch.spec.n_heads
        back = lw.ln1.backward_at(x.reshape(B * P, d))  # closed form of ln1's backward at x
        inputs = ctx.sink.workspace(3 * H)  # dmetric/d(receiver input) of q heads, k heads, v heads
        for j, (g, out, W, b) in enumerate(zip(grads, outs, (lw.W_Q, lw.W_K, lw.W_V), (lw.b_Q, lw.b_K, lw.b_V))):
            heads = lambda t: t.transpose(0, 1).reshape(H, B * P, -1)  # noqa: E731  [B, H, P, dh] -> [H, B*P, dh]
            back.through_linear(heads(g), W, heads(out), b, result=inputs[j * H : (j + 1) * H])
        inputs = inputs.view(3 * H, B, P, d)
        ctx.sink.add(ctx.at.qkv, ctx.at.qkv_up, inputs)
        return inputs.sum(0), None, None, None, None


def _mixed_projections(x: Tensor, arch: Arch, layer: int, sink: "_Scores | None", at: _LayerRows) -> tuple[Tensor, ...]:
    """q, k (through the q/k norms over all heads) and v of every head; with ``sink`` the
    receivers' gradients are formed in the backward (:class:`_MixedHeadProjections`)."""
    if sink is not None:
        return _MixedHeadProjections.apply(x, arch, layer, sink, at)
    lw = arch.layers[layer]
    q, k, v = arch.qkv(layer, lw.ln1(x))
    return whole_normed(lw.q_norm_whole, q), whole_normed(lw.k_norm_whole, k), v


class _MixedHeadProjections(torch.autograd.Function):
    """:class:`_HeadProjections` for q/k norms over all heads (OLMo-2): head H's q receiver
    gradient goes through the diagonal block ``J_HH`` of the q norm's Jacobian (its own view,
    ``eap.arch.mixednorm``), while the residual's gradient goes through the whole Jacobian, so
    it is formed separately (it is not the sum of the receivers' gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, arch: Arch, layer: int, sink: "_Scores", at: _LayerRows) -> tuple[Tensor, ...]:
        lw = arch.layers[layer]
        q, k, v = arch.qkv(layer, lw.ln1(x))
        ctx.save_for_backward(x, q, k, v)
        ctx.arch, ctx.layer, ctx.sink, ctx.at = arch, layer, sink, at
        return whole_normed(lw.q_norm_whole, q), whole_normed(lw.k_norm_whole, k), v

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, *raws = ctx.saved_tensors
        lw = ctx.arch.layers[ctx.layer]
        B, P, d = x.shape
        H = ctx.arch.spec.n_heads
        back = lw.ln1.backward_at(x.reshape(B * P, d))
        inputs = ctx.sink.workspace(3 * H)
        resid = x.new_zeros(B * P, d, dtype=grads[0].dtype)
        heads = lambda t: t.transpose(0, 1).reshape(H, B * P, -1)  # noqa: E731  [B, H, P, dh] -> [H, B*P, dh]
        flat = lambda t: t.transpose(1, 2).reshape(B * P, -1)  # noqa: E731  [B, H, P, dh] -> [B*P, H dh]
        kinds = zip(grads, raws, (lw.W_Q, lw.W_K, lw.W_V), (lw.b_Q, lw.b_K, lw.b_V),
                    (lw.q_norm_whole, lw.k_norm_whole, None))
        for j, (g, raw, W, b, norm) in enumerate(kinds):
            rows = inputs[j * H : (j + 1) * H]
            if norm is None:  # v: the receivers' gradients add up to the residual's
                back.through_linear(heads(g), W, heads(raw), b, result=rows)
                resid += rows.sum(0)
                continue
            groups = lw.k_groups if j == 1 else 1  # k: statistics over the original key heads (GQA)
            full, own = own_block_backward(norm, flat(raw), flat(g), H, groups)  # [B*P, H dh] each
            own = own.view(B * P, H, -1).transpose(0, 1)
            back.through_linear(own, W, heads(raw), b, result=rows)
            Hd = W.shape[0] * W.shape[2]
            W_flat = W.permute(1, 0, 2).reshape(1, d, Hd)
            b_flat = None if b is None else b.reshape(1, Hd)
            resid += back.through_linear(full.unsqueeze(0), W_flat, flat(raw).unsqueeze(0), b_flat)[0]
        ctx.sink.add(ctx.at.qkv, ctx.at.qkv_up, inputs.view(3 * H, B, P, d))
        return resid.view(B, P, d), None, None, None, None


# ------------------------------------------------------------------------------------ engine
class FastEngine:
    """EAP's passes on the adapter's blocks (module docstring). Built per ``attribute`` call
    from views of the model's weights (no copies); raises ``UnsupportedModel`` where the adapter
    does not describe the model."""

    def __init__(self, model: Any, post_norm: str = "jacobian") -> None:
        """``post_norm`` (post-norm families only): 'jacobian' (the default: a head's difference
        reaches its receivers through the post-norm's Jacobian at the clean run, the first-order
        term of exact patching) or 'ignore' (EAP-IG's ``attribute.py``: the raw pre-norm
        difference; for reproducing MIB numbers, not the first-order term)."""
        if post_norm not in POST_NORMS:
            raise ValueError(f"post_norm must be one of {POST_NORMS}, got {post_norm!r}")
        self.model = model
        self.arch = Arch(model, fused_qkv=False)
        self.post_norm = post_norm
        self._pre_norm: dict[int, Tensor] | None = None  # heads' pre-norm differences per layer (several points)

    def embed(self, tokens: Tensor) -> Float[Tensor, "b p d"]:
        """The input residual (``blocks.0.hook_resid_pre``), computed by the bridge itself."""
        got: list[Tensor] = []

        def grab(x: Tensor, hook: Any = None) -> Tensor:
            got.append(x.detach())
            raise StopForward

        with torch.no_grad():
            run_until_stop(self.model, tokens, [("blocks.0.hook_resid_pre", grab)])
        return got[0]

    def accumulate(
        self, graph: Graph, task: Task, points: list[tuple[float, float]],
        scores: Float[Tensor, "n_senders n_receivers"], prompt_weight: float, replacement: Any = None,
    ) -> None:
        """Add one prompt batch's contribution into ``scores``: gradient point ``(alpha,
        weight)`` at input ``clean + (1 - alpha) (corrupted - clean)``, counted with ``weight *
        prompt_weight`` (``eap.attribute.gradient_points``; the first point is the clean run).
        ``replacement`` (``eap.interventions.Replacement``): its sender outputs instead of the
        corrupted run's (only the clean point, EAP, makes sense then)."""
        spec = self.arch.spec
        rows, logits_col, n_all = _layout(graph, spec.n_layers, spec.n_heads)
        b, p = task.clean.shape
        buf = torch.empty(graph.n_senders, b, p, spec.d_model, device=scores.device, dtype=model_dtype(self.model))
        sink = _Scores(buf, scores)
        where = self._readout_where(task)
        self._pre_norm = {} if len(points) > 1 and self.arch.spec.post_norms else None
        with torch.no_grad():
            if replacement is None:
                buf[0] = self.embed(task.corrupted)
                self._blocks(buf[0], buf, rows, "set", None, where)
            else:
                replacement.fill(buf)
            clean = self.embed(task.clean)
        for i, (alpha, weight) in enumerate(points):
            if i == 0 and alpha != 1.0:
                raise AssertionError("the first gradient point must be the clean run")
            sink.weight = weight * prompt_weight
            x = clean if alpha == 1.0 else clean + (1.0 - alpha) * buf[0]
            if i == 0:
                buf[0] -= clean
            x = x.detach().requires_grad_(True)
            resid = self._blocks(x, buf, rows, "subtract" if i == 0 else "keep", sink, where)
            resid = resid.view_as(resid)
            resid.register_hook(sink.receiver(logits_col, n_all, where))
            self._metric(resid, task).sum().backward()
            sink.release()

    # -------------------------------------------------------------------------- passes
    def _readout_where(self, task: Task) -> _Where | None:
        """The read-out position of each prompt when the task has a read-out and the model an
        MLP (where the last MLP can run there only, :meth:`_last_mlp`), else None."""
        if not task.has_readout or self.arch.spec.attn_only:
            return None
        pos = task.per_prompt["readout_pos"].long()
        return torch.arange(pos.shape[0], device=pos.device), pos

    def _blocks(
        self, x: Tensor, buf: Tensor, rows: list[_LayerRows], mode: str, sink: _Scores | None,
        where: _Where | None = None,
    ) -> Tensor | None:
        """Run every block on the residual ``x``. ``mode``: 'set' (write the senders' outputs
        into ``buf``; stop after the last sender, return None), 'subtract' (take them away) or
        'keep'. With ``sink`` (a pass with grad) the receivers' gradients go into the scores.
        Returns the final residual ``[b, p, d]``, or ``[b, d]`` at ``where`` when given."""
        arch, spec = self.arch, self.arch.spec
        for i, at in enumerate(rows):
            last = i == spec.n_layers - 1
            a = self._attention(i, x, buf, at, mode, sink)
            if last and where is not None:
                return self._last_mlp(i, x, a, buf, at, mode, sink, where)
            if spec.attn_only:
                if last and mode == "set":
                    return None
                x = x + a
                continue
            if not spec.parallel:
                x = x + a
            m_in = x
            if sink is not None:
                m_in = x.view_as(x)  # only the MLP branch reads this view: its gradient is the receiver's
                m_in.register_hook(sink.receiver(at.mlp_in, at.mlp_up))
            out = arch.mlp(i, m_in)
            _write(buf[at.mlp], out, mode)
            if last and mode == "set":
                return None
            x = x + a + out if spec.parallel else x + out
        return x

    def _last_mlp(
        self, i: int, x: Float[Tensor, "b p d"], a: Float[Tensor, "b p d"], buf: Tensor, at: _LayerRows, mode: str,
        sink: _Scores | None, where: _Where,
    ) -> Float[Tensor, "b d"] | None:
        """The last block's MLP at the read-out positions only. With a read-out the metric reads
        the final residual there alone and the MLP is position-wise, so elsewhere its output
        (its buffer row, zero there) and its receiver's gradient (zero) do not reach a score.
        Returns the final residual at ``where`` (None for 'set')."""
        x_at, a_at = x[where], a[where]
        base = x_at + a_at
        m_in = x_at if self.arch.spec.parallel else base
        if sink is not None:
            m_in = m_in.view_as(m_in)  # only the MLP branch reads this view: its gradient is the receiver's
            m_in.register_hook(sink.receiver(at.mlp_in, at.mlp_up, where))
        out = self.arch.mlp(i, m_in)
        row = buf[at.mlp]
        if mode == "set":
            row.zero_()
            row[where] = out
            return None
        if mode == "subtract":
            row[where] -= out.detach()
        return base + out

    def _attention(self, i: int, x: Tensor, buf: Tensor, at: _LayerRows, mode: str, sink: _Scores | None) -> Tensor:
        """Attention's write into the residual stream (heads + ``b_O``, then any post-norm);
        per-head results into ``buf`` per ``mode`` (post-norms, 'subtract': then through the
        post-norm's Jacobian, module docstring); with ``sink``, the q/k/v receivers' gradients in
        the backward."""
        arch, spec = self.arch, self.arch.spec
        lw = arch.layers[i]
        B, P, d = x.shape
        H, dh = spec.n_heads, spec.d_head
        if lw.q_norm_whole is not None:  # OLMo-2: q/k norms over all heads (eap.arch.mixednorm)
            q, k, v = _mixed_projections(x, arch, i, sink, at)
        elif sink is None:
            q, k, v = arch.qkv(i, lw.ln1(x))
        else:
            q, k, v = _HeadProjections.apply(x, arch, i, sink, at)
        q, k = arch.qk_normed(i, q, k)  # per-head q/k norms (Qwen3): plain autograd after the projections
        if spec.positions == "rotary":
            cos, sin = arch.rope(P, x, i)
            q, k = arch.rotate(q, cos, sin), arch.rotate(k, cos, sin)
        z = arch.attend(i, q, k, v)  # [B, H, P, dh]
        if mode == "keep":
            out = z.transpose(1, 2).reshape(B, P, H * dh) @ lw.W_O.reshape(H * dh, d)
        else:
            z = z.transpose(0, 1).reshape(H, B * P, dh)
            results = buf[at.heads : at.heads + H].view(H, B * P, d)  # the heads' rows of the buffer
            if mode == "set":
                out = torch.bmm(z, lw.W_O, out=results).sum(0)
            else:
                per_head = torch.bmm(z, lw.W_O)  # [H, B*P, d]: each head's result, without b_O
                results -= per_head.detach()
                out = per_head.sum(0)
            out = out.view(B, P, d)
        out = out if lw.b_O is None else out + lw.b_O
        if lw.ln1_post is None:
            return out
        if self.post_norm == "jacobian" and mode != "set":  # head rows: J_PN(S) (corrupted - clean) at this point
            rows = buf[at.heads : at.heads + H]
            if mode == "subtract" and self._pre_norm is not None:  # later gradient points need them again
                self._pre_norm[i] = rows.clone()
            raw = rows if mode == "subtract" else self._pre_norm[i]
            rows.copy_(post_norm_jvp(lw.ln1_post, out.detach(), raw))
        return lw.ln1_post(out)

    def _metric(self, resid: Float[Tensor, "b *p d"], task: Task) -> Float[Tensor, " b"]:
        """Per-prompt metric from the final residual, read out by ``eap.arch.Readout`` (only the
        read-out logits with a task read-out, else all logits and ``task.metric``)."""
        readout = self.arch.readout
        if not task.has_readout:
            return task.metric(readout.logits(resid))
        at = resid
        if resid.dim() == 3:  # all positions: take the read-out's
            at = resid[torch.arange(resid.shape[0], device=resid.device), task.per_prompt["readout_pos"].long()]
        return task.readout(readout.selected(at, task.per_prompt["readout_tokens"].long()))


def _write(rows: Tensor, out: Tensor, mode: str) -> None:
    """Buffer rows = ``out`` ('set') or -= ``out`` ('subtract'); nothing for 'keep'."""
    if mode == "set":
        rows.copy_(out)
    elif mode == "subtract":
        rows -= out.detach()
