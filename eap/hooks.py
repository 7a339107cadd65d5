"""Hook plumbing shared by attribution (``eap``) and exact patching (``validation``).

The graph (``eap.graph``) names, for every sender and receiver, the TransformerLens hook where
it is read or written; this module checks that a model has those hooks switched on (and, through
the architecture adapter ``eap.arch``, that the graph is right for the model) and offers the few
hook functions both sides need.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from eap.arch import ArchSpec, UnsupportedModel, check_edges
from eap.graph import Graph, GraphError, HookGroup


class HookError(RuntimeError):
    """The model lacks hooks that edge-level work needs."""


REQUIRED_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")


#: bridges whose TransformerLens 4 adapter cannot switch the edge hooks on (GPT-J): model -> why
_WITHOUT_EDGE_HOOKS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def mark_without_edge_hooks(model: Any, reason: str) -> None:
    """Record that TransformerLens cannot give ``model`` its edge hooks (``reason``: its words);
    only the plain-torch fast paths (``eap.fast``, ``validation.runner``) serve such a model."""
    _WITHOUT_EDGE_HOOKS[model] = reason


def edge_hooks_unavailable(model: Any) -> str | None:
    """Why TransformerLens cannot give ``model`` its edge hooks, or None where it can."""
    try:
        return _WITHOUT_EDGE_HOOKS.get(model)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def require_edge_hooks(model: Any, why_not_fast: str | None = None) -> None:
    """Raise ``UnsupportedModel`` if the bridge path (hooks) cannot serve ``model``: its
    TransformerLens adapter has no per-head q/k/v input or result hooks, so the fast path is the
    only one (``why_not_fast``: why that one did not serve either)."""
    reason = edge_hooks_unavailable(model)
    if reason is None:
        return
    family = getattr(getattr(getattr(model, "original_model", None), "config", None), "model_type", "this model")
    msg = (f"TransformerLens 4 has no per-head q/k/v input or per-head result hooks for {family!r} ({reason}), "
           "so the bridge's hook path cannot compute edges here; eap-bench's plain-torch fast path "
           "(engine 'fast' for attribution, exact patching and circuits) is the only path for this family")
    raise UnsupportedModel(msg + (f"; it did not serve: {why_not_fast}" if why_not_fast else ""))


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (nothing after it is needed)."""


def check_edge_hooks(model: Any, graph: Graph | None = None) -> ArchSpec:
    """Raise ``HookError`` unless ``model`` exposes every hook the edge graph reads/writes, and
    ``eap.arch.UnsupportedModel`` (naming the feature) unless the edge graph is right for the
    model's architecture (``eap.arch.check_edges``). Returns the model's ``ArchSpec``.

    Models must be TransformerLens bridges with split q/k/v inputs, per-head results and
    ``hook_mlp_in`` switched on, grouped-query attention ungrouped; ``eap.load_model`` does that.
    """
    hook_dict = getattr(model, "hook_dict", None)
    cfg = getattr(model, "cfg", None)
    if hook_dict is None or cfg is None:
        raise HookError(
            f"{type(model).__name__} is not a TransformerLens model with hooks; load it with eap.load_model"
        )
    off = [flag for flag in REQUIRED_FLAGS if not getattr(cfg, flag, False)]
    if off and edge_hooks_unavailable(model) is None:
        raise HookError(
            f"model has {', '.join(off)} switched off: edge attribution needs split q/k/v inputs, "
            "per-head results and hook_mlp_in (use eap.load_model, or call set_use_split_qkv_input(True), "
            "set_use_attn_result(True), set_use_hook_mlp_in(True))"
        )
    spec = check_edges(model)
    graph = graph or Graph.from_model(model)
    graph.check_model(model)
    if not graph.spec.matches(spec.graph_spec()):
        raise GraphError(f"graph was built for {graph.spec} but the model's architecture gives {spec.graph_spec()}")
    missing = [g.hook for g in graph.sender_groups + graph.receiver_groups if g.hook not in hook_dict]
    if missing:
        raise HookError(f"model lacks the hooks {missing[:6]}{' ...' if len(missing) > 6 else ''} needed for edges")
    return spec


def as_nodes(act: Tensor, group: HookGroup) -> Float[Tensor, "nodes batch pos d_model"]:
    """View a hook's activation as one slice per graph node: [b, p, H, d] -> [H, b, p, d],
    [b, p, d] -> [1, b, p, d]."""
    if group.n_heads is None:
        return act.unsqueeze(0)
    return act.permute(2, 0, 1, 3)


def sender_difference_hooks(
    graph: Graph, buf: Float[Tensor, "n_senders batch pos d_model"], subtract: bool
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Forward hooks that write every sender's output into its slice of ``buf`` (``subtract``
    False: ``buf = out``) or take it away (True: ``buf -= out``). A corrupted forward with the
    first and a clean forward with the second leave ``buf = corrupted - clean`` for every sender;
    attribution and exact patching both fill their difference buffer this way."""

    def hook_for(group: HookGroup) -> Callable[[Tensor, Any], Tensor]:
        rows = slice(group.start, group.start + group.size)

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            if subtract:
                buf[rows] -= as_nodes(act.detach(), group)
            else:
                buf[rows] = as_nodes(act.detach(), group)
            return act

        return hook

    return [(g.hook, hook_for(g)) for g in graph.sender_groups]


def run_until_stop(model: Any, tokens: Tensor, fwd_hooks: list) -> Any:
    """A forward with ``fwd_hooks``: the model's output, or None where a hook raised ``StopForward``."""
    with model.hooks(fwd_hooks=fwd_hooks):
        try:
            return model(tokens)
        except StopForward:
            return None


def leaf_input_hook(
    shift: Float[Tensor, "batch pos d_model"] | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """Forward hook for ``blocks.0.hook_resid_pre`` that makes the residual a leaf requiring grad
    (frozen weights leave nothing else to differentiate), optionally adding ``shift`` first."""

    def hook(x: Tensor, hook: Any = None) -> Tensor:
        x = x.detach()
        if shift is not None:
            x = x + shift
        return x.requires_grad_(True)

    return hook


def with_grad_hook(act: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
    """``act`` as a fresh view whose gradient is passed to ``on_grad`` in the backward pass (a
    tensor hook, not a module backward hook: those clone every gradient). The view, not ``act``,
    carries the hook because ``act`` can be shared with other paths (the bridge passes
    ``resid_mid`` itself through ``hook_mlp_in``); a forward hook returns the view so that only
    its own consumer uses it. Returns ``act`` itself when it does not require grad."""
    if not act.requires_grad:
        return act
    out = act.view_as(act)
    out.register_hook(on_grad)
    return out


def stop_hook(x: Tensor, hook: Any = None) -> Tensor:
    """Forward hook that ends the forward pass (see ``StopForward``)."""
    raise StopForward
