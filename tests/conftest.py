"""Shared test setup: offline hub, the --benchmark flag, tiny float64 models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the performance benchmarks (pytest-benchmark); plain pytest skips them",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="performance benchmark: run with pytest --benchmark")
    for item in items:
        if "benchmark" in item.keywords or "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    toy models gain nothing from threads, and on a busy machine extra threads cost many times over."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TINY_SHAPE = dict(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=64)
TINY3_SHAPE = dict(n_layer=3, n_embd=24, n_head=3, n_positions=32, vocab_size=64)


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer, 16-wide, 2-head random GPT-2 in float64 on CPU (seeded)."""
    from eap.models import random_model

    return random_model(TINY_SHAPE, seed=0, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny3_model():
    """A 3-layer, 24-wide, 3-head random GPT-2 in float64 on CPU (seeded)."""
    from eap.models import random_model

    return random_model(TINY3_SHAPE, seed=1, device="cpu", dtype=torch.float64)


def random_task(model, n=4, seq=7, seed=0):
    """Random clean/corrupted token pairs with a smooth, non-saturated metric: the log-prob
    difference of two fixed tokens at the last position. Used for the math tests."""
    from eap.task import Task

    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    device = next(model.parameters()).device
    clean = torch.randint(3, vocab, (n, seq), generator=g).to(device)
    corrupted = clean.clone()
    corrupted[:, : seq // 2] = torch.randint(3, vocab, (n, seq // 2), generator=g).to(device)
    end = torch.full((n,), seq - 1, device=device)
    toks = torch.randint(3, vocab, (n, 2), generator=g).to(device)
    return Task(clean, corrupted, _lp_diff, per_prompt={"end": end, "toks": toks}, name="random")


def closure_task(model, n=5, seq=6, seed=0):
    """``(closure, per_prompt)``: the same task twice. ``closure``'s metric closes over answer
    tensors of all n prompts, the way the seed notebook and EAP-IG users write it
    (``metric(logits)`` indexing fixed ``end``/``toks``); ``per_prompt`` is :func:`random_task`,
    whose metric gets them through ``per_prompt``."""
    from eap.task import Task

    base = random_task(model, n=n, seq=seq, seed=seed)
    end, toks = base.per_prompt["end"], base.per_prompt["toks"]

    def metric(logits):
        lp = logits[range(logits.size(0)), end].log_softmax(-1)
        return lp[range(logits.size(0)), toks[:, 0]] - lp[range(logits.size(0)), toks[:, 1]]

    return Task(base.clean, base.corrupted, metric, name="closure"), base


def _lp_diff(logits, end, toks, **_):
    lp = logits[torch.arange(logits.shape[0]), end].log_softmax(-1)
    return lp.gather(1, toks[:, :1]).squeeze(1) - lp.gather(1, toks[:, 1:]).squeeze(1)


@pytest.fixture
def make_random_task():
    return random_task


def central_difference(fn, model, graph, task, eps=1e-2, **kw):
    """(fn(scale=+eps) - fn(scale=-eps)) / 2 eps for ``validation.patch_edges`` / ``patch_nodes``:
    the derivative of exact patching along the patch direction, which EAP must equal."""
    return (fn(model, graph, task, scale=eps, progress=False, **kw)
            - fn(model, graph, task, scale=-eps, progress=False, **kw)) / (2 * eps)


def exact_over_eps_errors(model, graph, task, scores, eps_values=(1e-1, 3e-2, 1e-2), **kw):
    """Largest |central difference of exact patching - scores| relative to max |scores|, per eps."""
    import validation

    scale = scores.abs().max()
    return [float((central_difference(validation.patch_edges, model, graph, task, eps, **kw) - scores).abs().max()
                  / scale) for eps in eps_values]
