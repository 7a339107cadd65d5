"""The cost model and sample-size rule of docs/scaling.md (``bench.scaling``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from bench import scaling


def test_edge_counts_from_published_configs():
    # 32,491: GPT-2 small's graph (the project's reference figure); 231,877: GPT-2 medium (issue #10)
    assert scaling.edges(scaling.CONFIGS["GPT-2 small"]) == 32491
    assert scaling.edges(scaling.CONFIGS["GPT-2 medium"]) == 231877


def test_flops_of_gpt2_small_match_its_parameter_count():
    """2 FLOPs per weight per token: GPT-2 small has 84.9M block weights (q/k/v/o 4 d^2 and MLP
    8 d^2 per layer, 12 layers) and a 768 x 50257 unembedding; attention over one position adds
    QK and AV, 2 d per layer."""
    body, unembed = scaling.flops_per_token(scaling.CONFIGS["GPT-2 small"], n_tokens=1)
    assert body == 2 * 12 * (12 * 768**2 + 2 * 768)
    assert unembed == 2 * 768 * 50257


def test_extrapolated_forward_equivalents_reproduce_the_measured_ones():
    """The extrapolation (mean ratio x body share) stays within 10% of each measured shape."""
    for name, (cfg, fe) in scaling.MEASURED_FE.items():
        assert scaling.k_fe() * scaling.body_share(cfg, scaling.MEASURED_TOKENS) == pytest.approx(fe, rel=0.1), name


@pytest.mark.parametrize("rho,k", [(0.5, 200), (0.8, 100)])
def test_spearman_ci_matches_resampling(rho, k):
    """The CI half-width of Spearman's rho on k random edges against the spread of rho over 2000
    simulated samples (bivariate normal with that Spearman correlation): within 10%."""
    rng = np.random.default_rng(0)
    r = 2 * np.sin(np.pi * rho / 6)  # the Pearson r whose Spearman rho is rho (normal pairs)
    x = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], size=(2000, k))
    rhos = np.array([spearmanr(s[:, 0], s[:, 1])[0] for s in x])
    lo, hi = np.quantile(rhos, [0.025, 0.975])
    want_lo, want_hi = scaling.spearman_ci(float(np.median(rhos)), k)
    assert hi - lo == pytest.approx(want_hi - want_lo, rel=0.1)
    assert abs(rhos.mean() - rho) < 0.02


def test_sample_size_is_the_smallest_that_meets_the_width():
    for rho, h in [(0.5, 0.05), (0.9, 0.1), (0.3, 0.025)]:
        k = scaling.spearman_sample_size(rho, h)
        lo, hi = scaling.spearman_ci(rho, k)
        lo1, hi1 = scaling.spearman_ci(rho, k - 1)
        assert hi - lo <= 2 * h < hi1 - lo1
    assert scaling.spearman_sample_size(0.5, 0.05) > scaling.spearman_sample_size(0.5, 0.1)  # narrower: more edges


def test_hours_scale_with_workers_and_gpu():
    cfg = scaling.CONFIGS["Llama-3.1-8B"]
    h1 = scaling.hours(cfg, 0.25, 100, 20, scaling.GPUS["H100"], 0.4, 1)
    assert scaling.hours(cfg, 0.25, 100, 20, scaling.GPUS["H100"], 0.4, 8) == pytest.approx(h1 / 8)
    assert scaling.hours(cfg, 0.25, 100, 20, scaling.GPUS["A100"], 0.4, 1) == pytest.approx(h1 * 989 / 312)
