"""A q/k norm over the *whole* projected q (or k) of all heads (OLMo-2): head H's own view.

OLMo-2 normalises ``q_proj(x)`` (all heads, ``n_heads * d_head`` features) with one RMSNorm, so
the norm statistics couple the heads. The receiver ``aL.hH<q>`` (or ``<k>``) is defined as head
H's own view: head H's projection reads the patched residual, every other head's slice of the
projected vector stays as the residual stream gives it (clean in exact patching), the norm
statistics are computed over that mixed vector, and head H uses its own slice of the result
(:func:`own_views`). Hooking ``q_proj`` instead would let the changed statistics reach every
head: a different quantity. EAP uses the matching block of the norm's Jacobian, head H's slice
with respect to head H's slice (:func:`own_block_backward`).

Grouped key heads (GQA, e.g. OLMo-2-32B: 40 query heads, 8 key/value heads). The model is
ungrouped on load (``eap.arch.ungroup``: each query head gets a copy of its group's k projection
and k-norm weight; the same clean function), but a k receiver's statistics are those of the
*original* key heads: ``aL.hH<k>`` replaces the key slice of head H's group (every copy of it, so
the mean of squares equals the one over the original heads), the other groups stay clean, and
head H alone uses the result (the other query heads of its group keep the clean key, as for any
GQA k/v receiver). Replacing only head H's copy would take the statistics over the copies: the
same clean function but different patched values. ``groups`` (query heads per original key head)
selects this in :func:`own_views` and :func:`own_block_backward`; 1 for q and for MHA.
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
    norm: Norm, context: Float[Tensor, "N H P dh"], own: Float[Tensor, "N Hs P dh"], heads: slice = slice(None),
    groups: int = 1,
) -> Float[Tensor, "N Hs P dh"]:
    """Head ``heads[i]``'s slice of ``norm`` applied to ``context`` (every head's projection of
    the residual the other heads read) with that head's slice replaced by ``own[:, i]`` (its
    projection of its own input). Equal to :func:`whole_normed` of ``context`` where ``own`` is
    ``context``'s slice. ``groups > 1`` (ungrouped key heads, consecutive copies of one original
    head): every copy of head ``heads[i]``'s group is replaced, so the statistics are those of
    the original heads with that one slice patched (module docstring)."""
    N, H, P, dh = context.shape
    idx = torch.arange(H, device=own.device)[heads]
    rows = torch.arange(len(idx), device=own.device)
    mixed = context.unsqueeze(1).expand(N, len(idx), H, P, dh).clone()  # [N, Hs, H, P, dh]
    if groups == 1:
        mixed[:, rows, idx] = own
    else:
        if H % groups:
            raise ValueError(f"{H} heads are not groups of {groups}")
        members = (idx // groups * groups)[:, None] + torch.arange(groups, device=own.device)  # [Hs, groups]
        mixed[:, rows[:, None], members] = own.unsqueeze(2)
    return whole_normed(norm, mixed)[:, rows, idx]


def own_block_backward(
    norm: Norm, y: Float[Tensor, "N n"], grad: Float[Tensor, "N n"], n_heads: int, groups: int = 1
) -> tuple[Float[Tensor, "N n"], Float[Tensor, "N n"]]:
    """The norm's backward at its input ``y`` (every head's projection, ``n = H * dh``) for the
    gradient ``grad`` at its output: ``(full, own)``. ``full = J^T grad`` (the gradient at ``y``,
    heads coupled through the statistics); ``own``: per head H, ``J_HH^T grad_H`` (the diagonal
    block: head H's output slice with respect to its own input slice, the gradient of the
    receiver ``aL.hH<q>``). With ``s = r w grad``: ``full = s - x_hat mean(s x_hat)`` and ``own_H =
    s_H - x_hat_H sum_H(s x_hat) / n``. ``groups > 1`` (ungrouped key heads, :func:`own_views`):
    head H's group slice of the original heads w.r.t. itself, ``own_H = s_H - x_hat_H sum_H(s
    x_hat) / (n / groups)`` (the statistics over ``n / groups`` original features). In ``grad``'s
    dtype."""
    back = norm.backward_at(y)
    s = back.scale(grad)  # r * w * grad, computation dtype
    prod = (s * back.x_hat).unflatten(-1, (n_heads, -1)).sum(-1, keepdim=True)  # [N, H, 1]
    n = y.shape[-1]
    x_hat = back.x_hat.unflatten(-1, (n_heads, -1))
    own = (s.unflatten(-1, (n_heads, -1)) - x_hat * (prod / (n // groups))).flatten(-2)
    full = s - back.x_hat * (prod.sum(-2) / n)
    return full.to(grad.dtype), own.to(grad.dtype)
