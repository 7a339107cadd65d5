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
    records it as ``eap_grouped_kv_heads`` and says ``num_key_value_heads == num_attention_heads``.

    Under a k norm over all key heads (OLMo-2) the norm's weight is repeated too: the mean of
    squares over the copies is the mean over the original heads, so the clean function is the
    same. Patched values are not taken over the copies: a k receiver's statistics are those of
    the original key heads (``eap.arch.mixednorm``, ``groups``)."""
    cfg = hf_model.config
    fam = family_of(str(getattr(cfg, "model_type", "")))
    if fam.n_kv_heads is None:
        return None
    H = int(getattr(cfg, fam.n_heads))
    kv = int(getattr(cfg, fam.n_kv_heads, None) or H)
    if kv == H:
        return None
    if (fam.kv_proj is None and fam.qkv_proj is None) or H % kv:
        raise UnsupportedModel(f"{fam.name}: cannot ungroup {kv} key/value heads for {H} query heads")
    groups = H // kv
    names = fam.kv_proj or (fam.qkv_proj,)
    n_done = 0
    for module in hf_model.modules():
        if not (hasattr(module, "num_key_value_groups") and all(hasattr(module, n) for n in names)):
            continue
        if fam.kv_proj is not None:
            for name in fam.kv_proj:
                _repeat_rows(getattr(module, name), [(0, kv, groups)])
            if fam.whole_qk_norm:  # OLMo-2: the k norm's weight covers every key head's features
                _repeat_weight(module.k_norm, kv, groups)
        else:  # fused [q; k; v] rows (Phi-3): q stays, k and v rows are repeated per query head
            _repeat_rows(getattr(module, fam.qkv_proj), [(0, H, 1), (H, kv, groups), (H + kv, kv, groups)])
        module.num_key_value_groups = 1
        if hasattr(module, "num_key_value_heads"):  # Phi-3 slices its fused output with it
            module.num_key_value_heads = H
        n_done += 1
    if n_done != int(getattr(cfg, fam.n_layers)):
        raise UnsupportedModel(f"{fam.name}: found {n_done} attention modules to ungroup, expected {getattr(cfg, fam.n_layers)}")
    setattr(cfg, fam.n_kv_heads, H)
    cfg.eap_grouped_kv_heads = kv
    return kv


def _repeat_rows(lin: torch.nn.Linear, blocks: list[tuple[int, int, int]]) -> None:
    """Replace ``lin``'s output rows by blocks of heads: ``(first head, n heads, copies)`` each
    (heads of ``d_head`` rows, in units of the first block's head size), every head of a block
    repeated ``copies`` times in place (``repeat_interleave``), weights and bias alike."""
    n_heads_in = sum(n for _, n, _ in blocks)
    dh = lin.out_features // n_heads_in

    def rebuild(t: torch.Tensor) -> torch.Tensor:
        heads = t.view(n_heads_in, dh, *t.shape[1:])
        parts = [heads[start : start + n].repeat_interleave(copies, dim=0) for start, n, copies in blocks]
        return torch.cat(parts).reshape(-1, *t.shape[1:])

    with torch.no_grad():
        lin.weight = torch.nn.Parameter(rebuild(lin.weight), requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(rebuild(lin.bias), requires_grad=lin.bias.requires_grad)
    lin.out_features = lin.weight.shape[0]


def _repeat_weight(norm: torch.nn.Module, n_heads: int, copies: int) -> None:
    """A norm over ``n_heads`` heads' features gets each head's slice of its weight repeated
    ``copies`` times (``repeat_interleave`` of head blocks, as :func:`_repeat_rows`)."""
    w = norm.weight
    with torch.no_grad():
        new = w.view(n_heads, -1).repeat_interleave(copies, dim=0).reshape(-1)
        norm.weight = torch.nn.Parameter(new, requires_grad=w.requires_grad)
