"""Run the layers after a patched receiver in plain torch, for every family ``eap.arch`` describes.

Exact patching only changes things from the receiver's layer on, and the clean run up to that
layer is shared by every edge into the receiver. ``BlockRunner`` runs the model's blocks from
any point of the residual stream (with ``eap.arch.Arch``: norms, rotary positions, attention
with scaling/softcap/sliding windows, plain or gated MLPs, sequential or parallel blocks,
post-norms) and stops at the read-out. It is built once per patching call, checks itself against
the bridge's own forward (``Arch.verify``) and raises ``UnsupportedModel`` naming any feature it
does not implement; callers then fall back to the hook-based path through the bridge.

Residual-stream "points" (where a difference can be injected):
  ``("pre", L)``  input of block L (``blocks.L.hook_resid_pre``; L = 0 is the embedding),
  ``("mid", L)``  between attention and MLP of block L (``hook_resid_mid``; sequential blocks
                  with an MLP only),
  ``("post", L)`` output of block L (``hook_resid_post``).

Receivers (see ``patch_receiver``): 'q', 'k', 'v' (one query head's input, read at
``("pre", L)``), 'mlp' (the MLP's input: ``("mid", L)``, or ``("pre", L)`` in parallel blocks)
and 'logits' (``("post", n_layers - 1)``). Under grouped-query attention (ungrouped by
``eap.load_model``) a 'k' or 'v' receiver is the key/value input seen by that query head only.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.arch import Arch, UnsupportedModel

__all__ = ["BlockRunner", "UnsupportedModel"]

Point = tuple[str, int]


class BlockRunner:
    """A model's blocks in plain torch from any residual point (see module docstring).

    All tensors live on the model's device in the model's dtype. Nothing requires grad.
    """

    def __init__(self, model: Any, verify: bool = True) -> None:
        self.arch = Arch(model)
        if verify:
            self.arch.verify(model)
        spec = self.arch.spec
        self.n_layers = spec.n_layers
        self.n_heads = spec.n_heads
        self.d_head = spec.d_head
        self.parallel = spec.parallel
        self.attn_only = spec.attn_only

    # ----------------------------------------------------------------- running
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's write into the residual stream for its (pre-norm) input ``x``."""
        return self.arch.mlp(layer, x)

    def run(self, x: Tensor, point: Point, pos: Int[Tensor, " B"] | None = None) -> Tensor:
        """Run the residual ``x`` at ``point`` to the end of the last block.

        Returns the final residual (before the final norm) ``[B, p, d]``, or ``[B, d]`` at
        ``pos`` only (then the last block computes just that query position)."""
        where, layer = point
        if where == "mid":
            if self.parallel or self.attn_only:
                raise ValueError("no 'mid' point in a parallel or attention-only block")
            x = x + self.arch.mlp(layer, x)
            layer += 1
        elif where == "post":
            layer += 1
        elif where != "pre":
            raise ValueError(f"unknown residual point {point!r}")
        if layer >= self.n_layers and pos is not None:
            return x[torch.arange(x.shape[0], device=x.device), pos]
        for i in range(layer, self.n_layers):
            x = self.arch.block(i, x, pos if i == self.n_layers - 1 else None)
        return x

    def logits(self, x: Float[Tensor, "B p d"]) -> Float[Tensor, "B p d_vocab"]:
        """Full logits from the final residual (``eap.arch.Readout``)."""
        return self.arch.readout.logits(x)

    def selected_logits(self, x: Float[Tensor, "B d"], tokens: Int[Tensor, "B k"]) -> Float[Tensor, "B k"]:
        """Only the logits of ``tokens`` (per row) from the final residual at the read-out
        position: the same ``eap.arch.Readout`` that ``eap.attribute.select_logits`` uses."""
        return self.arch.readout.selected(x, tokens)

    # ----------------------------------------------------------------- patching
    def patch_receiver(
        self, kind: str, layer: int, head: int | None, x_in: Float[Tensor, "nb p d"], D: Float[Tensor, "m nb p d"]
    ) -> tuple[Point, Float[Tensor, "m nb p d"]]:
        """Receiver ``kind`` ('q', 'k', 'v', 'mlp', 'logits') of ``layer`` (query head ``head``)
        reads the clean residual ``x_in``; copy i of its input gets ``+ D[i]``.

        Returns the residual point to continue from and the change of the residual there, one
        copy per leading index of ``D`` (the patched head's or MLP's write minus its clean
        write; for 'logits' the change is ``D`` itself at the last block's output)."""
        m = D.shape[0]
        arch = self.arch
        if kind == "logits":
            return ("post", self.n_layers - 1), D
        if kind == "mlp":
            if self.attn_only:
                raise ValueError("an attention-only model has no MLP receivers")
            new = arch.mlp(layer, (x_in.unsqueeze(0) + D).flatten(0, 1)).view_as(D)
            return ("post", layer), new - arch.mlp(layer, x_in).unsqueeze(0)
        if kind not in ("q", "k", "v") or head is None:
            raise ValueError(f"unknown receiver kind {kind!r} (head {head})")
        clean = {k: arch.head_input(layer, head, k, x_in) for k in "qkv"}
        r0 = arch.head_result(layer, head, clean["q"], clean["k"], clean["v"])
        patched = arch.head_input(layer, head, kind, (x_in.unsqueeze(0) + D).flatten(0, 1))
        qkv = {k: (patched if k == kind else v.repeat(m, 1, 1)) for k, v in clean.items()}
        dr = arch.head_result(layer, head, qkv["q"], qkv["k"], qkv["v"]).view_as(D) - r0.unsqueeze(0)
        post = arch.layers[layer].ln1_post
        if post is not None:  # a norm on the sum of heads (Gemma-2): the layer's write changes by that much
            full = arch.attn(layer, x_in, post=False)
            dr = post(full.unsqueeze(0) + dr) - post(full).unsqueeze(0)
        return self.sender_point("head", layer), dr

    def sender_point(self, kind: str, layer: int) -> Point:
        """Where a sender ('input', 'head' or 'mlp' of ``layer``) writes into the residual stream."""
        if kind == "input":
            return ("pre", 0)
        if kind == "head":
            return ("post", layer) if self.parallel or self.attn_only else ("mid", layer)
        if kind == "mlp":
            return ("post", layer)
        raise ValueError(f"unknown sender kind {kind!r}")
