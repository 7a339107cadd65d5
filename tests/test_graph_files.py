"""Graph files know their circuit and their model (eap.graph_io): a file whose circuit is every
edge warns, a file of another model with the same shape is refused, an EAP-IG file warns."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import eap
from eap import Graph, GraphError
from eap.graph_io import MODEL_KEY

DATA = Path(__file__).parent / "data" / "eap-ig"


@pytest.fixture(scope="module")
def toys():
    return eap.load_model("toy-llama-4l"), eap.load_model("toy-gpt2-4l")


def _scored(model) -> Graph:
    g = Graph.from_model(model)
    g.set_edge_scores(torch.linspace(-1, 1, g.n_edges))
    return g


def test_writing_every_edge_as_a_circuit_warns(tmp_path, toys):
    g = _scored(toys[0])
    for write, suffix in ((g.to_json, "json"), (g.to_pt, "pt")):
        with pytest.warns(UserWarning, match="every one of the .* edges is in the graph"):
            write(tmp_path / f"all.{suffix}")
        with pytest.raises(GraphError, match="whole model"):
            write(tmp_path / f"strict.{suffix}", circuit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            write(tmp_path / f"scores.{suffix}", circuit=False)  # a file of scores: no warning
    g.apply_topk(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.to_json(tmp_path / "circuit.json")
        g.to_pt(tmp_path / "circuit.pt", circuit=True)
    back = Graph.from_json(tmp_path / "circuit.json", model=toys[0])
    assert int(back.in_graph.sum()) == 20


@pytest.mark.parametrize("suffix", ["json", "pt"])
def test_a_file_of_another_model_with_the_same_shape_is_refused(tmp_path, toys, suffix):
    llama, gpt2 = toys
    assert Graph.from_model(llama).edge_names == Graph.from_model(gpt2).edge_names  # same shape, same edges
    g = _scored(llama)
    g.apply_topk(30)
    path = tmp_path / f"llama.{suffix}"
    (g.to_json if suffix == "json" else g.to_pt)(path)
    read = Graph.from_json if suffix == "json" else Graph.from_pt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = read(path, model=llama)  # its own model: no warning, no error
    assert back.model_id["family"] == "LlamaForCausalLM" and back.model_id == g.model_id
    torch.testing.assert_close(back.edge_scores(), g.edge_scores(), rtol=0, atol=0)
    with pytest.raises(GraphError, match="written for the model .*LlamaForCausalLM.*GPT2LMHeadModel"):
        read(path, model=gpt2)
    loose = read(path)  # read without a model: the check comes when the graph meets one
    loose.check_model(llama)
    with pytest.raises(GraphError, match="written for the model"):
        loose.check_model(gpt2)
    task = eap.tasks.ioi(gpt2, n=2, seed=0)
    with pytest.raises(GraphError, match="written for the model"):
        eap.attribute(gpt2, loose, task, progress=False)


def test_same_family_other_weights_is_refused(tmp_path, toys):
    llama = toys[0]
    g = _scored(llama)
    g.apply_topk(10)
    g.to_json(tmp_path / "a.json")
    other = eap.load_model("toy-llama-4l")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)  # same family, shape and parameter count; other weights
    with pytest.raises(GraphError, match="other weights"):
        Graph.from_json(tmp_path / "a.json", model=other)
    Graph.from_json(tmp_path / "a.json", model=eap.load_model("toy-llama-4l"))  # a fresh load of the same model


@pytest.mark.parametrize("name", ["2l4h.json", "2l4h.pt"])
def test_eapig_files_without_a_model_load_with_a_warning(name):
    read = Graph.from_json if name.endswith(".json") else Graph.from_pt
    with pytest.warns(UserWarning, match="records no model"):
        g = read(DATA / name)
    assert g.model_id is None and not g.model_id_from_file and MODEL_KEY not in g.extra_cfg


def test_save_and_load_are_deprecated_aliases(tmp_path, toys):
    g = _scored(toys[1])
    g.apply_topk(5)
    with pytest.warns(DeprecationWarning, match="to_pt"):
        g.save(tmp_path / "g.pt")
    with pytest.warns(DeprecationWarning, match="from_pt"):
        back = Graph.load(tmp_path / "g.pt")
    torch.testing.assert_close(back.scores, g.scores, rtol=0, atol=0)


def test_graph_module_holds_no_file_io():
    import inspect

    import eap.graph

    src = inspect.getsource(eap.graph)
    assert "json.dumps" not in src and "torch.save" not in src and "torch.load" not in src
    assert src.count("\n") <= 600
