"""Interventions: what a patched sender's output is replaced by.

``patching`` (interchange, the default)  its output on the task's corrupted prompt
``zero``                                  zeros
``mean``                                  its mean over a reference set of prompts, averaged over
                                          prompts and positions (one vector per sender)
``mean-positional``                       its mean over the reference prompts per position

The same replacement is used everywhere a sender is patched: EAP's first-order estimate is
``(replacement_u - out_u(clean)) . d metric / d in_v``, exact patching (``validation``) replaces
u's output at v by it, a circuit replaces every out-of-circuit edge by it. Only ``patching``
needs the corrupted prompts; the means come from the *reference* prompts (``Task.reference``, or
an explicit ``reference=`` token tensor; every built-in task uses its corrupted prompts, e.g.
IOI's ABC prompts of the same templates, see docs/tasks.md).

Means are computed once per (model, graph, reference, per-position) by forwards of the reference
prompts through the model's hooks (stopped after the last sender), in prompt batches within the
memory budget (``eap.budget.attribution_batch_size``, a bound on a forward without grad), summed
in float64, and kept in a per-model cache (``clear_cache`` forgets them, e.g. after the weights
changed in place). :meth:`Replacement.fingerprint` names the replacement for results files.

EAP-IG (hannamw/EAP-IG 795f5607, ``compute_mean_activations``): its non-positional mean masks
only the last real position of each prompt and then averages over nodes; we compute the
documented mean instead. Its positional mean is ours (equal-length prompts).
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.budget import attribution_batch_size
from eap.graph import Graph
from eap.hooks import edge_hooks_unavailable, run_until_stop, sender_difference_hooks, stop_hook


class InterventionError(ValueError):
    """An unknown intervention, or one that cannot be set up (no reference prompts, too short)."""


class Intervention(str, Enum):
    """What a patched sender's output becomes (module docstring)."""

    PATCHING = "patching"
    ZERO = "zero"
    MEAN = "mean"
    MEAN_POSITIONAL = "mean-positional"

    @classmethod
    def parse(cls, value: "Intervention | str") -> "Intervention":
        try:
            return cls(value)
        except ValueError:
            raise InterventionError(f"unknown intervention {value!r}; choose one of {INTERVENTIONS}") from None

    @property
    def needs_corrupted(self) -> bool:
        return self is Intervention.PATCHING

    @property
    def needs_reference(self) -> bool:
        return self in (Intervention.MEAN, Intervention.MEAN_POSITIONAL)


INTERVENTIONS: tuple[str, ...] = tuple(i.value for i in Intervention)


@dataclass(frozen=True)
class Replacement:
    """The replacement sender outputs of a non-patching intervention: ``values`` None (zero),
    ``[n_senders, d]`` (mean) or ``[n_senders, p_ref, d]`` (mean-positional), in the model's
    dtype on its device; ``reference`` a hash of the reference tokens ("" for zero)."""

    intervention: Intervention
    values: Tensor | None
    reference: str = ""

    def fill(self, buf: Float[Tensor, "n_senders b p d"]) -> None:
        """Write every sender's replacement output into ``buf`` (in place)."""
        if self.values is None:
            buf.zero_()
            return
        if self.values.shape[0] != buf.shape[0] or self.values.shape[-1] != buf.shape[-1]:
            raise InterventionError(f"replacement for {self.values.shape[0]} senders of width {self.values.shape[-1]} "
                                    f"does not fit a buffer {tuple(buf.shape)}")
        if self.values.dim() == 2:
            buf.copy_(self.values[:, None, None, :].expand_as(buf))
            return
        p = buf.shape[2]
        if p > self.values.shape[1]:
            raise InterventionError(f"mean-positional: the reference prompts have {self.values.shape[1]} positions, "
                                    f"the task's prompts {p}; use reference prompts at least as long")
        buf.copy_(self.values[:, None, :p, :].expand_as(buf))

    def to(self, device: torch.device | str) -> "Replacement":
        """The same replacement with its values on ``device`` (e.g. for another process)."""
        return self if self.values is None else Replacement(self.intervention, self.values.to(device), self.reference)

    def fingerprint(self) -> str:
        """Names the replacement in results-file fingerprints: intervention and reference hash."""
        return f"{self.intervention.value}|{self.reference}"


#: per model: {(graph spec, dtype, device, reference hash, per_position): means}
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, Tensor]]" = weakref.WeakKeyDictionary()


def clear_cache(model: Any | None = None) -> None:
    """Forget cached means (of ``model``, or of every model)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def reference_hash(tokens: Int[Tensor, "m p"]) -> str:
    t = tokens.detach().long().cpu().contiguous()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:16]


def replacement_for(
    model: Any, graph: Graph, task: Any, intervention: "Intervention | str",
    reference: Int[Tensor, "m p"] | None = None, memory_budget: int | float | str | None = None,
) -> Replacement | None:
    """The replacement of ``intervention`` for ``task`` (None for ``patching``: the corrupted run
    supplies it). ``reference``: the prompts the means are taken over (default
    ``task.reference``); an ``InterventionError`` if a mean has none."""
    iv = Intervention.parse(intervention)
    if iv is Intervention.PATCHING:
        return None
    if iv is Intervention.ZERO:
        return Replacement(iv, None)
    ref = reference if reference is not None else getattr(task, "reference", None)
    if ref is None:
        raise InterventionError(
            f"intervention {iv.value!r} needs reference prompts to average over: the task {getattr(task, 'name', '')!r} "
            "has none (Task(reference=...)); pass reference= (a [m, seq] token tensor)")
    if not isinstance(ref, Tensor) or ref.dim() != 2 or ref.dtype.is_floating_point or ref.shape[0] == 0:
        raise InterventionError("reference prompts must be a non-empty [m, seq] tensor of token ids")
    why = edge_hooks_unavailable(model)
    if why is not None:
        raise InterventionError(f"intervention {iv.value!r} takes its means through the model's per-head hooks, "
                                f"which its TransformerLens adapter lacks: {why}")
    d_vocab = model.cfg.d_vocab
    if bool(((ref < 0) | (ref >= d_vocab)).any()):
        raise InterventionError(f"reference prompts hold token ids outside the model's vocabulary [0, {d_vocab})")
    values = sender_means(model, graph, ref, iv is Intervention.MEAN_POSITIONAL, memory_budget)
    return Replacement(iv, values, reference_hash(ref))


def sender_means(
    model: Any, graph: Graph, reference: Int[Tensor, "m p"], per_position: bool,
    memory_budget: int | float | str | None = None,
) -> Float[Tensor, "n_senders *p d"]:
    """Every sender's output averaged over the reference prompts (and positions unless
    ``per_position``), in the model's dtype on its device; cached per model (module docstring)."""
    param = next(model.parameters())
    key = (repr(graph.spec), param.dtype, str(param.device), reference_hash(reference), per_position)
    try:
        cache = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    if key not in cache:
        cache[key] = _compute_means(model, graph, reference.to(param.device).long(), per_position, memory_budget)
    return cache[key]


@torch.no_grad()
def _compute_means(model: Any, graph: Graph, ref: Tensor, per_position: bool, budget: Any) -> Tensor:
    param = next(model.parameters())
    m, p = ref.shape
    d = model.cfg.d_model
    total = torch.zeros(graph.n_senders, p, d, dtype=torch.float64, device=param.device)
    step = attribution_batch_size(model, graph.n_senders, m, p, False, budget)
    for s in range(0, m, step):
        toks = ref[s : s + step]
        buf = torch.empty(graph.n_senders, toks.shape[0], p, d, device=param.device, dtype=param.dtype)
        run_until_stop(model, toks, sender_difference_hooks(graph, buf, subtract=False)
                       + [(graph.sender_groups[-1].hook, stop_hook)])
        total += buf.double().sum(1)
    mean = total / m
    if not per_position:
        mean = mean.mean(1)
    return mean.to(param.dtype)
