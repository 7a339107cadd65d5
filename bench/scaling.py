"""What exhaustive exact truth costs past this machine, and how many sampled edges suffice.

The cost model (``docs/scaling.md``)::

    hours = edges x forward-equivalents per edge x forward time / workers / 3600

* ``edges``: from the edge graph of the published config (``eap.arch.graph_spec``; q/k/v
  receivers per query head, so grouped-query models count ungrouped).
* forward-equivalents per edge (``fe``): seconds of patched forwards per edge over the seconds of
  one plain forward of the same prompts. Measured on three shapes (``MEASURED_FE``, from
  docs/architectures.md); for the others extrapolated as ``K_FE x body share``, where body share
  is the fraction of a plain forward's FLOPs spent in the blocks (patched forwards start at the
  receiver's layer and read out a few logits, so the unembedding is not part of their work) and
  ``K_FE`` is the mean ratio of the measured shapes.
* forward time: FLOPs of one plain forward (blocks of the ungrouped model + attention + full
  unembedding) of ``n_prompts x n_tokens`` tokens over ``peak x utilisation`` of a GPU.

Sample size: the 95% CI of Spearman's rho between attribution and truth on ``K`` edges drawn at
random has, by Fisher's z with Bonett and Wright's variance for Spearman's rho,
``var(atanh r) = (1 + r^2 / 2) / (K - 3)``; :func:`spearman_sample_size` inverts it for a half-width.

    python -m bench.scaling               # prints the tables of docs/scaling.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Published HuggingFace config fields (config.json) of the models the cost model covers.
CONFIGS: dict[str, dict[str, Any]] = {
    "GPT-2 small": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    "GPT-2 medium": dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257),
    "Pythia-1B": dict(model_type="gpt_neox", num_hidden_layers=16, hidden_size=2048, num_attention_heads=8,
                      intermediate_size=8192, rotary_pct=0.25, use_parallel_residual=True, vocab_size=50304),
    "Qwen2.5-0.5B": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "Llama-3.1-8B": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256),
}
#: Shapes whose forward-equivalents per edge were measured (docs/architectures.md: random weights
#: of the real shapes, 8 IOI prompts x 18 tokens, float32, CPU, one thread, ``stratified:300``).
MEASURED_FE: dict[str, tuple[dict[str, Any], float]] = {
    "GPT-2 small": (CONFIGS["GPT-2 small"], 0.211),
    "Qwen2.5-0.5B": (CONFIGS["Qwen2.5-0.5B"], 0.201),
    "Pythia-160m": (dict(model_type="gpt_neox", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=50304), 0.196),
}
MEASURED_TOKENS = 18


@dataclass(frozen=True)
class Gpu:
    """A GPU for the cost model: dense bf16 peak (FLOP/s) and the share of it exact patching's
    stacked forwards are assumed to reach (``utilisation``: not measured)."""

    name: str
    peak_flops: float


GPUS = {"H100": Gpu("H100 SXM", 989e12), "A100": Gpu("A100 SXM", 312e12)}


def _field(cfg: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def shape(cfg: dict) -> dict[str, int]:
    """Layers, width, heads, head size, MLP width, vocabulary, gated MLP (from HF config fields)."""
    L = int(_field(cfg, "n_layer", "num_hidden_layers"))
    d = int(_field(cfg, "n_embd", "hidden_size"))
    H = int(_field(cfg, "n_head", "num_attention_heads"))
    dh = int(_field(cfg, "head_dim", default=d // H))
    mlp = int(_field(cfg, "n_inner", "intermediate_size", default=4 * d))
    gated = cfg["model_type"] in ("llama", "qwen2", "mistral", "gemma2")
    return dict(L=L, d=d, H=H, dh=dh, mlp=mlp, V=int(cfg["vocab_size"]), gated=int(gated))


def edges(cfg: dict) -> int:
    """Edges of the model's graph (``eap.arch.graph_spec`` of the config)."""
    from eap.arch import graph_spec
    from eap.graph import Graph

    return Graph(graph_spec(cfg)).n_edges


def flops_per_token(cfg: dict, n_tokens: int) -> tuple[float, float]:
    """FLOPs per token of a plain forward: (blocks, unembedding). Blocks of the ungrouped model
    (q, k, v and output projections of every query head, the MLP, causal attention over
    ``n_tokens``); norms, biases and the embedding lookup are ignored."""
    s = shape(cfg)
    attn_proj = 4 * s["d"] * s["H"] * s["dh"]
    mlp = (3 if s["gated"] else 2) * s["d"] * s["mlp"]
    scores = 2 * s["H"] * s["dh"] * (n_tokens + 1) / 2  # QK^T and AV over the causal prefix, on average
    return 2.0 * s["L"] * (attn_proj + mlp + scores), 2.0 * s["d"] * s["V"]


def body_share(cfg: dict, n_tokens: int) -> float:
    body, unembed = flops_per_token(cfg, n_tokens)
    return body / (body + unembed)


def k_fe() -> float:
    """Mean of measured forward-equivalents per edge over body share (the extrapolation factor)."""
    ratios = [fe / body_share(cfg, MEASURED_TOKENS) for cfg, fe in MEASURED_FE.values()]
    return sum(ratios) / len(ratios)


def fe_per_edge(name: str, cfg: dict) -> tuple[float, bool]:
    """(forward-equivalents per edge, measured?) for a model of :data:`CONFIGS`."""
    if name in MEASURED_FE:
        return MEASURED_FE[name][1], True
    return k_fe() * body_share(cfg, MEASURED_TOKENS), False


def forward_seconds(cfg: dict, n_prompts: int, n_tokens: int, gpu: Gpu, utilisation: float) -> float:
    body, unembed = flops_per_token(cfg, n_tokens)
    return n_prompts * n_tokens * (body + unembed) / (gpu.peak_flops * utilisation)


def hours(cfg: dict, fe: float, n_prompts: int, n_tokens: int, gpu: Gpu, utilisation: float, workers: int) -> float:
    """Hours to exhaustive exact truth: edges x fe x forward time / workers."""
    return edges(cfg) * fe * forward_seconds(cfg, n_prompts, n_tokens, gpu, utilisation) / workers / 3600


# ------------------------------------------------------------------------- sample size
def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def spearman_ci(rho: float, k: int, level: float = 0.95) -> tuple[float, float]:
    """CI of Spearman's rho on ``k`` randomly drawn edges (Fisher z, Bonett-Wright variance)."""
    if k <= 3:
        return (-1.0, 1.0)
    se = math.sqrt((1 + rho * rho / 2) / (k - 3))
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    return math.tanh(z - _z(level) * se), math.tanh(z + _z(level) * se)


def spearman_sample_size(rho: float, half_width: float, level: float = 0.95) -> int:
    """Smallest number of sampled edges whose CI on Spearman's rho (at ``rho``) is at most
    ``2 x half_width`` wide."""
    lo, hi = 4, 4
    while (lambda c: c[1] - c[0])(spearman_ci(rho, hi, level)) > 2 * half_width:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        width = spearman_ci(rho, mid, level)
        if width[1] - width[0] <= 2 * half_width:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ------------------------------------------------------------------------------ tables
def tables(n_prompts: int = 100, n_tokens: int = 20, gpu: str = "H100", small_util: float = 0.2,
           large_util: float = 0.4) -> str:
    """The markdown tables of docs/scaling.md."""
    g = GPUS[gpu]
    rows = ["| model | edges | fwd-eq / edge | GFLOP / plain forward | forward on 1 H100 | hours on 1 / 8 / 64 H100 "
            "| ... on A100 (1 / 8 / 64) |", "|---|---|---|---|---|---|---|"]
    for name, cfg in CONFIGS.items():
        fe, measured = fe_per_edge(name, cfg)
        util = large_util if shape(cfg)["d"] >= 2048 else small_util
        body, unembed = flops_per_token(cfg, n_tokens)
        fwd = forward_seconds(cfg, n_prompts, n_tokens, g, util)
        h = [hours(cfg, fe, n_prompts, n_tokens, g, util, w) for w in (1, 8, 64)]
        ha = [hours(cfg, fe, n_prompts, n_tokens, GPUS["A100"], util, w) for w in (1, 8, 64)]
        rows.append(f"| {name} | {edges(cfg):,} | {fe:.3f}{'' if measured else ' (extrap.)'} | "
                    f"{n_prompts * n_tokens * (body + unembed) / 1e9:,.0f} | {fwd * 1e3:.1f} ms ({util:.0%}) | "
                    + " / ".join(_h(x) for x in h) + " | " + " / ".join(_h(x) for x in ha) + " |")
    sizes = ["| Spearman rho | ±0.10 | ±0.05 | ±0.025 |", "|---|---|---|---|"]
    for rho in (0.3, 0.5, 0.7, 0.9):
        sizes.append(f"| {rho} | " + " | ".join(f"{spearman_sample_size(rho, h):,}" for h in (0.10, 0.05, 0.025)) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(sizes) + f"\n\n(K_FE = {k_fe():.3f})"


def _h(hours_: float) -> str:
    return f"{hours_ * 60:.1f} min" if hours_ < 1 else f"{hours_:,.1f} h"


if __name__ == "__main__":
    print(tables())
