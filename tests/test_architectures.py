"""Beyond GPT-2: Llama, Mistral, Qwen2, GPT-NeoX/Pythia, Gemma-2 and an attention-only model.

Tiny random float64 models of each family (``eap.arch`` describes them). For every family:
attribution equals independent directional derivatives; the fast exact path (validation's block
runner) equals naive one-edge-per-forward hooks; every receiver's input is the clean input plus
the sum of its senders' differences (parallel blocks included); exact/ε -> EAP; node scores are
sums of edge scores. Negative controls: unsupported features raise ``UnsupportedModel`` naming
them. Note: HF (and so the bridge) computes RMSNorm and, for Llama-like families, the attention
softmax in float32 even in a float64 model; tolerances below say where that matters.
"""

from __future__ import annotations

import pytest
import torch

import eap
import validation
from eap import Graph, attribute, random_model
from eap.arch import Arch, UnsupportedModel, arch_spec, check_edges
from validation.runner import BlockRunner

from conftest import random_task, central_difference, exact_over_eps_errors
from test_attribute import reference_scores
from test_validation import _sender_outputs, naive_edges, naive_nodes, readout_task, _receiver_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(device="cpu", dtype=torch.float64)

#: (shape, arch) of the tiny test model of each family
FAMILY_MODELS = {
    "gpt2": ("gpt2-tiny", None),
    "llama": ("llama-tiny", None),
    "qwen2": ("qwen-tiny", None),
    "pythia": ("pythia-tiny", None),
    "mistral": (dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                     intermediate_size=64, sliding_window=5, max_position_embeddings=64), "mistral"),
    "attn-only": (dict(n_layer=3, n_embd=24, n_head=3, n_positions=32, attn_only=True), "gpt2"),
}


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family(request):
    shape, arch = FAMILY_MODELS[request.param]
    model = random_model(shape, seed=2, arch=arch, **F64)
    graph = Graph.from_model(model)
    assert graph.spec.attn_only == (request.param == "attn-only")
    assert graph.spec.parallel_attn_mlp == (request.param == "pythia")
    return request.param, model, graph


# ------------------------------------------------------------------------------ attribution
def test_eap_equals_directional_derivative(family):
    name, model, g = family
    task = random_task(model, n=3, seq=7, seed=4)
    ref = reference_scores(model, g, task)[g.edge_sender, g.edge_receiver]
    got = attribute(model, g, task, progress=False)
    assert ref.abs().max() > 1e-4
    for kind in set(g.edge_kind):  # every receiver kind is live
        sel = torch.tensor([k == kind for k in g.edge_kind])
        assert ref[sel].abs().max() > 1e-6 * ref.abs().max(), kind
    # to 1e-6 relative; 1e-7 of the largest score absolute (float32 RMSNorm/softmax inside HF)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7 * ref.abs().max())


def test_node_scores_are_sums_of_edge_scores(family):
    _, model, g = family
    task = random_task(model, n=3, seq=6, seed=5)
    edges = attribute(model, g, task, progress=False)
    nodes = attribute(model, g, task, level="node", progress=False)
    sums = torch.zeros(g.n_senders, dtype=torch.float64).index_add_(0, g.edge_sender, edges)
    torch.testing.assert_close(nodes, sums, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ exact patching
def test_fast_exact_path_equals_naive_hooks(family):
    _, model, g = family
    task = random_task(model, n=3, seq=7, seed=6)
    stats = {}
    got = validation.patch_edges(model, g, task, progress=False, batch_size=5, stats=stats)
    assert stats["path"] == "fast"
    want = naive_edges(model, g, task, range(g.n_edges))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_fast_readout_and_nodes_equal_naive_hooks(family):
    _, model, g = family
    task = readout_task(model, n=4, seq=8, seed=7)
    edges = g.select_edges("stratified:40", seed=1)
    fast = validation.patch_edges(model, g, task, edges, progress=False)
    torch.testing.assert_close(fast[edges], naive_edges(model, g, task, edges.tolist()), atol=1e-9, rtol=0)
    nodes = validation.patch_nodes(model, g, random_task(model, n=3, seq=6, seed=8), progress=False)
    torch.testing.assert_close(nodes, naive_nodes(model, g, random_task(model, n=3, seq=6, seed=8)), atol=1e-9, rtol=0)


def test_every_receiver_input_is_the_sum_of_its_senders(family):
    """clean_input_v + sum_u (corr_u - clean_u) == corrupted_input_v, parallel blocks included."""
    _, model, g = family
    task = random_task(model, n=3, seq=6, seed=9)
    diff = _sender_outputs(model, g, task.corrupted) - _sender_outputs(model, g, task.clean)

    clean, corr = _receiver_inputs(model, g, task.clean), _receiver_inputs(model, g, task.corrupted)
    for r in range(g.n_receivers):
        k = int(g.n_upstream[r])
        torch.testing.assert_close(clean[r] + diff[:k].sum(0), corr[r], atol=1e-12, rtol=0)
    # negative control: dropping the last upstream sender breaks it somewhere
    worst = max(float((clean[r] + diff[: int(g.n_upstream[r]) - 1].sum(0) - corr[r]).abs().max())
                for r in range(g.n_receivers))
    assert worst > 1e-6


def test_exact_over_eps_converges_to_eap(family):
    """Central differences (exact(+ε) - exact(-ε)) / 2ε -> EAP, error falling like ε² (until
    the float32 RMSNorm/softmax inside HF's Llama-like models adds rounding noise below ε ~ 1e-2)."""
    _, model, g = family
    task = random_task(model, n=3, seq=6, seed=10)
    scores = attribute(model, g, task, progress=False).double()
    errors = exact_over_eps_errors(model, g, task, scores)
    # eps 0.1 -> 0.03 must cut the error ~11x (eps^2); at 0.01 float32 rounding inside HF's
    # RMSNorm/softmax can flatten the curve, so there we only ask that it still falls
    assert (errors[0] > 5 * errors[1] and errors[2] < errors[1]) or errors[0] < 1e-8, errors
    assert errors[2] < 1e-3, errors
    eps = 1e-2
    nodes = central_difference(validation.patch_nodes, model, g, task, eps)
    node_eap = attribute(model, g, task, level="node", progress=False).double()
    assert (nodes - node_eap).abs().max() < 1e-3 * node_eap.abs().max()


# ------------------------------------------------------------------------------ the runner
@pytest.mark.parametrize("shape", ["llama-tiny", "qwen-tiny", "pythia-tiny", "gemma-2-tiny", "gpt2-tiny"])
def test_patch_receiver_equals_hooked_forward(shape):
    """Contract 2 on its own: any perturbation D of one receiver's input, run by the block
    runner from the returned point, equals the bridge's forward with D added at that hook."""
    model = random_model(shape, seed=3, **F64)
    runner = BlockRunner(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    names = {("pre", i): f"blocks.{i}.hook_resid_pre" for i in range(L)}
    if not runner.parallel:
        names.update({("mid", i): f"blocks.{i}.hook_resid_mid" for i in range(L)})
    names.update({("post", i): f"blocks.{i}.hook_resid_post" for i in range(L)})
    names["mlp_in", L - 1] = f"blocks.{L - 1}.hook_mlp_in"
    cache = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, (lambda k: lambda x, hook=None: cache.__setitem__(k, x.clone()))(k))
                                                for k, n in names.items()])
    gen = torch.Generator().manual_seed(1)
    for kind, head, hook, x_in in [
        ("q", 1, f"blocks.{L - 1}.hook_q_input", cache["pre", L - 1]),
        ("k", H - 1, f"blocks.{L - 1}.hook_k_input", cache["pre", L - 1]),
        ("v", 0, f"blocks.{L - 1}.hook_v_input", cache["pre", L - 1]),
        ("mlp", None, f"blocks.{L - 1}.hook_mlp_in", cache["mlp_in", L - 1]),
        ("logits", None, f"blocks.{L - 1}.hook_resid_post", cache["post", L - 1]),
    ]:
        D = 0.3 * torch.randn((2,) + x_in.shape, generator=gen, dtype=x_in.dtype)
        point, delta = runner.patch_receiver(kind, L if kind == "logits" else L - 1, head, x_in, D)
        ours = runner.logits(runner.run((cache[point].unsqueeze(0) + delta).flatten(0, 1), point))
        for i in range(2):
            def add(x, hook=None, i=i):
                x = x.clone()
                if head is None:
                    x += D[i]
                else:
                    x[:, :, head] += D[i]
                return x

            with torch.no_grad():
                want = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])
            torch.testing.assert_close(ours[2 * i: 2 * i + 2], want, atol=1e-9, rtol=1e-9, msg=f"{shape} {kind}")


def test_gemma2_blocks_and_readout_are_exact_with_biting_softcaps_and_windows():
    """The adapter knows Gemma-2 (1 + w norms, post-norms, softcaps, sliding windows on every
    other layer); negative controls: dropping the softcap or the window is detected."""
    from dataclasses import replace

    shape = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=64, query_pre_attn_scalar=16, attn_logit_softcapping=0.5,
                 final_logit_softcapping=0.2, sliding_window=3, max_position_embeddings=64)
    model = random_model(shape, seed=4, arch="gemma2", **F64)
    arch = Arch(model)
    assert arch.spec.windows == (3, None) and arch.spec.norm_offset == 1.0
    arch.verify(model, n_pos=10)
    for broken in (dict(attn_softcap=None), dict(final_softcap=None)):
        bad = Arch(model)
        bad.spec = replace(bad.spec, **broken)
        bad.readout.softcap = bad.spec.final_softcap
        with pytest.raises(UnsupportedModel, match="does not reproduce"):
            bad.verify(model, n_pos=10)
    bad = Arch(model)
    bad.layers[0].window = None
    with pytest.raises(UnsupportedModel, match="block 0"):
        bad.verify(model, n_pos=10)


def test_rotary_styles_match_hf():
    """Rotate-half (Llama, used by every family here) and adjacent pairs (GPT-J; no family here
    uses it yet) against transformers' own functions; partial rotary passes the rest through."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope, create_sinusoidal_positions
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    from eap.arch import apply_rotary

    B, P, H, r, dh = 2, 5, 3, 8, 12
    x = torch.randn(B, H, P, dh, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sincos = create_sinusoidal_positions(P, r).double()
    sin, cos = sincos[:, : r // 2], sincos[:, r // 2:]
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # HF's layout
    want = gptj_rope(x[..., :r].transpose(1, 2), sin[None], cos[None]).transpose(1, 2)
    got = apply_rotary(x, cos2, sin2, "interleaved")
    torch.testing.assert_close(got[..., :r], want)
    assert torch.equal(got[..., r:], x[..., r:])
    want_q, _ = llama_rope(x[..., :r], x[..., :r], cos2[None], sin2[None])
    torch.testing.assert_close(apply_rotary(x, cos2, sin2, "half")[..., :r], want_q)
    assert not torch.allclose(apply_rotary(x, cos2, sin2, "half"), got)  # the styles differ


# ------------------------------------------------------------------------------ half precision
BF16_TOL = 0.05  # max |score(half) - score(float32)| as a share of the largest float32 score


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attribution_tracks_float32(dtype):
    """Same weights (drawn in float32, then cast) in bfloat16 / float16 on the CPU: scores come
    back in float32 (accumulated in float32), within BF16_TOL of the float32 scores, and rank
    the edges like them (Spearman >= 0.99). IOI, 16 prompts, a 4-layer GQA Llama."""
    from scipy.stats import spearmanr

    from eap.tasks import ioi

    shape = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=64)
    scores = {}
    for dt in (torch.float32, dtype):
        model = random_model(shape, arch="llama", seed=0, device="cpu", dtype=dt)
        g = Graph.from_model(model)
        scores[dt] = attribute(model, g, ioi(model, 16, seed=0), progress=False)
    full, half = scores[torch.float32], scores[dtype]
    assert half.dtype == torch.float32
    assert (half - full).abs().max() <= BF16_TOL * full.abs().max()
    assert spearmanr(half.numpy(), full.numpy()).statistic >= 0.99
    # negative control: the check notices scores of another model
    other = attribute(random_model(shape, arch="llama", seed=1, device="cpu", dtype=dtype), g,
                      ioi(model, 16, seed=0), progress=False)
    assert spearmanr(other.numpy(), full.numpy()).statistic < 0.99


# ------------------------------------------------------------------------------ refusals
def test_gemma2_edges_are_not_approximated():
    """Gemma-2 edges are defined through the recomputed post-norm (tests/test_postnorm.py); the
    paths that would silently approximate it (the bridge's hooks) are refused."""
    model = random_model("gemma-2-tiny", seed=0, **F64)
    g = Graph.from_model(model)
    task = random_task(model, n=2, seq=5)
    with pytest.raises(UnsupportedModel, match="post-norm"):
        attribute(model, g, task, progress=False, engine="bridge")
    with pytest.raises(UnsupportedModel, match="post-norm"):
        attribute(model, g, task, method="atp*", progress=False)
    with pytest.raises(UnsupportedModel, match="post-norm"):
        validation.patch_edges(model, g, task, [0, 1], progress=False, engine="bridge")


def test_grouped_bridge_is_refused_with_a_clear_message(tmp_path):
    """The issue's repro: a GQA model booted without ungrouping used to fail with
    'mat1 and mat2 shapes cannot be multiplied'."""
    model = random_model("llama-tiny", seed=0, device="cpu")
    grouped = _boot_grouped(tmp_path)
    with pytest.raises(UnsupportedModel, match="grouped-query attention"):
        attribute(grouped, Graph.from_model(grouped), random_task(grouped, n=2, seq=5), progress=False)
    assert check_edges(model).family == "llama"  # ungrouped by random_model / load_model: accepted


def _boot_grouped(path):
    """A Llama with 4 query heads and 2 KV heads saved with save_pretrained and booted by
    TransformerLens directly (grouped k/v hooks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eap.models import _boot, _word_tokenizer

    tok = _word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return _boot(str(path), torch.device("cpu"), torch.float64)


def test_saved_gqa_model_loads_ungrouped_and_computes_the_same_function(tmp_path):
    grouped = _boot_grouped(tmp_path)
    model = eap.load_model(tmp_path, device="cpu", dtype=torch.float64)
    assert grouped.cfg.n_key_value_heads == 2 and arch_spec(model).grouped_kv_heads == 2
    assert model.blocks[0].attn.W_K.shape[0] == 4  # one key projection per query head
    tokens = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), grouped(tokens), atol=1e-12, rtol=1e-12)
    # patching a1.h3<k> touches the key seen by query head 3 only: other heads' patterns stay
    patterns = {}

    def keep(x, hook=None):
        patterns[len(patterns)] = x.detach().clone()
        return x

    def push(x, hook=None):
        x = x.clone()
        x[:, :, 3] += 1.0
        return x

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", keep)])
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_k_input", push), ("blocks.1.attn.hook_pattern", keep)])
    changed = (patterns[0] - patterns[1]).abs().amax(dim=(0, 2, 3))
    assert changed[3] > 1e-3 and changed[[0, 1, 2]].max() == 0
    g = Graph.from_model(model)
    task = random_task(model, n=2, seq=6)
    ref = reference_scores(model, g, task)[g.edge_sender, g.edge_receiver]
    torch.testing.assert_close(attribute(model, g, task, progress=False), ref, rtol=1e-6, atol=1e-7 * ref.abs().max())
    edges = g.select_edges("stratified:24", seed=0)
    stats = {}
    exact = validation.patch_edges(model, g, task, edges, progress=False, stats=stats)
    assert stats["path"] == "fast"
    torch.testing.assert_close(exact[edges], naive_edges(model, g, task, edges.tolist()), atol=1e-9, rtol=0)


def test_undescribed_family_is_refused():
    with pytest.raises(UnsupportedModel, match="'bloom' is not described"):
        arch_spec({"model_type": "bloom", "n_layer": 2, "n_head": 2, "hidden_size": 8})


# ------------------------------------------------------------------------------ graphs from configs
def closed_form_edges(L: int, H: int, parallel: bool = False, attn_only: bool = False) -> int:
    """Edges of the MIB/EAP-IG graph: senders before layer l feed its 3H q/k/v receivers
    (A = sum_l (1 + l (H+1)) of them in all), the MLP sees the same plus (sequential) the layer's
    heads, the logits see every sender."""
    if attn_only:
        return 3 * H * (L + H * L * (L - 1) // 2) + 1 + L * H
    A = L + (H + 1) * L * (L - 1) // 2
    return 3 * H * A + A + (0 if parallel else L * H) + 1 + L * (H + 1)


@pytest.mark.parametrize("config, edges", [
    (dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
          intermediate_size=14336, vocab_size=128256), 1_592_881),  # Llama-3.1-8B (MIB)
    (dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
          intermediate_size=4864, vocab_size=151936), None),  # Qwen2.5-0.5B
    (dict(model_type="gemma2", num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4,
          head_dim=256, intermediate_size=9216, vocab_size=256000), None),  # Gemma-2-2B
    (dict(model_type="gpt_neox", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
          intermediate_size=3072, use_parallel_residual=True, vocab_size=50304), 32_347),  # Pythia-160m
    (dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257), 32_491),  # GPT-2 small
])
def test_graph_from_config_only(config, edges):
    spec = eap.arch.graph_spec(config)
    g = Graph(spec)
    assert g.n_edges == closed_form_edges(spec.n_layers, spec.n_heads, spec.parallel_attn_mlp, spec.attn_only)
    if edges is not None:  # published counts (field notes)
        assert g.n_edges == edges
    assert spec.n_heads == config.get("num_attention_heads", config.get("n_head"))  # per query head
    assert Graph.from_cfg(dict(n_layers=spec.n_layers, n_heads=spec.n_heads, parallel_attn_mlp=spec.parallel_attn_mlp)).n_edges == g.n_edges
    assert spec.d_model == config.get("hidden_size", config.get("n_embd"))


def test_closed_form_matches_built_graphs():
    for L, H, par, ao in [(1, 1, False, False), (3, 2, True, False), (4, 3, False, True), (5, 7, False, False)]:
        assert Graph(eap.GraphSpec(L, H, ao, par)).n_edges == closed_form_edges(L, H, par, ao)


def test_random_shapes_are_the_published_configs():
    from transformers import AutoConfig

    from eap.arch import family_named
    from eap.models import RANDOM_SHAPES

    expect = {  # layers, width, heads, kv heads, head dim, mlp, vocab, eps, rotary dim
        "llama-3.2-1b": (16, 2048, 32, 8, 64, 8192, 128256, 1e-5, 64),
        "qwen2.5-0.5b": (24, 896, 14, 2, 64, 4864, 151936, 1e-6, 64),
        "pythia-160m": (12, 768, 12, 12, 64, 3072, 50304, 1e-5, 16),
        "gemma-2-2b": (26, 2304, 8, 4, 256, 9216, 256000, 1e-6, 256),
    }
    for name, facts in expect.items():
        fam, fields = RANDOM_SHAPES[name]
        s = arch_spec(AutoConfig.for_model(family_named(fam).model_types[0], **fields))
        assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_head, s.d_mlp, s.d_vocab, s.eps, s.rotary_dim) == facts
    gemma = arch_spec(AutoConfig.for_model("gemma2", **RANDOM_SHAPES["gemma-2-2b"][1]))
    assert (gemma.attn_softcap, gemma.final_softcap, gemma.windows[:2]) == (50.0, 30.0, (4096, None))
    assert arch_spec(AutoConfig.for_model("gpt_neox", **RANDOM_SHAPES["pythia-160m"][1])).parallel


def test_word_level_tokenizer_is_kept_for_every_family(tmp_path):
    """AutoTokenizer swaps in Qwen2's own tokenizer class for a qwen2 config; eap.load_model
    keeps the saved word-level tokenizer, so IOI prompts are the same tokens for every family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eap.models import _word_tokenizer
    from eap.tasks import ioi

    want = ioi(random_model("gpt2-tiny", device="cpu"), 4, seed=0).clean
    for shape in ("qwen-tiny", "llama-tiny", "pythia-tiny", "gemma-2-tiny"):
        assert torch.equal(ioi(random_model(shape, device="cpu"), 4, seed=0).clean, want), shape
    tok = _word_tokenizer()
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert torch.equal(ioi(eap.load_model(tmp_path, device="cpu"), 4, seed=0).clean, want)


def test_tiny_random_shapes_load_by_name():
    for name in ("llama-tiny", "qwen-tiny", "pythia-tiny", "gemma-2-tiny"):
        a = eap.load_model(f"random:{name}@1", device="cpu")
        b = eap.load_model(f"random:{name}@1", device="cpu")
        assert torch.equal(a.blocks[0].attn.W_Q, b.blocks[0].attn.W_Q)
