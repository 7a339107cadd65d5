"""A small plain-torch runner for the layers after a patched receiver (GPT-2 family).

Exact patching only changes things from the receiver's layer on, and the clean run up to that
layer is shared by every edge into the receiver. ``BlockRunner`` re-implements the GPT-2 block
(LayerNorm, causal multi-head attention, MLP with gelu_new/gelu/relu, optional parallel
attention/MLP) straight from the model's weights, so a patched forward can *start* at any point
of the residual stream and stop at the read-out. It reads weights once from a TransformerLens 4
bridge in compatibility mode (``W_Q [L,H,d,dh]`` ...) and raises ``UnsupportedModel`` for
architectures it does not implement (rotary/alibi positions, RMSNorm, gated MLPs, grouped
queries, local attention); callers then fall back to the hook-based path through the bridge.

Residual-stream "points" (where a difference can be injected):
  ``("pre", L)``  input of block L (``blocks.L.hook_resid_pre``; L = 0 is the embedding),
  ``("mid", L)``  between attention and MLP of block L (``hook_resid_mid``, sequential blocks),
  ``("post", L)`` output of block L (``hook_resid_post``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


class UnsupportedModel(NotImplementedError):
    """The block runner does not implement this architecture (use the hook-based path)."""


def _act_fn(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh_exact"):
        c = math.sqrt(2.0 / math.pi)
        return lambda x: 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise UnsupportedModel(f"activation {name!r} is not supported by the block runner")


def check_supported(model: Any) -> None:
    """Raise ``UnsupportedModel`` unless ``BlockRunner`` can reproduce ``model`` exactly."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "normalization_type", None) != "LN":
        problems.append(f"normalization_type={cfg.normalization_type!r} (only 'LN')")
    if getattr(cfg, "positional_embedding_type", "standard") not in ("standard", "learned"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (only absolute)")
    if getattr(cfg, "gated_mlp", False):
        problems.append("gated MLP")
    nkv = getattr(cfg, "n_key_value_heads", None)
    if nkv not in (None, cfg.n_heads):
        problems.append("grouped-query attention")
    if getattr(cfg, "use_local_attn", False):
        problems.append("local attention")
    if getattr(cfg, "attn_only", False):
        problems.append("attention-only model")
    if getattr(cfg, "final_rms", False):
        problems.append("final RMSNorm")
    if problems:
        raise UnsupportedModel("block runner does not support: " + "; ".join(problems))
    try:
        _act_fn(cfg.act_fn)
        for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out", "b_out", "W_U"):
            getattr(model, name)
        model.blocks[0].ln1._original_component.weight
        model.ln_final._original_component.weight
    except UnsupportedModel:
        raise
    except Exception as exc:  # missing weights / components
        raise UnsupportedModel(f"block runner cannot read the model's weights: {exc}") from exc


def _ln_params(norm: Any) -> tuple[Tensor, Tensor | None, float]:
    orig = getattr(norm, "_original_component", norm)
    return orig.weight.detach(), (orig.bias.detach() if getattr(orig, "bias", None) is not None else None), float(
        getattr(orig, "eps", getattr(orig, "variance_epsilon", 1e-5))
    )


class BlockRunner:
    """GPT-2-family blocks in plain torch from a bridge's weights (see module docstring).

    All tensors live on the model's device in the model's dtype. Nothing requires grad.
    """

    def __init__(self, model: Any) -> None:
        check_supported(model)
        cfg = model.cfg
        self.n_layers = int(cfg.n_layers)
        self.n_heads = int(cfg.n_heads)
        self.d_head = int(cfg.d_head)
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        if not getattr(cfg, "use_attn_scale", True):
            scale = 1.0
        elif scale <= 0:
            scale = math.sqrt(self.d_head)
        self.attn_scales = [
            scale * ((layer + 1) if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else 1.0)
            for layer in range(self.n_layers)
        ]
        self.act = _act_fn(cfg.act_fn)
        g = lambda t: t.detach()  # noqa: E731
        self.W_Q, self.W_K, self.W_V = g(model.W_Q), g(model.W_K), g(model.W_V)
        self.b_Q, self.b_K, self.b_V = g(model.b_Q), g(model.b_K), g(model.b_V)
        self.W_O, self.b_O = g(model.W_O), g(model.b_O)
        self.W_in, self.b_in, self.W_out, self.b_out = g(model.W_in), g(model.b_in), g(model.W_out), g(model.b_out)
        # [L, d, H*dh] fused projections for the full-attention blocks
        L, H, d, dh = self.W_Q.shape
        self.W_QKV = torch.cat([w.permute(0, 2, 1, 3).reshape(L, d, H * dh) for w in (self.W_Q, self.W_K, self.W_V)], -1)
        self.b_QKV = torch.cat([b.reshape(L, H * dh) for b in (self.b_Q, self.b_K, self.b_V)], -1)
        self.W_O_flat = self.W_O.reshape(L, H * dh, d)
        self.W_U = g(model.W_U)
        b_U = getattr(model, "b_U", None)
        self.b_U = g(b_U) if b_U is not None else torch.zeros(self.W_U.shape[1], dtype=self.W_U.dtype, device=self.W_U.device)
        self.ln1 = [_ln_params(model.blocks[i].ln1) for i in range(self.n_layers)]
        self.ln2 = [_ln_params(model.blocks[i].ln2) for i in range(self.n_layers)]
        self.ln_final = _ln_params(model.ln_final)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def norm(x: Tensor, params: tuple[Tensor, Tensor | None, float]) -> Tensor:
        w, b, eps = params
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def head_qkv(self, layer: int, head: int, kind: str, x_in: Float[Tensor, "B p d"]) -> Float[Tensor, "B p dh"]:
        """q, k or v of one head from its (pre-LN1) input."""
        W = {"q": self.W_Q, "k": self.W_K, "v": self.W_V}[kind][layer, head]
        b = {"q": self.b_Q, "k": self.b_K, "v": self.b_V}[kind][layer, head]
        return self.norm(x_in, self.ln1[layer]) @ W + b

    def head_result(
        self, layer: int, head: int, q: Float[Tensor, "B p dh"], k: Float[Tensor, "B p dh"], v: Float[Tensor, "B p dh"]
    ) -> Float[Tensor, "B p d"]:
        """One head's output (``attn.hook_result``, without b_O) from its q, k, v (causal)."""
        z = F.scaled_dot_product_attention(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True, scale=1.0 / self.attn_scales[layer]
        ).squeeze(1)
        return z @ self.W_O[layer, head]

    def attn(self, layer: int, x: Float[Tensor, "B p d"], pos: Int[Tensor, " B"] | None = None) -> Tensor:
        """Attention output (all heads + b_O) of block ``layer`` for residual ``x``.

        With ``pos``, only the query at position ``pos[i]`` of row i is computed: [B, d]."""
        B, P, d = x.shape
        H, dh = self.n_heads, self.d_head
        qkv = self.norm(x, self.ln1[layer]) @ self.W_QKV[layer] + self.b_QKV[layer]
        q, k, v = qkv.view(B, P, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [B, H, P, dh]
        s = 1.0 / self.attn_scales[layer]
        if pos is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)  # [B,H,P,dh]
            z = z.transpose(1, 2).reshape(B, P, H * dh)
        else:
            rows = torch.arange(B, device=x.device)
            qp = q[rows, :, pos].unsqueeze(2)  # [B,H,1,dh]
            mask = torch.arange(P, device=x.device)[None, :] <= pos[:, None]  # [B,P]
            z = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask[:, None, None, :], scale=s)
            z = z.reshape(B, H * dh)
        return z @ self.W_O_flat[layer] + self.b_O[layer]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """MLP output (``hook_mlp_out``) for the pre-LN2 input ``x``."""
        h = self.act(self.norm(x, self.ln2[layer]) @ self.W_in[layer] + self.b_in[layer])
        return h @ self.W_out[layer] + self.b_out[layer]

    # ----------------------------------------------------------------- running
    def block(self, layer: int, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """``resid_post`` of block ``layer`` from its ``resid_pre`` ([B,p,d], or [B,d] with ``pos``)."""
        a = self.attn(layer, x, pos)
        base = x if pos is None else x[torch.arange(x.shape[0], device=x.device), pos]
        if self.parallel:
            return base + a + self.mlp(layer, base)
        mid = base + a
        return mid + self.mlp(layer, mid)

    def run(self, x: Tensor, point: tuple[str, int], pos: Tensor | None = None) -> Tensor:
        """Run the residual ``x`` at ``point`` to the end of the last block.

        Returns the final residual (pre final LN) ``[B, p, d]``, or ``[B, d]`` at ``pos`` only
        (then the last block computes just that query position)."""
        where, layer = point
        if where == "mid":
            if self.parallel:
                raise ValueError("no 'mid' point in a parallel attention/MLP block")
            x = x + self.mlp(layer, x)
            layer += 1
        elif where == "post":
            layer += 1
        if layer >= self.n_layers and pos is not None:
            return x[torch.arange(x.shape[0], device=x.device), pos]
        for i in range(layer, self.n_layers):
            last = i == self.n_layers - 1
            x = self.block(i, x, pos if last else None)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """Full logits from the final residual (final LN + unembedding)."""
        return self.norm(x, self.ln_final) @ self.W_U + self.b_U

    def selected_logits(self, x: Float[Tensor, "B d"], tokens: Int[Tensor, "B k"]) -> Float[Tensor, "B k"]:
        """Only the logits of ``tokens`` (per row) from the final residual at the read-out position."""
        y = self.norm(x, self.ln_final)
        return torch.einsum("bd,dbk->bk", y, self.W_U[:, tokens]) + self.b_U[tokens]
