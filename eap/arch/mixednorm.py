"""A q/k norm over the *whole* projected q (or k) of all heads (OLMo-2): head H's own view.

OLMo-2 normalises ``q_proj(x)`` (all heads, ``n_heads * d_head`` features) with one RMSNorm, so
the norm statistics couple the heads. The receiver ``aL.hH<q>`` (or ``<k>``) is defined as head
H's own view: head H's projection reads the patched residual, every other head's slice of the
projected vector stays as the residual stream gives it (clean in exact patching), the norm
statistics are computed over that mixed vector, and head H uses its own slice of the result
(:func:`own_views`). Hooking ``q_proj`` instead would let the changed statistics reach every
head: a different quantity. EAP uses the matching block of the norm's Jacobian, head H's slice
with respect to head H's slice (:func:`own_block_backward`).

Grouped k/v heads under such a norm are not implemented (``eap.arch.ungroup`` refuses them):
their statistics would have to be taken over the original key/value heads.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from eap.arch.norm import Norm


def whole_normed(norm: Norm, t: Float[Tensor, "*N H P dh"]) -> Float[Tensor, "*N H P dh"]:
    """Per-head ``t`` through a norm over all heads' features at each position (OLMo-2's
    ``q_norm(q_proj(x))`` in the per-head layout)."""
    H, dh = t.shape[-3], t.shape[-1]
    flat = t.transpose(-2, -3).flatten(-2)  # [*N, P, H dh]
    return norm(flat).unflatten(-1, (H, dh)).transpose(-2, -3)


def own_views(
    norm: Norm, context: Float[Tensor, "N H P dh"], own: Float[Tensor, "N Hs P dh"], heads: slice = slice(None)
) -> Float[Tensor, "N Hs P dh"]:
    """Head ``heads[i]``'s slice of ``norm`` applied to ``context`` (every head's projection of
    the residual the other heads read) with that head's slice replaced by ``own[:, i]`` (its
    projection of its own input). Equal to :func:`whole_normed` of ``context`` where ``own`` is
    ``context``'s slice."""
    N, H, P, dh = context.shape
    idx = torch.arange(H, device=own.device)[heads]
    rows = torch.arange(len(idx), device=own.device)
    mixed = context.unsqueeze(1).expand(N, len(idx), H, P, dh).clone()  # [N, Hs, H, P, dh]
    mixed[:, rows, idx] = own
    return whole_normed(norm, mixed)[:, rows, idx]


def own_block_backward(
    norm: Norm, y: Float[Tensor, "N n"], grad: Float[Tensor, "N n"], n_heads: int
) -> tuple[Float[Tensor, "N n"], Float[Tensor, "N n"]]:
    """The norm's backward at its input ``y`` (every head's projection, ``n = H * dh``) for the
    gradient ``grad`` at its output: ``(full, own)``. ``full = J^T grad`` (the gradient at ``y``,
    heads coupled through the statistics); ``own``: per head H, ``J_HH^T grad_H`` (the diagonal
    block: head H's output slice with respect to its own input slice, the gradient of the
    receiver ``aL.hH<q>``). With ``s = r w grad``: ``full = s - x_hat mean(s x_hat)`` and ``own_H =
    s_H - x_hat_H sum_H(s x_hat) / n``. In ``grad``'s dtype."""
    back = norm.backward_at(y)
    s = back.scale(grad)  # r * w * grad, computation dtype
    prod = (s * back.x_hat).unflatten(-1, (n_heads, -1)).sum(-1, keepdim=True)  # [N, H, 1]
    n = y.shape[-1]
    x_hat = back.x_hat.unflatten(-1, (n_heads, -1))
    own = (s.unflatten(-1, (n_heads, -1)) - x_hat * (prod / n)).flatten(-2)
    full = s - back.x_hat * (prod.sum(-2) / n)
    return full.to(grad.dtype), own.to(grad.dtype)
