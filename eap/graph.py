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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


class GraphError(ValueError):
    """Raised when a graph does not fit a model or a request."""


@dataclass(frozen=True)
class GraphSpec:
    """The shape facts that determine the graph."""

    n_layers: int
    n_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False

    @classmethod
    def from_cfg(cls, cfg: Any) -> "GraphSpec":
        """From a TransformerLens config or any object/dict with the same field names."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(
            n_layers=int(get("n_layers")),
            n_heads=int(get("n_heads")),
            attn_only=bool(get("attn_only", False) or False),
            parallel_attn_mlp=bool(get("parallel_attn_mlp", False) or False),
        )


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
        self.scores: Float[Tensor, "n_senders n_receivers"] = torch.zeros(len(senders), len(receivers))
        self.in_graph: Bool[Tensor, "n_senders n_receivers"] = self.mask.clone()

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
        """Raise if this graph was built for a model of another shape."""
        other = GraphSpec.from_cfg(model.cfg)
        if other != self.spec:
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
        """The score matrix flattened to the fixed edge order."""
        return self.scores[self.edge_sender, self.edge_receiver]

    def set_edge_scores(self, values: Float[Tensor, " n_edges"]) -> None:
        if values.shape != (self.n_edges,):
            raise GraphError(f"expected {self.n_edges} edge scores, got shape {tuple(values.shape)}")
        self.scores = torch.zeros(self.n_senders, self.n_receivers, dtype=values.dtype)
        self.scores[self.edge_sender, self.edge_receiver] = values.detach().cpu()

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
        """Keep the k best edges in the graph (``in_graph``), by the current scores."""
        self.in_graph = torch.zeros_like(self.mask)
        idx = self.topk(k, absolute=absolute)
        self.in_graph[self.edge_sender[idx], self.edge_receiver[idx]] = True

    # ------------------------------------------------------------------- I/O
    def to_json(self, path: str | Path) -> None:
        """Save in the EAP-IG/MIB graph format: {cfg, nodes: {name: in_graph}, edges: {name: {score, in_graph}}}."""
        scores = self.edge_scores().tolist()
        in_graph = self.in_graph[self.edge_sender, self.edge_receiver].tolist()
        active = set()
        for name, keep in zip(self.edge_names, in_graph):
            if keep:
                u, v = name.split("->")
                active.update((u, v.split("<")[0]))
        nodes = {n: n in active for n in dict.fromkeys(self.senders + [r.split("<")[0] for r in self.receivers])}
        edges = {
            name: {"score": (None if s != s else float(s)), "in_graph": bool(g)}
            for name, s, g in zip(self.edge_names, scores, in_graph)
        }
        Path(path).write_text(json.dumps({"cfg": asdict(self.spec), "nodes": nodes, "edges": edges}))

    @classmethod
    def from_json(cls, path: str | Path) -> "Graph":
        data = json.loads(Path(path).read_text())
        graph = cls(GraphSpec(**data["cfg"]))
        names = graph.edge_names
        if set(data["edges"]) != set(names):
            raise GraphError(f"{path}: edge names do not match a graph of {graph.spec}")
        edges = data["edges"]
        vals = torch.tensor([float("nan") if edges[n]["score"] is None else edges[n]["score"] for n in names])
        graph.set_edge_scores(vals)
        keep = torch.tensor([bool(edges[n]["in_graph"]) for n in names])
        graph.in_graph = torch.zeros_like(graph.mask)
        graph.in_graph[graph.edge_sender[keep], graph.edge_receiver[keep]] = True
        return graph

    def save(self, path: str | Path) -> None:
        """Save spec, score matrix and in_graph mask as a torch tensor file."""
        torch.save({"spec": asdict(self.spec), "scores": self.scores, "in_graph": self.in_graph}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        data = torch.load(path, weights_only=True)
        graph = cls(GraphSpec(**data["spec"]))
        graph.scores, graph.in_graph = data["scores"], data["in_graph"]
        return graph

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
            chosen = []
            for kd in dict.fromkeys(kinds):
                pool = torch.tensor([i for i, x in enumerate(kinds) if x == kd])
                take = max(1, round(k * len(pool) / self.n_edges))
                chosen.append(pool[torch.randperm(len(pool), generator=gen)[:take]])
            return torch.cat(chosen).sort().values
        if isinstance(spec, (Sequence, Tensor)):
            return _unique_sorted(self.edge_index(spec), "edge")
        raise GraphError(f"cannot interpret edge spec {spec!r}")


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
