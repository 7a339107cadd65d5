"""Beyond GPT-2: a Pythia-style model (parallel attention/MLP, rotary positions).

The graph gives a layer's MLP the same senders as its attention; attribution must still equal
the independent directional derivatives, and exact patching (which falls back from the GPT-2
block runner to the hook path for rotary models) must converge to it as the patch shrinks.
"""

from __future__ import annotations

import pytest
import torch

import validation
from eap import Graph, attribute, random_model

from conftest import random_task
from test_attribute import reference_scores


@pytest.fixture(scope="module")
def neox():
    return random_model(dict(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=64), seed=2,
                        device="cpu", dtype=torch.float64, arch="gpt-neox")


def test_parallel_graph(neox):
    assert neox.cfg.parallel_attn_mlp
    g = Graph.from_model(neox)
    # m0 reads only the input (not layer 0's heads): parallel blocks
    assert "input->m0" in g.edge_names and "a0.h0->m0" not in g.edge_names and "a0.h0->m1" in g.edge_names


def test_eap_matches_directional_derivative_on_parallel_rotary_model(neox):
    g = Graph.from_model(neox)
    task = random_task(neox, n=3, seq=6, seed=4)
    ref = reference_scores(neox, g, task)[g.edge_sender, g.edge_receiver]
    got = attribute(neox, g, task, progress=False)
    mlp = torch.tensor([k == "mlp" for k in g.edge_kind])
    assert ref[mlp].abs().max() > 1e-6  # MLP receivers are live in the parallel block
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * ref.abs().max())


def test_exact_hook_path_converges_to_eap(neox):
    g = Graph.from_model(neox)
    task = random_task(neox, n=3, seq=6, seed=4)
    eps = 1e-4
    with pytest.warns(UserWarning, match="hook-based patching path"):
        exact = validation.patch_edges(neox, g, task, scale=eps, progress=False)
    eap_scores = attribute(neox, g, task, progress=False)
    big = eap_scores.abs() > 1e-2 * eap_scores.abs().max()
    ratio = (exact / eps)[big] / eap_scores[big]
    assert big.sum() > 10
    assert (ratio - 1).abs().max() < 1e-3
