"""LayerNorm / RMSNorm as the families compute them (:class:`Norm`) and their backward in closed
form (:class:`NormBackward`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from eap.arch.spec import ArchSpec


@dataclass
class Norm:
    """LayerNorm or RMSNorm with its weight (bias), epsilon and any weight offset (Gemma: 1 + w)."""

    kind: str
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    offset: float = 0.0
    weight_in_fp32: bool = False

    @classmethod
    def of(cls, module: Any, spec: ArchSpec) -> "Norm":
        """From a bridge norm component (its public ``weight`` / ``bias`` / ``eps`` attributes)."""
        hf = module.original_component
        eps = getattr(hf, "eps", None)
        if eps is None:
            eps = getattr(hf, "variance_epsilon", spec.eps)
        w = getattr(hf, "weight", None)
        b = getattr(hf, "bias", None)
        return cls(spec.norm, None if w is None else w.detach(), None if b is None else b.detach(), float(eps),
                   spec.norm_offset, spec.norm_weight_in_fp32)

    @classmethod
    def identity(cls) -> "Norm":
        """No norm (OLMo-2 has none before attention and MLP): ``x`` itself."""
        return cls("none", None, None, 0.0)

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """Normalise the last dimension; ``out_dtype`` (default: ``x``'s) is the result's dtype."""
        out_dtype = out_dtype or x.dtype
        if self.kind == "none":
            return x if out_dtype == x.dtype else x.to(out_dtype)
        if self.kind == "layernorm":
            w, b = self.weight, self.bias
            if out_dtype != x.dtype:
                x, w, b = x.to(out_dtype), _cast(w, out_dtype), _cast(b, out_dtype)
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        h = x.to(torch.float32)  # as HF: RMS statistics in float32, whatever the model dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:  # a norm without a weight (a user's description of a non-parametric norm)
            return h.to(out_dtype) if not self.offset else (h * self.offset).to(out_dtype)
        if self.weight_in_fp32:
            return (h * (self.offset + self.weight.float())).to(out_dtype)
        w = self.weight if not self.offset else self.offset + self.weight
        return _cast(w, out_dtype) * h.to(out_dtype)

    def backward_at(self, x: Float[Tensor, "*b d"]) -> "NormBackward":
        """The norm's backward at input ``x`` in closed form (:class:`NormBackward`): with
        ``r = 1 / sqrt(var(x) + eps)`` (RMSNorm: ``1 / sqrt(mean(x^2) + eps)``), ``x_hat`` the
        normalised input and ``w`` the weight (with any offset), ``J(x)^T grad = project(r * w *
        grad)``, where ``project`` removes from each row its component along ``x_hat`` and, for
        LayerNorm, its mean: ``v - mean(v) - x_hat * mean(v * x_hat)`` (RMSNorm: ``v - x_hat *
        mean(v * x_hat)``). Computed in the precision autograd uses through :meth:`__call__`:
        RMSNorm in float32 (HF's upcast), LayerNorm in ``x``'s dtype, at least float32."""
        c = torch.float32 if self.kind == "rmsnorm" else torch.promote_types(x.dtype, torch.float32)
        if self.kind == "none":  # the identity: r = 1, nothing to project out
            return NormBackward(x.new_ones(x.shape[:-1] + (1,), dtype=c), None, None, x.new_zeros(x.shape, dtype=c), False)
        xc = x.to(c)
        if self.kind == "layernorm":
            xc = xc - xc.mean(-1, keepdim=True)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight if self.weight is None or not self.offset else self.offset + self.weight
        if w is not None:  # in the dtype the forward applies it in
            w = w.to(c if self.kind == "layernorm" or self.weight_in_fp32 else x.dtype)
        return NormBackward(r, w, None if self.bias is None else self.bias.to(c), xc * r, self.kind == "layernorm")


@dataclass
class NormBackward:
    """A norm's backward at one input: ``J^T grad = project(scale(grad))`` (``Norm.backward_at``).

    ``r`` ``[*b, 1]`` (one over the input's RMS or standard deviation) and ``x_hat`` ``[*b, d]`` in
    the computation dtype, ``weight`` ``[d]`` (with any offset) in the dtype the forward applies it
    in, ``bias`` ``[d]``; None where the norm has none."""

    r: Tensor
    weight: Tensor | None
    bias: Tensor | None
    x_hat: Tensor
    centred: bool  # LayerNorm: the mean is removed too

    @property
    def dtype(self) -> torch.dtype:
        return self.r.dtype

    def scale(self, grad: Float[Tensor, "*s *b d"]) -> Float[Tensor, "*s *b d"]:
        """``r * w * grad`` in the computation dtype (a new tensor)."""
        g = grad.to(self.dtype, copy=True)
        return g.mul_(self.r if self.weight is None else self.weight * self.r)  # (in g's dtype)

    def project(self, v: Float[Tensor, "*s *b d"], inplace: bool = False) -> Float[Tensor, "*s *b d"]:
        """``v - mean(v) - x_hat * mean(v * x_hat)`` per row (not centred: without ``mean(v)``);
        ``inplace``: ``v`` is updated and returned."""
        dot = torch.linalg.vecdot(v, self.x_hat).unsqueeze(-1) / v.shape[-1]  # mean(v * x_hat)
        if not inplace:
            v = v.clone()
        if self.centred:
            v.sub_(v.mean(-1, keepdim=True))
        return v.addcmul_(self.x_hat, dot, value=-1.0)

    def through_linear(
        self, grad: Float[Tensor, "S N e"], W: Float[Tensor, "S d e"], out: Float[Tensor, "S N e"],
        b: Float[Tensor, "S e"] | None = None, result: Float[Tensor, "S N d"] | None = None,
    ) -> Float[Tensor, "S N d"]:
        """``J^T (grad_s @ W_s^T)`` for each of ``S`` linear maps ``y -> y @ W_s + b_s`` of this
        norm's output ``y`` (e.g. every head's q projection), given the gradients ``grad`` at their
        outputs and the outputs ``out`` themselves (the forward's values; rows ``N`` = the
        flattened input rows). Equal to ``project(scale(grad @ W^T))``, computed with one batched
        product and one pass over the ``[S, N, d]`` result: ``r`` and ``w`` are folded into the
        small factors, the mean is removed by centring the scaled weights, and
        ``mean(v * x_hat) = (r grad) . ((x_hat w) @ W) / d`` with ``(x_hat w) @ W = out - b -
        bias @ W``. In ``grad``'s dtype; written into ``result`` when given."""
        dt = grad.dtype
        d = W.shape[1]
        g = grad * self.r.reshape(1, -1, 1).to(dt)
        xw_W = out if b is None else out - b[:, None]  # (x_hat * w) @ W
        if self.bias is not None:
            xw_W = xw_W - torch.einsum("d,sde->se", self.bias.to(dt), W)[:, None]
        dot = torch.linalg.vecdot(g, xw_W).unsqueeze(-1) / d  # [S, N, 1]: mean(v * x_hat)
        v = torch.bmm(g, self._scaled_centred(W, dt).transpose(1, 2), out=result)
        return v.addcmul_(self.x_hat.reshape(1, -1, d).to(dt), dot, value=-1.0)

    def _scaled_centred(self, W: Float[Tensor, "S d e"], dt: torch.dtype) -> Float[Tensor, "S d e"]:
        """``W`` with each input row ``d`` scaled by the norm's weight and, for LayerNorm, centred
        over ``d`` (so ``grad @ result^T`` is ``scale`` and the mean removal of ``grad @ W^T``).
        Computed in ``W``'s own memory order: the per-head weights are strided views of the
        model's fused projection, and a transposed copy of them costs as much as the product."""
        w = None if self.weight is None else self.weight.to(dt)[:, None]  # [d, 1]
        if not self.centred:
            return W if w is None else W * w
        if w is None:
            return W - W.mean(1, keepdim=True)
        mean = torch.einsum("sde,dk->ske", W, w) / W.shape[1]  # [S, 1, e]: mean over d of w * W
        return torch.addcmul(-mean, W, w)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
