"""A custom attribution method for eap-bench: EAP with the gradient taken at the corrupted run.

The contract (the same as ``eap.attribute``): ``fn(model, graph, task, **kwargs)`` returns a
float tensor ``[graph.n_edges]`` in ``graph.edge_names`` order, in the metric's units, with the
noising sign: score(u -> v) ~= metric(edge patched) - metric(clean). The bench checks shape,
dtype and finiteness of what comes back.

Here: score(u -> v) = (out_u(corrupted) - out_u(clean)) . d metric / d in_v, the gradient taken
on the *corrupted* run instead of the clean one. It is built from two built-in methods by
linearity: ``clean-corrupted`` averages the gradients at the clean and the corrupted run, so

    corrupted-gradient score = 2 * clean-corrupted - eap

(it costs two attributions; a method written from scratch would run one corrupted forward and
backward). Use it as ``--methods eap,custom_method:eap_corrupted_grad`` with ``PYTHONPATH=examples``.
"""

from __future__ import annotations

import torch

import eap


def eap_corrupted_grad(model, graph, task, batch_size: int | None = None) -> torch.Tensor:
    """EAP scores with the gradient at the corrupted run (see module docstring)."""
    kw = dict(batch_size=batch_size, progress=False, write_graph=False)
    both = eap.attribute(model, graph, task, method="clean-corrupted", **kw)
    clean = eap.attribute(model, graph, task, method="eap", **kw)
    return 2 * both - clean
