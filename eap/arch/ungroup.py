"""Ungrouping grouped-query attention (one key/value projection per query head)."""

from __future__ import annotations

from typing import Any

import torch

from eap.arch.errors import UnsupportedModel
from eap.arch.family import family_of


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
    if fam.whole_qk_norm:
        raise UnsupportedModel(
            f"{fam.name}: grouped key/value heads ({kv} for {H} query heads) under a k norm over all key heads: "
            "the k/v receivers' statistics must be taken over the original key/value heads with only one "
            "query head's group slice patched, which eap-bench does not implement (copying the key/value "
            "heads per query head would change the patched values); only n_key_value_heads == "
            "num_attention_heads is supported for this family"
        )
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
