"""The read-out: final norm + unembedding (+ final logit softcap)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.arch.norm import Norm
from eap.arch.spec import ArchSpec, arch_spec


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """``tanh(x / cap) * cap`` (Gemma-2 soft-capping); ``x`` itself without a cap."""
    return x if not cap else torch.tanh(x / cap) * cap


class Readout:
    """Final norm + unembedding (+ final logit softcap): the one read-out of eap-bench.

    ``selected`` is computed in float32 at least (a half-precision model's logits are not rounded
    to half precision before the metric). Used by ``eap.attribute.select_logits`` (with gradients) and
    by validation's block runner."""

    def __init__(self, model: Any, spec: ArchSpec | None = None) -> None:
        spec = spec or arch_spec(model)
        self.norm = Norm.of(model.ln_final, spec)
        self.W_U: Float[Tensor, "d_model d_vocab"] = model.W_U.detach()
        b_U = getattr(model, "b_U", None)
        self.b_U: Tensor | None = None if b_U is None else b_U.detach()
        self.softcap = spec.final_softcap
        self.dtype = torch.promote_types(self.W_U.dtype, torch.float32)

    def logits(self, x: Float[Tensor, "*b d_model"]) -> Float[Tensor, "*b d_vocab"]:
        """All logits from the final residual (before the final norm). A half-precision model's
        full unembedding runs in its own dtype (no float32 copy of it); the result is float32."""
        y = self.norm(x, self.W_U.dtype) @ self.W_U
        if self.b_U is not None:
            y = y + self.b_U
        return softcap(y.to(self.dtype), self.softcap)

    def selected(self, x: Float[Tensor, "b d_model"], tokens: Int[Tensor, "b k"]) -> Float[Tensor, "b k"]:
        """Only the logits of ``tokens`` (per row) from the final residual at one position."""
        y = self.norm(x, self.dtype)
        w = self.W_U.T[tokens].to(self.dtype)  # [b, k, d]: rows of the unembedding, no full matmul
        out = torch.einsum("bd,bkd->bk", y, w)
        if self.b_U is not None:
            out = out + self.b_U[tokens].to(self.dtype)
        return softcap(out, self.softcap)
