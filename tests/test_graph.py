"""The edge graph: counts, order, names, selection and file formats."""

from __future__ import annotations

import json

import pytest
import torch

from eap.graph import Graph, GraphError, GraphSpec


def closed_form_edges(L: int, H: int, attn_only: bool = False, parallel: bool = False) -> int:
    """Edge count from first principles: each receiver reads every sender written before it."""
    per_layer = H + (0 if attn_only else 1)  # senders written by one layer
    total = 0
    for layer in range(L):
        before = 1 + layer * per_layer  # input + all earlier layers
        total += 3 * H * before  # q, k, v of every head
        if not attn_only:
            total += before + (0 if parallel else H)  # the MLP also sees its own layer's heads
    return total + 1 + L * per_layer  # logits read everything


def test_gpt2_small_counts():
    g = Graph.from_cfg(dict(n_layers=12, n_heads=12))
    assert (g.n_senders, g.n_receivers, g.n_edges) == (157, 445, 32491)


@pytest.mark.parametrize(
    "L,H,attn_only,parallel",
    [(1, 1, False, False), (2, 4, False, False), (4, 8, False, False), (3, 5, True, False), (6, 8, False, True),
     (24, 16, False, False)],
)
def test_counts_follow_the_rule(L, H, attn_only, parallel):
    g = Graph(GraphSpec(L, H, attn_only, parallel))
    assert g.n_edges == closed_form_edges(L, H, attn_only, parallel)
    assert g.n_edges == int(g.mask.sum())


def test_published_counts_of_other_models():
    # field notes: gpt2-medium 231,877; pythia-70m (6 layers, 8 heads, parallel) 3,580
    assert Graph(GraphSpec(24, 16)).n_edges == 231_877
    assert Graph(GraphSpec(6, 8, parallel_attn_mlp=True)).n_edges == 3_580


def test_edges_respect_residual_order():
    """u -> v exactly when u is written before v reads, checked by explicit times."""
    g = Graph(GraphSpec(3, 2))

    def write_time(s):  # input at 0; layer l: heads at 2l+1, mlp at 2l+2
        if s == "input":
            return 0
        layer = int(s[1:].split(".")[0])
        return 2 * layer + (1 if s.startswith("a") else 2)

    def read_time(r):  # layer l: q/k/v read at 2l+0.5, mlp at 2l+1.5; logits at the end
        if r == "logits":
            return 99
        layer = int(r[1:].split(".")[0].split("<")[0])
        return 2 * layer + (0.5 if r.startswith("a") else 1.5)

    expected = torch.tensor([[write_time(s) < read_time(r) for r in g.receivers] for s in g.senders])
    assert torch.equal(g.mask, expected)


def test_names_and_order():
    g = Graph(GraphSpec(2, 2))
    assert g.senders == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert g.receivers[:7] == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0"]
    assert g.receivers[-1] == "logits"
    assert g.edge_names[0] == "input->a0.h0<q>"
    assert g.edge_names[-1] == "m1->logits"
    assert "a0.h1->a1.h0<k>" in g.edge_names and "input->m0" in g.edge_names
    assert "a1.h0->a1.h1<q>" not in g.edge_names  # same layer heads do not talk
    # edge order is the row-major order of the mask
    s, r = g.mask.nonzero().T
    assert torch.equal(g.edge_sender, s) and torch.equal(g.edge_receiver, r)
    assert g.edge_kind[0] == "q" and g.edge_kind[-1] == "logits"


def test_edge_index_and_topk():
    g = Graph(GraphSpec(2, 2))
    idx = g.edge_index(["input->m0", 3])
    assert g.edge_names[idx[0]] == "input->m0" and idx[1] == 3
    with pytest.raises(GraphError, match="unknown edge name"):
        g.edge_index(["a9.h9->m0"])
    with pytest.raises(GraphError, match="out of range"):
        g.edge_index([g.n_edges])
    vals = torch.zeros(g.n_edges)
    vals[[4, 7, 9]] = torch.tensor([0.5, -2.0, 1.0])
    vals[0] = float("nan")
    assert g.topk(3, vals).tolist() == [7, 9, 4]
    assert g.topk(1, vals, absolute=False).tolist() == [9]


def test_select_senders():
    g = Graph(GraphSpec(2, 2))
    assert g.select_senders("all").tolist() == list(range(g.n_senders))
    assert g.select_senders(["m1", "input", 2]).tolist() == [0, 2, 6]
    with pytest.raises(GraphError, match="unknown sender name"):
        g.select_senders(["a7.h0"])
    with pytest.raises(GraphError, match="duplicates"):
        g.select_senders(["m0", 3])
    with pytest.raises(GraphError, match="bad node spec"):
        g.select_senders("top:3")


def test_select_edges_specs():
    g = Graph(GraphSpec(3, 4))
    assert torch.equal(g.select_edges("all"), torch.arange(g.n_edges))
    a = g.select_edges("sample:50", seed=1)
    assert a.numel() == 50 and a.unique().numel() == 50 and torch.equal(a, g.select_edges("sample:50", seed=1))
    assert not torch.equal(a, g.select_edges("sample:50", seed=2))
    strat = g.select_edges("stratified:60", seed=0)
    kinds = {g.edge_kind[i] for i in strat.tolist()}
    assert kinds == {"q", "k", "v", "mlp", "logits"}
    scores = torch.arange(g.n_edges, dtype=torch.float) - 100
    assert g.select_edges("topk:2", scores).tolist() == [g.n_edges - 2, g.n_edges - 1]
    for bad in ["topk:x", "best:3", "sample:0"]:
        with pytest.raises(GraphError, match="bad edge spec"):
            g.select_edges(bad, scores)
    with pytest.raises(GraphError, match="needs scores"):
        g.select_edges("topk:3")
    with pytest.raises(GraphError, match="duplicates"):
        g.select_edges([1, 1])


def test_json_and_tensor_roundtrip(tmp_path):
    g = Graph(GraphSpec(2, 3, d_model=12))
    vals = torch.randn(g.n_edges, generator=torch.Generator().manual_seed(0))
    g.set_edge_scores(vals)
    g.apply_topk(5)
    g.to_json(tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert set(data) == {"cfg", "nodes", "edges"}
    assert len(data["edges"]) == g.n_edges
    assert sum(e["in_graph"] for e in data["edges"].values()) == 5
    name = g.edge_names[3]
    assert data["edges"][name]["score"] == pytest.approx(float(vals[3]))
    back = Graph.from_json(tmp_path / "g.json")
    torch.testing.assert_close(back.edge_scores(), vals)
    assert torch.equal(back.in_graph, g.in_graph)
    assert back.spec.d_model == 12
    g.save(tmp_path / "g.pt")
    back = Graph.load(tmp_path / "g.pt")
    torch.testing.assert_close(back.edge_scores(), vals)
    assert torch.equal(back.in_graph, g.in_graph)


def test_graph_checks_model(tiny_model):
    g = Graph.from_model(tiny_model)
    g.check_model(tiny_model)
    with pytest.raises(GraphError, match="graph was built for"):
        Graph(GraphSpec(3, 2)).check_model(tiny_model)
