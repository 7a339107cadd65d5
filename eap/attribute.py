"""Fast gradient edge attribution: EAP, EAP-IG and clean-corrupted, vectorised.

Sign and units
--------------
``score(u -> v) = mean over prompts of (out_u(corrupted) - out_u(clean)) . d metric / d in_v``,
summed over positions, the gradient taken on the clean run ("noising"). It is the first-order
estimate of ``metric(edge patched) - metric(clean)`` in the metric's units, the same quantity that
``validation.patch_edges`` measures exactly.

Methods
-------
``eap``              gradient at the clean run (the seed notebook's method).
``eap-ig``           gradient averaged over ``ig_steps`` inputs interpolated between the corrupted
                     and the clean input embedding, ``x_k = clean + (1 - k/m)(corrupted - clean)``,
                     k = 1..m (so m = 1 is EAP).
``clean-corrupted``  average of the gradients at the clean and at the corrupted run.
``atp-qk``           EAP, but q and k edges recompute the receiver head's attention pattern exactly
                     and are linear only from the pattern on (AtP*'s QK-fix; ``eap.atp``).
``atp-graddrop``     EAP averaged over gradients with one layer's residual-stream gradient dropped
                     (AtP*'s GradDrop; magnitudes per the paper, signed; ``eap.atp``).
``atp*``             both fixes (Kramar et al. 2024, adapted to edges; see ``eap.atp``, docs/atp.md).
``eap-ig-activations`` gradients averaged over runs in which one sender group's output (input,
                     a layer's heads, a layer's MLP) lies on the straight line from its clean to
                     its replacement output (``eap.ig_activations``; MIB's EAP-IG-activations).
``information-flow-routes`` Ferrando & Voita's proximity of each sender's output to each
                     receiver's input on the clean run, no gradient (``eap.flow_routes``): a
                     contribution share in [0, 1], *not* an estimate of a patching effect.

Interventions
-------------
``intervention=`` ('patching' | 'zero' | 'mean' | 'mean-positional', ``eap.interventions``) sets
what "corrupted" means above: ``replacement_u`` takes ``out_u(corrupted)``'s place, so EAP is
``(replacement_u - out_u(clean)) . d metric / d in_v``. The methods that need corrupted *inputs*
(``eap-ig``, ``clean-corrupted``, the AtP variants) refuse the others.

``eap``, ``eap-ig`` and ``clean-corrupted`` take ``post_norm='jacobian'`` (default: on post-norm
families a head's difference passes the post-norm's Jacobian, the first-order term of exact
patching) or ``'ignore'`` (EAP-IG's ``attribute.py`` variant, for reproducing MIB numbers;
``eap.arch.postnorm``); elsewhere both give the same scores.

How it is computed (per prompt batch)
-------------------------------------
1. corrupted forward, no grad: forward hooks write every sender's output into one preallocated
   buffer ``[n_senders, batch, pos, d_model]``; the forward stops after the last sender (no
   unembedding).
2. clean forward with grad: the same hooks subtract the clean outputs (buffer = corrupted - clean);
   the residual at ``blocks.0.hook_resid_pre`` is the only leaf.
3. backward: a tensor hook on each receiver's input contracts its gradient with the upstream prefix of the buffer in
   one matrix product and adds into the ``[n_senders, n_receivers]`` score matrix. Gradients are
   never stored, no parameter gradient is accumulated.
``eap-ig`` and ``clean-corrupted`` add one forward+backward per extra gradient point. The AtP
methods share steps 1-3 (``eap.passes``: ``fill_corrupted``, ``receiver_hooks``, ``metric_values``)
and add their own work (``eap.atp.AtP``). Each method is one object of the registry
``eap.methods.REGISTRY``, which says how it computes (gradient points, or an AtP variant);
``attribute`` looks it up and calls its ``compute``.

Engines
-------
The passes above run on one of two engines, chosen once per call (``engine=``): ``fast``
(``eap.fast``: the same passes on the architecture adapter's plain-torch blocks, no per-head
copies of the residual stream) wherever ``eap.arch`` reproduces the model, else ``bridge`` (the
hooks above, through the TransformerLens bridge). Both give the same scores. The AtP
methods run on the bridge engine.
"""

from __future__ import annotations

from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

from eap.atp import AtPOptions  # noqa: F401  (kept importable from here)
from eap.fast import ENGINES
from eap.graph import Graph
from eap.interventions import Intervention
from eap.methods import REGISTRY, AtPMethod, GradientPointsMethod, Method, get_method
from eap.passes import (  # noqa: F401  (their old home: kept importable from here)
    AttributionError, GradientMethod, ScoreSink, auto_batch_size, check_task_inputs, fill_corrupted, metric_values,
    receiver_hooks, select_logits,
)
from eap.task import Task

#: Names of the built-in methods (derived from ``eap.methods.REGISTRY``).
METHODS = REGISTRY.names(builtin_only=True)
GRADIENT_METHODS = tuple(m.name for m in REGISTRY if isinstance(m, GradientPointsMethod) and m.builtin)
ATP_METHODS = tuple(m.name for m in REGISTRY if isinstance(m, AtPMethod) and m.builtin)


def gradient_points(method: str, ig_steps: int = 5) -> list[tuple[float, float]]:
    """(alpha, weight) pairs of a gradient-points method (``eap.methods.GradientPointsMethod.points``):
    the input of each backward pass is ``clean + (1 - alpha) * (corrupted - clean)`` and its
    gradient counts with ``weight``."""
    found = REGISTRY.get(method) if method in REGISTRY else None
    if not isinstance(found, GradientPointsMethod):
        raise AttributionError(f"unknown gradient method {method!r}; choose one of {GRADIENT_METHODS}")
    return found.points(ig_steps=ig_steps)


def attribute(
    model: Any,
    graph: Graph,
    task: Task,
    method: "Literal['eap', 'eap-ig', 'clean-corrupted', 'atp-qk', 'atp-graddrop', 'atp*'] | str | Method" = "eap",
    *,
    level: Literal["edge", "node"] = "edge",
    batch_size: int | None = None,
    ig_steps: int = 5,
    memory_budget: int | float | str | None = None,
    progress: bool = True,
    write_graph: bool = True,
    engine: Literal["auto", "fast", "bridge"] = "auto",
    intervention: Literal["patching", "zero", "mean", "mean-positional"] = "patching",
    reference: Tensor | None = None,
    **options: Any,
) -> Float[Tensor, " n"]:
    """Score every edge (``level='edge'``, a tensor ``[graph.n_edges]`` in the graph's edge order)
    or every sender (``level='node'``, ``[graph.n_senders]``).

    Units and sign: score ~= mean over prompts of metric(patched) - metric(clean), in the units of
    ``task.metric`` (e.g. logits for IOI's logit difference); patched = the sender's output
    replaced by its corrupted value (edge: at one receiver; node: everywhere). First order,
    gradient on the clean run for ``eap`` (see module docstring for the other methods; the AtP
    methods, ``eap.atp``, score edges only).

    ``method``: a name registered in ``eap.methods.REGISTRY`` (the built-ins: ``eap.METHODS``) or
    a ``Method``. ``ig_steps`` goes to the methods that declare it (``eap-ig``); ``**options``:
    further options of the method (each method's typed ``options``; an unknown one is an error).

    Prompts are split into batches of ``batch_size`` (when None, as many as fit
    ``memory_budget``: bytes or a size such as ``"2GiB"``, default a share of the free device
    memory; see ``eap.budget``); the result does not depend on the split. The gradient methods
    peak at the same memory per batch (their gradient points run one after another); the AtP
    methods hold more per prompt and plan for it (``eap.budget.plan_atp``). A metric that closes
    over tensors of all prompts cannot be split: then a ``TaskError`` asks for ``per_prompt``
    data unless one batch holds every prompt. Scores come back on the CPU in the model's dtype
    (float32 at least); with ``write_graph`` they are also written into ``graph.scores``.

    ``engine``: ``"auto"`` (the fast engine of ``eap.fast`` where the architecture adapter
    reproduces the model and no hooks are attached, else the bridge's hooks), ``"fast"`` (or
    ``eap.arch.UnsupportedModel``) or ``"bridge"``; the scores are the same. Which engine ran,
    and why the bridge where it did, is logged at INFO by the ``eap.attribute`` logger
    (``logging.basicConfig(level=logging.INFO)`` shows it; ``eap.passes.engine_used``).

    ``intervention``: what a patched sender output is (``eap.interventions``: 'patching' the
    corrupted run, 'zero', 'mean' or 'mean-positional' over ``reference`` prompts, default
    ``task.reference``); the score is the estimate of patching with that replacement. It goes to
    the methods that declare it (``eap.methods.INTERVENTION``); the others (they need the corrupted
    prompts) refuse any but 'patching'.
    """
    if engine not in ENGINES:
        raise AttributionError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    chosen = get_method(method)
    chosen.check_level(level)
    intervention = Intervention.parse(intervention).value
    if not chosen.supports(intervention):
        raise AttributionError(
            f"{chosen.name!r} needs the corrupted prompts themselves (interpolated inputs or corrupted-run "
            f"gradients), which the {intervention!r} intervention does not provide; use one of "
            f"{[m.name for m in REGISTRY if m.builtin and m.supports(intervention)]}")
    shared = {"ig_steps": ig_steps}
    if intervention != "patching" or reference is not None:  # a user's method gets them only when asked
        shared.update(intervention=intervention, reference=reference)
    bound = chosen.bind(options, shared=shared)
    check_task_inputs(model, graph, task)
    return chosen.compute(model, graph, task, level=level, batch_size=batch_size, memory_budget=memory_budget,
                          progress=progress, write_graph=write_graph, engine=engine, options=bound)
