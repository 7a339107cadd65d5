"""Memory budgets: the one place a budget in bytes becomes batch sizes.

Attribution (``eap.attribute``), exact patching (``validation.patch_edges`` / ``patch_nodes``)
and circuit evaluation (``validation.evaluate_circuit``) ask this module how many prompts (and,
for the last two, how many patched copies or circuits) to process at once. Nothing else in
eap-bench turns memory into a batch size.

Budget
------
A budget is a number of bytes of *extra* memory a call may use on the model's device, on top of
the model and the task that are already resident. ``None`` means the default:
``DEFAULT_FRACTION`` of the device's free memory now (CUDA: ``torch.cuda.mem_get_info``; CPU:
``MemAvailable`` from ``/proc/meminfo``). Strings such as ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"``
are accepted everywhere a budget is (:func:`parse_size`).

Estimates
---------
Every estimate is bytes per prompt (or per stacked row) from the model's config: width ``d``,
heads ``H``, MLP width ``d_mlp``, layers ``L``, vocabulary ``V``, sequence length ``p``, the
element size of the model's dtype. The coefficients were calibrated with tensor accounting
(the peak of live tensor bytes, ``torch.profiler`` with ``profile_memory=True``) on GPT-2-shaped
models (``random:gpt2-small``, the 4-layer GPT-2 toy) and err on the high side by 5-35 %; see
``docs/memory.md`` for the measurements. A budget below what one prompt needs is not refused:
the batch becomes one prompt (and one copy) and a ``BudgetWarning`` says so.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from eap.measure import proc_kib_field

#: Share of the device's free memory used when no budget is given.
DEFAULT_FRACTION = 0.5
#: Exact patching on CPU: most bytes of activations one patched forward may touch. Larger
#: forwards leave the CPU caches and get slower per row (GPT-2 small, one thread: 30 ms per row
#: from 16 to 128 rows, 40 ms per row at 256 rows), smaller ones are dominated by overheads.
CPU_FORWARD_BYTES = 64 * 2**20
#: Exact patching on CPU: most stacked rows per forward (fastest range 80-320 on small models).
CPU_MAX_ROWS = 256
#: Exact patching on CUDA: most stacked rows per forward.
CUDA_MAX_ROWS = 16384

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 10**3, "kib": 2**10,
    "m": 2**20, "mb": 10**6, "mib": 2**20,
    "g": 2**30, "gb": 10**9, "gib": 2**30,
    "t": 2**40, "tb": 10**12, "tib": 2**40,
}


class BudgetError(ValueError):
    """A memory budget that cannot be parsed, is not positive, or cannot be met."""


class BudgetWarning(UserWarning):
    """The budget is below the minimum batch (one prompt, one copy); the minimum is used."""


# ------------------------------------------------------------------------------------ budgets
def parse_size(size: int | float | str) -> int:
    """Bytes from ``1073741824``, ``"2GiB"``, ``"512 MiB"``, ``"1.5GB"``, ``"300M"`` (a bare
    K/M/G/T is binary, KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary). Raises ``BudgetError``."""
    if isinstance(size, bool):
        raise BudgetError(f"memory budget must be a number of bytes or a size like '2GiB', got {size!r}")
    if isinstance(size, (int, float)):
        value = float(size)
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(
                f"cannot read memory budget {size!r}: use bytes or a size like '2GiB', '512MiB', '1.5GB'"
            )
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise BudgetError(f"memory budget must be a number of bytes or a size like '2GiB', got {type(size).__name__}")
    if not math.isfinite(value) or value < 1:
        raise BudgetError(f"memory budget must be at least 1 byte, got {size!r}")
    return int(value)


def free_memory(device: torch.device | str) -> int:
    """Free memory of ``device`` in bytes now (CUDA: free device memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:  # other POSIX systems: the physical pages not in use
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def resolve_budget(budget: int | float | str | None, device: torch.device | str) -> int:
    """The budget in bytes: ``budget`` parsed, else ``DEFAULT_FRACTION`` of the free memory."""
    if budget is None:
        return max(1, int(DEFAULT_FRACTION * free_memory(device)))
    return parse_size(budget)


# ------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class Shape:
    """The config facts the estimates use (all from ``model.cfg`` and the parameters)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    itemsize: int
    device: torch.device

    @classmethod
    def of(cls, model: Any) -> "Shape":
        cfg = model.cfg
        p = next(model.parameters())
        d = int(cfg.d_model)
        d_mlp = int(getattr(cfg, "d_mlp", None) or 0) or (0 if getattr(cfg, "attn_only", False) else 4 * d)
        return cls(int(cfg.n_layers), d, int(cfg.n_heads), d_mlp, int(cfg.d_vocab), p.element_size(), p.device)


def _fmt(n: float) -> str:
    if n < 2**10:
        return f"{int(n)} bytes"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _minimum(what: str, need: int, budget: int) -> None:
    warnings.warn(
        f"memory budget {_fmt(budget)} is below what one prompt needs for {what} (about {_fmt(need)}); "
        "using one prompt per batch", BudgetWarning, stacklevel=3,
    )


# ------------------------------------------------------------------------------ attribution
def attribution_prompt_bytes(model: Any, n_senders: int, seq_len: int, readout: bool) -> int:
    """Peak bytes one prompt adds to an attribution batch (any method: the gradient points run
    one after another, each freeing its activations in its backward pass).

    Per token: the difference buffer (``n_senders * d``), per layer the activations a forward
    with grad keeps for its backward plus the gradients alive during it (``1.5 H d + 11.5 d_mlp
    + 2 d + 2 H p``: the split q/k/v inputs' LayerNorms, gelu's intermediates, the attention
    pattern), and without a readout the full logits, their log-softmax and gradient (``3 V``).
    """
    s = Shape.of(model)
    p = int(seq_len)
    per_layer = 1.5 * s.n_heads * s.d_model + 11.5 * s.d_mlp + 2 * s.d_model + 2 * s.n_heads * p
    per_token = n_senders * s.d_model + s.n_layers * per_layer + (0 if readout else 3 * s.d_vocab)
    return int(math.ceil(p * per_token * s.itemsize))


def attribution_batch_size(model: Any, n_senders: int, n_prompts: int, seq_len: int, readout: bool,
                           budget: int | float | str | None = None) -> int:
    """Prompts per attribution batch that fit ``budget`` bytes (default: see module docstring);
    at least 1 (with a ``BudgetWarning`` when even one prompt exceeds the budget), at most
    ``n_prompts``."""
    b = resolve_budget(budget, Shape.of(model).device)
    per = attribution_prompt_bytes(model, n_senders, seq_len, readout)
    if per > b:
        _minimum("attribution", per, b)
    return max(1, min(int(n_prompts), b // per))


# ------------------------------------------------------------------------------------ AtP*
def atp_stashed_patterns(n_layers: int, grad_drop: bool) -> int:
    """Most pattern gradients ``[H, p, p]`` per prompt that AtP's QK-fix holds at once: one per
    layer; with GradDrop (variants run from the last layer down, a layer's QK-fix done as soon as
    its last variant is in) ``max(L, max_l l (L - l + 1))``."""
    L = int(n_layers)
    return max([L] + ([l * (L - l + 1) for l in range(1, L)] if grad_drop else []))


def atp_prompt_bytes(model: Any, seq_len: int, *, qk_fix: bool, grad_drop: bool) -> int:
    """Bytes per prompt that AtP holds on top of :func:`attribution_prompt_bytes`: with the
    QK-fix the clean attention input per layer (``L p d``), the model's own pattern per layer
    (``L H p p``, to check the adapter against) and the stashed pattern gradients
    (:func:`atp_stashed_patterns` ``* H p p``); with GradDrop the residual gradient at every
    layer boundary (``L p d``) and one block's backward working set (``p (4 d + 6 d_mlp + 4 H p)``,
    which EAP's backward overlaps with activations it has freed, but GradDrop's extra backward
    passes run while the autograd graph is kept; the graph itself is what
    ``attribution_prompt_bytes`` counts at its peak). Pattern tensors in float32 at least."""
    s = Shape.of(model)
    p = int(seq_len)
    wide = max(s.itemsize, 4)
    out = 0
    if qk_fix:
        out += s.n_layers * p * s.d_model * s.itemsize
        out += (s.n_layers + atp_stashed_patterns(s.n_layers, grad_drop)) * s.n_heads * p * p * wide
    if grad_drop:
        out += s.n_layers * p * s.d_model * s.itemsize
        out += p * (4 * s.d_model + 6 * s.d_mlp + 4 * s.n_heads * p) * s.itemsize
    return int(out)


def atp_sender_bytes(model: Any, seq_len: int) -> int:
    """Working bytes of the QK-fix per (sender, prompt) of a chunk: the patched input, its norm,
    the patched q (or k) of every head and the rotary temporaries (``8 p d``), the patched
    scores, pattern and its difference (``4 H p p``, float32 at least)."""
    s = Shape.of(model)
    p = int(seq_len)
    return int(p * (8 * s.d_model * s.itemsize + 4 * s.n_heads * p * max(s.itemsize, 4)))


@dataclass(frozen=True)
class AtPPlan:
    """Prompts per batch and, for the QK-fix, senders per chunk (patched inputs computed at once).

    Bytes: ``eap_bytes`` per prompt (:func:`attribution_prompt_bytes`), ``extra_bytes`` per prompt
    held by AtP (:func:`atp_prompt_bytes`), ``sender_bytes`` per sender and prompt of a QK-fix
    chunk (:func:`atp_sender_bytes`), ``fixed_bytes`` for the whole call, ``budget``. With
    GradDrop (``overlap``) the QK-fix runs while the clean forward's graph is kept for the extra
    backward passes, so the chunk adds to EAP's peak; without, it runs after the backward freed it.
    ``peak_bytes`` is the estimated peak."""

    prompts_per_batch: int
    senders_per_chunk: int
    budget: int
    eap_bytes: int = 0
    extra_bytes: int = 0
    sender_bytes: int = 0
    fixed_bytes: int = 0
    overlap: bool = True

    def prompt_peak(self, chunk: int) -> int:
        """Peak bytes per prompt with QK-fix chunks of ``chunk`` senders."""
        work = chunk * self.sender_bytes
        return self.extra_bytes + (self.eap_bytes + work if self.overlap else max(self.eap_bytes, work))

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.prompts_per_batch * self.prompt_peak(self.senders_per_chunk)


#: QK-fix: the most senders patched at once (more buys no speed on CPU; fewer loops on GPU).
ATP_MAX_CHUNK = 64


def plan_atp(model: Any, n_senders: int, n_prompts: int, seq_len: int, readout: bool, *, qk_fix: bool,
             grad_drop: bool, budget: int | float | str | None = None, prompts_per_batch: int | None = None,
             fixed_bytes: int = 0, max_chunk: int | None = None) -> AtPPlan:
    """Batch plan for ``eap.atp`` within ``budget`` bytes (default: see module docstring).

    ``max_chunk``: the most senders any q/k receiver has (default ``n_senders``; a larger
    QK-fix chunk is never used). Per prompt: see :class:`AtPPlan`; plus ``fixed_bytes`` (e.g.
    GradDrop's score matrix per layer). Prompts per batch: ``prompts_per_batch`` if given, else
    the most that fit with a chunk of ``min(max_chunk, ATP_MAX_CHUNK)`` (at least 1, with a
    ``BudgetWarning`` when even one prompt and one sender do not fit); then the chunk takes what
    the budget leaves, at most that, at least 1."""
    total = resolve_budget(budget, Shape.of(model).device)
    b = max(0, total - int(fixed_bytes))
    want = max(1, min(int(n_senders if max_chunk is None else max_chunk), ATP_MAX_CHUNK))
    plan = AtPPlan(1, want, total, attribution_prompt_bytes(model, n_senders, seq_len, readout),
                   atp_prompt_bytes(model, seq_len, qk_fix=qk_fix, grad_drop=grad_drop),
                   atp_sender_bytes(model, seq_len) if qk_fix else 0, int(fixed_bytes), grad_drop)
    if prompts_per_batch is not None:
        nb = max(1, min(int(n_prompts), int(prompts_per_batch)))
    else:
        if plan.prompt_peak(1) > b:
            _minimum("AtP attribution", plan.prompt_peak(1) + int(fixed_bytes), total)
        nb = max(1, min(int(n_prompts), b // max(1, plan.prompt_peak(want))))
    chunk = want
    while chunk > 1 and nb * plan.prompt_peak(chunk) > b:
        chunk = max(1, min(chunk - 1, chunk * b // max(1, nb * plan.prompt_peak(chunk))))
    return replace(plan, prompts_per_batch=nb, senders_per_chunk=chunk)


def held_bytes(obj: Any, model: Any) -> int:
    """Bytes of the tensors ``obj`` holds (in its attributes, their lists, tuples, dicts and plain
    objects, a few levels deep; modules are not entered) that do not share storage with the
    model's parameters: e.g. the block runner's fused weight copies."""
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    visited: set[int] = set()

    def visit(v: Any, depth: int) -> None:
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            if st.data_ptr() not in shared:
                storages[st.data_ptr()] = st.nbytes()
            return
        if depth > 4 or id(v) in visited or isinstance(v, torch.nn.Module):
            return
        visited.add(id(v))
        if isinstance(v, (list, tuple)):
            children = list(v)
        elif isinstance(v, dict):
            children = list(v.values())
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            children = list(vars(v).values())
        else:
            return
        for x in children:
            visit(x, depth + 1)

    visit(obj, 0)
    return sum(storages.values())


# ---------------------------------------------------------------------------- exact patching
def patch_cache_bytes(model: Any, n_senders: int, seq_len: int, residuals: bool) -> int:
    """Bytes per prompt of exact patching's cache for one prompt batch: the sender differences
    (``n_senders * p * d``) and, for the block runner, the clean residual stream before every
    block, before every MLP and after the last block (``(2 L + 1) p d``)."""
    s = Shape.of(model)
    rows = n_senders + ((2 * s.n_layers + 1) if residuals else 0)
    return int(seq_len) * rows * s.d_model * s.itemsize


def patch_setup_bytes(model: Any, seq_len: int) -> int:
    """Transient bytes per prompt of the two caching forwards (no grad, one layer at a time:
    the split q/k/v inputs' LayerNorms, per-head results, attention scores, the MLP)."""
    s = Shape.of(model)
    p = int(seq_len)
    return p * (4 * s.n_heads * s.d_model + 3 * s.d_mlp + 4 * s.d_model + 2 * s.n_heads * p) * s.itemsize


def patch_row_bytes(model: Any, seq_len: int, readout: bool, hooks: bool = False) -> int:
    """Bytes per stacked row (one prompt of one patched copy) of a patched forward: the copy's
    difference and residual, one block's activations (``16 d + 3 d_mlp + 3 H p`` per token), and
    without a readout the logits and the metric's working copy (``2 V``). The hook path runs the
    whole model through the bridge: its per-layer activations count instead when larger."""
    s = Shape.of(model)
    p = int(seq_len)
    per_token = 16 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * p
    if hooks:
        per_token = max(per_token, 2 * s.d_model + 4 * s.n_heads * s.d_model + 3 * s.d_mlp + 2 * s.n_heads * p)
    if not readout:
        per_token += 2 * s.d_vocab
    return p * per_token * s.itemsize


@dataclass(frozen=True)
class PatchPlan:
    """How exact patching streams prompts: ``prompts_per_batch`` prompts are cached at a time,
    and one patched forward stacks ``copies_per_forward`` copies of them (one per edge).

    ``cache_bytes`` (the batch's cache), ``forward_bytes`` (one patched forward, or the caching
    forwards if larger), ``fixed_bytes`` (held for the whole call, e.g. the block runner's
    weights) and ``budget`` in bytes; ``peak_bytes`` is the estimated peak."""

    prompts_per_batch: int
    copies_per_forward: int
    budget: int
    cache_bytes: int
    forward_bytes: int
    fixed_bytes: int = 0

    @property
    def rows_per_forward(self) -> int:
        return self.prompts_per_batch * self.copies_per_forward

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes + self.forward_bytes

    def batches(self, n_prompts: int) -> list[slice]:
        """The prompt batches: consecutive slices of ``prompts_per_batch`` (the last may be shorter)."""
        nb = self.prompts_per_batch
        return [slice(s, min(s + nb, n_prompts)) for s in range(0, n_prompts, nb)]


def plan_patching(
    model: Any,
    n_senders: int,
    n_prompts: int,
    seq_len: int,
    *,
    readout: bool,
    residuals: bool = True,
    hooks: bool = False,
    max_copies: int = 1,
    budget: int | float | str | None = None,
    prompts_per_batch: int | None = None,
    whole_task: bool = False,
    fixed_bytes: int = 0,
) -> PatchPlan:
    """Prompts per batch and copies per forward for exact patching within ``budget`` bytes.

    Peak = ``fixed_bytes`` (held for the whole call) + cache of one batch + the larger of one
    patched forward and the caching forwards.
    Prompts per batch: all ``n_prompts`` if ``whole_task`` (a metric that needs every prompt in
    each call; ``BudgetError`` if that does not fit), else ``prompts_per_batch`` if given, else
    the most that fit, but no more than one efficient forward's rows (on CPU at most
    ``CPU_FORWARD_BYTES`` of activations, ``CPU_MAX_ROWS`` rows; on CUDA the half of the budget
    the cache leaves): more prompts per batch would cost memory and buy no speed, so the peak
    stays flat in ``n_prompts``. Copies per forward: as many as the rest of the budget holds,
    at most ``max_copies`` (the most edges any receiver has to measure)."""
    return _plan_rows(
        model, n_prompts, patch_cache_bytes(model, n_senders, seq_len, residuals), patch_setup_bytes(model, seq_len),
        patch_row_bytes(model, seq_len, readout, hooks), what="exact patching", max_copies=max_copies,
        budget=budget, prompts_per_batch=prompts_per_batch, whole_task=whole_task, fixed_bytes=fixed_bytes,
    )


# ------------------------------------------------------------------------- circuit evaluation
def circuit_cache_bytes(model: Any, n_senders: int, seq_len: int) -> int:
    """Bytes per prompt of circuit evaluation's cache for one prompt batch: every sender's
    corrupted output (``n_senders * p * d``) and the clean input embedding (``p * d``)."""
    s = Shape.of(model)
    return int(seq_len) * (n_senders + 1) * s.d_model * s.itemsize


def circuit_row_bytes(model: Any, n_senders: int, seq_len: int, readout: bool, hooks: bool = False) -> int:
    """Bytes per stacked row (one prompt of one circuit) of a circuit forward: the row's buffer of
    (corrupted - current) sender outputs (``n_senders * d`` per token, alive for the whole
    forward) plus one layer's working memory: the corrections of one receiver kind's heads,
    their inputs and norms and all heads' results (``5 H d``), ``10 d + 3 d_mlp + 3 H p`` as a
    patched row, and without a readout the logits and the metric's copy (``2 V``). The hook path
    runs the whole model through the bridge per row: its per-layer activations count instead
    when larger."""
    s = Shape.of(model)
    p = int(seq_len)
    work = 5 * s.n_heads * s.d_model + 10 * s.d_model + 3 * s.d_mlp + 3 * s.n_heads * p
    if hooks:
        work = max(work, 2 * s.d_model + 4 * s.n_heads * s.d_model + 3 * s.d_mlp + 2 * s.n_heads * p
                   + 3 * s.n_heads * s.d_model)
    per_token = n_senders * s.d_model + work + (0 if readout else 2 * s.d_vocab)
    return p * per_token * s.itemsize


def plan_circuits(
    model: Any,
    n_senders: int,
    n_prompts: int,
    seq_len: int,
    *,
    readout: bool,
    hooks: bool = False,
    max_circuits: int = 1,
    budget: int | float | str | None = None,
    prompts_per_batch: int | None = None,
    whole_task: bool = False,
    fixed_bytes: int = 0,
) -> PatchPlan:
    """Prompts per batch and circuits per forward for circuit evaluation
    (``validation.evaluate_circuit``) within ``budget`` bytes: the rules of
    :func:`plan_patching`, with circuit evaluation's cache (:func:`circuit_cache_bytes`) and rows
    (:func:`circuit_row_bytes`); ``copies_per_forward`` of the plan is circuits per forward, at
    most ``max_circuits``."""
    return _plan_rows(
        model, n_prompts, circuit_cache_bytes(model, n_senders, seq_len), patch_setup_bytes(model, seq_len),
        circuit_row_bytes(model, n_senders, seq_len, readout, hooks), what="circuit evaluation",
        max_copies=max_circuits, budget=budget, prompts_per_batch=prompts_per_batch, whole_task=whole_task,
        fixed_bytes=fixed_bytes,
    )


def _plan_rows(
    model: Any, n_prompts: int, cache: int, setup: int, row: int, *, what: str, max_copies: int,
    budget: int | float | str | None, prompts_per_batch: int | None, whole_task: bool, fixed_bytes: int,
) -> PatchPlan:
    """The plan of a patching-like job from its bytes per prompt (``cache``, ``setup``) and per
    stacked row (``row``); see :func:`plan_patching` for the rules."""
    s = Shape.of(model)
    total = resolve_budget(budget, s.device)
    fixed = int(fixed_bytes)
    b = max(0, total - fixed)
    n = int(n_prompts)
    cpu = s.device.type != "cuda"
    row_cap = min(CPU_MAX_ROWS, max(1, CPU_FORWARD_BYTES // row)) if cpu else CUDA_MAX_ROWS
    per_prompt = cache + max(setup, row)  # one batch with one copy per forward
    if whole_task:
        nb = n
        if nb * per_prompt + fixed > total:
            raise BudgetError(
                f"the task's metric needs all {n} prompts in every call, and {what} of {n} prompts "
                f"needs about {_fmt(nb * per_prompt + fixed)} ({_fmt(cache)} cached + {_fmt(max(setup, row))} working "
                f"memory per prompt, {_fmt(fixed)} fixed), more than the memory budget of {_fmt(total)}: raise "
                "memory_budget, or pass "
                "the metric's per-prompt data through Task(per_prompt=...) so prompts can be streamed in batches"
            )
    elif prompts_per_batch is not None:
        nb = max(1, min(n, int(prompts_per_batch)))
    else:
        fit = b // per_prompt
        if fit < 1:
            _minimum(what, fixed + per_prompt, total)
        pref = row_cap if cpu else max(1, (b // 2) // row)
        nb = max(1, min(n, fit, pref))
    rows = (b - nb * cache) // row if b > nb * cache else 0
    rows = min(rows, row_cap if cpu else CUDA_MAX_ROWS)
    copies = max(1, min(int(max_copies), rows // nb))
    return PatchPlan(nb, copies, total, nb * cache, max(nb * setup, nb * copies * row), fixed)
