"""Information flow routes (Ferrando & Voita 2024) on the edge graph: MIB's
``information-flow-routes`` baseline.

On the clean run, without gradients, each receiver v's input ``x_v`` (per prompt and position)
is compared with the output ``o_u`` of each sender u upstream of it::

    proximity(u, v) = max(0, ||x_v||_1 - ||x_v - o_u||_1)
    share(u, v)     = proximity(u, v) / sum_{u' upstream of v} proximity(u', v)     (0 if the sum is 0)
    score(u -> v)   = mean over prompts of (mean over positions of share(u, v))

A dimensionless share in [0, 1] (each receiver's scores sum to 1 per position), **not** an
estimate of a patching effect: it does not depend on the metric, the corrupted prompts or the
intervention. Rank it against exact patching like the other methods (faithfulness curves, rank
agreement), never compare its values with metric units.

Follows hannamw/EAP-IG 795f5607 ``get_scores_information_flow_routes`` (L1 proximity, share over
the receiver's upstream senders, mean over positions, mean over prompts). Differences: its input
node is the token embedding (``hook_embed``), ours the embedding with positions
(``blocks.0.hook_resid_pre``; the same for rotary models), so on learned-position models the
input's share and every other share at a receiver differ; we average over all positions (prompts
of one length; EAP-IG over the real ones), and a receiver whose proximities are all zero gets
zero shares (NaN there).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eap.passes import auto_batch_size
from eap.graph import Graph, HookGroup
from eap.hooks import as_nodes, run_until_stop, sender_difference_hooks, stop_hook
from eap.models import model_dtype
from eap.task import Task


def shares(
    inputs: Float[Tensor, "k n d"], outputs: Float[Tensor, "s n d"]
) -> Float[Tensor, "s k n"]:
    """Each of ``k`` receiver inputs' share from each of ``s`` sender outputs, per token ``n``."""
    x = inputs.transpose(0, 1)  # [n, k, d]
    dist = torch.cdist(x, outputs.transpose(0, 1), p=1.0)  # [n, k, s]: ||x_v - o_u||_1
    prox = (x.abs().sum(-1, keepdim=True) - dist).clamp_min(0)
    total = prox.sum(-1, keepdim=True)
    share = torch.where(total > 0, prox / torch.where(total > 0, total, 1), 0)
    return share.permute(2, 1, 0)


class FlowRoutes:
    """The strategy of ``attribute(method='information-flow-routes')``: adds into ``scores``
    [n_senders, n_receivers] (module docstring)."""

    def __init__(self, model: Any, graph: Graph, scores: Float[Tensor, "n_senders n_receivers"]) -> None:
        self.model, self.graph, self.scores = model, graph, scores

    def auto_batch_size(self, task: Task, budget: int | float | str | None) -> int:
        return auto_batch_size(self.model, self.graph, task, budget)

    def plan(self, task: Task, batch_size: int, budget: int | float | str | None) -> None:
        """Nothing to plan beyond the batch size (one forward without grad)."""

    def result(self) -> Float[Tensor, "n_senders n_receivers"]:
        return self.scores

    @torch.no_grad()
    def accumulate(self, task: Task, prompt_weight: float) -> None:
        model, graph = self.model, self.graph
        b, p = task.clean.shape
        buf = torch.empty(graph.n_senders, b, p, model.cfg.d_model, device=self.scores.device, dtype=model_dtype(model))

        def receiver(g: HookGroup):
            def hook(x: Tensor, hook: Any = None) -> Tensor:
                ins = as_nodes(x, g).reshape(g.size, b * p, -1)
                up = buf[: g.n_upstream].reshape(g.n_upstream, b * p, -1)
                sh = shares(ins, up).view(g.n_upstream, g.size, b, p).mean(-1).sum(-1)  # [s, k]
                self.scores[: g.n_upstream, g.start : g.start + g.size] += sh.to(self.scores.dtype) * prompt_weight
                return x

            return hook

        hooks = sender_difference_hooks(graph, buf, subtract=False) + [(g.hook, receiver(g)) for g in graph.receiver_groups]
        hooks.append((graph.receiver_groups[-1].hook, stop_hook))  # no unembedding
        run_until_stop(model, task.clean, hooks)
