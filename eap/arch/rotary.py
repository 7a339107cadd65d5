"""Rotary positions (rotate-half and interleaved, full or partial)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from eap.arch.errors import UnsupportedModel


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
