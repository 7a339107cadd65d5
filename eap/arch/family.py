"""Model families: the declarative :class:`Family` and the registry of families.

A family is a short declarative description read by generic code. The built-in families are
registered at import; users add their own without editing the package:

* :func:`register_family` (``eap.arch.register_family(Family("my-llama", ("my_llama",)))``), or
* an entry point in the group ``eap_bench.families`` naming a :class:`Family` (or a callable
  returning one, or a sequence of them), loaded on first look-up of an unknown model type.

A registered description is not trusted: on first use ``eap.arch.Arch.verify`` runs it against
the HuggingFace model's own forward and refuses it, naming the first layer (or the read-out)
where it diverges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from eap.arch.errors import UnsupportedModel

#: entry-point group of user families (``[project.entry-points."eap_bench.families"]``)
ENTRY_POINT_GROUP = "eap_bench.families"


@dataclass(frozen=True)
class Family:
    """How one model family computes (declarative; read by generic code).

    Config keys are the family's HuggingFace config field names. ``parallel`` is a constant or
    the name of a boolean config field. ``windows``: 'none', 'all' (``sliding_window`` on every
    layer, Mistral, Phi-3) or 'layer_types' (``config.layer_types[i] == 'sliding_attention'``).
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
    shared_norm: bool = False  # GPT-J: one norm (ln_1) feeds both attention and the MLP
    # positions
    positions: Literal["absolute", "rotary"] = "rotary"
    rotary: Literal["half", "interleaved"] = "half"  # rotate-half (Llama, NeoX) or adjacent pairs (GPT-J)
    rotary_dim: str | None = None  # config field of the rotary width (GPT-J); default: partial factor x d_head
    rotary_returns: Literal["cos_sin", "sin_cos"] = "cos_sin"  # what the HF rotary module returns (GPT-J: sin, cos)
    # attention
    qk_norm: Literal["none", "head"] = "none"  # Qwen3: RMSNorm of each head's q and k (over d_head) before rotary
    scores_fp32: bool = False  # GPT-J: q.k computed in float32, then promoted to the model dtype (HF's mask sum)
    softmax_fp32: bool = True  # softmax upcast to float32 (HF eager / the bridge for Llama-like families)
    windows: Literal["none", "all", "layer_types"] = "none"
    attn_softcap: str | None = None  # config field of tanh soft-capping of attention scores
    kv_proj: tuple[str, str] | None = ("k_proj", "v_proj")  # HF attention submodules (GQA ungrouping)
    qkv_proj: str | None = None  # a fused q/k/v projection instead (Phi-3's qkv_proj; GQA ungrouping)
    # MLP and block
    gated_mlp: bool = True
    parallel: bool | str = False
    post_norms: bool = False  # Gemma-2: a norm after attention (on the sum of heads) and after the MLP
    pre_norms: bool = True  # OLMo-2: no norm before attention and MLP (only the post-norms)
    whole_qk_norm: bool = False  # OLMo-2: one RMSNorm over all heads' q (and k) features (eap.arch.mixednorm)
    rope_per_layer_type: bool = False  # Gemma-3: the rotary module takes the layer type (local/global bases)
    # read-out
    final_softcap: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.model_types or not all(isinstance(t, str) and t for t in self.model_types):
            raise ValueError(f"a Family needs a name and at least one HuggingFace model_type, got {self!r}")


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
#: Qwen3: Qwen2 plus an RMSNorm of every head's q and k (weights over d_head, shared by heads), no q/k/v bias
QWEN3 = Family("qwen3", ("qwen3",), windows="layer_types", qk_norm="head")
#: Phi-3: Llama-like with fused ``qkv_proj`` and ``gate_up_proj`` (the bridge splits them into views)
PHI3 = Family("phi3", ("phi3",), windows="all", kv_proj=None, qkv_proj="qkv_proj")
#: Gemma (v1): ``1 + w`` RMSNorm, embedding scaled by sqrt(d_model) (in the bridge's embedding), GeGLU, MQA
GEMMA = Family("gemma", ("gemma",), norm_offset=1.0, norm_weight_in_fp32=True)
#: GPT-J: one LayerNorm for parallel attention and MLP, interleaved partial rotary, q.k in float32
GPTJ = Family(
    "gptj", ("gptj",), n_layers="n_layer", d_model="n_embd", n_heads="n_head", n_kv_heads=None, d_mlp="n_inner",
    n_ctx="n_positions", eps="layer_norm_epsilon", act="activation_function", norm="layernorm", shared_norm=True,
    rotary="interleaved", rotary_dim="rotary_dim", rotary_returns="sin_cos", scores_fp32=True, softmax_fp32=False,
    kv_proj=None,
    gated_mlp=False, parallel=True,
)
#: OLMo-2: post-norms without pre-norms, q/k RMSNorm over the whole projected q and k (couples heads)
OLMO2 = Family("olmo2", ("olmo2",), post_norms=True, pre_norms=False, whole_qk_norm=True)
#: Gemma-3 (text): Gemma-2's block with per-head q/k norms (1 + w), local/global layers with their own rotary bases
GEMMA3 = Family(
    "gemma3", ("gemma3_text",), act="hidden_activation", norm_offset=1.0, norm_weight_in_fp32=True,
    windows="layer_types", attn_softcap="attn_logit_softcapping", post_norms=True,
    final_softcap="final_logit_softcapping", qk_norm="head", rope_per_layer_type=True,
)
#: the families eap-bench describes itself (registered at import)
FAMILIES: tuple[Family, ...] = (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA2, QWEN3, PHI3, GEMMA, GPTJ, OLMO2, GEMMA3)

_REGISTRY: dict[str, Family] = {}  # by name
_BY_MODEL_TYPE: dict[str, Family] = {}
_ENTRY_POINTS_LOADED = False


def register_family(family: Family, replace: bool = False) -> Family:
    """Describe a model family to eap-bench (for model types it does not know, or, with
    ``replace=True``, instead of a registered description). Returns ``family``.

    Raises ``ValueError`` if its name or one of its model types is already registered to another
    family (and ``replace`` is False). The description is checked against the HF model's own
    forward on first use (``Arch.verify``), so a wrong one is refused there, not trusted."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes an eap.arch.Family, got {type(family).__name__}")
    if not replace:
        clash = [family.name] if family.name in _REGISTRY and _REGISTRY[family.name] != family else []
        clash += [t for t in family.model_types if t in _BY_MODEL_TYPE and _BY_MODEL_TYPE[t] != family]
        if clash:
            raise ValueError(f"family {family.name!r}: {', '.join(map(repr, clash))} already registered "
                             "(pass replace=True to describe it anew)")
    old = _REGISTRY.pop(family.name, None)
    if old is not None:
        for t in old.model_types:
            _BY_MODEL_TYPE.pop(t, None)
    _REGISTRY[family.name] = family
    for t in family.model_types:
        _BY_MODEL_TYPE[t] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a registered family (tests; a user's own description)."""
    fam = _REGISTRY.pop(name, None)
    if fam is None:
        raise KeyError(f"no registered family {name!r}")
    for t in fam.model_types:
        if _BY_MODEL_TYPE.get(t) is fam:
            del _BY_MODEL_TYPE[t]


def registered_families() -> tuple[Family, ...]:
    """Every registered family (built in, registered, from entry points), in registration order."""
    load_entry_points()
    return tuple(_REGISTRY.values())


def load_entry_points(reload: bool = False) -> None:
    """Register the families of the installed ``eap_bench.families`` entry points (once per
    process, or again with ``reload``, e.g. after installing a plug-in). Each entry point names
    a :class:`Family`, a sequence of them, or a callable returning either; one that fails to
    load raises ``UnsupportedModel`` naming it. Look-ups of unknown model types call this."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED and not reload:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib import metadata

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj: Any = ep.load()
            if callable(obj) and not isinstance(obj, Family):
                obj = obj()
        except Exception as exc:  # a broken plug-in names itself, it does not break other families
            raise UnsupportedModel(f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} "
                                   f"failed to load: {type(exc).__name__}: {exc}") from exc
        many = obj if isinstance(obj, (list, tuple)) else (obj,)
        for fam in many:
            if not isinstance(fam, Family):
                raise UnsupportedModel(f"entry point {ep.name!r} ({ep.value}) gave a {type(fam).__name__}, "
                                       "not an eap.arch.Family")
            if _REGISTRY.get(fam.name) != fam:
                register_family(fam)


def family_named(name: str) -> Family:
    """The :class:`Family` called ``name`` ('gpt2', 'gpt-neox', 'llama', ...; HF model types too)."""
    for fam in registered_families():
        if name == fam.name or name in fam.model_types:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in registered_families())}")


def family_of(model_type: str) -> Family:
    """The :class:`Family` of a HuggingFace ``model_type`` (raises ``UnsupportedModel`` naming
    it and how to describe it)."""
    if model_type not in _BY_MODEL_TYPE:
        load_entry_points()
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModel(not_described(model_type))
    return _BY_MODEL_TYPE[model_type]


def not_described(model_type: str) -> str:
    """The one message for a model family eap-bench does not know (MHA and GQA alike)."""
    return (
        f"model family {model_type!r} is not described in eap.arch (described: {', '.join(sorted(_BY_MODEL_TYPE))}); "
        f"describe it with eap.arch.register_family(Family(name, ({model_type!r},), ...)) or an "
        f"{ENTRY_POINT_GROUP!r} entry point (checked against the HF model on first use; see docs/architectures.md)"
    )


for _fam in FAMILIES:
    register_family(_fam)
