"""A model's blocks in plain torch (:class:`Arch`, :class:`Layer`): norms, rotary positions,
attention, MLPs and whole blocks, read once from a TransformerLens 4 bridge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from eap.arch.errors import UnsupportedModel
from eap.arch.mixednorm import own_views, whole_normed
from eap.arch.norm import Norm
from eap.arch.readout import Readout, softcap
from eap.arch.rotary import apply_rotary
from eap.arch.spec import arch_spec


@dataclass
class Layer:
    """One block's weights (views of the model's tensors, except the optional fused q/k/v copy)."""

    ln1: Norm
    ln2: Norm | None
    ln1_post: Norm | None
    ln2_post: Norm | None
    q_norm: Norm | None  # per-head q/k norms over d_head (Qwen3), before rotary
    k_norm: Norm | None
    W_Q: Tensor  # [H, d, dh]
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor | None  # [H, dh]
    b_K: Tensor | None
    b_V: Tensor | None
    W_O: Tensor  # [H, dh, d]
    b_O: Tensor | None  # [d]
    W_qkv: Tensor | None  # [d, 3 H dh] fused copy for full-attention passes (None: project with the views)
    b_qkv: Tensor | None
    W_in: Tensor | None
    W_gate: Tensor | None
    W_out: Tensor | None
    b_in: Tensor | None
    b_gate: Tensor | None
    b_out: Tensor | None
    scale: float
    window: int | None
    q_norm_whole: Norm | None = None  # OLMo-2: RMSNorm over all heads' q features (eap.arch.mixednorm)
    k_norm_whole: Norm | None = None
    k_groups: int = 1  # query heads per original key head under k_norm_whole (GQA ungrouped; eap.arch.mixednorm)


def _flat_heads(w: Float[Tensor, "H d dh"]) -> Float[Tensor, "d H_dh"]:
    """Per-head projection weights as one ``[d, H dh]`` matrix (a view of the model's tensor
    where its layout allows, as for every family here)."""
    H, d, dh = w.shape
    return w.permute(1, 0, 2).reshape(d, H * dh)


def _fuse_qkv(W_Q: Tensor, W_K: Tensor, W_V: Tensor, b_Q: Tensor | None, b_K: Tensor | None,
              b_V: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One ``[d, 3 H dh]`` weight (and ``[3 H dh]`` bias, or None) for a full-attention pass."""
    H, d, dh = W_Q.shape
    W_qkv = torch.cat([_flat_heads(W_Q), _flat_heads(W_K), _flat_heads(W_V)], dim=-1).contiguous()
    biases = [b_Q, b_K, b_V]
    if all(b is None for b in biases):
        return W_qkv, None
    zeros = torch.zeros(H, dh, dtype=W_Q.dtype, device=W_Q.device)
    return W_qkv, torch.cat([(b if b is not None else zeros).reshape(-1) for b in biases])


def _rotary_module(model: Any) -> Any:
    """The HF rotary module: the bridge's ``rotary_emb`` component, else the HF model's own
    ``rotary_emb`` submodule (GPT-J, which the bridge does not expose)."""
    if hasattr(model, "rotary_emb"):
        return model.rotary_emb.original_component
    found = [m for name, m in model.original_model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        raise UnsupportedModel(f"expected one rotary module (rotary_emb) in the HF model, found {len(found)}")
    return found[0]


def _opt(obj: Any, name: str) -> Tensor | None:
    try:
        t = getattr(obj, name)
    except AttributeError:
        return None
    return None if t is None else t.detach()


class Arch:
    """A model's blocks in plain torch, read once from a TransformerLens 4 bridge.

    Raises ``UnsupportedModel`` naming any feature it does not implement. All tensors stay on
    the model's device and dtype; nothing requires grad. Residual tensors are ``[B, P, d]``;
    with ``pos`` ([B] positions) a block computes only that query position and returns ``[B, d]``.
    ``fused_qkv=False`` skips the fused q/k/v weight copy per layer (callers that only need
    :meth:`head_inputs` / :meth:`pattern` then hold no weight memory beyond views).
    """

    def __init__(self, model: Any, fused_qkv: bool = True) -> None:
        """``fused_qkv``: keep one fused ``[d, 3 H dh]`` copy of each layer's q/k/v weights (one
        matrix product per full-attention pass; validation's runner, which runs many); False: project
        with views of the model's own weights, no copy (``eap.fast``)."""
        spec = arch_spec(model)
        if spec.problems:
            raise UnsupportedModel(f"{spec.family}: the block runner does not implement: {'; '.join(spec.problems)}")
        if spec.n_kv_heads != spec.n_heads:
            raise UnsupportedModel(
                f"grouped-query attention with grouped k/v (n_key_value_heads={spec.n_kv_heads}): load the "
                "model with eap.load_model, which ungroups it"
            )
        if spec.positions == "rotary" and not 0 < spec.rotary_dim <= spec.d_head:
            raise UnsupportedModel(f"rotary dimension {spec.rotary_dim} of head size {spec.d_head}")
        from transformers.activations import ACT2FN

        self.spec = spec
        self.act = ACT2FN[spec.act]
        self.rotary_module = _rotary_module(model) if spec.positions == "rotary" else None
        self._rope: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.layers = [self._layer(model, i, fused_qkv) for i in range(spec.n_layers)]
        self.readout = Readout(model, spec)

    def _layer(self, model: Any, i: int, fused_qkv: bool = True) -> Layer:
        spec, blk = self.spec, model.blocks[i]
        attn, mlp = blk.attn, getattr(blk, "mlp", None)
        hf_attn = attn.original_component
        W_Q, W_K, W_V, W_O = (attn.W_Q.detach(), attn.W_K.detach(), attn.W_V.detach(), attn.W_O.detach())
        b_Q, b_K, b_V, b_O = (_opt(attn, n) for n in ("b_Q", "b_K", "b_V", "b_O"))
        H, d, dh = W_Q.shape
        if W_K.shape != W_Q.shape or W_V.shape != W_Q.shape:
            raise UnsupportedModel(f"layer {i}: q/k/v weights of different shapes {tuple(W_Q.shape)}, {tuple(W_K.shape)}")
        W_qkv, b_qkv = _fuse_qkv(W_Q, W_K, W_V, b_Q, b_K, b_V) if fused_qkv else (None, None)
        scale = getattr(hf_attn, "scaling", None)
        if scale is None:
            raise UnsupportedModel(f"layer {i}: the attention module has no 'scaling' attribute")
        has_mlp = not spec.attn_only
        post = spec.post_norms
        pre = (lambda n: Norm.of(n, spec)) if spec.pre_norms else (lambda n: Norm.identity())
        whole = {}
        if spec.whole_qk_norm:
            whole = {f"{t}_norm_whole": Norm(spec.norm, getattr(hf_attn, f"{t}_norm").weight.detach(), None,
                                             float(getattr(hf_attn, f"{t}_norm").variance_epsilon), spec.norm_offset,
                                             spec.norm_weight_in_fp32) for t in "qk"}
        if spec.whole_qk_norm and spec.grouped_kv_heads:
            whole["k_groups"] = H // spec.grouped_kv_heads
        qk = spec.qk_norm != "none"
        return Layer(
            ln1=pre(getattr(blk, "ln1", None)), **whole,
            ln2=pre(getattr(blk, "ln1" if spec.shared_norm else "ln2", None)) if has_mlp else None,
            ln1_post=Norm.of(blk.ln1_post, spec) if post else None, ln2_post=Norm.of(blk.ln2_post, spec) if post else None,
            q_norm=Norm.of(attn.q_norm, spec) if qk else None, k_norm=Norm.of(attn.k_norm, spec) if qk else None,
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V, W_O=W_O, b_O=b_O, W_qkv=W_qkv, b_qkv=b_qkv,
            W_in=_opt(mlp, "W_in") if has_mlp else None, W_gate=_opt(mlp, "W_gate") if has_mlp and spec.gated_mlp else None,
            W_out=_opt(mlp, "W_out") if has_mlp else None, b_in=_opt(mlp, "b_in") if has_mlp else None,
            b_gate=_opt(mlp, "b_gate") if has_mlp and spec.gated_mlp else None, b_out=_opt(mlp, "b_out") if has_mlp else None,
            scale=float(scale), window=spec.windows[i],
        )

    # ------------------------------------------------------------------ positions
    def rope(self, n_pos: int, like: Tensor, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin ``[n_pos, rotary_dim]`` from the model's own rotary module (any rope scaling);
        ``layer``: needed where layers have their own rotary bases (Gemma-3's local/global)."""
        kind = self.spec.rope_types[layer] if self.spec.rope_types and layer is not None else None
        if self.spec.rope_types and kind is None:
            raise ValueError(f"{self.spec.family}: rotary positions differ per layer; pass the layer")
        key = (n_pos, like.device, like.dtype, kind)
        if key not in self._rope:
            pos = torch.arange(n_pos, device=like.device)[None]
            args = () if kind is None else (kind,)
            with torch.no_grad():
                cos, sin = self.rotary_module(like.new_zeros(1, n_pos, 1), pos, *args)
            if self.spec.rotary_returns == "sin_cos":
                cos, sin = sin, cos
            cos, sin = cos[0], sin[0]
            if cos.shape[-1] * 2 == self.spec.rotary_dim:  # one angle per pair (GPT-J): HF's [f, f] layout
                cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
            self._rope[key] = (cos, sin)
        return self._rope[key]

    def rotate(self, x: Float[Tensor, "*b P dh"], cos: Tensor, sin: Tensor) -> Tensor:
        """Apply rotary positions to q or k (the first ``rotary_dim`` features of each head)."""
        return apply_rotary(x, cos, sin, self.spec.rotary)

    # ------------------------------------------------------------------ attention
    def attend(
        self, layer: int, q: Float[Tensor, "B H Pq dh"], k: Float[Tensor, "B H P dh"], v: Float[Tensor, "B H P dh"],
        pos: Int[Tensor, " B"] | None = None,
    ) -> Float[Tensor, "B H Pq dh"]:
        """Causal attention (with the layer's scaling, softcap and sliding window). Without
        ``pos`` the queries are all positions; with ``pos`` q is ``[B, H, 1, dh]`` at ``pos``."""
        lw, spec = self.layers[layer], self.spec
        manual = spec.attn_softcap or ((spec.softmax_fp32 or spec.scores_fp32) and q.dtype != torch.float32)
        if not manual:
            if pos is None and lw.window is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=lw.scale)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._allowed(layer, k, pos), scale=lw.scale)
        return torch.matmul(self.pattern(layer, q, k, pos).to(q.dtype), v)

    def _allowed(self, layer: int, k: Tensor, pos: Int[Tensor, " B"] | None) -> Tensor:
        """Which keys each query may see: causal, within the layer's sliding window."""
        window = self.layers[layer].window
        keys = torch.arange(k.shape[-2], device=k.device)
        qpos = (keys[:, None] if pos is None else pos[:, None, None, None])  # [P,1] or [B,1,1,1]
        allowed = keys <= qpos
        return allowed if window is None else allowed & (qpos - keys < window)

    def pattern(
        self, layer: int, q: Float[Tensor, "*B H Pq dh"], k: Float[Tensor, "*B H P dh"],
        pos: Int[Tensor, " B"] | None = None,
    ) -> Float[Tensor, "*B H Pq P"]:
        """The attention pattern (softmax over keys, rows sum to 1) of queries ``q`` on keys ``k``:
        the layer's scaling, score softcap, causal mask and sliding window, the softmax in float32
        where the family computes it so. Returned in the softmax's dtype (float32 then, else
        ``q``'s); ``attend`` casts it back to the model's dtype. Leading dimensions broadcast."""
        lw, spec = self.layers[layer], self.spec
        if spec.scores_fp32:  # GPT-J: q.k in float32, then (HF's mask addition) promoted to the model dtype
            dt = torch.promote_types(q.dtype, torch.float32)
            scores = (torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * lw.scale).to(dt)
            scores = softcap(scores, spec.attn_softcap)
        else:
            scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * lw.scale, spec.attn_softcap)
        scores = scores.masked_fill(~self._allowed(layer, k, pos), float("-inf"))
        if spec.softmax_fp32:
            return torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.softmax(scores, dim=-1)

    def attn(self, layer: int, x: Tensor, pos: Tensor | None = None, post: bool = True) -> Tensor:
        """Attention's write into the residual stream (all heads + b_O, then any post-norm) for
        residual ``x`` [B,P,d]; with ``pos`` only at those query positions ([B, d])."""
        lw, spec = self.layers[layer], self.spec
        B, P, d = x.shape
        H, dh = spec.n_heads, spec.d_head
        q, k, v = self.qkv(layer, lw.ln1(x))
        q, k = self.qk_normed(layer, q, k)
        if lw.q_norm_whole is not None:
            q, k = whole_normed(lw.q_norm_whole, q), whole_normed(lw.k_norm_whole, k)
        if spec.positions == "rotary":
            cos, sin = self.rope(P, x, layer)
            k = self.rotate(k, cos, sin)
            if pos is None:
                q = self.rotate(q, cos, sin)
        if pos is not None:
            rows = torch.arange(B, device=x.device)
            q = q[rows, :, pos].unsqueeze(2)  # [B, H, 1, dh]
            if spec.positions == "rotary":
                q = self.rotate(q, cos[pos][:, None, None], sin[pos][:, None, None])
        z = self.attend(layer, q, k, v, pos)  # [B, H, Pq, dh]
        z = z.transpose(1, 2).reshape(B, -1, H * dh)
        out = z @ lw.W_O.reshape(H * dh, d)
        if lw.b_O is not None:
            out = out + lw.b_O
        if post and lw.ln1_post is not None:
            out = lw.ln1_post(out)
        return out if pos is None else out[:, 0]

    def qkv(self, layer: int, y: Float[Tensor, "B P d"]) -> tuple[Tensor, Tensor, Tensor]:
        """Every head's q, k and v, each ``[B, H, P, dh]`` (before rotary), from the normalised
        input ``y`` (``ln1`` of the residual): the fused copy, or one product per projection with
        views of the model's weights."""
        lw, spec = self.layers[layer], self.spec
        B, P, _ = y.shape
        H, dh = spec.n_heads, spec.d_head
        if lw.W_qkv is not None:
            qkv = y @ lw.W_qkv
            if lw.b_qkv is not None:
                qkv = qkv + lw.b_qkv
            q, k, v = qkv.view(B, P, 3, H, dh).permute(2, 0, 3, 1, 4)
            return q, k, v
        out = []
        for W, b in ((lw.W_Q, lw.b_Q), (lw.W_K, lw.b_K), (lw.W_V, lw.b_V)):
            t = y @ _flat_heads(W)
            if b is not None:
                t = t + b.reshape(H * dh)
            out.append(t.view(B, P, H, dh).transpose(1, 2))
        return out[0], out[1], out[2]

    def qk_normed(self, layer: int, q: Float[Tensor, "*b dh"], k: Float[Tensor, "*b dh"]) -> tuple[Tensor, Tensor]:
        """``q`` and ``k`` (per head, before rotary) through the layer's q/k norms (Qwen3: RMSNorm
        over ``d_head``, one weight shared by the heads); unchanged without them."""
        lw = self.layers[layer]
        if lw.q_norm is None:
            return q, k
        return lw.q_norm(q), lw.k_norm(k)

    def _kind_normed(self, layer: int, kind: str, t: Tensor) -> Tensor:
        """One kind's projection (``'q'``, ``'k'`` or ``'v'``) through its q/k norm, if any."""
        norm = {"q": self.layers[layer].q_norm, "k": self.layers[layer].k_norm}.get(kind)
        return t if norm is None else norm(t)

    def head_input(
        self, layer: int, head: int, kind: str, x_in: Float[Tensor, "N P d"], context: Tensor | None = None,
    ) -> Float[Tensor, "N P dh"]:
        """One head's q, k or v (rotated for q and k) from its pre-norm input ``x_in``
        (``context``: see :meth:`own_head_inputs`)."""
        return self.own_head_inputs(layer, kind, x_in.unsqueeze(1), heads=slice(head, head + 1),
                                    context=context).squeeze(1)

    def own_head_inputs(
        self, layer: int, kind: str, x: Float[Tensor, "N Hs P d"], heads: slice = slice(None),
        context: Float[Tensor, "N P d"] | None = None,
    ) -> Float[Tensor, "N Hs P dh"]:
        """The q, k or v (rotated for q and k) of the query heads ``heads`` (default all), each
        from its *own* pre-norm input: ``x[:, i]`` is the input of head ``heads[i]`` (e.g. a
        circuit whose edges are patched per receiver). A q/k norm over all heads (OLMo-2) also
        needs ``context``, the residual the *other* heads' slices are projected from: each head
        gets its own view (``eap.arch.mixednorm.own_views``); other families ignore it."""
        lw = self.layers[layer]
        W = {"q": lw.W_Q, "k": lw.W_K, "v": lw.W_V}[kind][heads]  # [Hs, d, dh]
        b = {"q": lw.b_Q, "k": lw.b_K, "v": lw.b_V}[kind]
        out = torch.einsum("nhpd,hde->nhpe", lw.ln1(x), W)  # bmm over heads (no broadcast copies of W)
        if b is not None:
            out = out + b[heads].unsqueeze(-2)
        out = self._kind_normed(layer, kind, out)
        whole = {"q": lw.q_norm_whole, "k": lw.k_norm_whole}.get(kind)
        if whole is not None:
            if context is None:
                raise ValueError(f"{self.spec.family}: a q/k norm over all heads needs the context residual")
            (ctx,) = self.head_inputs(layer, kind, context, rotate=False, qk_normed=False)  # [N, H, P, dh]
            out = own_views(whole, ctx, out, heads, lw.k_groups if kind == "k" else 1)
        if kind != "v" and self.spec.positions == "rotary":
            cos, sin = self.rope(x.shape[-2], x, layer)
            out = self.rotate(out, cos, sin)
        return out

    def head_inputs(
        self, layer: int, kinds: str, x_in: Float[Tensor, "*N P d"], rotate: bool = True, qk_normed: bool = True,
    ) -> list[Float[Tensor, "*N H P dh"]]:
        """Every head's q, k and/or v (``kinds``, e.g. ``"qk"``; rotated for q and k) from their
        shared pre-norm input ``x_in``: one norm, then one projection of all heads per kind (the
        same numbers as :meth:`head_input`; :meth:`own_head_inputs` when each head has its own input).
        A list in the order of ``kinds``. ``rotate=False``: before rotary; ``normed=False``:
        before a q/k norm over all heads (OLMo-2)."""
        lw = self.layers[layer]
        normed = lw.ln1(x_in)
        out = []
        for kind in kinds:
            W = {"q": lw.W_Q, "k": lw.W_K, "v": lw.W_V}[kind]  # [H, d, dh]
            b = {"q": lw.b_Q, "k": lw.b_K, "v": lw.b_V}[kind]
            H, d, dh = W.shape
            y = normed @ W.permute(1, 0, 2).reshape(d, H * dh)  # [*N, P, H dh]
            if b is not None:
                y = y + b.reshape(-1)
            y = self._kind_normed(layer, kind, y.unflatten(-1, (H, dh)).transpose(-2, -3))  # [*N, H, P, dh]
            whole = {"q": lw.q_norm_whole, "k": lw.k_norm_whole}.get(kind)
            if whole is not None and qk_normed:
                y = whole_normed(whole, y)
            if kind != "v" and rotate and self.spec.positions == "rotary":
                cos, sin = self.rope(x_in.shape[-2], x_in, layer)
                y = self.rotate(y, cos, sin)
            out.append(y)
        return out

    def head_result(self, layer: int, head: int, q: Tensor, k: Tensor, v: Tensor) -> Float[Tensor, "N P d"]:
        """One head's output (``attn.hook_result``: before b_O and any post-norm) from its q, k, v."""
        z = self.attend(layer, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return z @ self.layers[layer].W_O[head]

    def head_results(
        self, layer: int, q: Float[Tensor, "N H P dh"], k: Float[Tensor, "N H P dh"], v: Float[Tensor, "N H P dh"]
    ) -> Float[Tensor, "N H P d"]:
        """Every head's output (``attn.hook_result``: before b_O and any post-norm) from per-head
        q, k, v (all positions); their sum + b_O is the layer's attention write."""
        z = self.attend(layer, q, k, v)
        return torch.einsum("nhpe,hed->nhpd", z, self.layers[layer].W_O)

    # ------------------------------------------------------------------ MLP, block
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's write into the residual stream (``hook_mlp_out``, after any post-norm) for
        its pre-norm input ``x``."""
        lw = self.layers[layer]
        y = lw.ln2(x)
        h = y @ lw.W_in
        if lw.b_in is not None:
            h = h + lw.b_in
        if lw.W_gate is not None:
            g = y @ lw.W_gate
            if lw.b_gate is not None:
                g = g + lw.b_gate
            h = self.act(g) * h
        else:
            h = self.act(h)
        out = h @ lw.W_out
        if lw.b_out is not None:
            out = out + lw.b_out
        return out if lw.ln2_post is None else lw.ln2_post(out)

    def block(self, layer: int, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """``resid_post`` of block ``layer`` from its ``resid_pre`` ([B,P,d], or [B,d] with ``pos``)."""
        a = self.attn(layer, x, pos)
        base = x if pos is None else x[torch.arange(x.shape[0], device=x.device), pos]
        if self.spec.attn_only:
            return base + a
        if self.spec.parallel:
            return base + a + self.mlp(layer, base)
        mid = base + a
        return mid + self.mlp(layer, mid)

    # ------------------------------------------------------------------ self-check
    @torch.no_grad()
    def verify(self, model: Any, n_pos: int = 8) -> None:
        """Run a short random prompt through the model (the bridge around the HF model) and
        through these blocks; raise ``UnsupportedModel`` naming the first block (or the read-out)
        whose output differs beyond rounding: the family description (``eap.arch.Family``,
        built in or registered) does not reproduce this model there.

        Rounding: relative 1e-6 in float64 (HF computes RMSNorm statistics and some softmaxes in
        float32 even in a float64 model, and TransformerLens' bridge of some families computes its
        own softmax in the model dtype: ~1e-7 apart), 1e-4 in float32, 5e-2 in half precision."""
        spec = self.spec
        P = max(2, min(n_pos, spec.n_ctx or n_pos))
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, spec.d_vocab, (1, P), generator=gen).to(self.layers[0].W_Q.device)
        names = [f"blocks.{i}.hook_resid_pre" for i in range(spec.n_layers)] + [f"blocks.{spec.n_layers - 1}.hook_resid_post"]
        got: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(x: Tensor, hook: Any = None) -> Tensor:
                got[name] = x.detach().clone()
                return x

            return hook

        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
        dtype = logits.dtype
        tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 5e-2)
        outs = [got[n] for n in names[1:]]
        for i in range(spec.n_layers):
            ours = self.block(i, got[names[i]])
            err = (ours - outs[i]).abs().max() / outs[i].abs().max().clamp_min(1e-30)
            if not err <= tol:
                raise UnsupportedModel(
                    f"{spec.family}: the block runner does not reproduce block {i} of this model (relative error "
                    f"{float(err):.2e} > {tol:g}{_agree(i)}): the family description "
                    f"{spec.family!r} is wrong for it, or the checkpoint has a feature eap.arch does not implement"
                )
        ours = self.readout.logits(outs[-1])
        err = (ours - logits.to(ours.dtype)).abs().max() / logits.abs().max().clamp_min(1e-30)
        if not err <= tol:
            raise UnsupportedModel(
                f"{spec.family}: the read-out (final norm, unembedding) does not reproduce this model's logits "
                f"(relative error {float(err):.2e} > {tol:g}; every block agrees): the family description "
                f"{spec.family!r} is wrong for its read-out"
            )


def _agree(i: int) -> str:
    return "; the first block already differs" if i == 0 else f"; blocks 0..{i - 1} agree"
