"""OLMo-2 with grouped-query attention (OLMo-2-32B: 40 query heads, 8 key/value heads).

Definition (``eap.arch.mixednorm``): the k norm runs over the whole projected k of the
*original* key/value heads. Receiver ``aL.hH<k>`` patches head H's group slice only (the KV head
query head H reads), the statistics are taken over the original key heads, and query head H
alone uses the result; the other query heads of its group keep the clean key.

The reference is the naive plain-torch forward of test_postnorm_olmo2.py run on a *grouped* HF
OLMo-2 (rebuilt here from the loaded model's weights: one k/v projection and k-norm slice per
original key head), one forward per edge. The negative control runs the same reference on the
ungrouped copies (one k slice per query head): same clean function, other patched values.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import validation
from eap import Graph, attribute, random_model
from eap.arch import Arch, arch_spec

from conftest import exact_over_eps_errors, random_task
from test_postnorm_olmo2 import naive_edges, naive_forward

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)


def regrouped(hf, kv: int):
    """A grouped copy of the ungrouped HF OLMo-2 ``hf``: k_proj, v_proj and k_norm keep one
    slice per original key/value head (the ungrouped model holds ``H / kv`` equal copies)."""
    from transformers import Olmo2ForCausalLM

    cfg = copy.deepcopy(hf.config)
    H = cfg.num_attention_heads
    cfg.num_key_value_heads = kv
    grouped = Olmo2ForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in grouped.named_parameters():
            t = operator.attrgetter(name)(hf).detach()  # the same path in the loaded (bridged) HF model
            if name.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight")):
                heads = t.view(H, -1, *t.shape[1:])
                first = heads[:: H // kv]
                assert torch.equal(heads, first.repeat_interleave(H // kv, 0))  # really copies
                t = first.reshape(-1, *t.shape[1:])
            p.copy_(t)
    return grouped


@pytest.fixture(scope="module")
def olmo_gqa():
    model = random_model("olmo-2-tiny-gqa", seed=3, **F64)
    return model, Graph.from_model(model), regrouped(model.original_model, 2)


def test_loaded_grouped_model_is_the_same_function(olmo_gqa):
    model, _, grouped = olmo_gqa
    spec = arch_spec(model)
    assert spec.whole_qk_norm and spec.grouped_kv_heads == 2 and spec.n_heads == 4
    arch = Arch(model)
    arch.verify(model)
    assert arch.layers[0].k_groups == 2
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = grouped(tokens).logits
        torch.testing.assert_close(model(tokens).to(want.dtype), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(naive_forward(grouped, tokens), want, atol=1e-6, rtol=1e-6)
        # the copies give the same clean function too (the negative control below differs only when patched)
        torch.testing.assert_close(naive_forward(model.original_model, tokens), want, atol=1e-6, rtol=1e-6)


def test_exact_patching_takes_statistics_over_the_original_key_heads(olmo_gqa):
    model, g, grouped = olmo_gqa
    task = random_task(model, n=3, seq=6, seed=6)
    stats = {}
    got = validation.patch_edges(model, g, task, progress=False, stats=stats)
    assert stats["path"] == "fast"
    want = naive_edges(model, g, task, range(g.n_edges), hf=grouped)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=0)


def test_negative_control_statistics_over_ungrouped_copies_differ(olmo_gqa):
    """Patching only head H's copy of the key (statistics over the per-query-head copies) gives
    other patched values on the k receivers (the q and v receivers agree)."""
    model, g, grouped = olmo_gqa
    task = random_task(model, n=3, seq=6, seed=6)
    k = [e for e in range(g.n_edges) if g.edge_names[e].endswith("<k>")]
    ours = validation.patch_edges(model, g, task, k, progress=False)[k]
    copies = naive_edges(model, g, task, k, hf=model.original_model)
    off = float((ours - copies).abs().max() / ours.abs().max())
    print(f"ungrouped-copies statistics: k edges off by {off:.1%} of the largest k score")
    assert off > 0.01


def test_exact_over_eps_converges_to_eap_with_the_group_block(olmo_gqa):
    model, g, _ = olmo_gqa
    task = random_task(model, n=3, seq=6, seed=10)
    scores = attribute(model, g, task, progress=False).double()
    errors = exact_over_eps_errors(model, g, task, scores)
    assert errors[0] > 5 * errors[1] and errors[2] < errors[1], errors
    assert errors[2] < 1e-3, errors


def test_circuit_without_one_k_edge(olmo_gqa):
    model, g, _ = olmo_gqa
    task = random_task(model, n=3, seq=6, seed=11)
    e = int(torch.nonzero(torch.tensor([n.startswith("a0.h1->a1") and n.endswith("<k>") for n in g.edge_names]))[0])
    one = validation.evaluate_circuit(model, g, task, torch.arange(g.n_edges) != e, progress=False)
    exact = validation.patch_edges(model, g, task, [e], progress=False)[e]
    assert abs(float(exact)) > 1e-6
    torch.testing.assert_close(one.effect, exact.reshape(()).double(), atol=1e-9, rtol=1e-6)


def test_real_shape_is_the_published_config():
    from transformers import AutoConfig

    from eap.models import RANDOM_SHAPES

    s = arch_spec(AutoConfig.for_model("olmo2", **RANDOM_SHAPES["olmo-2-32b"][1]))
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_head, s.d_mlp, s.d_vocab) == (
        64, 5120, 40, 8, 128, 27648, 100352)
    assert s.whole_qk_norm and not s.pre_norms and s.post_norms


def test_a_saved_grouped_model_loads_and_agrees(olmo_gqa, tmp_path):
    """What a user does: save_pretrained a grouped OLMo-2, eap.load_model it (ungrouped there)."""
    import eap
    from eap.models import _word_tokenizer

    model, g, grouped = olmo_gqa
    grouped.save_pretrained(tmp_path)
    _word_tokenizer().save_pretrained(tmp_path)
    loaded = eap.load_model(tmp_path, device="cpu", dtype=torch.float64)
    assert arch_spec(loaded).grouped_kv_heads == 2 and Graph.from_model(loaded).n_edges == g.n_edges
    assert eap.models.checkpoint_params(loaded)[0] == sum(p.numel() for p in grouped.parameters())
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).to(torch.float64), grouped(tokens).logits, atol=1e-6, rtol=1e-6)
    task = random_task(loaded, n=2, seq=5, seed=2)
    k = [e for e in range(g.n_edges) if g.edge_names[e].endswith("<k>")]
    torch.testing.assert_close(validation.patch_edges(loaded, g, task, k, progress=False)[k],
                               validation.patch_edges(model, g, task, k, progress=False)[k], atol=1e-12, rtol=1e-9)
