"""The edge graph of a transformer, stored densely.

Nodes
-----
Senders (things that write to the residual stream), in residual-stream order:
``input`` (``blocks.0.hook_resid_pre``), then per layer ``L`` every head ``aL.hH``
(``blocks.L.attn.hook_result``, per head, without ``b_O``) and the MLP ``mL``
(``blocks.L.hook_mlp_out``).

Receivers (things that read the residual stream), in forward order: per layer ``L`` every
head's q, k and v input ``aL.hH<q>`` / ``<k>`` / ``<v>`` (``blocks.L.hook_{q,k,v}_input``, the
pre-LayerNorm per-head input), the MLP input ``mL`` (``blocks.L.hook_mlp_in``), and finally
``logits`` (``blocks.{last}.hook_resid_post``, before the final LayerNorm).

Edges
-----
``u -> v`` exists when ``u`` writes before ``v`` reads: senders of earlier layers, and a layer's
heads also feed that layer's MLP (unless attention and MLP run in parallel, as in GPT-J/Pythia,
where the MLP sees what the layer's attention sees). Because senders are listed in residual
order, the senders feeding any receiver are always a *prefix* of the sender list; its length is
``graph.n_upstream[receiver]``. This is what makes the vectorised attribution and the batched
patching cheap.

Storage is dense: ``mask`` and ``scores`` are ``[n_senders, n_receivers]`` matrices; the fixed edge
order is the row-major order of ``mask`` (sender-major), exposed as the index arrays
``edge_sender`` / ``edge_receiver``. Edge names follow EAP-IG/MIB: ``a0.h1->a2.h0<q>``,
``input->m0``, ``m11->logits``.

Circuits and files
------------------
A graph also carries a circuit: ``in_graph`` (edges, ``[n_senders, n_receivers]``, inside ``mask``),
``nodes_in_graph`` (senders, ``[n_senders]``; ``logits`` is always in), optional node scores and,
for files that have them, neuron masks/scores (``[n_senders, d_model]``). Circuits are chosen with
EAP-IG's semantics (``apply_topn``, ``apply_greedy``, ``apply_threshold``, ``prune``: MIB evaluates
with them) or by the plain top-k by |score| (``topk`` / ``apply_topk``). ``to_json`` / ``to_pt``
write, and ``from_json`` / ``from_pt`` read, the files of EAP-IG 2.0.0 (commit 795f5607, the
package MIB's circuit track uses); ``save`` / ``load`` are the same ``.pt`` format. See
``docs/graph-format.md``.
"""

from __future__ import annotations

import heapq
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


class GraphError(ValueError):
    """Raised when a graph does not fit a model or a request, or a graph file is malformed."""


@dataclass(frozen=True)
class GraphSpec:
    """The shape facts that determine the graph.

    ``d_model`` (the residual width) does not change the edges; EAP-IG's readers need it (its
    JSON reader builds neuron-level tensors of that width), so graph files carry it. ``None``
    means unknown (a graph built without a model, or read from an old file).
    """

    n_layers: int
    n_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    d_model: int | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> "GraphSpec":
        """From a TransformerLens config or any object/dict with the same field names
        (``n_layers``, ``n_heads``, optional ``attn_only``, ``parallel_attn_mlp``, ``d_model``)."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        missing = [k for k in ("n_layers", "n_heads") if get(k) is None]
        if missing:
            raise GraphError(f"config lacks {', '.join(missing)}: cannot build a graph from {type(cfg).__name__}")
        d_model = get("d_model")
        return cls(
            n_layers=int(get("n_layers")),
            n_heads=int(get("n_heads")),
            attn_only=bool(get("attn_only", False) or False),
            parallel_attn_mlp=bool(get("parallel_attn_mlp", False) or False),
            d_model=None if d_model is None else int(d_model),
        )

    def matches(self, other: "GraphSpec") -> bool:
        """Same edges, and the same ``d_model`` where both know it."""
        same_edges = (self.n_layers, self.n_heads, self.attn_only, self.parallel_attn_mlp) == (
            other.n_layers, other.n_heads, other.attn_only, other.parallel_attn_mlp
        )
        return same_edges and (self.d_model is None or other.d_model is None or self.d_model == other.d_model)


@dataclass(frozen=True)
class HookGroup:
    """A run of graph nodes read or written at one hook.

    ``start`` is the index of the first node (sender or receiver index); ``n_heads`` is the
    number of heads along the hook's head dimension, or ``None`` for a hook without one.
    ``n_upstream`` (receivers only) is the number of senders that feed these receivers.
    """

    hook: str
    start: int
    n_heads: int | None
    n_upstream: int = 0
    layer: int = 0
    kind: str = ""

    @property
    def size(self) -> int:
        return self.n_heads or 1


class Graph:
    """Senders × receivers edge graph with a dense score matrix (see module docstring)."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        L, H = spec.n_layers, spec.n_heads
        senders = ["input"]
        sender_groups = [HookGroup("blocks.0.hook_resid_pre", 0, None, layer=0, kind="input")]
        receivers: list[str] = []
        receiver_groups: list[HookGroup] = []
        n_upstream: list[int] = []
        for layer in range(L):
            attn_up = len(senders)
            for kind in "qkv":
                receiver_groups.append(
                    HookGroup(f"blocks.{layer}.hook_{kind}_input", len(receivers), H, attn_up, layer, kind)
                )
                receivers += [f"a{layer}.h{h}<{kind}>" for h in range(H)]
                n_upstream += [attn_up] * H
            sender_groups.append(HookGroup(f"blocks.{layer}.attn.hook_result", len(senders), H, layer=layer, kind="head"))
            senders += [f"a{layer}.h{h}" for h in range(H)]
            if not spec.attn_only:
                mlp_up = attn_up if spec.parallel_attn_mlp else len(senders)
                receiver_groups.append(HookGroup(f"blocks.{layer}.hook_mlp_in", len(receivers), None, mlp_up, layer, "mlp"))
                receivers.append(f"m{layer}")
                n_upstream.append(mlp_up)
                sender_groups.append(HookGroup(f"blocks.{layer}.hook_mlp_out", len(senders), None, layer=layer, kind="mlp"))
                senders.append(f"m{layer}")
        receiver_groups.append(
            HookGroup(f"blocks.{L - 1}.hook_resid_post", len(receivers), None, len(senders), L, "logits")
        )
        receivers.append("logits")
        n_upstream.append(len(senders))

        self.senders: list[str] = senders
        self.receivers: list[str] = receivers
        self.sender_groups: list[HookGroup] = sender_groups
        self.receiver_groups: list[HookGroup] = receiver_groups
        self.n_upstream: Int[Tensor, " n_receivers"] = torch.tensor(n_upstream, dtype=torch.long)
        self.mask: Bool[Tensor, "n_senders n_receivers"] = (
            torch.arange(len(senders))[:, None] < self.n_upstream[None, :]
        )
        edge_idx = self.mask.nonzero()
        self.edge_sender: Int[Tensor, " n_edges"] = edge_idx[:, 0].contiguous()
        self.edge_receiver: Int[Tensor, " n_edges"] = edge_idx[:, 1].contiguous()
        #: edge scores in the metric's units (sign: metric(patched) - metric(clean)); 0 off ``mask``
        self.scores: Float[Tensor, "n_senders n_receivers"] = torch.zeros(len(senders), len(receivers))
        #: the circuit's edges (a subset of ``mask``); a new graph holds every edge
        self.in_graph: Bool[Tensor, "n_senders n_receivers"] = self.mask.clone()
        #: the circuit's nodes (senders; ``logits`` is always in); EAP-IG's ``nodes_in_graph``
        self.nodes_in_graph: Bool[Tensor, " n_senders"] = torch.ones(len(senders), dtype=torch.bool)
        #: optional node scores (NaN = unscored, always kept by node-level selection); EAP-IG's ``nodes_scores``
        self.node_scores: Float[Tensor, " n_senders"] | None = None
        #: optional neuron masks/scores, read from and written to files (not used by the selections)
        self.neurons_in_graph: Bool[Tensor, "n_senders d_model"] | None = None
        self.neuron_scores: Float[Tensor, "n_senders d_model"] | None = None
        #: further cfg keys of a file this graph was read from, written back unchanged
        self.extra_cfg: dict[str, Any] = {}

    # ---------------------------------------------------------------- build
    @classmethod
    def from_model(cls, model: Any) -> "Graph":
        """The graph of a TransformerLens model (or anything with a ``cfg``)."""
        return cls(GraphSpec.from_cfg(model.cfg))

    @classmethod
    def from_cfg(cls, cfg: Any) -> "Graph":
        """The graph of a config-like object or dict (no weights needed)."""
        return cls(GraphSpec.from_cfg(cfg))

    def check_model(self, model: Any) -> None:
        """Raise if this graph was built for a model of another shape (``d_model`` is compared
        only when the graph knows it)."""
        other = GraphSpec.from_cfg(model.cfg)
        if not self.spec.matches(other):
            raise GraphError(f"graph was built for {self.spec} but the model is {other}")

    # ----------------------------------------------------------------- sizes
    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @property
    def n_edges(self) -> int:
        return int(self.edge_sender.numel())

    def __repr__(self) -> str:
        return f"Graph({self.spec}, senders={self.n_senders}, receivers={self.n_receivers}, edges={self.n_edges})"

    # ----------------------------------------------------------------- names
    @cached_property
    def edge_names(self) -> list[str]:
        s, r = self.senders, self.receivers
        return [f"{s[i]}->{r[j]}" for i, j in zip(self.edge_sender.tolist(), self.edge_receiver.tolist())]

    @cached_property
    def _edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    @cached_property
    def receiver_kind(self) -> list[str]:
        """Kind of each receiver: 'q', 'k', 'v', 'mlp' or 'logits'."""
        kinds = [""] * self.n_receivers
        for g in self.receiver_groups:
            for j in range(g.start, g.start + g.size):
                kinds[j] = g.kind
        return kinds

    @cached_property
    def edge_kind(self) -> list[str]:
        """Receiver kind of each edge, in edge order."""
        kinds = self.receiver_kind
        return [kinds[j] for j in self.edge_receiver.tolist()]

    def edge_index(self, names_or_indices: Iterable[str | int] | Tensor) -> Int[Tensor, " k"]:
        """Edge indices from edge names and/or integer indices (checked)."""
        return _resolve(names_or_indices, self._edge_index, self.n_edges, "edge", "'a0.h1->a2.h0<q>'")

    @cached_property
    def _sender_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.senders)}

    def sender_index(self, names_or_indices: Iterable[str | int] | Tensor) -> Int[Tensor, " k"]:
        """Sender indices from sender names and/or integer indices (checked)."""
        return _resolve(names_or_indices, self._sender_index, self.n_senders, "sender", "'input', 'a0.h1', 'm0'")

    def select_senders(self, spec: Any) -> Int[Tensor, " k"]:
        """Sorted sender indices: None/'all' or a list/tensor of sender names or indices."""
        if spec is None or (isinstance(spec, str) and spec == "all"):
            return torch.arange(self.n_senders)
        if isinstance(spec, str):
            raise GraphError(f"bad node spec {spec!r}: use 'all' or a list of sender names/indices")
        return _unique_sorted(self.sender_index(spec), "node")

    # ---------------------------------------------------------------- scores
    def edge_scores(self) -> Float[Tensor, " n_edges"]:
        """The score matrix flattened to the fixed edge order (metric units, noising sign)."""
        return self.scores[self.edge_sender, self.edge_receiver]

    def set_edge_scores(self, values: Float[Tensor, " n_edges"]) -> None:
        """Set the edge scores from a vector in the fixed edge order (kept in its dtype, on CPU)."""
        if values.shape != (self.n_edges,):
            raise GraphError(f"expected {self.n_edges} edge scores, got shape {tuple(values.shape)}")
        self.scores = torch.zeros(self.n_senders, self.n_receivers, dtype=values.dtype)
        self.scores[self.edge_sender, self.edge_receiver] = values.detach().cpu()

    def set_node_scores(self, values: Float[Tensor, " n_senders"] | None) -> None:
        """Set the node scores, one per sender in sender order (e.g. ``eap.attribute(...,
        level="node")``; NaN = unscored), or drop them with ``None``."""
        if values is None:
            self.node_scores = None
            return
        if values.shape != (self.n_senders,):
            raise GraphError(f"expected {self.n_senders} node scores, got shape {tuple(values.shape)}")
        self.node_scores = values.detach().cpu().clone()

    def topk(self, k: int, scores: Tensor | None = None, absolute: bool = True) -> Int[Tensor, " k"]:
        """Indices (edge order) of the k highest-scoring edges, by |score| unless absolute=False.

        NaN scores never rank.
        """
        s = self.edge_scores() if scores is None else scores.detach().cpu()
        if s.shape != (self.n_edges,):
            raise GraphError(f"expected {self.n_edges} edge scores, got shape {tuple(s.shape)}")
        s = s.abs() if absolute else s.clone()
        s = torch.where(torch.isnan(s), torch.full_like(s, -float("inf")), s)
        k = min(int(k), int(torch.isfinite(s).sum()))
        return torch.topk(s.double(), k).indices

    def apply_topk(self, k: int, absolute: bool = True) -> None:
        """Keep the k best edges in the graph (``in_graph``), by the current scores (see ``topk``:
        NaN never ranks; nothing is pruned). The nodes in the graph become the endpoints of those
        edges. For EAP-IG's/MIB's selection, which prunes, use ``apply_topn``."""
        self.in_graph = torch.zeros_like(self.mask)
        idx = self.topk(k, absolute=absolute)
        self.in_graph[self.edge_sender[idx], self.edge_receiver[idx]] = True
        has_out, has_in = self._node_links()
        self.nodes_in_graph = has_out | has_in

    # ------------------------------------------------- circuits (EAP-IG semantics)
    @cached_property
    def receiver_node(self) -> Int[Tensor, " n_receivers"]:
        """Sender index of the node each receiver belongs to (a head's q/k/v inputs belong to
        the head, an MLP's input to the MLP); -1 for ``logits``."""
        index = self._sender_index
        return torch.tensor([index.get(r.split("<")[0], -1) for r in self.receivers], dtype=torch.long)

    def _node_links(self) -> tuple[Bool[Tensor, " n_senders"], Bool[Tensor, " n_senders"]]:
        """Which senders have an outgoing, and which an incoming, edge in ``in_graph``."""
        has_out = self.in_graph.any(dim=1)
        fed = self.in_graph.any(dim=0) & (self.receiver_node >= 0)
        has_in = torch.zeros(self.n_senders, dtype=torch.bool)
        has_in[self.receiver_node[fed]] = True
        return has_out, has_in

    def _connected_nodes(self) -> Bool[Tensor, " n_senders"]:
        """EAP-IG's node rule: an outgoing and an incoming edge in the graph (``input`` counts as fed)."""
        has_out, has_in = self._node_links()
        has_in[0] = True
        return has_out & has_in

    def prune(self) -> None:
        """EAP-IG's ``prune``: repeatedly take out nodes without an incoming (``input`` exempt) or
        an outgoing edge, then edges whose sender or receiver node is out, until nothing changes.
        What stays are exactly the edges on some path ``input -> ... -> logits``, and
        ``nodes_in_graph`` becomes the nodes on them (recomputed from the edges, as in EAP-IG).
        Neurons of nodes taken out are cleared. Never adds an edge."""
        has_node = self.receiver_node >= 0
        while True:
            nodes = self._connected_nodes()
            receiver_in = torch.ones(self.n_receivers, dtype=torch.bool)
            receiver_in[has_node] = nodes[self.receiver_node[has_node]]
            in_graph = self.in_graph & nodes[:, None] & receiver_in[None, :]
            settled = torch.equal(in_graph, self.in_graph) and torch.equal(nodes, self.nodes_in_graph)
            self.in_graph, self.nodes_in_graph = in_graph, nodes
            if settled:
                break
        if self.neurons_in_graph is not None:
            self.neurons_in_graph = self.neurons_in_graph & self.nodes_in_graph[:, None]

    def apply_topn(
        self, n: int, absolute: bool = True, level: str = "edge", reset: bool = True, prune: bool = True
    ) -> None:
        """EAP-IG's ``apply_topn`` (what MIB's circuit evaluation calls at each edge budget).

        ``level="edge"``: the ``n`` highest-scoring edges (|score| unless ``absolute=False``) are
        the graph's edges, all others out; ``n`` counts edges *before* pruning, so with
        ``prune=True`` (the default) fewer may stay: edges not on a path input -> logits go (see
        ``prune``). With ``reset``, the nodes are cleared first and then set to those with an
        incoming and an outgoing chosen edge. NaN scores are refused (EAP-IG's sort would rank
        them first). Ties go to the earlier edge in edge order (EAP-IG's unstable sort leaves them
        unspecified).

        ``level="node"``: the ``n`` highest-scoring nodes (``node_scores``; unscored NaN nodes are
        always kept and do not count) are the graph's nodes; with ``reset`` every edge out of a
        kept node is put in. EAP-IG also marks non-edges there (e.g. a head's own q input) and
        its ``prune`` counts them, so a node can stay in through a non-edge; circuits here keep to
        ``mask``, so node-level selection with pruning can keep less than EAP-IG's. (Edge level,
        what MIB's edge-level evaluation uses, matches EAP-IG exactly.)
        """
        n = _count(n, "apply_topn")
        if level == "edge":
            scores = self._ranking_scores(absolute, "apply_topn")
            if n > self.n_edges:
                raise GraphError(f"apply_topn: n={n} is more than the graph's {self.n_edges} edges")
            keep = torch.zeros(self.n_edges, dtype=torch.bool)
            keep[torch.argsort(scores, descending=True, stable=True)[:n]] = True
            self._choose_edges(keep, reset)
        elif level == "node":
            scores, scored = self._node_ranking(absolute, "apply_topn")
            if n > int(scored.sum()):
                raise GraphError(f"apply_topn: n={n} is more than the {int(scored.sum())} scored nodes")
            nodes = torch.zeros(self.n_senders, dtype=torch.bool)
            ranked = scores.masked_fill(~scored, -float("inf"))
            nodes[torch.argsort(ranked, descending=True, stable=True)[:n]] = True
            self._choose_nodes(nodes | ~scored, reset)
        else:
            raise GraphError(f"apply_topn: level must be 'edge' or 'node', got {level!r} (neuron level is not supported)")
        if prune:
            self.prune()

    def apply_threshold(
        self, threshold: float, absolute: bool = True, level: str = "edge", reset: bool = True, prune: bool = True
    ) -> None:
        """EAP-IG's ``apply_threshold``: keep the edges (``level="edge"``) or nodes
        (``level="node"``) whose score (|score| unless ``absolute=False``; metric units) is
        ``>= threshold``. NaN edge scores are never kept; unscored (NaN) nodes always are.
        ``reset`` and ``prune`` as in ``apply_topn``."""
        threshold = float(threshold)
        if level == "edge":
            scores = self.edge_scores().detach().cpu()
            self._choose_edges((scores.abs() if absolute else scores) >= threshold, reset)
        elif level == "node":
            scores, scored = self._node_ranking(absolute, "apply_threshold")
            self._choose_nodes((scores >= threshold) | ~scored, reset)
        else:
            raise GraphError(f"apply_threshold: level must be 'edge' or 'node', got {level!r}")
        if prune:
            self.prune()

    def apply_greedy(self, n: float, absolute: bool = True, reset: bool = True, prune: bool = True) -> None:
        """EAP-IG's ``apply_greedy``: grow the circuit from the logits backwards.

        Candidates are the edges whose receiver's node is in the graph (after ``reset``: the
        edges into ``logits``). ``ceil(n)`` times (EAP-IG counts a float ``n`` down to zero; MIB's
        ROC passes ``fraction * n_edges``), the highest-scoring candidate (|score| unless
        ``absolute=False``) goes in; when its sender joins the graph, the edges into that
        sender become candidates. Ties go to the candidate that became one first, then to edge
        order. Then ``prune`` (default) removes edges whose sender was never fed from the input,
        so fewer than ``n`` edges may stay. NaN scores are refused.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 0:
            raise GraphError(f"apply_greedy: n must be a number >= 0, got {n!r}")
        if n > self.n_edges:
            raise GraphError(f"apply_greedy: n={n} is more than the graph's {self.n_edges} edges")
        scores = self._ranking_scores(absolute, "apply_greedy").tolist()
        if reset:
            self.in_graph = torch.zeros_like(self.mask)
            self.nodes_in_graph = torch.zeros(self.n_senders, dtype=torch.bool)
        owner = self.receiver_node[self.edge_receiver].tolist()  # node each edge feeds, -1: logits
        into: list[list[int]] = [[] for _ in range(self.n_senders)]
        for e, node in enumerate(owner):
            if node >= 0:
                into[node].append(e)
        node_in = self.nodes_in_graph.tolist()
        heap = [(-scores[e], 0, e) for e, node in enumerate(owner) if node < 0 or node_in[node]]
        heapq.heapify(heap)
        senders = self.edge_sender.tolist()
        chosen, wave = [], 0
        for _ in range(math.ceil(n)):
            _, _, e = heapq.heappop(heap)
            chosen.append(e)
            parent = senders[e]
            if not node_in[parent]:
                node_in[parent] = True
                wave += 1
                for f in into[parent]:
                    heapq.heappush(heap, (-scores[f], wave, f))
        picked = torch.tensor(chosen, dtype=torch.long)
        self.in_graph[self.edge_sender[picked], self.edge_receiver[picked]] = True
        self.nodes_in_graph = torch.tensor(node_in, dtype=torch.bool)
        if prune:
            self.prune()

    def _ranking_scores(self, absolute: bool, what: str) -> Float[Tensor, " n_edges"]:
        scores = self.edge_scores().detach().cpu()
        nan = torch.isnan(scores)
        if nan.any():
            first = self.edge_names[int(nan.nonzero()[0])]
            raise GraphError(
                f"{what}: {int(nan.sum())} of {self.n_edges} edge scores are NaN (e.g. {first}); EAP-IG's sort "
                "would rank them first. Fill them (e.g. graph.set_edge_scores(graph.edge_scores().nan_to_num())) "
                "or use apply_topk, which never ranks NaN"
            )
        return scores.abs() if absolute else scores

    def _node_ranking(self, absolute: bool, what: str) -> tuple[Float[Tensor, " n_senders"], Bool[Tensor, " n_senders"]]:
        if self.node_scores is None:
            raise GraphError(f"{what}(level='node') needs node scores: graph.set_node_scores(...) or a file with them")
        scores = self.node_scores.abs() if absolute else self.node_scores
        return scores, ~torch.isnan(scores)

    def _choose_edges(self, keep: Bool[Tensor, " n_edges"], reset: bool) -> None:
        self.in_graph = torch.zeros_like(self.mask)
        self.in_graph[self.edge_sender[keep], self.edge_receiver[keep]] = True
        if reset:
            self.nodes_in_graph = self._connected_nodes()

    def _choose_nodes(self, nodes: Bool[Tensor, " n_senders"], reset: bool) -> None:
        self.nodes_in_graph = nodes.clone()
        if reset:
            self.in_graph = self.mask & nodes[:, None]

    # ------------------------------------------------------------------- I/O
    def _file_cfg(self) -> dict[str, Any]:
        """A file's ``cfg``: EAP-IG's keys, ``attn_only`` only when true (EAP-IG has no such
        graphs), then ``extra_cfg`` (keys read from a file, written back)."""
        s = self.spec
        cfg: dict[str, Any] = {"n_layers": s.n_layers, "n_heads": s.n_heads, "parallel_attn_mlp": s.parallel_attn_mlp}
        if s.d_model is not None:
            cfg["d_model"] = s.d_model
        if s.attn_only:
            cfg["attn_only"] = True
        for key, value in self.extra_cfg.items():
            cfg.setdefault(key, value)
        return cfg

    def _neuron_block(self, values: Tensor, node: int) -> list:
        """A node's neuron entry as EAP-IG writes it: a head gets its layer's block of heads
        ``[n_heads][d_model]`` (EAP-IG indexes head neurons with the layer's slice), any other
        node its own row ``[d_model]``."""
        group = next(g for g in self.sender_groups if g.start <= node < g.start + g.size)
        if group.kind == "head":
            return values[group.start : group.start + group.size].tolist()
        return values[node].tolist()

    def to_json(self, path: str | Path) -> None:
        """Write the EAP-IG/MIB JSON graph file, as EAP-IG 2.0.0's ``Graph.to_json`` does and its
        ``Graph.from_json`` reads it: ``{"cfg": {n_layers, n_heads, parallel_attn_mlp, d_model},
        "nodes": {name: {"in_graph": bool[, "score": float][, "neurons": [...],
        "neurons_scores": [...]]}}, "edges": {name: {"score": float, "in_graph": bool}}}``.

        Nodes are the senders plus ``logits`` (always in). Scores are in the metric's units; NaN
        is written as the literal ``NaN``, as EAP-IG's ``json.dump`` does (Python reads it back;
        strict JSON parsers must allow it). Without a known ``d_model`` (graph not built from a
        model) the file lacks it, and EAP-IG cannot read it: a warning says so.
        """
        if self.spec.d_model is None:
            warnings.warn(
                "graph has no d_model (build it with Graph.from_model or GraphSpec(d_model=...)): the JSON file "
                "lacks it and EAP-IG's Graph.from_json will fail with KeyError 'd_model'",
                UserWarning, stacklevel=2,
            )
        nodes: dict[str, dict[str, Any]] = {}
        node_in = self.nodes_in_graph.tolist()
        node_scores = None if self.node_scores is None else self.node_scores.tolist()
        for i, name in enumerate(self.senders):
            entry: dict[str, Any] = {"in_graph": bool(node_in[i])}
            if node_scores is not None:
                entry["score"] = float(node_scores[i])
            if self.neurons_in_graph is not None:
                entry["neurons"] = self._neuron_block(self.neurons_in_graph, i)
            if self.neuron_scores is not None:
                entry["neurons_scores"] = self._neuron_block(self.neuron_scores, i)
            nodes[name] = entry
        nodes["logits"] = {"in_graph": True}
        scores = self.edge_scores().detach().cpu().tolist()
        in_graph = self.in_graph[self.edge_sender, self.edge_receiver].tolist()
        edges = {
            name: {"score": float(s), "in_graph": bool(g)} for name, s, g in zip(self.edge_names, scores, in_graph)
        }
        Path(path).write_text(json.dumps({"cfg": self._file_cfg(), "nodes": nodes, "edges": edges}))

    @classmethod
    def from_json(cls, path: str | Path) -> "Graph":
        """Read a JSON graph file written by EAP-IG/MIB or by ``to_json`` (also this package's
        older files: nodes as bare booleans, no ``d_model``).

        The ``cfg`` needs ``n_layers`` and ``n_heads``; ``parallel_attn_mlp``, ``attn_only``
        default to false, ``d_model`` to unknown, other keys are kept in ``extra_cfg``. Every edge
        of the graph the ``cfg`` describes must be listed, and nothing else. Scores keep their
        exact values: float32 when every value is one (as in EAP-IG's files), else float64;
        ``null`` reads as NaN. Nodes missing from the file are out of the graph (as in EAP-IG);
        the ``logits`` entry is ignored (always in). Node ``score`` and neuron entries are read
        when present.
        """
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise GraphError(f"{path}: not a JSON graph file ({exc})") from exc
        if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= set(data):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise GraphError(f"{path}: a graph file needs the top-level keys cfg, nodes, edges; found {found}")
        graph = cls._from_file_cfg(data["cfg"], path)
        edges = data["edges"]
        if not isinstance(edges, dict):
            raise GraphError(f"{path}: 'edges' must map edge names to {{'score', 'in_graph'}}")
        graph._check_edge_names(list(edges), path)
        scores, keep = [], []
        for name in graph.edge_names:
            entry = edges[name]
            if not isinstance(entry, dict) or not {"score", "in_graph"} <= set(entry):
                raise GraphError(f"{path}: edge {name!r} must map to {{'score': float, 'in_graph': bool}}, got {entry!r}")
            scores.append(_score(entry["score"], f"{path}: edge {name!r}"))
            keep.append(_flag(entry["in_graph"], f"{path}: edge {name!r}"))
        graph.set_edge_scores(_exact(torch.tensor(scores, dtype=torch.float64)))
        graph.in_graph = torch.zeros_like(graph.mask)
        kept = torch.tensor(keep, dtype=torch.bool)
        graph.in_graph[graph.edge_sender[kept], graph.edge_receiver[kept]] = True
        graph._read_json_nodes(data["nodes"], path)
        return graph

    def _read_json_nodes(self, nodes: Any, path: str | Path) -> None:
        if not isinstance(nodes, dict):
            raise GraphError(f"{path}: 'nodes' must map node names to {{'in_graph': bool, ...}}")
        node_in = torch.zeros(self.n_senders, dtype=torch.bool)
        scores = torch.full((self.n_senders,), float("nan"), dtype=torch.float64)
        neuron_fields: dict[str, Tensor] = {}
        any_score = False
        for name, entry in nodes.items():
            if name == "logits":
                continue
            if name not in self._sender_index:
                raise GraphError(
                    f"{path}: unknown node {name!r}: a graph of {self.spec} has the nodes "
                    f"{self.senders[0]}, {self.senders[1]}, ..., {self.senders[-1]} and logits"
                )
            i = self._sender_index[name]
            where = f"{path}: node {name!r}"
            if isinstance(entry, bool):  # this package's files before EAP-IG's node dicts
                node_in[i] = entry
                continue
            if not isinstance(entry, dict) or "in_graph" not in entry:
                raise GraphError(f"{where} must map to {{'in_graph': bool, ...}}, got {entry!r}")
            node_in[i] = _flag(entry["in_graph"], where)
            if "score" in entry:
                any_score = True
                scores[i] = _score(entry["score"], where)
            for key in ("neurons", "neurons_scores"):
                if key in entry:
                    if key not in neuron_fields:
                        if self.spec.d_model is None:
                            raise GraphError(f"{where} has {key!r} but the cfg has no d_model")
                        neuron_fields[key] = torch.full((self.n_senders, self.spec.d_model), float("nan"), dtype=torch.float64)
                    neuron_fields[key][i] = self._neuron_row(entry[key], i, f"{where} {key!r}")
        self.nodes_in_graph = node_in
        self.node_scores = _exact(scores) if any_score else None
        if "neurons" in neuron_fields:
            self.neurons_in_graph = neuron_fields["neurons"].nan_to_num(0.0) != 0
        if "neurons_scores" in neuron_fields:
            self.neuron_scores = _exact(neuron_fields["neurons_scores"])

    def _neuron_row(self, value: Any, node: int, where: str) -> Float[Tensor, " d_model"]:
        """One node's neurons from a file entry: ``[d_model]``, or for a head EAP-IG's layer block
        ``[n_heads][d_model]`` (its row for this head)."""
        try:
            values = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise GraphError(f"{where}: not a list of numbers ({exc})") from exc
        group = next(g for g in self.sender_groups if g.start <= node < g.start + g.size)
        d = self.spec.d_model
        if values.shape == (d,):
            return values
        if group.kind == "head" and values.shape == (group.size, d):
            return values[node - group.start]
        raise GraphError(f"{where}: expected {d} values per node (a head: also [{group.size}, {d}]), got shape {tuple(values.shape)}")

    def _check_edge_names(self, names: list[str], path: str | Path) -> None:
        listed = set(names)
        unknown = [n for n in names if n not in self._edge_index]
        missing = [n for n in self.edge_names if n not in listed]
        if unknown or missing:
            raise GraphError(
                f"{path}: the edges do not match the cfg ({self.spec}, {self.n_edges} edges): {len(unknown)} "
                f"listed edges are not in such a graph {unknown[:3]}, {len(missing)} of its edges are not listed "
                f"{missing[:3]}"
            )

    @classmethod
    def _from_file_cfg(cls, cfg: Any, path: str | Path) -> "Graph":
        """A new graph for a file's ``cfg`` dict, checked; unknown keys go to
        ``extra_cfg``."""
        if not isinstance(cfg, dict):
            raise GraphError(f"{path}: 'cfg' must be a dict with n_layers, n_heads, parallel_attn_mlp, d_model")

        def positive(key: str, required: bool) -> int | None:
            value = cfg.get(key)
            if value is None and not required:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GraphError(f"{path}: cfg[{key!r}] must be a positive integer, got {value!r}")
            return value

        def flag(key: str) -> bool:
            value = cfg.get(key, False)
            if not isinstance(value, bool):
                raise GraphError(f"{path}: cfg[{key!r}] must be true or false, got {value!r}")
            return value

        spec = GraphSpec(
            n_layers=positive("n_layers", True),
            n_heads=positive("n_heads", True),
            attn_only=flag("attn_only"),
            parallel_attn_mlp=flag("parallel_attn_mlp"),
            d_model=positive("d_model", False),
        )
        graph = cls(spec)
        graph.extra_cfg = {k: v for k, v in cfg.items() if k not in _CFG_KEYS}
        return graph

    def to_pt(self, path: str | Path) -> None:
        """Write EAP-IG's ``.pt`` graph file, as EAP-IG 2.0.0's ``Graph.to_pt`` does and its
        ``Graph.from_pt`` reads it: a dict of ``cfg``, ``src_nodes`` (senders), ``dst_nodes``
        (receivers), ``edges_scores`` ``[n_src, n_dst]`` (scores' dtype, metric units),
        ``edges_in_graph`` and ``nodes_in_graph`` ``[n_src]`` (bool), and when present
        ``nodes_scores``, ``neurons_in_graph``, ``neurons_scores`` ``[n_src, d_model]``.

        EAP-IG's reader indexes the tensors by its own dense layout and ignores the names, so the
        tensors are laid out in that order by name; an attention-only graph gets EAP-IG's MLP rows
        and columns empty (zero, false, NaN scores)."""
        src, dst = _eapig_layout(self.spec.n_layers, self.spec.n_heads)
        rows = _positions(self.senders, src, "src_nodes", "EAP-IG's layout")
        cols = _positions(self.receivers, dst, "dst_nodes", "EAP-IG's layout")
        scores = torch.zeros(len(src), len(dst), dtype=self.scores.dtype)
        scores[rows[:, None], cols[None, :]] = torch.where(self.mask, self.scores.detach().cpu(), 0)
        in_graph = torch.zeros(len(src), len(dst), dtype=torch.bool)
        in_graph[rows[:, None], cols[None, :]] = self.in_graph.cpu() & self.mask
        data: dict[str, Any] = {
            "cfg": self._file_cfg(), "src_nodes": src, "dst_nodes": dst, "edges_scores": scores,
            "edges_in_graph": in_graph, "nodes_in_graph": _spread(self.nodes_in_graph, rows, len(src), False),
        }
        if self.node_scores is not None:
            data["nodes_scores"] = _spread(self.node_scores, rows, len(src), float("nan"))
        if self.neurons_in_graph is not None:
            data["neurons_in_graph"] = _spread(self.neurons_in_graph, rows, len(src), False)
        if self.neuron_scores is not None:
            data["neurons_scores"] = _spread(self.neuron_scores, rows, len(src), float("nan"))
        torch.save(data, path)

    @classmethod
    def from_pt(cls, path: str | Path) -> "Graph":
        """Read a ``.pt`` graph file written by EAP-IG/MIB or by ``to_pt`` / ``save`` (also this
        package's older ``{"spec", "scores", "in_graph"}`` files).

        Rows and columns are matched by the names in ``src_nodes`` / ``dst_nodes``, never by
        position. Scores keep the file's values and dtype. A score on a pair that is not an edge
        of the graph the ``cfg`` describes, or a node the graph lacks marked in, is refused (the
        cfg does not describe the file); ``edges_in_graph`` on non-edges is ignored (EAP-IG's
        node-level selection marks them).
        """
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a non-torch or unsafe file
            raise GraphError(f"{path}: not a torch graph file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(data, dict):
            raise GraphError(f"{path}: a graph file holds a dict, got {type(data).__name__}")
        if "spec" in data:
            return cls._from_legacy_pt(data, path)
        required = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
        missing = [k for k in required if k not in data]
        if missing:
            raise GraphError(f"{path}: not an EAP-IG graph file: missing {missing} (found {sorted(data)})")
        graph = cls._from_file_cfg(data["cfg"], path)
        src, dst = data["src_nodes"], data["dst_nodes"]
        rows = _positions(graph.senders, src, "src_nodes", path)
        cols = _positions(graph.receivers, dst, "dst_nodes", path)
        shape = (len(src), len(dst))
        scores = _tensor(data["edges_scores"], shape, f"{path}: edges_scores", floating=True)
        in_graph = _tensor(data["edges_in_graph"], shape, f"{path}: edges_in_graph").bool()
        nodes = _tensor(data["nodes_in_graph"], (len(src),), f"{path}: nodes_in_graph").bool()
        is_edge = torch.zeros(shape, dtype=torch.bool)
        is_edge[rows[:, None], cols[None, :]] = graph.mask
        stray = (scores != 0) & ~is_edge
        if stray.any():
            i, j = stray.nonzero()[0].tolist()
            raise GraphError(
                f"{path}: edges_scores holds a score for {src[i]}->{dst[j]}, which is not an edge of a graph of "
                f"{graph.spec}: the file's cfg does not describe its edges ({int(stray.sum())} such scores)"
            )
        has_node = torch.zeros(len(src), dtype=torch.bool)
        has_node[rows] = True
        if (nodes & ~has_node).any():
            extra = [src[i] for i in (nodes & ~has_node).nonzero().flatten().tolist()]
            raise GraphError(f"{path}: nodes_in_graph marks {extra[:3]}, which a graph of {graph.spec} does not have")
        graph.scores = scores[rows][:, cols].clone()
        graph.in_graph = in_graph[rows][:, cols] & graph.mask
        graph.nodes_in_graph = nodes[rows].clone()
        if "nodes_scores" in data:
            graph.node_scores = _tensor(data["nodes_scores"], (len(src),), f"{path}: nodes_scores", floating=True)[rows].clone()
        for key, attr in (("neurons_in_graph", "neurons_in_graph"), ("neurons_scores", "neuron_scores")):
            if key in data:
                value = data[key]
                width = graph.spec.d_model if graph.spec.d_model is not None else getattr(value, "shape", (0, 0))[-1]
                value = _tensor(value, (len(src), width), f"{path}: {key}", floating=key == "neurons_scores")
                setattr(graph, attr, (value if key == "neurons_scores" else value.bool())[rows].clone())
        return graph

    @classmethod
    def _from_legacy_pt(cls, data: dict, path: str | Path) -> "Graph":
        """This package's ``.pt`` files before EAP-IG's format: ``{"spec", "scores", "in_graph"}``
        as dense ``[n_senders, n_receivers]`` tensors; nodes = endpoints of in-graph edges."""
        graph = cls._from_file_cfg(data["spec"], path)
        shape = (graph.n_senders, graph.n_receivers)
        graph.scores = _tensor(data.get("scores"), shape, f"{path}: scores", floating=True)
        graph.in_graph = _tensor(data.get("in_graph"), shape, f"{path}: in_graph").bool() & graph.mask
        has_out, has_in = graph._node_links()
        graph.nodes_in_graph = has_out | has_in
        return graph

    def save(self, path: str | Path) -> None:
        """Save the graph (scores, circuit, cfg) as EAP-IG's ``.pt`` file: same as ``to_pt``."""
        self.to_pt(path)

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """Load a ``.pt`` graph file (EAP-IG's, ``save``'s, or this package's older files): same
        as ``from_pt``."""
        return cls.from_pt(path)

    # ---------------------------------------------------------- receivers
    def receiver_group_of(self, receiver: int) -> HookGroup:
        for g in self.receiver_groups:
            if g.start <= receiver < g.start + g.size:
                return g
        raise GraphError(f"receiver index {receiver} out of range")

    def select_edges(self, spec: Any, scores: Tensor | None = None, seed: int = 0) -> Int[Tensor, " k"]:
        """Resolve an edge selection to sorted edge indices.

        ``spec``: None or "all"; a list/tensor of indices or names; "topk:K" (by |scores|,
        which must be given); "sample:K" (uniform random, seeded); "stratified:K" (random,
        the same share of every receiver kind, seeded).
        """
        if spec is None or (isinstance(spec, str) and spec == "all"):
            return torch.arange(self.n_edges)
        if isinstance(spec, str):
            kind, _, num = spec.partition(":")
            if kind not in ("topk", "sample", "stratified") or not num.isdigit() or int(num) < 1:
                raise GraphError(
                    f"bad edge spec {spec!r}: use 'all', 'topk:K', 'sample:K', 'stratified:K' or a list of edges"
                )
            k = min(int(num), self.n_edges)
            if kind == "topk":
                if scores is None:
                    raise GraphError("'topk:K' needs scores to rank edges by")
                return self.topk(k, scores).sort().values
            gen = torch.Generator().manual_seed(seed)
            if kind == "sample":
                return torch.randperm(self.n_edges, generator=gen)[:k].sort().values
            kinds = self.edge_kind
            pools = [torch.tensor([i for i, x in enumerate(kinds) if x == kd]) for kd in dict.fromkeys(kinds)]
            takes = _stratified_counts([len(p) for p in pools], k)
            chosen = [p[torch.randperm(len(p), generator=gen)[:take]] for p, take in zip(pools, takes)]
            return torch.cat(chosen).sort().values
        if isinstance(spec, (Sequence, Tensor)):
            return _unique_sorted(self.edge_index(spec), "edge")
        raise GraphError(f"cannot interpret edge spec {spec!r}")


def _stratified_counts(sizes: list[int], k: int) -> list[int]:
    """Edges to draw from each stratum of ``sizes`` so that exactly ``k`` are drawn: each
    stratum's share rounded (at least one while ``k`` allows), then the total corrected to ``k``
    one edge at a time where rounding went furthest from the share."""
    n = sum(sizes)
    quota = [k * s / n for s in sizes]
    take = [min(s, max(1, round(q))) for s, q in zip(sizes, quota)]
    least = 1 if k >= len(sizes) else 0
    while sum(take) > k:
        j = max((i for i in range(len(sizes)) if take[i] > least), key=lambda i: (take[i] - quota[i], -i))
        take[j] -= 1
    while sum(take) < k:
        j = max((i for i in range(len(sizes)) if take[i] < sizes[i]), key=lambda i: (quota[i] - take[i], -i))
        take[j] += 1
    return take


def _resolve(items: Iterable[str | int] | Tensor, index: dict[str, int], n: int, what: str, example: str) -> Tensor:
    """Indices from names (looked up in ``index``) and/or integers in [0, n), checked."""
    if isinstance(items, Tensor):
        items = items.flatten().tolist()
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in index:
                raise GraphError(f"unknown {what} name {item!r} (names look like {example})")
            out.append(index[item])
        else:
            i = int(item)
            if not 0 <= i < n:
                raise GraphError(f"{what} index {i} out of range [0, {n})")
            out.append(i)
    return torch.tensor(out, dtype=torch.long)


def _unique_sorted(idx: Tensor, what: str) -> Tensor:
    if idx.unique().numel() != idx.numel():
        raise GraphError(f"{what} list contains duplicates")
    return idx.sort().values


_CFG_KEYS = ("n_layers", "n_heads", "attn_only", "parallel_attn_mlp", "d_model")


def _eapig_layout(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    """EAP-IG's dense layout: its forward (source) nodes and backward (destination) inputs in its
    tensor order. For graphs with MLPs this is also this module's sender/receiver order; it is
    spelled out because EAP-IG's ``.pt`` reader indexes by position."""
    src, dst = ["input"], []
    for layer in range(n_layers):
        src += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
        dst += [f"a{layer}.h{h}<{kind}>" for kind in "qkv" for h in range(n_heads)] + [f"m{layer}"]
    return src, dst + ["logits"]


def _positions(ours: list[str], theirs: Any, what: str, where: Any) -> Int[Tensor, " n"]:
    """Position of each of our names in a file's name list (all must be there)."""
    if not isinstance(theirs, (list, tuple)) or not all(isinstance(x, str) for x in theirs):
        raise GraphError(f"{where}: {what} must be a list of node names")
    index = {name: i for i, name in enumerate(theirs)}
    missing = [name for name in ours if name not in index]
    if missing:
        raise GraphError(f"{where}: {what} lacks {missing[:3]} ({len(missing)} names): not a graph of this cfg")
    return torch.tensor([index[name] for name in ours], dtype=torch.long)


def _spread(values: Tensor, rows: Int[Tensor, " n"], n_rows: int, fill: float | bool) -> Tensor:
    """``values`` placed at ``rows`` of a tensor with ``n_rows`` rows, ``fill`` elsewhere."""
    out = torch.full((n_rows, *values.shape[1:]), fill, dtype=values.dtype)
    out[rows] = values.detach().cpu()
    return out


def _tensor(value: Any, shape: tuple[int, ...], where: str, floating: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise GraphError(f"{where} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise GraphError(f"{where} has shape {tuple(value.shape)}, expected {tuple(shape)} from the file's node lists")
    if floating and not value.is_floating_point():
        raise GraphError(f"{where} must hold floating-point scores, got {value.dtype}")
    return value


def _exact(values: Tensor) -> Tensor:
    """float32 when that holds every value exactly (NaN included), else float64: never rounds."""
    wide = values.to(torch.float64)
    narrow = wide.to(torch.float32)
    return narrow if bool(((narrow.to(torch.float64) == wide) | torch.isnan(wide)).all()) else wide


def _score(value: Any, where: str) -> float:
    """A score from a file: a number, or null/NaN for unscored."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraphError(f"{where}: score must be a number or null, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise GraphError(f"{where}: in_graph must be true or false, got {value!r}")


def _count(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise GraphError(f"{what}: n must be an integer >= 0, got {n!r}")
    return int(n)
