"""A task: clean and corrupted prompts plus a per-prompt metric.

The same ``Task`` object is used unchanged by ``eap`` (attribution), ``validation`` (exact
patching) and ``bench``. Users bring their own task through the constructor; ``eap.tasks.ioi``
builds the IOI one.

Conventions
-----------
* ``clean`` and ``corrupted`` are integer token tensors of the same shape ``[n_prompts, seq]``.
  Prompts of different lengths are right-padded; the metric reads the positions it needs.
* ``metric(logits)`` maps logits ``[n_prompts, seq, d_vocab]`` to one value per prompt
  ``[n_prompts]``. Everything in eap-bench is in the metric's units: a score is
  mean over prompts of metric(patched) - metric(clean).
* Per-prompt data the metric needs (answer positions, token ids, ...) goes in ``per_prompt``:
  a dict of tensors whose first dimension is ``n_prompts``. The metric function is called as
  ``metric_fn(logits, **entries)`` with the entries of ``per_prompt`` its signature names (all
  of them if it takes ``**kwargs``), which lets a task be split into batches
  (:meth:`Task.subset`) without the user writing any batching code. A metric parameter without
  a default that ``per_prompt`` lacks is a ``TaskError`` when the task is made.
* A metric may instead close over tensors of all ``n_prompts`` (``metric(logits)`` indexing
  fixed ``io``/``s`` answer ids, as the seed notebook and EAP-IG users write it). Such a metric
  can only be called on all prompts at once: attribution then needs ``batch_size >= n_prompts``
  and exact patching one prompt batch (it calls the metric once per patched copy on exactly
  the task's prompts). :meth:`Task.subset_problem` detects it, and both raise a ``TaskError``
  asking for ``per_prompt`` data where their memory budget cannot hold all prompts at once.
* Optional fast read-out: a task whose metric depends only on a few logits at one position per
  prompt can say so with ``readout``. ``per_prompt`` must then hold ``readout_pos`` ``[n]``
  (the position) and ``readout_tokens`` ``[n, k]`` (the token ids), and
  ``readout(selected, **per_prompt)`` maps the gathered logits ``[n, k]`` to the same values
  as ``metric``. Exact patching uses it to skip the full unembedding.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

MetricFn = Callable[..., Tensor]


class TaskError(ValueError):
    """Raised for malformed tasks and metrics."""


def accepted_entries(fn: Callable[..., Any], per_prompt: dict[str, Tensor], what: str) -> tuple[str, ...] | None:
    """The ``per_prompt`` keys ``fn(x, **entries)`` is called with: None (all of them) when ``fn``
    takes ``**kwargs`` or has no readable signature, else the keyword parameters it names. A
    parameter after the first without a default that ``per_prompt`` lacks is a ``TaskError``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    named = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in named if p.default is p.empty and p.name not in per_prompt]
    required_positional = [p.name for p in params[1:] if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if missing or required_positional or not params:
        raise TaskError(
            f"the {what} {getattr(fn, '__qualname__', fn)!r} is called as {what}(x, **entries) with the per_prompt "
            f"entries its signature names; it requires {missing or required_positional or 'no input'} but per_prompt "
            f"holds {sorted(per_prompt) or 'nothing'}. Add them to Task(per_prompt=...), give them defaults, or "
            "take **kwargs"
        )
    return tuple(p.name for p in named if p.name in per_prompt)


class Task:
    """Clean/corrupted prompt pairs and a per-prompt metric (see module docstring)."""

    def __init__(
        self,
        clean: Int[Tensor, "n seq"],
        corrupted: Int[Tensor, "n seq"],
        metric: MetricFn,
        *,
        per_prompt: dict[str, Tensor] | None = None,
        readout: MetricFn | None = None,
        name: str = "custom",
        info: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(clean, Tensor) or not isinstance(corrupted, Tensor):
            raise TaskError("clean and corrupted must be torch tensors of token ids")
        if clean.shape != corrupted.shape:
            raise TaskError(
                f"clean and corrupted prompts must have the same shape, got clean "
                f"{tuple(clean.shape)} and corrupted {tuple(corrupted.shape)}"
            )
        if clean.ndim != 2:
            raise TaskError(f"prompts must be [n_prompts, seq], got shape {tuple(clean.shape)}")
        if clean.dtype.is_floating_point or corrupted.dtype.is_floating_point:
            raise TaskError("prompts must be integer token ids, not floats")
        if clean.shape[0] == 0:
            raise TaskError("a task needs at least one prompt")
        if not callable(metric):
            raise TaskError("metric must be callable: logits [n, seq, vocab] -> [n]")
        per_prompt = dict(per_prompt or {})
        for key, value in per_prompt.items():
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != clean.shape[0]:
                raise TaskError(
                    f"per_prompt[{key!r}] must be a tensor with first dimension n_prompts="
                    f"{clean.shape[0]}"
                )
        if readout is not None and not {"readout_pos", "readout_tokens"} <= per_prompt.keys():
            raise TaskError("a task with a readout needs per_prompt['readout_pos'] and ['readout_tokens']")
        self._metric_keys = accepted_entries(metric, per_prompt, "metric")
        self._readout_keys = accepted_entries(readout, per_prompt, "readout") if readout is not None else None
        self.clean = clean.long()
        self.corrupted = corrupted.long()
        self.metric_fn = metric
        self.per_prompt = per_prompt
        self.readout_fn = readout
        self.name = name
        self.info = dict(info or {})

    # ------------------------------------------------------------------ shape
    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean.shape[1]

    def __len__(self) -> int:
        return self.n_prompts

    def __repr__(self) -> str:
        return f"Task({self.name!r}, n_prompts={self.n_prompts}, seq={self.seq_len})"

    # ----------------------------------------------------------------- metric
    def metric(self, logits: Float[Tensor, "n seq vocab"]) -> Float[Tensor, " n"]:
        """One metric value per prompt, checked for shape and finiteness."""
        out = self.metric_fn(logits, **self.entries(self.per_prompt, self._metric_keys))
        return self._check(out, logits.shape[0], "metric")

    def readout(self, selected: Float[Tensor, "n k"]) -> Float[Tensor, " n"]:
        """Metric from the logits of ``readout_tokens`` at ``readout_pos`` only."""
        if self.readout_fn is None:
            raise TaskError(f"task {self.name!r} defines no readout")
        out = self.readout_fn(selected, **self.entries(self.per_prompt, self._readout_keys))
        return self._check(out, selected.shape[0], "readout")

    @staticmethod
    def entries(per_prompt: dict[str, Tensor], keys: tuple[str, ...] | None) -> dict[str, Tensor]:
        """The ``per_prompt`` entries a metric or readout is called with (all when ``keys`` is None)."""
        return per_prompt if keys is None else {k: per_prompt[k] for k in keys}

    @property
    def has_readout(self) -> bool:
        return self.readout_fn is not None

    def subset_problem(self, d_vocab: int) -> str | None:
        """Why the metric (or readout) cannot be evaluated on a subset of the prompts, or None.

        The probe calls ``metric_fn`` on zero logits ``[2, seq, d_vocab]`` of two of the prompts
        (the first and the last) with their ``per_prompt`` data, and ``readout_fn`` likewise on
        ``[2, k]``; an exception or an output that is not one value per prompt means the function
        closes over data of all ``n_prompts`` prompts. Cheap (two prompts' logits). It cannot see a
        metric that silently slices its closed-over tensors to the batch size."""
        n = self.n_prompts
        if n == 1:
            return None
        idx = torch.tensor([0, n - 1] if n > 2 else [0], device=self.clean.device)
        sub = self.subset(idx)
        k = len(idx)
        probes = [("metric", self.metric_fn, self._metric_keys,
                   torch.zeros(k, self.seq_len, int(d_vocab), device=self.clean.device))]
        if self.readout_fn is not None:
            width = self.per_prompt["readout_tokens"].shape[-1] if self.per_prompt["readout_tokens"].ndim > 1 else 1
            probes.append(("readout", self.readout_fn, self._readout_keys, torch.zeros(k, width, device=self.clean.device)))
        for what, fn, keys, fake in probes:
            try:
                with torch.no_grad():
                    out = fn(fake, **self.entries(sub.per_prompt, keys))
            except Exception as exc:  # any failure on a subset is the finding
                return (f"the {what} failed on {k} of the {n} prompts ({type(exc).__name__}: {exc})")
            if not isinstance(out, Tensor) or tuple(out.shape) != (k,):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                return f"the {what} returned shape {got} for {k} of the {n} prompts (expected [{k}])"
        return None

    def check_split(self, d_vocab: int, splitter: str, way_out: str) -> None:
        """A ``TaskError`` when the metric cannot be evaluated on a subset of the prompts
        (:meth:`subset_problem`) although ``splitter`` (what splits them, e.g. "batch_size=4")
        will; the message names ``per_prompt=`` and ``way_out``, the caller's other remedy."""
        problem = self.subset_problem(d_vocab)
        if problem is not None:
            raise TaskError(
                f"{problem}: the metric seems to close over data of all {self.n_prompts} prompts, but {splitter} "
                f"splits them. Pass the per-prompt data (answer ids, positions, ...) through "
                f"Task(per_prompt=...) so the metric is called as metric(logits, **batch_data), or {way_out}."
            )

    def check_tokens(self, d_vocab: int, n_ctx: int | None = None) -> None:
        """Raise ``TaskError`` if a prompt holds a token id outside ``[0, d_vocab)`` or the prompts
        are longer than the model's context ``n_ctx`` (the one check attribution and exact
        patching share)."""
        for name, toks in (("clean", self.clean), ("corrupted", self.corrupted)):
            bad = (toks < 0) | (toks >= d_vocab)
            if bool(bad.any()):
                i, j = (int(v) for v in bad.nonzero()[0])
                raise TaskError(
                    f"{name} prompts hold token ids outside the model's vocabulary [0, {d_vocab}) "
                    f"(first: prompt {i}, position {j}, id {int(toks[i, j])}); were they made with another tokenizer?"
                )
        if n_ctx is not None and self.seq_len > n_ctx:
            raise TaskError(f"prompts have {self.seq_len} tokens, more than the model's context {n_ctx}")

    def _check(self, out: Any, n: int, what: str) -> Tensor:
        if not isinstance(out, Tensor):
            raise TaskError(f"{what} must return a tensor of shape [{n}], got {type(out).__name__}")
        if out.shape != (n,):
            raise TaskError(
                f"{what} must return one value per prompt, shape [{n}], got {tuple(out.shape)}"
            )
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).nonzero().flatten()[:5].tolist()
            raise TaskError(f"{what} returned NaN or inf (prompts {bad}); refusing to score with it")
        return out

    # ---------------------------------------------------------------- batches
    def subset(self, idx: Sequence[int] | Tensor | slice) -> "Task":
        """The same task restricted to some prompts (metric and data follow)."""
        if isinstance(idx, slice):
            idx = torch.arange(self.n_prompts)[idx]
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Task(
            self.clean[idx],
            self.corrupted[idx],
            self.metric_fn,
            per_prompt={k: v[idx.to(v.device)] for k, v in self.per_prompt.items()},
            readout=self.readout_fn,
            name=self.name,
            info=self.info,
        )

    def batches(self, batch_size: int | None) -> Iterator["Task"]:
        """Consecutive sub-tasks of at most ``batch_size`` prompts (all at once if None)."""
        n = self.n_prompts
        step = n if not batch_size else int(batch_size)
        for start in range(0, n, step):
            yield self if step >= n else self.subset(slice(start, min(start + step, n)))

    def to(self, device: torch.device | str) -> "Task":
        return Task(
            self.clean.to(device),
            self.corrupted.to(device),
            self.metric_fn,
            per_prompt={k: v.to(device) for k, v in self.per_prompt.items()},
            readout=self.readout_fn,
            name=self.name,
            info=self.info,
        )
