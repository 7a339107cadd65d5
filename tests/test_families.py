"""Qwen3, Phi-3, Gemma (v1) and GPT-J, checked against HuggingFace's own modules (float64).

Each family's tiny model is made the way a user makes one: a transformers model of the family's
``-tiny`` shape (grouped-query where the family is: Qwen3 2 of 4, Phi-3 2 of 4 through its fused
``qkv_proj``, Gemma one KV head), saved with ``save_pretrained`` and loaded with
``eap.load_model`` (which ungroups it). The references never use eap-bench's adapter or the
TransformerLens bridge: :class:`HFEdges` patches the HF model's own modules with plain PyTorch
hooks, one edge per forward, from the definition (receiver ``aL.hH<q>``: head H's query
projection reads ``ln1(resid_pre + d)``, every other head reads the clean input; ``mL``: the
MLP reads ``ln2(resid_mid + d)``; logits: the final norm reads ``resid_final + d``; sender
outputs: the input residual, each head's ``z_h @ W_O[h]``, each MLP's output).

GPT-J has no per-head hooks in TransformerLens 4: the fast path is its only path, and the bridge
path refuses it with a clear ``UnsupportedModel``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import eap
import validation
from eap import Graph, attribute
from eap.arch import Arch, UnsupportedModel, family_named, register_family

from conftest import random_task
from test_architectures import closed_form_edges

pytestmark = pytest.mark.usefixtures("one_thread")

#: HF module names per family: layers, pre-attention norm, pre-MLP norm, attention, its q/k/v
#: projections (one fused module or three), its output projection, MLP, final norm
HF_LAYOUT = {
    "qwen3": ("model.layers", "input_layernorm", "post_attention_layernorm", "self_attn",
              ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", "model.norm"),
    "gemma": ("model.layers", "input_layernorm", "post_attention_layernorm", "self_attn",
              ("q_proj", "k_proj", "v_proj"), "o_proj", "mlp", "model.norm"),
    "phi3": ("model.layers", "input_layernorm", "post_attention_layernorm", "self_attn",
             ("qkv_proj",), "o_proj", "mlp", "model.norm"),
    "gptj": ("transformer.h", "ln_1", "ln_1", "attn", ("q_proj", "k_proj", "v_proj"), "out_proj", "mlp",
             "transformer.ln_f"),
}
#: family -> its tiny random shape
TINY = {"qwen3": "qwen3-tiny", "phi3": "phi-3-tiny", "gemma": "gemma-tiny", "gptj": "gpt-j-tiny"}
#: GPT-J computes q.k in float32 even in a float64 model: rounding there is ~1e-10 of the logits
LOGIT_RTOL = {"gptj": 1e-9}
#: exact patching reads the clean residuals through the bridge, whose Phi-3 attention computes its
#: softmax in float64 where HF's does it in float32: ~1e-8 of the largest value apart (relative)
EXACT_RTOL = {"phi3": 1e-6}


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


class HFEdges:
    """Edge interventions on a HuggingFace model's own modules (module docstring)."""

    def __init__(self, hf, family: str, graph: Graph):
        layers, ln1, ln2, attn, proj, o, mlp, final = HF_LAYOUT[family]
        self.hf, self.graph = hf, graph
        self.layers = list(_get(hf, layers))
        self.ln1 = [_get(lay, ln1) for lay in self.layers]
        self.ln2 = [_get(lay, ln2) for lay in self.layers]
        self.attn = [_get(lay, attn) for lay in self.layers]
        self.proj = [[_get(a, p) for p in proj] for a in self.attn]
        self.o = [_get(a, o) for a in self.attn]
        self.mlp = [_get(lay, mlp) for lay in self.layers]
        self.final = _get(hf, final)
        self.H = graph.spec.n_heads
        self.dh = hf.config.head_dim if getattr(hf.config, "head_dim", None) else hf.config.hidden_size // self.H

    def forward(self, tokens, receiver: int | None = None, delta=None):
        """Logits and the recorded activations of one forward; with ``receiver``, its input + ``delta``."""
        rec = {"x": {}, "mid": {}, "z": {}, "mlp": {}, "final": None}
        hs = []

        def first(store, key):  # the module's first input (later calls come from the patching hooks)
            def hook(m, args, kwargs):
                store.setdefault(key, args[0] if args else kwargs["hidden_states"])

            return hook

        for i in range(len(self.layers)):
            hs.append(self.layers[i].register_forward_pre_hook(first(rec["x"], i), with_kwargs=True))
            hs.append(self.ln2[i].register_forward_pre_hook(first(rec["mid"], i), with_kwargs=True))
            hs.append(self.o[i].register_forward_pre_hook(first(rec["z"], i), with_kwargs=True))
            hs.append(self.mlp[i].register_forward_hook(lambda m, a, out, i=i: rec["mlp"].update({i: out})))
        hs.append(self.final.register_forward_pre_hook(lambda m, a: rec.__setitem__("final", a[0])))
        if receiver is not None:
            hs.append(self._patch(receiver, delta, rec))
        try:
            logits = self.hf(tokens).logits
        finally:
            for h in hs:
                h.remove()
        return logits, rec

    def _patch(self, r: int, delta, rec):
        g = self.graph.receiver_group_of(r)
        L = g.layer
        if g.kind == "logits":
            return self.final.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
        if g.kind == "mlp":
            return self.mlp[L].register_forward_pre_hook(lambda m, a: (self.ln2[L](rec["mid"][L] + delta),))
        head, kind = r - g.start, "qkv".index(g.kind)
        fused = len(self.proj[L]) == 1
        lin = self.proj[L][0] if fused else self.proj[L][kind]
        start = ((kind * self.H if fused else 0) + head) * self.dh  # fused rows: [q heads; k heads; v heads]
        cols = slice(start, start + self.dh)

        def hook(m, a, out):
            own = torch.nn.functional.linear(self.ln1[L](rec["x"][L] + delta), lin.weight, lin.bias)
            out = out.clone()
            out[..., cols] = own[..., cols]
            return out

        return lin.register_forward_hook(hook)

    def senders(self, rec):
        """[n_senders, b, p, d]: the input residual, each head's z_h @ W_O[h], each MLP's output."""
        parts = []
        for g in self.graph.sender_groups:
            if g.kind == "input":
                parts.append(rec["x"][0][None])
            elif g.kind == "head":
                z, W = rec["z"][g.layer], self.o[g.layer].weight
                parts += [(z[..., h * self.dh:(h + 1) * self.dh] @ W[:, h * self.dh:(h + 1) * self.dh].T)[None]
                          for h in range(self.H)]
            else:
                parts.append(rec["mlp"][g.layer][None])
        return torch.cat(parts)

    def receiver_input(self, rec, r: int):
        g = self.graph.receiver_group_of(r)
        if g.kind == "logits":
            return rec["final"]
        return rec["mid"][g.layer] if g.kind == "mlp" else rec["x"][g.layer]

    def differences(self, task):
        with torch.no_grad():
            return self.senders(self.forward(task.corrupted)[1]) - self.senders(self.forward(task.clean)[1])

    def exact(self, task, edges):
        """One full forward per edge: the mean metric change when only that edge is patched."""
        diff, g = self.differences(task), self.graph
        with torch.no_grad():
            base = task.metric(self.forward(task.clean)[0])
            out = [(task.metric(self.forward(task.clean, int(g.edge_receiver[e]), diff[int(g.edge_sender[e])])[0])
                    - base).mean().item() for e in edges]
        return torch.tensor(out, dtype=torch.float64)

    def nodes(self, task):
        """One forward per sender: its output += its difference where it enters the residual stream."""
        diff, g = self.differences(task), self.graph
        with torch.no_grad():
            base = task.metric(self.forward(task.clean)[0])
            out = []
            for u in range(g.n_senders):
                grp = next(x for x in g.sender_groups if x.start <= u < x.start + x.size)
                module = {"input": self.layers[0], "head": self.o[grp.layer], "mlp": self.mlp[grp.layer]}[grp.kind]
                if grp.kind == "input":
                    h = module.register_forward_pre_hook(
                        lambda m, a, kw, d=diff[u]: ((a[0] + d,) + a[1:], kw) if a else
                        (a, dict(kw, hidden_states=kw["hidden_states"] + d)), with_kwargs=True)
                else:
                    h = module.register_forward_hook(lambda m, a, o, d=diff[u]: o + d)
                try:
                    out.append((task.metric(self.hf(task.clean).logits) - base).mean().item())
                finally:
                    h.remove()
        return torch.tensor(out, dtype=torch.float64)

    def derivatives(self, task):
        """EAP's definition per edge: d metric / d alpha_u at 0 with receiver input + sum alpha_u diff_u."""
        diff, g = self.differences(task), self.graph
        out = torch.zeros(g.n_edges, dtype=torch.float64)
        for r in range(g.n_receivers):
            n_up = int(g.n_upstream[r])
            alpha = torch.zeros(n_up, dtype=torch.float64, requires_grad=True)
            push = torch.einsum("s,sbpd->bpd", alpha, diff[:n_up])
            value = task.metric(self.forward(task.clean, r, push)[0]).mean()
            grad = torch.autograd.grad(value, alpha)[0]
            sel = (g.edge_receiver == r).nonzero().squeeze(1)
            out[sel] = grad[g.edge_sender[sel]]
        return out


def _saved_tiny(family: str, path, seed: int = 0):
    """The family's tiny shape as a user's saved transformers model (grouped where the family is)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eap.models import RANDOM_SHAPES, _word_tokenizer

    tok = _word_tokenizer()
    fields = dict(RANDOM_SHAPES[TINY[family]][1])
    fields["vocab_size"] = max(fields["vocab_size"], len(tok))
    cfg = AutoConfig.for_model(family_named(family).model_types[0], **fields, bos_token_id=tok.eos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="eager").eval()
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


def _ungrouped_hf(model):
    """A plain transformers copy of the loaded (ungrouped) model: same weights, no bridge."""
    from transformers import AutoModelForCausalLM

    data = eap.models.portable(model)
    hf = AutoModelForCausalLM.from_config(data["config"], dtype=torch.float64, attn_implementation="eager")
    hf.load_state_dict(data["state"])
    return hf.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(TINY))
def fam(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    grouped = _saved_tiny(name, path)
    model = eap.load_model(path, device="cpu", dtype=torch.float64)
    graph = Graph.from_model(model)
    return name, model, graph, grouped, HFEdges(_ungrouped_hf(model), name, graph)


# ------------------------------------------------------------------------------ the adapter
def test_adapter_logits_equal_hf(fam):
    """The adapter's blocks and read-out from HF's own first-layer input give HF's logits (the
    original, grouped model read from disk); the ungrouped copy is the same function."""
    name, model, _, grouped, ref = fam
    tokens = random_task(model, n=3, seq=9, seed=1).clean
    with torch.no_grad():
        out = grouped(tokens, output_hidden_states=True)
        arch = Arch(model)
        x = out.hidden_states[0]
        for i in range(arch.spec.n_layers):
            x = arch.block(i, x)
        ours = arch.readout.logits(x)
        torch.testing.assert_close(ours, out.logits, rtol=0, atol=LOGIT_RTOL.get(name, 1e-12) * out.logits.abs().max())
        torch.testing.assert_close(ref.hf(tokens).logits, out.logits, rtol=0, atol=1e-12 * out.logits.abs().max())
    assert arch.spec.family == name
    assert (arch.spec.grouped_kv_heads or arch.spec.n_heads) == grouped.config.to_dict().get(
        "num_key_value_heads", arch.spec.n_heads)


def test_wrong_family_description_is_refused_by_verify(fam):
    """A description with one wrong fact (registered over the right one) is refused on first
    use, naming the block where it diverges; the right one passes."""
    name, model, *_ = fam
    right = family_named(name)
    wrong = {"qwen3": dict(rotary="interleaved"), "phi3": dict(windows="none"), "gemma": dict(norm_offset=0.0),
             "gptj": dict(rotary="half")}[name]
    Arch(model).verify(model, n_pos=10)
    register_family(replace(right, **wrong), replace=True)
    try:
        with pytest.raises(UnsupportedModel, match=f"{name}: the block runner does not reproduce block 0.*description"):
            Arch(model).verify(model, n_pos=10)
    finally:
        register_family(right, replace=True)


# ------------------------------------------------------------------------------ EAP
def test_fast_eap_equals_hf_derivatives_and_the_bridge(fam):
    name, model, g, _, ref = fam
    task = random_task(model, n=3, seq=7, seed=4)
    want = ref.derivatives(task)
    fast = attribute(model, g, task, engine="fast", progress=False)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(fast, want, rtol=1e-6, atol=1e-7 * want.abs().max())
    if name == "gptj":  # TransformerLens 4 has no per-head hooks for GPT-J: a clear refusal, not its error
        with pytest.raises(UnsupportedModel, match="no per-head q/k/v input.*'gptj'.*fast path"):
            attribute(model, g, task, engine="bridge", progress=False)
        with pytest.raises(UnsupportedModel, match="'gptj'"):
            validation.patch_edges(model, g, task, [0, 1], engine="bridge", progress=False)
    else:
        bridge = attribute(model, g, task, engine="bridge", progress=False)
        torch.testing.assert_close(fast, bridge, rtol=1e-6, atol=1e-7 * want.abs().max())


# ------------------------------------------------------------------------------ exact patching
def test_fast_exact_path_equals_one_edge_per_forward(fam):
    name, model, g, _, ref = fam
    task = random_task(model, n=3, seq=7, seed=6)
    stats = {}
    got = validation.patch_edges(model, g, task, progress=False, batch_size=2, stats=stats)
    assert stats["path"] == "fast"
    want = ref.exact(task, range(g.n_edges))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=EXACT_RTOL.get(name, 1e-9) * max(1.0, float(want.abs().max())), rtol=0)


def test_fast_node_patching_equals_one_node_per_forward(fam):
    name, model, g, _, ref = fam
    task = random_task(model, n=3, seq=6, seed=8)
    got = validation.patch_nodes(model, g, task, progress=False)
    want = ref.nodes(task)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=EXACT_RTOL.get(name, 1e-9) * max(1.0, float(want.abs().max())), rtol=0)
    if name == "gptj":
        with pytest.raises(UnsupportedModel, match="'gptj'.*only path"):
            attribute(model, g, task, method="atp*", progress=False)


def test_every_receiver_input_is_clean_plus_its_senders_differences(fam):
    _, model, g, _, ref = fam
    task = random_task(model, n=3, seq=6, seed=9)
    with torch.no_grad():
        _, clean = ref.forward(task.clean)
        _, corr = ref.forward(task.corrupted)
    diff = ref.senders(corr) - ref.senders(clean)
    worst = 0.0
    for r in range(g.n_receivers):
        k = int(g.n_upstream[r])
        want = ref.receiver_input(corr, r)
        torch.testing.assert_close(ref.receiver_input(clean, r) + diff[:k].sum(0), want, atol=1e-12, rtol=0)
        worst = max(worst, float((ref.receiver_input(clean, r) + diff[: k - 1].sum(0) - want).abs().max()))
    assert worst > 1e-6  # negative control: without the last upstream sender it breaks


def test_circuit_evaluation_matches_one_edge_per_forward(fam):
    """A circuit missing one edge changes the metric by that edge's exact patch; the empty
    circuit is the corrupted run (HF's own forward)."""
    name, model, g, _, ref = fam
    task = random_task(model, n=3, seq=7, seed=11)
    edges = g.select_edges("stratified:6", seed=2).tolist()
    circuits = torch.ones(len(edges), g.n_edges, dtype=torch.bool)
    circuits[torch.arange(len(edges)), edges] = False
    stats = {}
    res = validation.evaluate_circuit(model, g, task, circuits, stats=stats)
    assert stats["path"] == "fast"
    tol = EXACT_RTOL.get(name, 1e-9) * max(1.0, float(res.clean.abs().max()))
    torch.testing.assert_close(res.effect, ref.exact(task, edges), atol=tol, rtol=0)
    with torch.no_grad():
        corrupted = task.metric(ref.hf(task.corrupted).logits).double()
        clean = task.metric(ref.hf(task.clean).logits).double()
    torch.testing.assert_close(res.corrupted, corrupted, atol=tol, rtol=0)
    torch.testing.assert_close(res.clean, clean, atol=tol, rtol=0)


# ------------------------------------------------------------------------------ graphs
@pytest.mark.parametrize("shape", ["qwen3-0.6b", "phi-3-mini", "gemma-2b", "gpt-j-6b",
                                   "qwen3-tiny", "phi-3-tiny", "gemma-tiny", "gpt-j-tiny"])
def test_edge_counts_follow_the_closed_form(shape):
    from transformers import AutoConfig

    from eap.models import RANDOM_SHAPES

    fam_name, fields = RANDOM_SHAPES[shape]
    spec = eap.arch.graph_spec(AutoConfig.for_model(family_named(fam_name).model_types[0], **fields))
    assert spec.parallel_attn_mlp == (fam_name == "gptj")
    assert Graph(spec).n_edges == closed_form_edges(spec.n_layers, spec.n_heads, spec.parallel_attn_mlp)


def test_random_shapes_are_the_published_configs():
    from transformers import AutoConfig

    from eap.arch import arch_spec
    from eap.models import RANDOM_SHAPES

    expect = {  # layers, width, heads, kv heads, head dim, mlp, vocab, eps, rotary dim, windows[0]
        "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936, 1e-6, 128, None),
        "phi-3-mini": (32, 3072, 32, 32, 96, 8192, 32064, 1e-5, 96, 2047),
        "gemma-2b": (18, 2048, 8, 1, 256, 16384, 256000, 1e-6, 256, None),
        "gpt-j-6b": (28, 4096, 16, 16, 256, 16384, 50400, 1e-5, 64, None),
    }
    for name, facts in expect.items():
        fam_name, fields = RANDOM_SHAPES[name]
        s = arch_spec(AutoConfig.for_model(family_named(fam_name).model_types[0], **fields))
        got = (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_head, s.d_mlp, s.d_vocab, s.eps, s.rotary_dim,
               s.windows[0])
        assert got == facts, name
