"""Model families: the declarative :class:`Family` and the registry of described families."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eap.arch.errors import UnsupportedModel


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
    pre_norms: bool = True  # OLMo-2: no norm before attention and MLP (only the post-norms)
    whole_qk_norm: bool = False  # OLMo-2: one RMSNorm over all heads' q (and k) features (eap.arch.mixednorm)
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
#: OLMo-2: post-norms without pre-norms, q/k RMSNorm over the whole projected q and k (couples heads)
OLMO2 = Family("olmo2", ("olmo2",), post_norms=True, pre_norms=False, whole_qk_norm=True)
FAMILIES: tuple[Family, ...] = (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA2, OLMO2)
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
