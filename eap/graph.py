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
package MIB's circuit track uses), through ``eap.graph_io`` (the reader and writer; ``save`` /
``load`` are deprecated aliases of ``to_pt`` / ``from_pt``). See ``docs/graph-format.md``.
"""

from __future__ import annotations

import heapq
import math
import numbers
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eap import graph_io
from eap.graph_spec import GraphError, GraphSpec, HookGroup

__all__ = ["Graph", "GraphError", "GraphSpec", "HookGroup"]


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
        #: the model the graph was built for or its file recorded (``eap.graph_io.model_identity``), or None
        self.model_id: dict[str, Any] | None = None
        #: True when ``model_id`` was read from a file: ``check_model`` then refuses another model
        self.model_id_from_file = False

    # ---------------------------------------------------------------- build
    @classmethod
    def from_model(cls, model: Any) -> "Graph":
        """The graph of a TransformerLens model (or anything with a ``cfg``); it records the
        model's identity (``eap.graph_io.model_identity``) for the files it writes."""
        graph = cls(GraphSpec.from_cfg(model.cfg))
        graph.model_id = graph_io.model_identity(model)
        return graph

    @classmethod
    def from_cfg(cls, cfg: Any) -> "Graph":
        """The graph of a config-like object or dict (no weights needed)."""
        return cls(GraphSpec.from_cfg(cfg))

    def check_model(self, model: Any) -> None:
        """Raise if this graph was built for a model of another shape (``d_model`` is compared
        only when the graph knows it), or was read from a file recorded for another model
        (``eap.graph_io.check_model_identity``)."""
        other = GraphSpec.from_cfg(model.cfg)
        if not self.spec.matches(other):
            raise GraphError(f"graph was built for {self.spec} but the model is {other}")
        if self.model_id_from_file and self.model_id is not None:
            graph_io.check_model_identity(self.model_id, model, "graph")

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
        has_out, has_in = self.node_links()
        self.nodes_in_graph = has_out | has_in

    # ------------------------------------------------- circuits (EAP-IG semantics)
    @cached_property
    def receiver_node(self) -> Int[Tensor, " n_receivers"]:
        """Sender index of the node each receiver belongs to (a head's q/k/v inputs belong to
        the head, an MLP's input to the MLP); -1 for ``logits``."""
        index = self._sender_index
        return torch.tensor([index.get(r.split("<")[0], -1) for r in self.receivers], dtype=torch.long)

    def node_links(self) -> tuple[Bool[Tensor, " n_senders"], Bool[Tensor, " n_senders"]]:
        """Which senders have an outgoing, and which an incoming, edge in ``in_graph``."""
        has_out = self.in_graph.any(dim=1)
        fed = self.in_graph.any(dim=0) & (self.receiver_node >= 0)
        has_in = torch.zeros(self.n_senders, dtype=torch.bool)
        has_in[self.receiver_node[fed]] = True
        return has_out, has_in

    def _connected_nodes(self) -> Bool[Tensor, " n_senders"]:
        """EAP-IG's node rule: an outgoing and an incoming edge in the graph (``input`` counts as fed)."""
        has_out, has_in = self.node_links()
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

    # ------------------------------------------------------------------- I/O (eap.graph_io)
    def to_json(self, path: str | Path, *, circuit: bool | None = None) -> None:
        """Write the EAP-IG/MIB JSON graph file (``eap.graph_io.write_json``; docs/graph-format.md)."""
        graph_io.write_json(self, path, circuit=circuit)

    @classmethod
    def from_json(cls, path: str | Path, model: Any = None) -> "Graph":
        """Read a JSON graph file of EAP-IG/MIB or ``to_json`` (``eap.graph_io.read_json``); with
        ``model``, refuse a file recorded for another model."""
        return graph_io.read_json(cls, path, model)

    def to_pt(self, path: str | Path, *, circuit: bool | None = None) -> None:
        """Write EAP-IG's ``.pt`` graph file (``eap.graph_io.write_pt``; docs/graph-format.md)."""
        graph_io.write_pt(self, path, circuit=circuit)

    @classmethod
    def from_pt(cls, path: str | Path, model: Any = None) -> "Graph":
        """Read a ``.pt`` graph file of EAP-IG/MIB or ``to_pt`` (``eap.graph_io.read_pt``); with
        ``model``, refuse a file recorded for another model."""
        return graph_io.read_pt(cls, path, model)

    def save(self, path: str | Path) -> None:
        """Deprecated alias of ``to_pt``."""
        warnings.warn("Graph.save is deprecated: use Graph.to_pt (the same file)", DeprecationWarning, stacklevel=2)
        self.to_pt(path)

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """Deprecated alias of ``from_pt``."""
        warnings.warn("Graph.load is deprecated: use Graph.from_pt (the same file)", DeprecationWarning, stacklevel=2)
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
            how, _, num = spec.partition(":")
            if how not in ("topk", "sample", "stratified") or not num.isdigit() or int(num) < 1:
                raise GraphError(
                    f"bad edge spec {spec!r}: use 'all', 'topk:K', 'sample:K', 'stratified:K' or a list of edges"
                )
            k = min(int(num), self.n_edges)
            if how == "topk":
                if scores is None:
                    raise GraphError("'topk:K' needs scores to rank edges by")
                return self.topk(k, scores).sort().values
            gen = torch.Generator().manual_seed(seed)
            if how == "sample":
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


def _count(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise GraphError(f"{what}: n must be an integer >= 0, got {n!r}")
    return int(n)
