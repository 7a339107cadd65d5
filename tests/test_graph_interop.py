"""Graph files that EAP-IG and MIB read and write, and EAP-IG's circuit selection.

The reference files (``tests/data/eap-ig/``, copied from ``shared/interop/eap-ig/``) were written
by EAP-IG 2.0.0 itself (commit 795f5607): its ``Graph.from_model(cfg)``, standard-normal edge
scores (torch seed 0), ``apply_topn(20, absolute=True)``, then ``to_json`` and ``to_pt``. Their
README's table gives the counts. The expectations below come from the files and that table, and
from small independent reference implementations (reachability for ``prune``, a literal loop for
``apply_greedy``), never from ``eap.graph`` itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eap.graph import Graph, GraphError, GraphSpec

DATA = Path(__file__).resolve().parent / "data" / "eap-ig"
STEMS = ("2l4h", "2l4h-parallel")


def _shared_dir() -> Path | None:
    """``shared/interop/eap-ig`` next to the checkout (or next to any folder above it), if present."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "interop" / "eap-ig"
        if candidate.is_dir():
            return candidate
    return None


SHARED = _shared_dir()
DIRS = [DATA] + ([SHARED] if SHARED is not None else [])


def readme_table(directory: Path) -> dict[str, dict]:
    """The README's table: file stem -> cfg facts and counts."""
    rows = {}
    for line in (directory / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].endswith(".pt") and cells[2].isdigit():
            stem = cells[0].split(".json")[0].split(" /")[0]
            rows[stem] = dict(
                parallel="parallel_attn_mlp True" in cells[1],
                edges=int(cells[2]), edges_in=int(cells[3]), nodes_in=int(cells[4]),
            )
    return rows


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def edge_parts(name: str) -> tuple[str, str]:
    """'a0.h1->a1.h2<q>' -> ('a0.h1', 'a1.h2'): sender node, receiver node."""
    sender, receiver = name.split("->")
    return sender, receiver.split("<")[0]


def on_path_edges(edges: set[str]) -> set[str]:
    """Independent reference for EAP-IG's prune: the edges lying on some path input -> logits."""
    reach_fwd, reach_bwd = {"input"}, {"logits"}
    changed = True
    while changed:
        changed = False
        for e in edges:
            u, v = edge_parts(e)
            if u in reach_fwd and v not in reach_fwd:
                reach_fwd.add(v)
                changed = True
            if v in reach_bwd and u not in reach_bwd:
                reach_bwd.add(u)
                changed = True
    return {e for e in edges if edge_parts(e)[0] in reach_fwd and edge_parts(e)[1] in reach_bwd}


def nodes_of(edges: set[str]) -> set[str]:
    return {n for e in edges for n in edge_parts(e)} - {"logits"}


def in_graph_names(graph: Graph) -> set[str]:
    keep = graph.in_graph[graph.edge_sender, graph.edge_receiver]
    return {n for n, k in zip(graph.edge_names, keep.tolist()) if k}


def node_names(graph: Graph) -> set[str]:
    return {n for n, k in zip(graph.senders, graph.nodes_in_graph.tolist()) if k}


def random_graph(seed: int, parallel: bool = False, L: int = 3, H: int = 3) -> Graph:
    g = Graph.from_cfg(dict(n_layers=L, n_heads=H, parallel_attn_mlp=parallel, d_model=8))
    g.set_edge_scores(torch.randn(g.n_edges, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return g


# --------------------------------------------------------------------------- the files themselves
def test_committed_copies_are_the_shared_files():
    if SHARED is None:
        pytest.skip("no shared/interop/eap-ig next to this checkout (clean clone): the committed copies are used")
    for path in SHARED.iterdir():
        assert (DATA / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("directory", DIRS, ids=lambda d: d.parent.parent.name + "/" + d.name)
@pytest.mark.parametrize("stem", STEMS)
def test_read_eapig_files_counts_and_exact_values(directory, stem):
    table = readme_table(directory)[stem]
    raw = json.loads((directory / f"{stem}.json").read_text())
    pt = load_pt(directory / f"{stem}.pt")
    for graph in (Graph.from_json(directory / f"{stem}.json"), Graph.from_pt(directory / f"{stem}.pt")):
        assert graph.spec == GraphSpec(2, 4, parallel_attn_mlp=table["parallel"], d_model=64)
        assert graph.n_edges == table["edges"] == len(raw["edges"])
        assert int(graph.in_graph.sum()) == table["edges_in"]
        # the table counts EAP-IG's nodes_in_graph (senders); the JSON also lists logits, always in
        assert int(graph.nodes_in_graph.sum()) == table["nodes_in"] == int(pt["nodes_in_graph"].sum())
        assert sum(n["in_graph"] for n in raw["nodes"].values()) == table["nodes_in"] + 1
        # every edge, by name, against the JSON file
        scores = graph.edge_scores().tolist()
        keep = graph.in_graph[graph.edge_sender, graph.edge_receiver].tolist()
        for name, s, k in zip(graph.edge_names, scores, keep):
            assert s == raw["edges"][name]["score"] and k == raw["edges"][name]["in_graph"], name
        assert node_names(graph) == {n for n, d in raw["nodes"].items() if d["in_graph"]} - {"logits"}
        # ... and by name against the .pt file's dense tensors (rows/columns looked up by name)
        for i, s in enumerate(graph.senders):
            r = pt["src_nodes"].index(s)
            assert bool(graph.nodes_in_graph[i]) == bool(pt["nodes_in_graph"][r])
            for j, v in enumerate(graph.receivers):
                c = pt["dst_nodes"].index(v)
                if graph.mask[i, j]:
                    assert graph.scores[i, j] == pt["edges_scores"][r, c]
                    assert graph.in_graph[i, j] == pt["edges_in_graph"][r, c]
        assert graph.scores.dtype == torch.float32  # exactly the file's values, not rounded
        assert graph.node_scores is None and graph.neurons_in_graph is None


@pytest.mark.parametrize("stem", STEMS)
def test_round_trip_reproduces_the_files(stem, tmp_path):
    raw = json.loads((DATA / f"{stem}.json").read_text())
    pt = load_pt(DATA / f"{stem}.pt")
    for graph in (Graph.from_json(DATA / f"{stem}.json"), Graph.from_pt(DATA / f"{stem}.pt")):
        graph.to_json(tmp_path / "g.json")
        graph.to_pt(tmp_path / "g.pt")
        # what we write is what EAP-IG wrote: same JSON content, same .pt keys, types and values
        assert json.loads((tmp_path / "g.json").read_text()) == raw
        ours = load_pt(tmp_path / "g.pt")
        assert list(ours) == list(pt)
        for key, value in pt.items():
            assert type(ours[key]) is type(value), key
            if isinstance(value, torch.Tensor):
                assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
            else:
                assert ours[key] == value, key
        # read -> write -> read is the identity, through either format
        for back in (Graph.from_json(tmp_path / "g.json"), Graph.from_pt(tmp_path / "g.pt")):
            assert back.spec == graph.spec
            assert torch.equal(back.scores, graph.scores) and back.scores.dtype == graph.scores.dtype
            assert torch.equal(back.in_graph, graph.in_graph)
            assert torch.equal(back.nodes_in_graph, graph.nodes_in_graph)


def _structure(value):
    """Keys and types, recursively (lists by their element types)."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return ("list", sorted({repr(_structure(v)) for v in value}))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape))
    return type(value).__name__


@pytest.mark.parametrize("stem,parallel", [("2l4h", False), ("2l4h-parallel", True)])
def test_writer_structure_matches_eapig_key_by_key(stem, parallel, tmp_path):
    """A graph built and scored here (not read from the file) is written with EAP-IG's structure."""
    graph = Graph.from_cfg(dict(n_layers=2, n_heads=4, d_model=64, parallel_attn_mlp=parallel))
    graph.set_edge_scores(torch.linspace(-1, 1, graph.n_edges))
    graph.apply_topn(20)
    graph.to_json(tmp_path / "g.json")
    graph.to_pt(tmp_path / "g.pt")
    theirs = json.loads((DATA / f"{stem}.json").read_text())
    ours = json.loads((tmp_path / "g.json").read_text())
    assert list(ours) == list(theirs) == ["cfg", "nodes", "edges"]
    assert ours["cfg"] == theirs["cfg"] and list(ours["cfg"]) == list(theirs["cfg"])
    assert list(ours["nodes"]) == list(theirs["nodes"])  # same names, same order
    assert set(ours["edges"]) == set(theirs["edges"])
    assert _structure(ours) == _structure(theirs)  # every node a {"in_graph": bool}, every edge {"score": float, "in_graph": bool}
    assert all(type(e["score"]) is float and type(e["in_graph"]) is bool for e in ours["edges"].values())
    assert _structure(load_pt(tmp_path / "g.pt")) == _structure(load_pt(DATA / f"{stem}.pt"))


def test_d_model_comes_from_the_model(tiny_model, tmp_path):
    graph = Graph.from_model(tiny_model)
    assert graph.spec.d_model == tiny_model.cfg.d_model == 16
    graph.to_json(tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text())["cfg"]["d_model"] == 16
    # TransformerLens-named dicts still work, with or without d_model
    assert Graph.from_cfg(dict(n_layers=2, n_heads=2)).spec.d_model is None
    assert Graph.from_cfg(dict(n_layers=2, n_heads=2, d_model=16)).spec == graph.spec
    # a graph that does not know d_model fits any width; one that does, only its own
    Graph.from_cfg(dict(n_layers=2, n_heads=2)).check_model(tiny_model)
    with pytest.raises(GraphError, match="graph was built for"):
        Graph.from_cfg(dict(n_layers=2, n_heads=2, d_model=32)).check_model(tiny_model)
    with pytest.warns(UserWarning, match="d_model"):
        Graph(GraphSpec(2, 2)).to_json(tmp_path / "no-width.json")


# ------------------------------------------------------------------ circuit selection (EAP-IG)
@pytest.mark.parametrize("stem", STEMS)
def test_apply_topn_reproduces_eapig(stem):
    """The files hold EAP-IG's apply_topn(20, absolute=True) of their own scores: ours agrees."""
    expected = Graph.from_json(DATA / f"{stem}.json")
    graph = Graph.from_json(DATA / f"{stem}.json")
    graph.in_graph = graph.mask.clone()  # forget the file's circuit; keep its scores
    graph.nodes_in_graph[:] = False
    graph.apply_topn(20, absolute=True)
    assert torch.equal(graph.in_graph, expected.in_graph)
    assert torch.equal(graph.nodes_in_graph, expected.nodes_in_graph)
    # independently: n counts edges before pruning; pruning keeps the top-20 edges on input->logits paths
    top20 = {graph.edge_names[i] for i in graph.edge_scores().abs().argsort(descending=True)[:20].tolist()}
    assert in_graph_names(graph) == on_path_edges(top20) and len(on_path_edges(top20)) < 20
    assert node_names(graph) == nodes_of(on_path_edges(top20))
    graph.apply_topn(20, absolute=True, prune=False)
    assert in_graph_names(graph) == top20


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parallel", [False, True])
def test_prune_keeps_exactly_the_paths_from_input_to_logits(seed, parallel):
    graph = random_graph(seed, parallel)
    gen = torch.Generator().manual_seed(100 + seed)
    for share in (0.05, 0.2, 0.5):
        keep = torch.rand(graph.n_edges, generator=gen) < share
        graph.in_graph = torch.zeros_like(graph.mask)
        graph.in_graph[graph.edge_sender[keep], graph.edge_receiver[keep]] = True
        before = in_graph_names(graph)
        graph.prune()
        assert in_graph_names(graph) == on_path_edges(before)
        assert node_names(graph) == nodes_of(on_path_edges(before))


def greedy_reference(graph: Graph, n: int, absolute: bool) -> set[str]:
    """EAP-IG's greedy, literally: n times, the best edge not yet taken whose receiver's node is in
    the circuit (logits always is); its sender joins the circuit. Then the on-path edges."""
    score = dict(zip(graph.edge_names, graph.edge_scores().tolist()))
    key = (lambda e: abs(score[e])) if absolute else (lambda e: score[e])
    nodes, taken = {"logits"}, set()
    for _ in range(n):
        best = max((e for e in score if e not in taken and edge_parts(e)[1] in nodes), key=key)
        taken.add(best)
        nodes.add(edge_parts(best)[0])
    return on_path_edges(taken)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("absolute", [True, False])
def test_apply_greedy_matches_a_literal_reference(parallel, absolute):
    graph = random_graph(7, parallel)
    for n in (1, 5, 20, 60, graph.n_edges):
        graph.apply_greedy(n, absolute=absolute)
        assert in_graph_names(graph) == greedy_reference(graph, n, absolute), n
    graph.apply_greedy(10.000000000000002)  # MIB passes fraction * n_edges; EAP-IG then takes ceil(n) steps
    assert in_graph_names(graph) == greedy_reference(graph, 11, True)
    graph.apply_greedy(20, prune=False)  # before pruning: exactly n edges, each feeding the circuit
    assert int(graph.in_graph.sum()) == 20


def test_apply_threshold_edges():
    graph = random_graph(3)
    scores = graph.edge_scores().clone()
    scores[5] = float("nan")
    graph.set_edge_scores(scores)
    for threshold in (0.5, 1.0, 2.0):
        graph.apply_threshold(threshold)
        above = {n for n, s in zip(graph.edge_names, scores.tolist()) if abs(s) >= threshold}  # NaN never
        assert in_graph_names(graph) == on_path_edges(above)
        graph.apply_threshold(threshold, absolute=False, prune=False)
        assert in_graph_names(graph) == {n for n, s in zip(graph.edge_names, scores.tolist()) if s >= threshold}


def test_node_level_topn_and_threshold():
    graph = Graph.from_cfg(dict(n_layers=2, n_heads=2, d_model=8))
    # senders: input a0.h0 a0.h1 m0 a1.h0 a1.h1 m1
    graph.set_node_scores(torch.tensor([0.1, -3.0, 0.2, 2.0, float("nan"), 0.05, -1.0]))
    graph.apply_topn(2, level="node", prune=False)  # |score| top 2: a0.h0, m0; a1.h0 unscored: always in
    assert node_names(graph) == {"a0.h0", "m0", "a1.h0"}
    expected = {n for n in graph.edge_names if edge_parts(n)[0] in {"a0.h0", "m0", "a1.h0"}}
    assert in_graph_names(graph) == expected  # every edge out of a kept node
    graph.apply_topn(2, level="node")  # pruned: the input is out, so nothing is fed
    assert in_graph_names(graph) == set() and node_names(graph) == set()
    graph.apply_threshold(0.1, level="node")  # input (0.1), a0.h0, a0.h1, m0, a1.h0 (NaN), m1
    kept = {"input", "a0.h0", "a0.h1", "m0", "a1.h0", "m1"}
    assert in_graph_names(graph) == on_path_edges({n for n in graph.edge_names if edge_parts(n)[0] in kept})
    with pytest.raises(GraphError, match="more than the 6 scored nodes"):
        graph.apply_topn(7, level="node")
    graph.set_node_scores(None)
    with pytest.raises(GraphError, match="needs node scores"):
        graph.apply_topn(1, level="node")


def test_selection_refuses_bad_requests():
    graph = random_graph(0)
    with pytest.raises(GraphError, match="more than the graph's"):
        graph.apply_topn(graph.n_edges + 1)
    with pytest.raises(GraphError, match="integer >= 0"):
        graph.apply_topn(2.5)
    with pytest.raises(GraphError, match="level must be"):
        graph.apply_topn(3, level="neuron")
    with pytest.raises(GraphError, match="more than the graph's"):
        graph.apply_greedy(graph.n_edges + 1)
    scores = graph.edge_scores().clone()
    scores[3] = float("nan")
    graph.set_edge_scores(scores)
    for select in (lambda: graph.apply_topn(5), lambda: graph.apply_greedy(5)):
        with pytest.raises(GraphError, match="1 of .* edge scores are NaN"):
            select()
    graph.apply_topk(5)  # the simple top-k by |score| skips NaN instead
    assert int(graph.in_graph.sum()) == 5 and not graph.in_graph[graph.edge_sender[3], graph.edge_receiver[3]]


# --------------------------------------------------------------------- other file contents
def test_node_scores_and_neurons_round_trip(tmp_path):
    graph = random_graph(1, L=2, H=2)
    graph.set_node_scores(torch.tensor([0.5, float("nan"), -1.0, 2.0, 0.25, -0.5, 1.5]))
    gen = torch.Generator().manual_seed(0)
    graph.neurons_in_graph = torch.rand(graph.n_senders, 8, generator=gen) < 0.5
    graph.neuron_scores = torch.randn(graph.n_senders, 8, generator=gen)
    graph.apply_topn(10)
    graph.to_json(tmp_path / "g.json")
    graph.to_pt(tmp_path / "g.pt")
    raw = json.loads((tmp_path / "g.json").read_text())
    assert math.isnan(raw["nodes"]["a0.h0"]["score"]) and raw["nodes"]["m0"]["score"] == 2.0
    assert len(raw["nodes"]["a0.h1"]["neurons"]) == 2  # a head: EAP-IG's block of its layer's heads
    assert raw["nodes"]["a0.h1"]["neurons"][1] == graph.neurons_in_graph[2].tolist()
    assert raw["nodes"]["m0"]["neurons_scores"] == graph.neuron_scores[3].tolist()
    for back in (Graph.from_json(tmp_path / "g.json"), Graph.from_pt(tmp_path / "g.pt")):
        torch.testing.assert_close(back.node_scores, graph.node_scores, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(back.neurons_in_graph, graph.neurons_in_graph)
        assert torch.equal(back.neuron_scores, graph.neuron_scores)
        assert torch.equal(back.scores, graph.scores) and back.scores.dtype == torch.float64  # float64 kept exactly
        assert torch.equal(back.in_graph, graph.in_graph) and torch.equal(back.nodes_in_graph, graph.nodes_in_graph)


def test_extra_cfg_keys_null_scores_and_attention_only(tmp_path):
    raw = json.loads((DATA / "2l4h.json").read_text())
    raw["cfg"]["model_name"] = "gpt2-2l"
    first = next(iter(raw["edges"]))
    raw["edges"][first]["score"] = None
    (tmp_path / "x.json").write_text(json.dumps(raw))
    graph = Graph.from_json(tmp_path / "x.json")
    assert graph.extra_cfg == {"model_name": "gpt2-2l"} and math.isnan(graph.edge_scores()[graph.edge_index([first])])
    graph.to_json(tmp_path / "y.json")
    assert json.loads((tmp_path / "y.json").read_text())["cfg"]["model_name"] == "gpt2-2l"
    # attention-only graphs (no EAP-IG equivalent) round-trip; in .pt EAP-IG's MLP slots stay empty
    g = Graph.from_cfg(dict(n_layers=2, n_heads=2, attn_only=True, d_model=8))
    g.set_edge_scores(torch.randn(g.n_edges, generator=torch.Generator().manual_seed(0)))
    g.apply_topk(6)
    g.to_pt(tmp_path / "a.pt")
    data = load_pt(tmp_path / "a.pt")
    assert data["cfg"]["attn_only"] is True and "m0" in data["src_nodes"] and not data["edges_scores"][3].any()
    back = Graph.from_pt(tmp_path / "a.pt")
    assert back.spec == g.spec and torch.equal(back.scores, g.scores) and torch.equal(back.in_graph, g.in_graph)


def test_old_eap_bench_files_still_load(tmp_path):
    """Files written before EAP-IG's format: nodes as bare booleans, no d_model, null scores;
    .pt files as {"spec", "scores", "in_graph"}."""
    graph = Graph(GraphSpec(2, 2))
    names = graph.edge_names
    old = {
        "cfg": {"n_layers": 2, "n_heads": 2, "attn_only": False, "parallel_attn_mlp": False},
        "nodes": {n: n in ("input", "a0.h1", "logits") for n in graph.senders + ["logits"]},
        "edges": {n: {"score": None if i == 0 else i / 8, "in_graph": n in ("input->a0.h1<v>", "a0.h1->logits")}
                  for i, n in enumerate(names)},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = Graph.from_json(tmp_path / "old.json")
    assert back.spec == GraphSpec(2, 2) and math.isnan(back.edge_scores()[0])
    assert back.edge_scores()[1:].tolist() == [i / 8 for i in range(1, len(names))]
    assert in_graph_names(back) == {"input->a0.h1<v>", "a0.h1->logits"} and node_names(back) == {"input", "a0.h1"}
    scores = torch.arange(graph.n_senders * graph.n_receivers, dtype=torch.float32).view(graph.n_senders, -1) * graph.mask
    torch.save({"spec": {"n_layers": 2, "n_heads": 2, "attn_only": False, "parallel_attn_mlp": False},
                "scores": scores, "in_graph": graph.mask & (scores > 100)}, tmp_path / "old.pt")
    back = Graph.load(tmp_path / "old.pt")
    assert torch.equal(back.scores, scores) and torch.equal(back.in_graph, graph.mask & (scores > 100))


# ------------------------------------------------------------------------ negative controls
def test_files_whose_cfg_does_not_match_their_edges_are_refused(tmp_path):
    for stem, flip in (("2l4h", True), ("2l4h-parallel", False)):
        raw = json.loads((DATA / f"{stem}.json").read_text())
        raw["cfg"]["parallel_attn_mlp"] = flip
        (tmp_path / "bad.json").write_text(json.dumps(raw))
        with pytest.raises(GraphError, match="edges do not match the cfg"):
            Graph.from_json(tmp_path / "bad.json")
    raw = json.loads((DATA / "2l4h.json").read_text())
    raw["cfg"]["n_layers"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(GraphError, match="edges do not match the cfg"):
        Graph.from_json(tmp_path / "bad.json")
    # .pt: the sequential file's a0.hX -> m0 scores are not edges of a parallel graph
    data = load_pt(DATA / "2l4h.pt")
    data["cfg"] = dict(data["cfg"], parallel_attn_mlp=True)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(GraphError, match=r"a0\.h0->m0, which is not an edge"):
        Graph.from_pt(tmp_path / "bad.pt")
    data = load_pt(DATA / "2l4h.pt")
    data["cfg"] = dict(data["cfg"], n_layers=3)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(GraphError, match="src_nodes lacks"):
        Graph.from_pt(tmp_path / "bad.pt")


def test_malformed_files_are_refused(tmp_path):
    raw = json.loads((DATA / "2l4h.json").read_text())
    cases = {
        "no-edges": {k: v for k, v in raw.items() if k != "edges"},
        "bad-cfg": dict(raw, cfg=dict(raw["cfg"], n_layers="2")),
        "bad-node": dict(raw, nodes=dict(raw["nodes"], m0={"score": 1.0})),
        "unknown-node": dict(raw, nodes=dict(raw["nodes"], m7={"in_graph": True})),
        "bad-edge": dict(raw, edges=dict(raw["edges"], **{"input->m0": {"score": "big", "in_graph": True}})),
    }
    messages = {"no-edges": "top-level keys", "bad-cfg": "positive integer", "bad-node": "must map to",
                "unknown-node": "unknown node 'm7'", "bad-edge": "score must be a number"}
    for name, content in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        with pytest.raises(GraphError, match=messages[name]):
            Graph.from_json(tmp_path / f"{name}.json")
    data = load_pt(DATA / "2l4h.pt")
    del data["edges_in_graph"]
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(GraphError, match=r"missing \['edges_in_graph'\]"):
        Graph.from_pt(tmp_path / "bad.pt")


# ---------------------------------------------------------------------- validation's CLI
@pytest.fixture(scope="module")
def model_dir_2l4h(tmp_path_factory):
    """A saved random GPT-2 with EAP-IG's files' shape: 2 layers, 4 heads, d_model 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from eap.tasks.ioi import word_level_tokenizer

    tokenizer = word_level_tokenizer()
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_inner=256, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-2l4h")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_validation_cli_ranks_by_an_eapig_file(model_dir_2l4h, suffix, tmp_path):
    import validation
    from validation.__main__ import main

    scores_file = DATA / f"2l4h{suffix}"
    argv = ["--model", str(model_dir_2l4h), "--device", "cpu", "--n", "4", "--edges", "topk:3", "--no-progress",
            "--scores", str(scores_file), "--out", str(tmp_path / "r.pt")]
    assert main(argv) == 0
    measured = (~torch.isnan(validation.load_values(tmp_path / "r.pt"))).nonzero().flatten().tolist()
    graph = Graph.from_cfg(dict(n_layers=2, n_heads=4))
    raw = json.loads((DATA / "2l4h.json").read_text())["edges"]
    top3 = sorted(raw, key=lambda n: abs(raw[n]["score"]), reverse=True)[:3]
    assert {graph.edge_names[i] for i in measured} == set(top3)
    with pytest.raises(GraphError, match="graph was built for"):  # the file's d_model is 64, not 32
        main(["--model", "random:gpt2-tiny", "--device", "cpu", "--n", "4", "--edges", "topk:3", "--no-progress",
              "--scores", str(scores_file), "--out", str(tmp_path / "r2.pt")])
