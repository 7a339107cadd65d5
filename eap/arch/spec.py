"""The resolved facts of one model (:class:`ArchSpec`, from a HF config or a bridge) and the
check that its edge graph is right (:func:`check_edges`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from eap.arch.errors import UnsupportedModel
from eap.arch.family import family_of
from eap.graph import GraphSpec


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
    shared_norm: bool = False  # one norm feeds attention and the MLP (GPT-J)
    rotary_returns: str = "cos_sin"  # the HF rotary module's outputs (GPT-J: sin, cos)
    qk_norm: str = "none"  # 'head': each head's q and k are normalised over d_head before rotary (Qwen3)
    scores_fp32: bool = False  # q.k in float32 whatever the model dtype (GPT-J)
    grouped_kv_heads: int | None = None  # KV heads before ungrouping (None if never grouped)
    pre_norms: bool = True  # False: no norm before attention / MLP (OLMo-2)
    whole_qk_norm: bool = False  # q/k norm over all heads' features (OLMo-2; eap.arch.mixednorm)
    rope_types: tuple[str, ...] = ()  # per layer, the rotary module's layer type (Gemma-3); () if shared
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
        rotary_dim = int(_get(cfg, fam.rotary_dim, 0)) or int(d_head * pct)
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
        final_softcap=float(final_cap) if final_cap else None, shared_norm=fam.shared_norm,
        rotary_returns=fam.rotary_returns, qk_norm=fam.qk_norm, scores_fp32=fam.scores_fp32,
        grouped_kv_heads=int(grouped) if grouped else None, problems=tuple(problems),
        pre_norms=fam.pre_norms, whole_qk_norm=fam.whole_qk_norm,
        rope_types=tuple(_get(cfg, "layer_types") or ["full_attention"] * L) if fam.rope_per_layer_type else (),
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
        if flag == "use_qk_norm" and (spec.qk_norm != "none" or spec.whole_qk_norm):
            continue  # described by the family
        if getattr(cfg, flag, False):
            problems.append(what)
    if getattr(cfg, "num_experts", None):
        problems.append("mixture of experts")
    return replace(spec, n_kv_heads=int(kv), attn_only=bool(getattr(cfg, "attn_only", False)), problems=tuple(problems))


def check_edges(model: Any) -> ArchSpec:
    """Raise ``UnsupportedModel`` unless the edge graph (per-head senders, per-query-head q/k/v
    receivers) is right for ``model``; returns its :class:`ArchSpec`. Post-norm families pass:
    their head edges are defined through the recomputed post-norm (``eap.arch.postnorm``)."""
    cfg = model.cfg
    spec = arch_spec(model)  # first: a family eap.arch does not describe is refused as such, MHA or GQA
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv not in (None, cfg.n_heads):
        raise UnsupportedModel(
            f"grouped-query attention with grouped k/v hooks (n_key_value_heads={n_kv}, n_heads={cfg.n_heads}): "
            "the edge graph has q, k and v receivers per query head (as MIB and EAP-IG); load the model with "
            "eap.load_model, which ungroups the key/value heads (same function, one k/v input per query head)"
        )
    return spec
