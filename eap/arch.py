"""The architecture adapter: the one place that knows how a model family computes a block.

A *family* (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma-2) is a short declarative
:class:`Family`: the names of its HuggingFace config fields and the facts of its block (norm,
positions, attention, MLP, block layout, read-out). Generic code reads it:

* :func:`arch_spec` turns a HuggingFace config (a ``PretrainedConfig`` or a plain dict, no
  weights) or a loaded model into an :class:`ArchSpec` of plain numbers; :func:`graph_spec` turns
  that into the edge graph's :class:`~eap.graph.GraphSpec` (q/k/v receivers per *query* head).
* :func:`check_edges` refuses, with :class:`UnsupportedModel` naming the feature, models whose
  edge graph would be wrong (grouped k/v hooks, per-head outputs that a norm mixes, families not
  described here). Attribution and exact patching call it through ``eap.hooks.check_edge_hooks``.
* :class:`Readout` is the final norm + the selected columns of the unembedding (+ any final
  logit softcap), shared by ``eap.attribute.select_logits`` and validation's block runner.
* :class:`Arch` holds a model's weights (views of the bridge's own tensors, read once through
  the TransformerLens 4 bridge's public API: per-block ``W_Q``/``W_in``/..., the norm modules'
  ``weight``/``eps``, the HF rotary module and config via ``original_model`` /
  ``original_component``) and computes norms, rotary positions, attention (scaling, softcap,
  sliding windows), MLPs (plain or gated) and whole blocks (sequential, parallel, with
  post-norms) in plain torch, so exact patching can start anywhere in the residual stream.
  :meth:`Arch.verify` checks it against the bridge's own forward.

Grouped-query attention
-----------------------
Edge graphs follow MIB/EAP-IG: every query head has its own q, k and v receiver. ``eap.load_model``
*ungroups* a GQA model (:func:`ungroup_kv_heads`): each query head gets its own copy of its group's
key/value projection (``repeat_interleave`` of the weights), which computes the same function,
so the bridge's ``hook_k_input`` / ``hook_v_input`` have one slice per query head. Patching
``a3.h5<k>`` then means: the key input *seen by query head 5 only* is patched; the other heads
of its KV group still read the clean key input. Cost: the k/v projections become
``n_heads / n_kv_heads`` times larger (about +10% FLOPs on Llama-3.1-8B).

Numerics follow the bridge (which follows HF): RMSNorm statistics and (for Llama-like families)
the attention softmax are computed in float32 whatever the model dtype, then cast back.
The read-out is computed in float32 at least (a half-precision model's logits are not rounded
to half precision before the metric).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from eap.graph import GraphSpec


class UnsupportedModel(NotImplementedError):
    """The architecture adapter does not implement a feature of this model (named in the message)."""


# ------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    """How one model family computes (declarative; read by generic code).

    Config keys are the family's HuggingFace config field names. ``parallel`` is a constant or
    the name of a boolean config field. ``windows``: 'none', 'all' (``sliding_window`` on every
    layer, Mistral) or 'layer_types' (``config.layer_types[i] == 'sliding_attention'``).
    """

    name: str
    model_types: tuple[str, ...]
    # HuggingFace config field names
    n_layers: str = "num_hidden_layers"
    d_model: str = "hidden_size"
    n_heads: str = "num_attention_heads"
    n_kv_heads: str | None = "num_key_value_heads"
    d_mlp: str = "intermediate_size"
    n_ctx: str = "max_position_embeddings"
    eps: str = "rms_norm_eps"
    act: str = "hidden_act"
    # norm
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_offset: float = 0.0  # Gemma: the weight acts as (offset + w)
    norm_weight_in_fp32: bool = False  # Gemma: (x_hat * w) in float32, then cast; Llama: cast, then * w
    # positions
    positions: Literal["absolute", "rotary"] = "rotary"
    rotary: Literal["half", "interleaved"] = "half"  # rotate-half (Llama, NeoX) or adjacent pairs (GPT-J)
    # attention
    softmax_fp32: bool = True  # softmax upcast to float32 (HF eager / the bridge for Llama-like families)
    windows: Literal["none", "all", "layer_types"] = "none"
    attn_softcap: str | None = None  # config field of tanh soft-capping of attention scores
    kv_proj: tuple[str, str] | None = ("k_proj", "v_proj")  # HF attention submodules (GQA ungrouping)
    # MLP and block
    gated_mlp: bool = True
    parallel: bool | str = False
    post_norms: bool = False  # Gemma-2: a norm after attention (on the sum of heads) and after the MLP
    # read-out
    final_softcap: str | None = None


GPT2 = Family(
    "gpt2", ("gpt2",), n_layers="n_layer", d_model="n_embd", n_heads="n_head", n_kv_heads=None, d_mlp="n_inner",
    n_ctx="n_positions", eps="layer_norm_epsilon", act="activation_function", norm="layernorm",
    positions="absolute", softmax_fp32=False, kv_proj=None, gated_mlp=False,
)
GPT_NEOX = Family(
    "gpt-neox", ("gpt_neox",), n_kv_heads=None, eps="layer_norm_eps", norm="layernorm", softmax_fp32=False,
    kv_proj=None, gated_mlp=False, parallel="use_parallel_residual",
)
LLAMA = Family("llama", ("llama",))
MISTRAL = Family("mistral", ("mistral",), windows="all")
QWEN2 = Family("qwen2", ("qwen2",), windows="layer_types")
GEMMA2 = Family(
    "gemma2", ("gemma2",), act="hidden_activation", norm_offset=1.0, norm_weight_in_fp32=True,
    windows="layer_types", attn_softcap="attn_logit_softcapping", post_norms=True,
    final_softcap="final_logit_softcapping",
)
FAMILIES: tuple[Family, ...] = (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA2)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_named(name: str) -> Family:
    """The :class:`Family` called ``name`` ('gpt2', 'gpt-neox', 'llama', ...; HF model types too)."""
    for fam in FAMILIES:
        if name == fam.name or name in fam.model_types:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of(model_type: str) -> Family:
    """The :class:`Family` of a HuggingFace ``model_type`` (raises ``UnsupportedModel``)."""
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModel(
            f"model family {model_type!r} is not described in eap.arch (described: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}); add a Family entry (and its completeness test) to use it"
        )
    return _BY_MODEL_TYPE[model_type]


# ------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class ArchSpec:
    """The resolved facts of one model (plain numbers; no weights)."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads as the model computes now (== n_heads once ungrouped)
    d_head: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    norm: str
    eps: float
    norm_offset: float
    norm_weight_in_fp32: bool
    positions: str
    rotary: str
    rotary_dim: int  # 0 without rotary
    softmax_fp32: bool
    attn_softcap: float | None
    windows: tuple[int | None, ...]  # sliding window per layer (None: full causal attention)
    gated_mlp: bool
    act: str
    parallel: bool
    post_norms: bool
    attn_only: bool
    final_softcap: float | None
    grouped_kv_heads: int | None = None  # KV heads before ungrouping (None if never grouped)
    problems: tuple[str, ...] = field(default=())  # features the block runner does not implement

    def graph_spec(self) -> GraphSpec:
        """The edge graph's shape: q/k/v receivers per query head (MIB/EAP-IG convention)."""
        return GraphSpec(self.n_layers, self.n_heads, attn_only=self.attn_only, parallel_attn_mlp=self.parallel,
                         d_model=self.d_model)


def _get(cfg: Any, key: str | None, default: Any = None) -> Any:
    if key is None:
        return default
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    return default if value is None else value


def arch_spec(config_or_model: Any) -> ArchSpec:
    """Facts of a model from its HuggingFace config (``PretrainedConfig`` or dict with
    ``model_type``; no weights needed) or from a loaded TransformerLens bridge.

    Raises ``UnsupportedModel`` for families not described in this module."""
    if hasattr(config_or_model, "original_model") and hasattr(config_or_model, "cfg"):
        return _spec_from_model(config_or_model)
    return _spec_from_config(config_or_model)


def graph_spec(config_or_model: Any) -> GraphSpec:
    """The :class:`~eap.graph.GraphSpec` of a HuggingFace config or a model (see :func:`arch_spec`)."""
    return arch_spec(config_or_model).graph_spec()


def _spec_from_config(cfg: Any, d_vocab: int | None = None) -> ArchSpec:
    fam = family_of(str(_get(cfg, "model_type", "")))
    problems = []
    L, d, H = int(_get(cfg, fam.n_layers)), int(_get(cfg, fam.d_model)), int(_get(cfg, fam.n_heads))
    kv = int(_get(cfg, fam.n_kv_heads, H))
    d_head = int(_get(cfg, "head_dim", d // H))
    d_mlp = int(_get(cfg, fam.d_mlp, 4 * d))
    rotary_dim = 0
    if fam.positions == "rotary":
        rope = _get(cfg, "rope_parameters", {}) or {}
        pct = float(rope.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", _get(cfg, "rotary_pct", 1.0))))
        rotary_dim = int(d_head * pct)
    sliding = _get(cfg, "sliding_window")
    if fam.windows == "all":
        windows = tuple([sliding] * L)
    elif fam.windows == "layer_types":
        types = _get(cfg, "layer_types") or ["full_attention"] * L
        windows = tuple(sliding if t == "sliding_attention" else None for t in types)
    else:
        windows = tuple([None] * L)
    parallel = fam.parallel if isinstance(fam.parallel, bool) else bool(_get(cfg, fam.parallel, False))
    act = str(_get(cfg, fam.act, ""))
    try:
        from transformers.activations import ACT2FN

        ACT2FN[act]
    except KeyError:
        problems.append(f"activation {act!r}")
    if _get(cfg, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if fam.name == "gpt2" and _get(cfg, "add_cross_attention", False):
        problems.append("cross-attention")
    if fam.name == "gpt2" and _get(cfg, "reorder_and_upcast_attn", False):
        problems.append("reorder_and_upcast_attn")
    attn_cap = _get(cfg, fam.attn_softcap)
    final_cap = _get(cfg, fam.final_softcap)
    grouped = _get(cfg, "eap_grouped_kv_heads")
    return ArchSpec(
        family=fam.name, n_layers=L, d_model=d, n_heads=H, n_kv_heads=kv, d_head=d_head, d_mlp=d_mlp,
        n_ctx=int(_get(cfg, fam.n_ctx, 0)), d_vocab=int(d_vocab or _get(cfg, "vocab_size", 0)),
        norm=fam.norm, eps=float(_get(cfg, fam.eps, 1e-5)), norm_offset=fam.norm_offset,
        norm_weight_in_fp32=fam.norm_weight_in_fp32, positions=fam.positions, rotary=fam.rotary,
        rotary_dim=rotary_dim, softmax_fp32=fam.softmax_fp32,
        attn_softcap=float(attn_cap) if attn_cap else None, windows=windows, gated_mlp=fam.gated_mlp, act=act,
        parallel=parallel, post_norms=fam.post_norms, attn_only=bool(_get(cfg, "attn_only", False)),
        final_softcap=float(final_cap) if final_cap else None,
        grouped_kv_heads=int(grouped) if grouped else None, problems=tuple(problems),
    )


def _spec_from_model(model: Any) -> ArchSpec:
    """From a bridge: the HF config (``model.original_model.config``) read through the family,
    cross-checked with the bridge's own ``cfg``."""
    hf_cfg = model.original_model.config
    spec = _spec_from_config(hf_cfg, d_vocab=int(model.cfg.d_vocab))
    cfg = model.cfg
    ours = (spec.n_layers, spec.n_heads, spec.d_model)
    theirs = (int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_model))
    if ours != theirs:
        raise UnsupportedModel(f"HF config and bridge disagree on (n_layers, n_heads, d_model): {ours} vs {theirs}")
    kv = getattr(cfg, "n_key_value_heads", None) or spec.n_heads
    problems = list(spec.problems)
    for flag, what in (("use_qk_norm", "q/k norm"), ("use_local_attn", "local attention (TransformerLens)")):
        if getattr(cfg, flag, False):
            problems.append(what)
    if getattr(cfg, "num_experts", None):
        problems.append("mixture of experts")
    return replace(spec, n_kv_heads=int(kv), attn_only=bool(getattr(cfg, "attn_only", False)), problems=tuple(problems))


def check_edges(model: Any) -> ArchSpec:
    """Raise ``UnsupportedModel`` unless the edge graph (per-head senders, per-query-head q/k/v
    receivers, additive residual stream) is right for ``model``; returns its :class:`ArchSpec`."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv not in (None, cfg.n_heads):
        raise UnsupportedModel(
            f"grouped-query attention with grouped k/v hooks (n_key_value_heads={n_kv}, n_heads={cfg.n_heads}): "
            "the edge graph has q, k and v receivers per query head (as MIB and EAP-IG); load the model with "
            "eap.load_model, which ungroups the key/value heads (same function, one k/v input per query head)"
        )
    spec = arch_spec(model)
    if spec.post_norms:
        raise UnsupportedModel(
            f"{spec.family}: a norm after attention (post_attention_layernorm) acts on the sum of all heads, so "
            "per-head outputs are not additive into the residual stream and a single head->receiver edge has no "
            "exact meaning there; eap-bench refuses edge and node work on this family rather than approximate it "
            "(see docs/architectures.md)"
        )
    return spec


# ------------------------------------------------------------------------------------- pieces
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

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """Normalise the last dimension; ``out_dtype`` (default: ``x``'s) is the result's dtype."""
        out_dtype = out_dtype or x.dtype
        if self.kind == "layernorm":
            w, b = self.weight, self.bias
            if out_dtype != x.dtype:
                x, w, b = x.to(out_dtype), _cast(w, out_dtype), _cast(b, out_dtype)
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        h = x.to(torch.float32)  # as HF: RMS statistics in float32, whatever the model dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (h * (self.offset + self.weight.float())).to(out_dtype)
        w = self.weight if not self.offset else self.offset + self.weight
        return _cast(w, out_dtype) * h.to(out_dtype)

    def input_grad(self, x: Float[Tensor, "*b d"], grad: Float[Tensor, "*s *b d"]) -> Float[Tensor, "*s *b d"]:
        """The norm's backward: the gradient at its input ``x`` for the gradient ``grad`` at its
        output (``J(x)^T grad``, per unit of input, in ``grad``'s units), for a stack of gradients
        at the same input (``grad`` may have extra leading dimensions, e.g. one per head). ``x``
        and ``grad`` share a dtype; the result has it too. See :meth:`backward_at`."""
        back = self.backward_at(x)
        return back.project(back.scale(grad), inplace=True).to(grad.dtype)

    def backward_at(self, x: Float[Tensor, "*b d"]) -> "NormBackward":
        """The norm's backward at input ``x`` in closed form (:class:`NormBackward`): with
        ``r = 1 / sqrt(var(x) + eps)`` (RMSNorm: ``1 / sqrt(mean(x^2) + eps)``), ``x_hat`` the
        normalised input and ``w`` the weight (with any offset), ``J(x)^T grad = project(r * w *
        grad)``, where ``project`` removes from each row its component along ``x_hat`` and, for
        LayerNorm, its mean: ``v - mean(v) - x_hat * mean(v * x_hat)`` (RMSNorm: ``v - x_hat *
        mean(v * x_hat)``). Computed in the precision autograd uses through :meth:`__call__`:
        RMSNorm in float32 (HF's upcast), LayerNorm in ``x``'s dtype, at least float32."""
        c = torch.float32 if self.kind == "rmsnorm" else torch.promote_types(x.dtype, torch.float32)
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


def apply_rotary(
    x: Float[Tensor, "*b P dh"], cos: Float[Tensor, "*b P r"], sin: Float[Tensor, "*b P r"], style: str = "half"
) -> Float[Tensor, "*b P dh"]:
    """Rotate the first ``r`` features of ``x`` by the angles whose cos/sin are given in HF's
    layout (the ``r / 2`` frequencies twice: ``[f_0 .. f_{r/2-1}, f_0 .. f_{r/2-1}]``); the rest
    pass through (partial rotary, NeoX). ``style='half'`` pairs feature i with i + r/2 (Llama,
    NeoX, Gemma, Qwen), ``'interleaved'`` pairs 2i with 2i + 1 (GPT-J)."""
    r = cos.shape[-1]
    x_rot, x_pass = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    if style == "half":
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
        turned = torch.cat((-x2, x1), dim=-1)
    elif style == "interleaved":
        cos = cos[..., : r // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : r // 2].repeat_interleave(2, dim=-1)
        turned = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        raise UnsupportedModel(f"rotary style {style!r}")
    out = x_rot * cos + turned * sin
    return out if x_pass is None else torch.cat([out, x_pass], dim=-1)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _softcap(x: Tensor, cap: float | None) -> Tensor:
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
        return _softcap(y.to(self.dtype), self.softcap)

    def selected(self, x: Float[Tensor, "b d_model"], tokens: Int[Tensor, "b k"]) -> Float[Tensor, "b k"]:
        """Only the logits of ``tokens`` (per row) from the final residual at one position."""
        y = self.norm(x, self.dtype)
        w = self.W_U.T[tokens].to(self.dtype)  # [b, k, d]: rows of the unembedding, no full matmul
        out = torch.einsum("bd,bkd->bk", y, w)
        if self.b_U is not None:
            out = out + self.b_U[tokens].to(self.dtype)
        return _softcap(out, self.softcap)


# ------------------------------------------------------------------------------------- weights
@dataclass
class Layer:
    """One block's weights (views of the model's tensors, except the optional fused q/k/v copy)."""

    ln1: Norm
    ln2: Norm | None
    ln1_post: Norm | None
    ln2_post: Norm | None
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
        self.rotary_module = model.rotary_emb.original_component if spec.positions == "rotary" else None
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
        return Layer(
            ln1=Norm.of(blk.ln1, spec), ln2=Norm.of(blk.ln2, spec) if has_mlp else None,
            ln1_post=Norm.of(blk.ln1_post, spec) if post else None, ln2_post=Norm.of(blk.ln2_post, spec) if post else None,
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V, W_O=W_O, b_O=b_O, W_qkv=W_qkv, b_qkv=b_qkv,
            W_in=_opt(mlp, "W_in") if has_mlp else None, W_gate=_opt(mlp, "W_gate") if has_mlp and spec.gated_mlp else None,
            W_out=_opt(mlp, "W_out") if has_mlp else None, b_in=_opt(mlp, "b_in") if has_mlp else None,
            b_gate=_opt(mlp, "b_gate") if has_mlp and spec.gated_mlp else None, b_out=_opt(mlp, "b_out") if has_mlp else None,
            scale=float(scale), window=spec.windows[i],
        )

    # ------------------------------------------------------------------ positions
    def rope(self, n_pos: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[n_pos, rotary_dim]`` from the model's own rotary module (any rope scaling)."""
        key = (n_pos, like.device, like.dtype)
        if key not in self._rope:
            pos = torch.arange(n_pos, device=like.device)[None]
            with torch.no_grad():
                cos, sin = self.rotary_module(like.new_zeros(1, n_pos, 1), pos)
            self._rope[key] = (cos[0], sin[0])
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
        manual = spec.attn_softcap or (spec.softmax_fp32 and q.dtype != torch.float32)
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
        scores = _softcap(torch.matmul(q, k.transpose(-1, -2)) * lw.scale, spec.attn_softcap)
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
        if spec.positions == "rotary":
            cos, sin = self.rope(P, x)
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

    def head_input(self, layer: int, head: int, kind: str, x_in: Float[Tensor, "N P d"]) -> Float[Tensor, "N P dh"]:
        """One head's q, k or v (rotated for q and k) from its pre-norm input ``x_in``."""
        return self.own_head_inputs(layer, kind, x_in.unsqueeze(1), heads=slice(head, head + 1)).squeeze(1)

    def own_head_inputs(
        self, layer: int, kind: str, x: Float[Tensor, "N Hs P d"], heads: slice = slice(None)
    ) -> Float[Tensor, "N Hs P dh"]:
        """The q, k or v (rotated for q and k) of the query heads ``heads`` (default all), each
        from its *own* pre-norm input: ``x[:, i]`` is the input of head ``heads[i]`` (e.g. a
        circuit whose edges are patched per receiver)."""
        lw = self.layers[layer]
        W = {"q": lw.W_Q, "k": lw.W_K, "v": lw.W_V}[kind][heads]  # [Hs, d, dh]
        b = {"q": lw.b_Q, "k": lw.b_K, "v": lw.b_V}[kind]
        out = torch.einsum("nhpd,hde->nhpe", lw.ln1(x), W)  # bmm over heads (no broadcast copies of W)
        if b is not None:
            out = out + b[heads].unsqueeze(-2)
        if kind != "v" and self.spec.positions == "rotary":
            cos, sin = self.rope(x.shape[-2], x)
            out = self.rotate(out, cos, sin)
        return out

    def head_inputs(self, layer: int, kinds: str, x_in: Float[Tensor, "*N P d"]) -> list[Float[Tensor, "*N H P dh"]]:
        """Every head's q, k and/or v (``kinds``, e.g. ``"qk"``; rotated for q and k) from their
        shared pre-norm input ``x_in``: one norm, then one projection of all heads per kind (the
        same numbers as :meth:`head_input`; :meth:`own_head_inputs` when each head has its own input).
        A list in the order of ``kinds``."""
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
            y = y.unflatten(-1, (H, dh)).transpose(-2, -3)  # [*N, H, P, dh]
            if kind != "v" and self.spec.positions == "rotary":
                cos, sin = self.rope(x_in.shape[-2], x_in)
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
        """Run a short random prompt through the bridge and through these blocks; raise
        ``UnsupportedModel`` if any block's output or the logits differ beyond rounding."""
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
        tol = {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 5e-2)
        outs = [got[n] for n in names[1:]]
        for i in range(spec.n_layers):
            ours = self.block(i, got[names[i]])
            err = (ours - outs[i]).abs().max() / outs[i].abs().max().clamp_min(1e-30)
            if not err <= tol:
                raise UnsupportedModel(
                    f"{spec.family}: the block runner does not reproduce block {i} of this model (relative error "
                    f"{float(err):.2e} > {tol:g}); an unimplemented feature of this checkpoint?"
                )
        ours = self.readout.logits(outs[-1])
        err = (ours - logits.to(ours.dtype)).abs().max() / logits.abs().max().clamp_min(1e-30)
        if not err <= tol:
            raise UnsupportedModel(
                f"{spec.family}: the read-out (final norm, unembedding) does not reproduce this model's logits "
                f"(relative error {float(err):.2e} > {tol:g})"
            )


# ------------------------------------------------------------------------------------- GQA
def ungroup_kv_heads(hf_model: Any) -> int | None:
    """Ungroup a grouped-query HF model in place: each query head gets its own copy of its
    group's key/value projection (``repeat_interleave`` of the weights: the same function).
    Returns the original number of KV heads (None if the model was not grouped). The config
    records it as ``eap_grouped_kv_heads`` and says ``num_key_value_heads == num_attention_heads``."""
    cfg = hf_model.config
    fam = family_of(str(getattr(cfg, "model_type", "")))
    if fam.n_kv_heads is None:
        return None
    H = int(getattr(cfg, fam.n_heads))
    kv = int(getattr(cfg, fam.n_kv_heads, None) or H)
    if kv == H:
        return None
    if fam.kv_proj is None or H % kv:
        raise UnsupportedModel(f"{fam.name}: cannot ungroup {kv} key/value heads for {H} query heads")
    groups = H // kv
    n_done = 0
    for module in hf_model.modules():
        if not (hasattr(module, "num_key_value_groups") and all(hasattr(module, n) for n in fam.kv_proj)):
            continue
        for name in fam.kv_proj:
            lin = getattr(module, name)
            dh = lin.out_features // kv
            with torch.no_grad():
                w = lin.weight.view(kv, dh, -1).repeat_interleave(groups, dim=0).reshape(H * dh, -1)
                lin.weight = torch.nn.Parameter(w, requires_grad=lin.weight.requires_grad)
                if lin.bias is not None:
                    b = lin.bias.view(kv, dh).repeat_interleave(groups, dim=0).reshape(H * dh)
                    lin.bias = torch.nn.Parameter(b, requires_grad=lin.bias.requires_grad)
            lin.out_features = H * dh
        module.num_key_value_groups = 1
        n_done += 1
    if n_done != int(getattr(cfg, fam.n_layers)):
        raise UnsupportedModel(f"{fam.name}: found {n_done} attention modules to ungroup, expected {getattr(cfg, fam.n_layers)}")
    setattr(cfg, fam.n_kv_heads, H)
    cfg.eap_grouped_kv_heads = kv
    return kv
