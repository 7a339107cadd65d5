"""The floor: what any gradient attribution must pay at least, on the bare model.

Timing and peak memory themselves are measured by :mod:`eap.measure` (re-exported here).

The floor of a run is the **bare HuggingFace model** underneath the TransformerLens bridge
(the same weights, no bridge components, no hooks, HuggingFace's default attention), doing
the passes a gradient attribution cannot avoid, with the **same read-out** as the run it is
compared with:

1. the corrupted prompts, forward without grad, up to the final residual stream (EAP also
   stops there: it needs the senders' outputs, not corrupted logits);
2. the clean prompts, forward with grad from the input embeddings (a leaf; weights frozen) to
   the metric, and one backward to the input embeddings.

The read-out of step 2 (:func:`floor_kind`):

* ``"readout"`` when the task has one (``task.has_readout``; IOI has): the final norm at the
  read-out position only and only the read-out tokens' columns of the unembedding, as
  ``eap.attribute`` does;
* ``"full-logits"`` otherwise: the full unembedding at every position, then ``task.metric``.

:func:`full_logits` strips a task's read-out, so both ratios can be measured for a task that has
one. :func:`bridge_floor_pass` is the previous definition (the bridge with its edge hooks
switched on, full logits for both runs), kept to show how much the bridge itself costs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eap.passes import select_logits
from eap.hooks import StopForward
from eap.measure import PeakMemory, median, sync, time_call, time_interleaved
from eap.task import Task

__all__ = [
    "PeakMemory", "bare_model", "bridge_floor_pass", "floor_kind", "floor_pass", "full_logits", "median",
    "sync", "time_call", "time_interleaved",
]

_BARE: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class FloorError(RuntimeError):
    """The bare model under a bridge cannot be rebuilt (an unknown layout)."""


def _unwrapped_attr(root: Any, path: str) -> Any:
    """``root.<path>`` in the bridge's HuggingFace model, stepping through bridge components
    (their public ``original_component``) where the HF name is not an attribute of the bridge."""
    cur = root
    for part in path.split("."):
        while not hasattr(cur, part) and isinstance(getattr(cur, "original_component", None), torch.nn.Module):
            cur = cur.original_component
        cur = cur[int(part)] if part.isdigit() else getattr(cur, part)
    return cur


def bare_model(model: Any) -> Any:
    """The HuggingFace model under a TransformerLens bridge, without the bridge: a fresh
    instance of the same class from the same config (HuggingFace's default attention
    implementation), sharing the bridge's weight tensors (no copy), frozen, in eval mode.
    Built once per bridge."""
    bare = _BARE.get(model)
    if bare is not None:
        return bare
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    config = type(hf.config).from_dict(hf.config.to_dict())  # fresh: no attention override of the bridge
    try:
        bare = AutoModelForCausalLM.from_config(config)
    except ValueError:  # a class outside the auto mapping
        bare = type(hf)(config)
    param = next(model.parameters())
    bare = bare.to(device=param.device, dtype=param.dtype)
    state = {}
    for key, value in bare.state_dict().items():
        try:
            src = _unwrapped_attr(hf, key)
        except (AttributeError, IndexError, TypeError) as exc:
            raise FloorError(f"cannot find {key} of the bare {type(bare).__name__} in the bridge's model: {exc}") from exc
        if not isinstance(src, Tensor) or src.shape != value.shape:
            raise FloorError(f"{key}: the bridge's tensor has shape {getattr(src, 'shape', None)}, expected {tuple(value.shape)}")
        state[key] = src.detach()
    bare.load_state_dict(state, assign=True)
    bare.requires_grad_(False)
    bare.eval()
    _BARE[model] = bare
    return bare


def readout_mode(task: Task) -> str:
    """``"readout"`` when the task (and so the run compared with it) reads only a few logits,
    ``"full-logits"`` otherwise (the results' ``floor_kind``)."""
    return "readout" if task.has_readout else "full-logits"


floor_kind = readout_mode  # the older name


def full_logits(task: Task) -> Task:
    """The same task without its read-out: every pass computes all logits at every position
    (``task.metric``). Scores do not change; only the cost does."""
    return Task(task.clean, task.corrupted, task.metric_fn, per_prompt=task.per_prompt, name=task.name,
                info=task.info)


def _final_norm(model: Any, bare: Any) -> torch.nn.Module:
    """The bare model's final norm: the module the bridge maps to ``ln_final``."""
    return bare.get_submodule(model.adapter.component_mapping["ln_final"].name)


def _final_residual(bare: Any, norm: torch.nn.Module, **inputs: Any) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering the final norm (the forward stops there)."""
    got: list[Tensor] = []

    def grab(module: Any, args: tuple) -> None:
        got.append(args[0])
        raise StopForward

    handle = norm.register_forward_pre_hook(grab)
    try:
        bare.base_model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got[0]


def floor_pass(model: Any, task: Task) -> float:
    """One floor pass (see module docstring) on the bare model under ``model``, with the read-out
    of ``task`` (:func:`floor_kind`). Returns the summed clean metric (so no work can be skipped)."""
    bare = bare_model(model)
    norm = _final_norm(model, bare)
    device = next(bare.parameters()).device
    task = task.to(device)
    with torch.no_grad():
        _final_residual(bare, norm, input_ids=task.corrupted)
    with torch.enable_grad():
        emb = bare.get_input_embeddings()(task.clean).detach().requires_grad_(True)
        if task.has_readout:
            # the final residual of the bare model, read out by the same code as EAP's run
            # (eap.arch.Readout: final norm at the read-out position + the read-out columns only)
            resid = _final_residual(bare, norm, inputs_embeds=emb)
            metric = task.readout(select_logits(model, resid, task)).sum()
        else:
            metric = task.metric(bare(inputs_embeds=emb).logits).sum()
        (grad,) = torch.autograd.grad(metric, emb)
    return float(metric.detach()) + 0.0 * float(grad.flatten()[0])


def bridge_floor_pass(model: Any, task: Task) -> float:
    """The old floor, kept for comparison: the bridge itself (edge hooks switched on), one
    corrupted forward to full logits without grad, one clean forward to full logits and a
    backward to the first residual stream."""
    store: dict[str, Tensor] = {}

    def leaf(x: Tensor, hook: Any) -> Tensor:
        x = x.detach().requires_grad_(True)
        store["x"] = x
        return x

    with torch.no_grad():
        model(task.corrupted)
    with torch.enable_grad():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", leaf)]):
            logits = model(task.clean)
        m = task.metric(logits).sum()
        (g,) = torch.autograd.grad(m, store["x"])
    return float(m.detach()) + 0.0 * float(g.flatten()[0])
