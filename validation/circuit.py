"""Circuit evaluation: the metric when every edge outside a circuit is patched at once.

Semantics (MIB's circuit track, through EAP-IG's ``evaluate_graph``; hannamw/EAP-IG
``src/eap/evaluate.py`` at commit 795f5607)
-----------------------------------------------------------------------------------------------
One *corrupted run* (a plain forward of the corrupted prompts) gives every sender's corrupted
output ``corr_u``. The circuit is then evaluated in one forward of the clean prompts in which
**every receiver** (each head's q, k and v input, each MLP input, the logits) reads

    its current input  -  sum over its senders u *outside the circuit* of (cur_u - corr_u)

where ``cur_u`` is sender u's output *in this run* (EAP-IG's hooks subtract the current
activations from the difference buffer as the run goes). So a receiver sees, from each sender,
the sender's corrupted output if the edge is outside the circuit and its current output if the
edge is in it; senders whose inputs were patched upstream pass their changed outputs along the
circuit's edges (everything downstream is recomputed). The residual stream itself is never
patched: only the inputs of receivers are. Edges from ``input`` are treated like every other
edge (EAP-IG's input node is the token embedding ``hook_embed``, ours the embedding with
positions ``blocks.0.hook_resid_pre``; with clean and corrupted prompts of one length the
positions cancel in ``cur - corr``, so the two agree).

EAP-IG prunes the circuit first (``Graph.prune``: edges not on a path input -> logits go). That
never changes the result: a node none of whose inputs is in the circuit reads exactly the
corrupted run's inputs, so its output is its corrupted output and its outgoing edges act as if
patched; a node with no outgoing edge in the circuit reaches no receiver. This module evaluates
the circuit as given (``tests/test_circuit.py`` checks the pruned and unpruned circuits agree).

Consequences: the empty circuit is the corrupted run, the full circuit the clean run, and the
circuit missing only edge ``u -> v`` is exactly that edge's ``validation.patch_edges`` value.

Sign and units: ``per_prompt`` is the task's metric (metric units, not a difference) of each
circuit on each prompt; ``effect = mean - clean mean`` has the sign and units of
``patch_edges`` (noising); ``faithfulness = (mean - corrupted mean) / (clean mean - corrupted
mean)`` is MIB's normalisation (full model 1, corrupted run 0; ratios of means over prompts).

How it runs
-----------
Prompts stream in batches within ``memory_budget`` (``eap.budget.plan_circuits``): per batch,
one corrupted forward through the model's hooks (every sender's output) and the clean input
embedding are cached; then ``circuits_per_forward`` circuits at a time are stacked along the
batch and run by ``validation.runner.BlockRunner.run_circuits`` (the adapter's blocks in plain
torch, every receiver with its own input correction) and read out exactly as ``patch_edges``
does (``validation.units.metric_of_final``: only the read-out logits with a read-out). One
circuit costs about one forward of the prompts with per-head q/k/v inputs (see
docs/faithfulness.md for measured costs). Architectures the block runner does not implement
take the hook path through the bridge (a full forward per stack, receivers corrected at their
hooks), with a warning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eap.budget import PatchPlan, held_bytes, plan_circuits
from eap.graph import Graph, GraphError
from eap.hooks import as_nodes
from eap.measure import sync
from eap.task import Task, TaskError
from validation.errors import PatchError
from validation.options import CircuitStats, PatchOptions, path_name
from validation.patch import _check_inputs, _progress, plan_for_task, prepare_call, resolve_options
from validation.units import _collect, metric_of_final, per_copy

__all__ = ["CircuitError", "CircuitEval", "circuit_masks", "evaluate_circuit"]


class CircuitError(PatchError):
    """A circuit that cannot be evaluated (wrong length, unknown edge names, NaN, ...)."""


@dataclass
class CircuitEval:
    """What :func:`evaluate_circuit` returns (float64, CPU).

    ``per_prompt``: the metric of each circuit on each prompt, ``[n_circuits, n_prompts]`` (or
    ``[n_prompts]`` when one circuit was given as a 1-D spec); ``clean`` / ``corrupted``: the
    metric per prompt of the full circuit (the clean run) and of the empty circuit (every edge
    patched: the corrupted run), through the same path, or None with ``baselines=False``."""

    per_prompt: Float[Tensor, "*c n"]
    clean: Float[Tensor, " n"] | None
    corrupted: Float[Tensor, " n"] | None

    @property
    def mean(self) -> Float[Tensor, "*c"]:
        """Mean metric over prompts (metric units)."""
        return self.per_prompt.mean(-1)

    @property
    def effect(self) -> Float[Tensor, "*c"]:
        """``mean - clean mean``: the change the patched edges cause, sign and units of
        ``patch_edges`` (a circuit missing one edge gives that edge's ``patch_edges`` value)."""
        return self.mean - self._need("clean").mean()

    @property
    def faithfulness(self) -> Float[Tensor, "*c"]:
        """MIB's normalised faithfulness ``(mean - corrupted mean) / (clean mean - corrupted
        mean)``: 1 = the full model, 0 = the corrupted run (ratio of means over prompts)."""
        lo, hi = self._need("corrupted").mean(), self._need("clean").mean()
        return (self.mean - lo) / (hi - lo)

    def _need(self, what: str) -> Tensor:
        value = getattr(self, what)
        if value is None:
            raise CircuitError(f"no {what} baseline: evaluate with baselines=True")
        return value


# ------------------------------------------------------------------------------ circuit specs
def circuit_masks(graph: Graph, circuit: Any) -> tuple[Bool[Tensor, "c n_edges"], bool]:
    """Boolean masks over edges (edge order) of one or several circuits, and whether a single
    circuit was given as a 1-D spec.

    ``circuit``: None (the graph's own ``in_graph``); an ``eap.Graph`` (its ``in_graph``); a
    boolean (or 0/1 float) tensor/array ``[n_edges]`` or ``[n_circuits, n_edges]``; an integer
    tensor/array or a list of edge indices and/or names (one circuit); a list of such lists or
    tensors (several circuits). Raises ``CircuitError`` naming the problem."""
    if circuit is None:
        return graph.in_graph[graph.edge_sender, graph.edge_receiver].unsqueeze(0), True
    if isinstance(circuit, Graph):
        if not circuit.spec.matches(graph.spec):
            raise CircuitError(f"the circuit's graph is {circuit.spec}, the evaluation's {graph.spec}")
        return circuit.in_graph[graph.edge_sender, graph.edge_receiver].unsqueeze(0), True
    if isinstance(circuit, np.ndarray):
        circuit = torch.from_numpy(circuit)
    if isinstance(circuit, Tensor):
        if circuit.dtype == torch.bool or circuit.is_floating_point():
            return _mask(graph, circuit)
        if circuit.ndim != 1:
            raise CircuitError(
                f"an integer tensor is a list of edge indices (1-D), got shape {tuple(circuit.shape)}; "
                "pass several circuits as a boolean mask [n_circuits, n_edges]"
            )
        return _from_items(graph, circuit.tolist()).unsqueeze(0), True
    if isinstance(circuit, (str, bytes)) or not isinstance(circuit, Sequence):
        raise CircuitError(
            f"cannot read a circuit from {type(circuit).__name__}: give a boolean mask over edges, edge indices "
            "or names, a list of those, or an eap.Graph"
        )
    items = list(circuit)
    if items and all(isinstance(x, (Sequence, Tensor, np.ndarray)) and not isinstance(x, str) for x in items):
        masks = []
        for i, one in enumerate(items):
            try:
                m, single = circuit_masks(graph, one)
            except (CircuitError, GraphError) as exc:
                raise CircuitError(f"circuit {i}: {exc}") from exc
            if not single:
                raise CircuitError(f"circuit {i}: a list of circuits holds one circuit per entry")
            masks.append(m)
        return torch.cat(masks), False
    return _from_items(graph, items).unsqueeze(0), True


def _mask(graph: Graph, mask: Tensor) -> tuple[Tensor, bool]:
    if mask.ndim not in (1, 2) or mask.shape[-1] != graph.n_edges:
        raise CircuitError(
            f"a circuit mask has one entry per edge ({graph.n_edges} edges, edge order), optionally per circuit "
            f"[n_circuits, {graph.n_edges}]; got shape {tuple(mask.shape)}"
        )
    if mask.ndim == 2 and mask.shape[0] == 0:
        raise CircuitError("no circuits given (mask of shape [0, n_edges])")
    if mask.dtype != torch.bool:
        if torch.isnan(mask).any():
            raise CircuitError(f"circuit mask holds NaN ({int(torch.isnan(mask).sum())} entries)")
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            raise CircuitError(f"a float circuit mask must hold 0 or 1, got e.g. {mask[bad].flatten()[0].item()!r}")
        mask = mask != 0
    return mask.detach().cpu().reshape(-1, graph.n_edges), mask.ndim == 1


def _from_items(graph: Graph, items: list) -> Tensor:
    for x in items:
        if isinstance(x, float):
            raise CircuitError(f"edge indices must be integers, got {x!r} (for a mask pass a boolean tensor)")
    idx = graph.edge_index(items)
    if idx.unique().numel() != idx.numel():
        dup = [graph.edge_names[i] for i in idx.tolist() if int((idx == i).sum()) > 1][:3]
        raise CircuitError(f"the circuit lists edges more than once: {dup}")
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    mask[idx] = True
    return mask


def patched_edges(graph: Graph, keep: Bool[Tensor, "c n_edges"], dtype: torch.dtype,
                  device: torch.device) -> Float[Tensor, "c n_senders n_receivers"]:
    """Dense ``[c, n_senders, n_receivers]`` matrix: 1 on the edges *outside* each circuit."""
    out = torch.zeros(keep.shape[0], graph.n_senders, graph.n_receivers, dtype=dtype, device=device)
    out[:, graph.edge_sender, graph.edge_receiver] = (~keep).to(device=device, dtype=dtype)
    return out


# ------------------------------------------------------------------------------ paths
def _hooked_circuits(model: Any, graph: Graph, task: Task, corrupted: Tensor, patched: Tensor) -> Tensor:
    """Hook path: one forward of the stacked clean prompts through the bridge; sender hooks
    record ``corrupted - current`` per row, receiver hooks add their corrections. Logits."""
    c = patched.shape[0]
    S, nb, p, d = corrupted.shape
    dif = corrupted.new_empty(c, S, nb, p, d)

    def sender(g):
        def hook(x, hook=None):
            cur = as_nodes(x.detach(), g).reshape(g.size, c, nb, p, d).transpose(0, 1)
            dif[:, g.start : g.start + g.size] = corrupted[g.start : g.start + g.size] - cur
            return x

        return hook

    def receiver(g):
        def hook(x, hook=None):
            up = g.n_upstream
            m = patched[:, :up, g.start : g.start + g.size].transpose(1, 2)
            corr = torch.matmul(m, dif[:, :up].reshape(c, up, -1)).view(c, g.size, nb, p, d)
            corr = corr.permute(0, 2, 3, 1, 4).reshape(c * nb, p, g.size, d)
            return x + (corr if g.n_heads else corr.squeeze(2))

        return hook

    hooks = [(g.hook, sender(g)) for g in graph.sender_groups] + [(g.hook, receiver(g)) for g in graph.receiver_groups]
    with torch.no_grad():
        return model.run_with_hooks(task.clean.repeat(c, 1), fwd_hooks=hooks)


# ------------------------------------------------------------------------------ public API
def evaluate_circuit(
    model: Any,
    graph: Graph,
    task: Task,
    circuit: Any = None,
    *,
    baselines: bool = True,
    options: PatchOptions | None = None,
    stats: dict | CircuitStats | None = None,
    **kwargs: Any,
) -> CircuitEval:
    """The task's metric when every edge *not* in ``circuit`` is patched at once (see module
    docstring for the exact semantics: MIB/EAP-IG ``evaluate_graph`` with patching).

    circuit: see :func:`circuit_masks` (one or several circuits; None = ``graph.in_graph``).
        Several circuits are stacked along the batch of each forward.
    baselines: also evaluate the full and the empty circuit (``result.clean``,
        ``result.corrupted``; needed for ``effect`` and ``faithfulness``).
    options / keyword arguments: a :class:`~validation.options.PatchOptions` and overrides of
        its fields, as for ``patch_edges``: ``memory_budget``, ``batch_size``, ``readout``,
        ``engine`` (the deprecated ``method``), ``progress`` (default False here); ``eap.budget``
        plans the prompt batches and circuits per forward, the result does not depend on them.
        ``edges`` (pass ``circuit``), ``scale``, ``out``, ``shard`` and ``executor`` do not
        apply (a ``CircuitError``).
    stats: a dict (filled with the keys of :class:`~validation.options.CircuitStats`: setup_s
        (corrupted forwards), eval_s (circuit forwards), n_circuits (baselines included),
        n_forwards, circuits_per_forward, prompts_per_batch, n_batches, rows_per_forward,
        memory_budget, planned_peak_bytes, engine, path, readout) or a ``CircuitStats``.
    """
    if options is None:
        kwargs.setdefault("progress", False)
    opts = resolve_options(model, options, kwargs)
    given = {"edges": opts.edges is not None, "scale": opts.scale != 1.0, "out": opts.out is not None,
             "shard": opts.shard is not None, "executor": opts.executor not in ("local", None)}
    extra = [k for k, v in given.items() if v]
    if extra:
        raise CircuitError(f"evaluate_circuit does not take {', '.join(extra)} (circuit evaluation runs locally, "
                           "unscaled, without a results file)")
    _check_inputs(model, graph, task, 1.0)
    keep, single = circuit_masks(graph, circuit)
    task, runner, use_readout = prepare_call(model, task, opts.engine, opts.batch_size, opts.readout,
                                             "circuit evaluation")
    n_user = keep.shape[0]
    if baselines:
        keep = torch.cat([keep, torch.ones(1, graph.n_edges, dtype=torch.bool), torch.zeros(1, graph.n_edges, dtype=torch.bool)])
    plan: PatchPlan = plan_for_task(task, model.cfg.d_vocab, opts.batch_size, lambda whole, nb: plan_circuits(
        model, graph.n_senders, task.n_prompts, task.seq_len, readout=use_readout, hooks=runner is None,
        max_circuits=keep.shape[0], budget=opts.memory_budget, prompts_per_batch=nb, whole_task=whole,
        fixed_bytes=held_bytes(runner, model) if runner is not None else 0))
    st = CircuitStats(n_circuits=keep.shape[0], circuits_per_forward=plan.copies_per_forward,
                      prompts_per_batch=plan.prompts_per_batch, n_batches=len(plan.batches(task.n_prompts)),
                      rows_per_forward=plan.rows_per_forward, memory_budget=plan.budget,
                      planned_peak_bytes=plan.peak_bytes, engine="fast" if runner is not None else "bridge",
                      readout=use_readout)
    st.path = path_name(st.engine)
    values = _evaluate(model, graph, task, keep, plan, runner, use_readout, opts.progress, st)
    if not torch.isfinite(values).all():
        raise TaskError(f"task {task.name!r}: the metric returned NaN/inf for some circuit and prompt")
    st.fill(stats)
    per_prompt = values[:n_user]
    return CircuitEval(
        per_prompt=per_prompt[0] if single else per_prompt,
        clean=values[n_user] if baselines else None,
        corrupted=values[n_user + 1] if baselines else None,
    )


def _evaluate(model: Any, graph: Graph, task: Task, keep: Bool[Tensor, "c n_edges"], plan: PatchPlan,
              runner: Any, use_readout: bool, progress: bool, st: CircuitStats) -> Float[Tensor, "c n"]:
    """The metric of every circuit of ``keep`` on every prompt, batch by batch (``plan``);
    seconds and forwards into ``st``."""
    param = next(model.parameters())
    device = param.device
    n_c, m = keep.shape[0], plan.copies_per_forward
    values = torch.empty(n_c, task.n_prompts, dtype=torch.float64)
    batches = plan.batches(task.n_prompts)
    bar = _progress(n_c * len(batches), "circuits", progress, len(batches))
    try:
        for P in batches:
            t = task if (P.start, P.stop) == (0, task.n_prompts) else task.subset(P)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                cache = _collect(model, graph, t, residuals=False, differences=False, runner=runner)
            sync(device)
            st.setup_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for c0 in range(0, n_c, m):
                chunk = keep[c0 : c0 + m]
                patched = patched_edges(graph, chunk, param.dtype, device)
                with torch.no_grad():
                    if runner is not None:
                        final = runner.run_circuits(graph, cache.pre[0], cache.delta, patched)
                        got = metric_of_final(t, runner, final, len(chunk), use_readout)
                    else:
                        got = per_copy(t, _hooked_circuits(model, graph, t, cache.delta, patched), len(chunk), False)
                values[c0 : c0 + m, P] = got.double().cpu()
                st.n_forwards += 1
                bar.update(len(chunk))
            sync(device)
            st.eval_s += time.perf_counter() - t0
            del cache
    finally:
        bar.close()
    return values
