"""Graph files: EAP-IG 2.0.0's JSON and ``.pt`` formats (commit 795f5607, the package MIB's circuit
track uses), read and written for ``eap.graph.Graph`` (whose ``to_json`` / ``from_json`` /
``to_pt`` / ``from_pt`` call this module). Format, semantics and differences: docs/graph-format.md.

Besides EAP-IG's keys, a file's ``cfg`` records the model it was made for under
:data:`MODEL_KEY` (EAP-IG keeps unknown cfg keys and ignores them): the model's name or path,
its family and a weights probe (:func:`model_identity`). Reading a file with ``model=`` (and
``Graph.check_model``, which attribution and patching call, for a graph read from a file)
refuses a file recorded for another model of the same shape; a file without the key (EAP-IG's,
or one written from a graph built without a model) loads with a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.graph_spec import GraphError, GraphSpec

#: An ``eap.graph.Graph`` (not imported: ``eap.graph`` imports this module; readers get the class).
Graph = Any

__all__ = [
    "MODEL_KEY", "check_circuit", "check_model_identity", "model_identity", "read_json", "read_pt", "write_json",
    "write_pt",
]

#: The cfg key of a graph file that records the model (EAP-IG ignores it and writes it back).
MODEL_KEY = "eap_bench_model"
_PROBES, _PROBE_SIZE, _PROBE_RTOL = 8, 256, 0.02


# --------------------------------------------------------------------------- model identity
def model_identity(model: Any) -> dict[str, Any] | None:
    """What identifies a model in a graph file: ``name`` (its name or path as loaded), ``family``
    (the HF architecture), ``n_params`` and ``weights_probe``: sum of |w| over the first 256
    values of 8 parameters spread over the model (float64; a fingerprint that survives a change
    of device or dtype, compared with 2% tolerance). None for an object without parameters."""
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    if not params:
        return None
    cfg = model.cfg
    picks = sorted({round(i * (len(params) - 1) / (_PROBES - 1)) for i in range(_PROBES)})
    probe = [float(params[i].detach().flatten()[:_PROBE_SIZE].double().abs().sum()) for i in picks]
    name = getattr(cfg, "model_name", None)
    family = getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None)
    return {"name": None if name is None else str(name), "family": None if family is None else str(family),
            "n_params": int(sum(p.numel() for p in params)), "weights_probe": probe}


def check_model_identity(recorded: dict[str, Any], model: Any, where: Any) -> None:
    """A ``GraphError`` when the model a file recorded (``recorded``) is not ``model``: another
    family, parameter count or weights probe. The name alone decides nothing (paths differ
    between machines)."""
    now = model_identity(model)
    if now is None:
        return
    problems = []
    if recorded.get("family") != now["family"]:
        problems.append(f"family {recorded.get('family')!r} vs {now['family']!r}")
    if recorded.get("n_params") != now["n_params"]:
        problems.append(f"{recorded.get('n_params')} vs {now['n_params']} parameters")
    old = recorded.get("weights_probe")
    if not problems and (not isinstance(old, list) or len(old) != len(now["weights_probe"]) or any(
            abs(a - b) > _PROBE_RTOL * max(abs(a), abs(b)) + 1e-6 for a, b in zip(old, now["weights_probe"]))):
        problems.append("other weights")
    if problems:
        raise GraphError(
            f"{where}: this graph file was written for the model {recorded.get('name')!r} "
            f"({recorded.get('family')}), not for {now['name']!r} ({now['family']}): {'; '.join(problems)}. "
            "The edges have the same names, but the scores and the circuit belong to the other model; use the file "
            "with the model it was made for"
        )


def _take_identity(graph: Graph, cfg: dict, path: Any, model: Any) -> None:
    """Set ``graph.model_id`` from a file's cfg (warn when it has none); check it against ``model``."""
    recorded = cfg.get(MODEL_KEY)
    if recorded is None:
        warnings.warn(
            f"{path}: the graph file records no model (written by EAP-IG, or from a graph built without a model): "
            "nothing checks that it belongs to the model it is used with",
            UserWarning, stacklevel=4,
        )
        return
    if not isinstance(recorded, dict):
        raise GraphError(f"{path}: cfg[{MODEL_KEY!r}] must be a dict (name, family, n_params, weights_probe)")
    graph.model_id, graph.model_id_from_file = recorded, True
    if model is not None:
        check_model_identity(recorded, model, path)


# --------------------------------------------------------------------------- circuits
def check_circuit(graph: Graph, circuit: bool | None, path: Any) -> None:
    """Writing a file whose circuit holds every edge: a warning (``circuit=None``), an error
    (``circuit=True``) or nothing (``circuit=False``, a file of scores). EAP-IG and MIB read a
    file's ``in_graph`` as the circuit: the whole model is rarely what was meant."""
    if circuit is False or not bool((graph.in_graph | ~graph.mask).all()):
        return
    msg = (f"{path}: every one of the {graph.n_edges} edges is in the graph, so the file's circuit is the whole "
           "model; choose a circuit first (graph.apply_topn(n) or graph.apply_topk(k)), or write a file of scores "
           "only with circuit=False")
    if circuit:
        raise GraphError(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)


# --------------------------------------------------------------------------- JSON and .pt
def file_cfg(graph: Graph) -> dict[str, Any]:
    """A file's ``cfg``: EAP-IG's keys, ``attn_only`` only when true (EAP-IG has no such
    graphs), then ``extra_cfg`` (keys read from a file, written back)."""
    s = graph.spec
    cfg: dict[str, Any] = {"n_layers": s.n_layers, "n_heads": s.n_heads, "parallel_attn_mlp": s.parallel_attn_mlp}
    if s.d_model is not None:
        cfg["d_model"] = s.d_model
    if s.attn_only:
        cfg["attn_only"] = True
    if graph.model_id is not None:
        cfg[MODEL_KEY] = graph.model_id
    for key, value in graph.extra_cfg.items():
        cfg.setdefault(key, value)
    return cfg


def neuron_block(graph: Graph, values: Tensor, node: int) -> list:
    """A node's neuron entry as EAP-IG writes it: a head gets its layer's block of heads
    ``[n_heads][d_model]`` (EAP-IG indexes head neurons with the layer's slice), any other
    node its own row ``[d_model]``."""
    group = next(g for g in graph.sender_groups if g.start <= node < g.start + g.size)
    if group.kind == "head":
        return values[group.start : group.start + group.size].tolist()
    return values[node].tolist()


def write_json(graph: Graph, path: str | Path, *, circuit: bool | None = None) -> None:
    """Write the EAP-IG/MIB JSON graph file, as EAP-IG 2.0.0's ``Graph.to_json`` does and its
    ``Graph.from_json`` reads it: ``{"cfg": {n_layers, n_heads, parallel_attn_mlp, d_model},
    "nodes": {name: {"in_graph": bool[, "score": float][, "neurons": [...],
    "neurons_scores": [...]]}}, "edges": {name: {"score": float, "in_graph": bool}}}``.

    Nodes are the senders plus ``logits`` (always in). Scores are in the metric's units; NaN
    is written as the literal ``NaN``, as EAP-IG's ``json.dump`` does (Python reads it back;
    strict JSON parsers must allow it). Without a known ``d_model`` (graph not built from a
    model) the file lacks it, and EAP-IG cannot read it: a warning says so. ``circuit``: see
    :func:`check_circuit`; the ``cfg`` records the model (:data:`MODEL_KEY`).
    """
    check_circuit(graph, circuit, path)
    if graph.spec.d_model is None:
        warnings.warn(
            "graph has no d_model (build it with Graph.from_model or GraphSpec(d_model=...)): the JSON file "
            "lacks it and EAP-IG's Graph.from_json will fail with KeyError 'd_model'",
            UserWarning, stacklevel=3,
        )
    nodes: dict[str, dict[str, Any]] = {}
    node_in = graph.nodes_in_graph.tolist()
    node_scores = None if graph.node_scores is None else graph.node_scores.tolist()
    for i, name in enumerate(graph.senders):
        entry: dict[str, Any] = {"in_graph": bool(node_in[i])}
        if node_scores is not None:
            entry["score"] = float(node_scores[i])
        if graph.neurons_in_graph is not None:
            entry["neurons"] = neuron_block(graph, graph.neurons_in_graph, i)
        if graph.neuron_scores is not None:
            entry["neurons_scores"] = neuron_block(graph, graph.neuron_scores, i)
        nodes[name] = entry
    nodes["logits"] = {"in_graph": True}
    scores = graph.edge_scores().detach().cpu().tolist()
    in_graph = graph.in_graph[graph.edge_sender, graph.edge_receiver].tolist()
    edges = {
        name: {"score": float(s), "in_graph": bool(g)} for name, s, g in zip(graph.edge_names, scores, in_graph)
    }
    Path(path).write_text(json.dumps({"cfg": file_cfg(graph), "nodes": nodes, "edges": edges}))


def read_json(cls: type, path: str | Path, model: Any = None) -> Graph:
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
    graph = from_file_cfg(cls, data["cfg"], path)
    _take_identity(graph, data["cfg"], path, model)
    edges = data["edges"]
    if not isinstance(edges, dict):
        raise GraphError(f"{path}: 'edges' must map edge names to {{'score', 'in_graph'}}")
    check_edge_names(graph, list(edges), path)
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
    read_json_nodes(graph, data["nodes"], path)
    return graph


def read_json_nodes(graph: Graph, nodes: Any, path: str | Path) -> None:
    if not isinstance(nodes, dict):
        raise GraphError(f"{path}: 'nodes' must map node names to {{'in_graph': bool, ...}}")
    sender_index = {name: i for i, name in enumerate(graph.senders)}
    node_in = torch.zeros(graph.n_senders, dtype=torch.bool)
    scores = torch.full((graph.n_senders,), float("nan"), dtype=torch.float64)
    neuron_fields: dict[str, Tensor] = {}
    any_score = False
    for name, entry in nodes.items():
        if name == "logits":
            continue
        if name not in sender_index:
            raise GraphError(
                f"{path}: unknown node {name!r}: a graph of {graph.spec} has the nodes "
                f"{graph.senders[0]}, {graph.senders[1]}, ..., {graph.senders[-1]} and logits"
            )
        i = sender_index[name]
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
                    if graph.spec.d_model is None:
                        raise GraphError(f"{where} has {key!r} but the cfg has no d_model")
                    neuron_fields[key] = torch.full((graph.n_senders, graph.spec.d_model), float("nan"), dtype=torch.float64)
                neuron_fields[key][i] = neuron_row(graph, entry[key], i, f"{where} {key!r}")
    graph.nodes_in_graph = node_in
    graph.node_scores = _exact(scores) if any_score else None
    if "neurons" in neuron_fields:
        graph.neurons_in_graph = neuron_fields["neurons"].nan_to_num(0.0) != 0
    if "neurons_scores" in neuron_fields:
        graph.neuron_scores = _exact(neuron_fields["neurons_scores"])


def neuron_row(graph: Graph, value: Any, node: int, where: str) -> Float[Tensor, " d_model"]:
    """One node's neurons from a file entry: ``[d_model]``, or for a head EAP-IG's layer block
    ``[n_heads][d_model]`` (its row for this head)."""
    try:
        values = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise GraphError(f"{where}: not a list of numbers ({exc})") from exc
    group = next(g for g in graph.sender_groups if g.start <= node < g.start + g.size)
    d = graph.spec.d_model
    if values.shape == (d,):
        return values
    if group.kind == "head" and values.shape == (group.size, d):
        return values[node - group.start]
    raise GraphError(f"{where}: expected {d} values per node (a head: also [{group.size}, {d}]), got shape {tuple(values.shape)}")


def check_edge_names(graph: Graph, names: list[str], path: str | Path) -> None:
    listed = set(names)
    known = set(graph.edge_names)
    unknown = [n for n in names if n not in known]
    missing = [n for n in graph.edge_names if n not in listed]
    if unknown or missing:
        raise GraphError(
            f"{path}: the edges do not match the cfg ({graph.spec}, {graph.n_edges} edges): {len(unknown)} "
            f"listed edges are not in such a graph {unknown[:3]}, {len(missing)} of its edges are not listed "
            f"{missing[:3]}"
        )


def from_file_cfg(cls: type, cfg: Any, path: str | Path) -> Graph:
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
    graph.extra_cfg = {k: v for k, v in cfg.items() if k not in _CFG_KEYS and k != MODEL_KEY}
    return graph


def write_pt(graph: Graph, path: str | Path, *, circuit: bool | None = None) -> None:
    """Write EAP-IG's ``.pt`` graph file, as EAP-IG 2.0.0's ``Graph.to_pt`` does and its
    ``Graph.from_pt`` reads it: a dict of ``cfg``, ``src_nodes`` (senders), ``dst_nodes``
    (receivers), ``edges_scores`` ``[n_src, n_dst]`` (scores' dtype, metric units),
    ``edges_in_graph`` and ``nodes_in_graph`` ``[n_src]`` (bool), and when present
    ``nodes_scores``, ``neurons_in_graph``, ``neurons_scores`` ``[n_src, d_model]``.

    EAP-IG's reader indexes the tensors by its own dense layout and ignores the names, so the
    tensors are laid out in that order by name; an attention-only graph gets EAP-IG's MLP rows
    and columns empty (zero, false, NaN scores). ``circuit``: see :func:`check_circuit`; the
    ``cfg`` records the model (:data:`MODEL_KEY`)."""
    check_circuit(graph, circuit, path)
    src, dst = _eapig_layout(graph.spec.n_layers, graph.spec.n_heads)
    rows = _positions(graph.senders, src, "src_nodes", "EAP-IG's layout")
    cols = _positions(graph.receivers, dst, "dst_nodes", "EAP-IG's layout")
    scores = torch.zeros(len(src), len(dst), dtype=graph.scores.dtype)
    scores[rows[:, None], cols[None, :]] = torch.where(graph.mask, graph.scores.detach().cpu(), 0)
    in_graph = torch.zeros(len(src), len(dst), dtype=torch.bool)
    in_graph[rows[:, None], cols[None, :]] = graph.in_graph.cpu() & graph.mask
    data: dict[str, Any] = {
        "cfg": file_cfg(graph), "src_nodes": src, "dst_nodes": dst, "edges_scores": scores,
        "edges_in_graph": in_graph, "nodes_in_graph": _spread(graph.nodes_in_graph, rows, len(src), False),
    }
    if graph.node_scores is not None:
        data["nodes_scores"] = _spread(graph.node_scores, rows, len(src), float("nan"))
    if graph.neurons_in_graph is not None:
        data["neurons_in_graph"] = _spread(graph.neurons_in_graph, rows, len(src), False)
    if graph.neuron_scores is not None:
        data["neurons_scores"] = _spread(graph.neuron_scores, rows, len(src), float("nan"))
    torch.save(data, path)


def read_pt(cls: type, path: str | Path, model: Any = None) -> Graph:
    """Read a ``.pt`` graph file written by EAP-IG/MIB or by ``to_pt`` (also this
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
        return from_legacy_pt(cls, data, path)
    required = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
    missing = [k for k in required if k not in data]
    if missing:
        raise GraphError(f"{path}: not an EAP-IG graph file: missing {missing} (found {sorted(data)})")
    graph = from_file_cfg(cls, data["cfg"], path)
    _take_identity(graph, data["cfg"], path, model)
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


def from_legacy_pt(cls: type, data: dict, path: str | Path) -> Graph:
    """This package's ``.pt`` files before EAP-IG's format: ``{"spec", "scores", "in_graph"}``
    as dense ``[n_senders, n_receivers]`` tensors; nodes = endpoints of in-graph edges."""
    graph = from_file_cfg(cls, data["spec"], path)
    shape = (graph.n_senders, graph.n_receivers)
    graph.scores = _tensor(data.get("scores"), shape, f"{path}: scores", floating=True)
    graph.in_graph = _tensor(data.get("in_graph"), shape, f"{path}: in_graph").bool() & graph.mask
    has_out, has_in = graph.node_links()
    graph.nodes_in_graph = has_out | has_in
    return graph


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
