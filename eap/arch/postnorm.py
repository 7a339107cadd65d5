"""Edges through a post-norm (Gemma-2, Gemma-3, OLMo-2): what a head sender's difference is.

In a post-norm family a norm acts on the *sum* of a layer's heads (``post_attention_layernorm``)
before it enters the residual stream, so one head's output is not additive there. eap-bench
follows MIB/EAP-IG (``evaluate_graph`` with normalisation before and after):

* a head sender's output is its pre-norm contribution ``d_u`` (its slice of ``o_proj``: the
  bridge's ``attn.hook_result``); an MLP sender's output is its post-normed output;
* patching ``u -> v`` (u a head of layer L) gives receiver v, and v only, the post-normed
  attention output of layer L recomputed with u's pre-norm output corrupted:
  v's input changes by ``PN_L(S_L + scale * d_u) - PN_L(S_L)`` (:func:`post_normed_difference`),
  where ``S_L`` is layer L's clean pre-norm attention sum (all heads + ``b_O``);
* EAP is the first-order term of exactly that: ``J_PN_L(S_L) d_u`` (:func:`post_norm_jvp`), so
  exact / eps -> EAP as eps -> 0 as in every other family.

With an identity post-norm both reduce to ``d_u`` (the additive definition of the other
families). EAP-IG's own ``attribute.py`` contracts the raw ``d_u`` with the receiver gradient
(no Jacobian); the gradient methods' option ``post_norm='ignore'`` (``eap.attribute(...,
post_norm='ignore')``, ``eap.fast.FastEngine(post_norm='ignore')``) reproduces that variant on request.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from eap.arch.errors import UnsupportedModel
from eap.arch.norm import Norm
from eap.arch.spec import arch_spec


class _Normlike(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...


def post_normed_difference(
    norm: "Norm | _Normlike", S: Float[Tensor, "*b d"], D: Float[Tensor, "*m *b d"]
) -> Float[Tensor, "*m *b d"]:
    """``PN(S + D) - PN(S)``: the change of a post-normed layer output when its pre-norm sum
    ``S`` (broadcast over ``D``'s leading copies) moves by ``D`` (residual-stream units)."""
    return norm(S + D) - norm(S)


def post_norm_jvp(norm: Norm, S: Float[Tensor, "*b d"], D: Float[Tensor, "*m *b d"]) -> Float[Tensor, "*m *b d"]:
    """``J_PN(S) D``: the post-norm's Jacobian at the pre-norm sum ``S`` applied to ``D`` (the
    first-order term of :func:`post_normed_difference`), in ``D``'s dtype. With ``r`` and
    ``x_hat`` of ``Norm.backward_at(S)``: ``w * r * project(D)`` (``project`` removes the
    component along ``x_hat`` and, for LayerNorm, the mean), computed in the precision the norm
    itself uses (RMSNorm statistics in float32, as HF)."""
    back = norm.backward_at(S)
    v = back.project(D.to(back.dtype)) * back.r
    if back.weight is not None:
        v = v * back.weight.to(v.dtype)
    return v.to(D.dtype)


def refuse_hook_path(model: Any, what: str, needs: str, why: Exception | None = None) -> None:
    """Raise ``UnsupportedModel`` where ``model`` has post-norms (Gemma-2, Gemma-3, OLMo-2) and
    ``what`` would run on TransformerLens hooks: a head's edge there is defined through its
    layer's recomputed post-norm (this module), which the hooks do not apply. ``needs``: the
    plain-torch path that does; ``why``: the reason that path cannot run (or None)."""
    spec = arch_spec(model)
    if spec.post_norms:
        reason = f" ({why})" if why is not None else ""
        raise UnsupportedModel(
            f"{spec.family}: a post-norm acts on the sum of heads; {what} there needs {needs}, which applies it "
            f"per head; the hook path would silently drop it{reason}"
        )
