"""The shape facts of an edge graph (``GraphSpec``), its hook groups (``HookGroup``) and its error
type (``GraphError``): what ``eap.graph`` and the graph file reader/writer (``eap.graph_io``) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
