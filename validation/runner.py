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

Circuits (``run_circuits``): every block from the input embedding, each receiver (every head's
q, k and v input, every MLP input, the logits) with its own input correction, for several
circuits stacked along the batch (``validation.evaluate_circuit``).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.arch import Arch, UnsupportedModel
from eap.arch.postnorm import post_normed_difference, refuse_hook_path
from eap.graph import Graph, HookGroup
from eap.hooks import StopForward, run_until_stop

__all__ = ["BlockRunner", "UnsupportedModel", "refuse_hooks_for_post_norms"]

Point = tuple[str, int]


def refuse_hooks_for_post_norms(model: Any, what: str, why: Exception | None = None) -> None:
    """Raise ``UnsupportedModel`` for a post-norm family on the hook path: a head's edge there
    is defined through its layer's recomputed post-norm (``eap.arch.postnorm``), which only the
    block runner computes. ``why``: the reason the runner cannot run."""
    refuse_hook_path(model, what, "the block runner (engine='auto' or 'fast')", why)


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
        whole = arch.spec.whole_qk_norm  # OLMo-2: the other heads' q/k slices stay clean (eap.arch.mixednorm)
        clean = {k: arch.head_input(layer, head, k, x_in, context=x_in if whole else None) for k in "qkv"}
        r0 = arch.head_result(layer, head, clean["q"], clean["k"], clean["v"])
        patched = arch.head_input(layer, head, kind, (x_in.unsqueeze(0) + D).flatten(0, 1),
                                  context=x_in.repeat(m, 1, 1) if whole else None)
        qkv = {k: (patched if k == kind else v.repeat(m, 1, 1)) for k, v in clean.items()}
        dr = arch.head_result(layer, head, qkv["q"], qkv["k"], qkv["v"]).view_as(D) - r0.unsqueeze(0)
        post = arch.layers[layer].ln1_post
        if post is not None:  # a norm on the sum of heads (Gemma-2): the layer's write changes by that much
            full = arch.attn(layer, x_in, post=False)
            dr = post(full.unsqueeze(0) + dr) - post(full).unsqueeze(0)
        return self.sender_point("head", layer), dr

    def post_normed_difference(
        self, layer: int, S: Float[Tensor, "nb p d"], D: Float[Tensor, "m nb p d"]
    ) -> Float[Tensor, "m nb p d"]:
        """Post-norm families: the change ``PN_L(S + D) - PN_L(S)`` of layer ``layer``'s
        attention write when its pre-norm sum ``S`` moves by ``D`` (``eap.arch.postnorm``)."""
        return post_normed_difference(self.arch.layers[layer].ln1_post, S, D)

    def through_post_norms(
        self, graph: Graph, senders: Int[Tensor, " m"], D: Float[Tensor, "m nb p d"], pre: list[Tensor],
        sums: dict[int, Tensor],
    ) -> Float[Tensor, "m nb p d"]:
        """Post-norm families: copy i's row of ``D`` (sender ``senders[i]``'s pre-norm difference
        times ``scale`` for a head) becomes ``PN_L(S_L + D) - PN_L(S_L)`` for a head of layer L,
        ``S_L`` the layer's clean pre-norm attention sum from its clean input ``pre[L]`` (kept in
        ``sums``); MLP and input rows are already residual-stream changes. In place; returned."""
        layer = self.head_layers(graph).to(senders.device)[senders]  # -1: not a head
        for L in layer.unique().tolist():
            if L >= 0:
                if L not in sums:
                    sums[L] = self.arch.attn(L, pre[L], post=False)
                rows = layer == L
                D[rows] = self.post_normed_difference(L, sums[L], D[rows])
        return D

    def head_layers(self, graph: Graph) -> Int[Tensor, " n_senders"]:
        """The layer of every sender that is a head, -1 for the others (input, MLPs)."""
        layer = torch.full((graph.n_senders,), -1, dtype=torch.long)
        for g in graph.sender_groups:
            if g.kind == "head":
                layer[g.start : g.start + g.size] = g.layer
        return layer

    def sender_point(self, kind: str, layer: int) -> Point:
        """Where a sender ('input', 'head' or 'mlp' of ``layer``) writes into the residual stream."""
        if kind == "input":
            return ("pre", 0)
        if kind == "head":
            return ("post", layer) if self.parallel or self.attn_only else ("mid", layer)
        if kind == "mlp":
            return ("post", layer)
        raise ValueError(f"unknown sender kind {kind!r}")

    # ----------------------------------------------------------------- sender outputs
    @torch.no_grad()
    def collect(
        self, model: Any, graph: Graph, clean: Int[Tensor, "nb p"], corrupted: Int[Tensor, "nb p"],
        residuals: bool = True, differences: bool = True,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Float[Tensor, "n_senders nb p d"]]:
        """What ``validation.patch`` caches per prompt batch, computed by the adapter (the model
        computes only the input embeddings): ``(resid_pre, mlp_in, resid_post, delta)`` with
        ``delta`` = corrupted - clean sender outputs; with ``differences=False`` (circuits) the
        corrupted outputs themselves, and ``resid_pre`` holds only the clean embedding."""
        x_corr, x_clean = self.embed(model, corrupted), self.embed(model, clean)
        delta, _, _, _ = self.sender_outputs(graph, x_corr, residuals=False)
        if not differences:
            return [x_clean], [], [], delta
        out, pre, mlp_in, post = self.sender_outputs(graph, x_clean, residuals=residuals)
        return pre, mlp_in, post, delta.sub_(out)

    @staticmethod
    def embed(model: Any, tokens: Int[Tensor, "nb p"]) -> Float[Tensor, "nb p d"]:
        """The input residual (``blocks.0.hook_resid_pre``), computed by the model itself."""
        got: list[Tensor] = []

        def grab(x: Tensor, hook: Any = None) -> Tensor:
            got.append(x.detach().clone())
            raise StopForward

        run_until_stop(model, tokens, [("blocks.0.hook_resid_pre", grab)])
        return got[0]

    def sender_outputs(
        self, graph: Graph, embed: Float[Tensor, "nb p d"], residuals: bool = True
    ) -> tuple[Float[Tensor, "n_senders nb p d"], list[Tensor], list[Tensor], list[Tensor]]:
        """Every sender's output (the input residual, each head's result without ``b_O``, each
        MLP's output) of one forward from the input residual ``embed``, in the graph's sender
        order, and (with ``residuals``) the clean residuals ``resid_pre[L]``, ``mlp_in[L]`` and
        ``resid_post[L]``: what validation reads through the bridge's hooks, computed by the
        adapter instead (for models whose TransformerLens adapter has no per-head hooks, GPT-J).
        Stops after the last sender without ``residuals``."""
        arch, spec = self.arch, self.arch.spec
        if spec.post_norms:
            raise UnsupportedModel(f"{spec.family}: sender outputs before a post-norm are not computed here")
        out = embed.new_empty(graph.n_senders, *embed.shape)
        at = {(g.kind, g.layer): g.start for g in graph.sender_groups}
        out[at["input", 0]] = embed
        pre: list[Tensor] = []
        mlp_in: list[Tensor] = []
        x = embed
        for layer in range(self.n_layers):
            pre.append(x)
            res = arch.head_results(layer, *arch.head_inputs(layer, "qkv", x))  # [nb, H, p, d]
            out[at["head", layer] : at["head", layer] + self.n_heads] = res.transpose(0, 1)
            attn = res.sum(1)
            if arch.layers[layer].b_O is not None:
                attn = attn + arch.layers[layer].b_O
            if self.attn_only:
                x = x + attn
                continue
            mid = x if self.parallel else x + attn
            mlp_in.append(mid)
            mlp = arch.mlp(layer, mid)
            out[at["mlp", layer]] = mlp
            if not residuals and layer == self.n_layers - 1:
                break
            x = mid + mlp + (attn if self.parallel else 0)
        if not residuals:
            return out, [], [], []
        return out, pre, mlp_in, pre[1:] + [x]

    # ----------------------------------------------------------------- circuits
    def run_circuits(
        self,
        graph: Graph,
        embed: Float[Tensor, "nb p d"],
        corrupted: Float[Tensor, "n_senders nb p d"],
        patched: Float[Tensor, "c n_senders n_receivers"],
    ) -> Float[Tensor, "c_nb p d"]:
        """Run ``c`` circuits over a prompt batch, stacked along the batch (row ``i * nb + b`` is
        circuit i on prompt b); returns the logits receiver's input (the final residual before
        the final norm, corrected) of every row.

        ``embed`` is the clean input embedding (the ``input`` sender's clean output),
        ``corrupted`` every sender's output in the corrupted run, ``patched[i, u, r]`` 1 where
        edge u -> r is patched in circuit i (not in the circuit), 0 where it is kept (and off the
        graph's mask). Every receiver r reads the residual stream of its own row plus its own
        correction ``sum_u patched[i, u, r] * (corrupted_u - current_u)``, with ``current_u``
        sender u's output in this row's run so far (EAP-IG's ``evaluate_graph``): each head's
        q, k and v input, each MLP input and the logits get their own input; the residual
        stream itself is the sum of the current outputs.

        Post-norm families (EAP-IG's ``evaluate_graph`` with normalisation before and after): a
        head's output is its pre-norm result, and a receiver's correction from layer L's heads is
        ``PN_L(S_L + sum_h patched * (corrupted_h - current_h)) - PN_L(S_L)`` with ``S_L`` layer
        L's current pre-norm attention sum (all heads + ``b_O``) in this row's run
        (:class:`_PostNormCorrection`); MLP and input senders stay additive."""
        c, S = patched.shape[0], graph.n_senders
        _, nb, p, d = corrupted.shape
        H = self.n_heads
        # corrupted - current output of every sender, per circuit and prompt
        dif = corrupted.new_empty(c, S, nb, p, d)
        dif[:, 0] = corrupted[0] - embed
        x = embed.repeat(c, 1, 1)

        post = _PostNormCorrection(self, graph, dif) if self.arch.spec.post_norms else None

        def correction(g: HookGroup) -> Float[Tensor, "c r nb p d"]:
            up = g.n_upstream
            m = patched[:, :up, g.start : g.start + g.size].transpose(1, 2)  # [c, r, up]
            if post is not None:
                return post(m)
            return torch.matmul(m, dif[:, :up].reshape(c, up, nb * p * d)).view(c, g.size, nb, p, d)

        def record(start: int, out: Float[Tensor, "c k nb p d"]) -> None:
            dif[:, start : start + out.shape[1]] = corrupted[start : start + out.shape[1]] - out

        by_layer: dict[int, dict[str, HookGroup]] = {}
        for g in graph.receiver_groups:
            by_layer.setdefault(g.layer, {})[g.kind] = g
        heads_at = {g.layer: g.start for g in graph.sender_groups if g.kind == "head"}
        mlp_at = {g.layer: g.start for g in graph.sender_groups if g.kind == "mlp"}
        for layer in range(self.n_layers):
            groups = by_layer[layer]
            qkv = []
            for kind in "qkv":
                x_in = x.view(c, 1, nb, p, d) + correction(groups[kind])  # [c, H, nb, p, d]
                x_in = x_in.transpose(1, 2).reshape(c * nb, H, p, d)
                ctx = x if self.arch.spec.whole_qk_norm else None  # OLMo-2: other heads' slices from the residual
                qkv.append(self.arch.own_head_inputs(layer, kind, x_in, context=ctx))
            res = self.arch.head_results(layer, *qkv)  # [c * nb, H, p, d]
            record(heads_at[layer], res.view(c, nb, H, p, d).transpose(1, 2))
            attn = res.sum(1)
            b_O = self.arch.layers[layer].b_O
            if b_O is not None:
                attn = attn + b_O
            if post is not None:
                attn = post.attention_write(layer, attn)
            if self.attn_only:
                x = x + attn
                continue
            mid = x if self.parallel else x + attn
            out = self.arch.mlp(layer, mid + correction(groups["mlp"]).view(c * nb, p, d))
            record(mlp_at[layer], out.view(c, 1, nb, p, d))
            x = mid + out + (attn if self.parallel else 0)
        return x + correction(by_layer[self.n_layers]["logits"]).view(c * nb, p, d)


class _PostNormCorrection:
    """Receiver corrections in a post-norm family (``BlockRunner.run_circuits``): additive for
    the input and MLP senders, through each earlier layer's recomputed post-norm for its heads."""

    def __init__(self, runner: BlockRunner, graph: Graph, dif: Float[Tensor, "c n_senders nb p d"]) -> None:
        self.runner, self.dif = runner, dif
        self.heads = {g.layer: g.start for g in graph.sender_groups if g.kind == "head"}
        self.additive = (runner.head_layers(graph) < 0).to(device=dif.device, dtype=dif.dtype)  # [n_senders]
        self.sums: dict[int, Tensor] = {}  # layer -> current pre-norm attention sum [c nb, p, d]

    def attention_write(self, layer: int, attn: Float[Tensor, "c_nb p d"]) -> Float[Tensor, "c_nb p d"]:
        """Keep layer ``layer``'s current pre-norm sum; return its post-normed write."""
        self.sums[layer] = attn
        return self.runner.arch.layers[layer].ln1_post(attn)

    def __call__(self, m: Float[Tensor, "c r up"]) -> Float[Tensor, "c r nb p d"]:
        c, r, up = m.shape
        _, _, nb, p, d = self.dif.shape
        H = self.runner.n_heads
        flat = self.dif[:, :up].reshape(c, up, nb * p * d)
        out = torch.matmul(m * self.additive[:up], flat).view(c, r, nb, p, d)
        for layer, start in self.heads.items():
            if start + H > up:
                continue
            A = torch.matmul(m[:, :, start : start + H], flat[:, start : start + H]).view(c, r, nb, p, d)
            S = self.sums[layer].view(c, 1, nb, p, d)
            out += self.runner.post_normed_difference(layer, S, A)
        return out
