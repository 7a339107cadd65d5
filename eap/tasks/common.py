"""Pieces every built-in task shares: tokenizing, right-padding, the normalised metric, the
sample table. Task modules (``ioi``, ``greater_than``, ``induction``, ``sva``) build on these.

Conventions of the built-in tasks (on top of :mod:`eap.task`'s):

* Prompts are tokenized without special tokens (no BOS) and right-padded with the tokenizer's
  pad token (its eos token when it has none); ``per_prompt['end']`` is the last real token,
  where the answer is read.
* ``metric='normalized'`` maps a task's raw metric m to (m - m_corrupt) / (m_clean - m_corrupt),
  with m_clean and m_corrupt the mean raw metric of the model on the clean and the corrupted
  prompts (measured once when the task is built, stored in ``info`` and ``per_prompt``):
  dimensionless, 1 = clean behaviour, 0 = corrupted behaviour.
* ``task.info`` holds the texts and answers of every prompt, the seed, and ``table_columns``
  (header, info key) for :func:`sample_table`.
"""

from __future__ import annotations

import numbers
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task, TaskError

#: Punctuation the task templates use and the word-level tokenizer isolates.
PUNCTUATION: tuple[str, ...] = (",", ".")


@dataclass
class Prompts:
    """Token tensors and bookkeeping for n clean/corrupted prompt pairs (no model needed).

    ``answers`` holds the per-prompt tensors a task's metric needs besides ``end`` (answer token
    ids, years, ...), each with first dimension n; ``info`` the texts, names and seed."""

    clean: Int[Tensor, "n seq"]
    corrupted: Int[Tensor, "n seq"]
    end: Int[Tensor, " n"]  # index of the last real token: the answer is read there
    answers: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def check_n(n: Any) -> int:
    """``n`` as a positive int, or a ValueError naming the bad value."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer number of prompts, got {n!r}")
    return int(n)


def tokenizer_of(model: Any, task: str) -> Any:
    """``model.tokenizer``, or a ``TaskError``: the built-in tasks are made from text."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TaskError(
            f"model has no tokenizer; {task} builds its prompts from text and needs one (save the tokenizer "
            "next to the model with tokenizer.save_pretrained, or make your own eap.Task from token ids)"
        )
    return tokenizer


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """Words of ``texts`` that ``tokenizer`` maps (wholly or partly) to its unknown token, in
    first-seen order, stripped of surrounding punctuation. [] for a tokenizer without one."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    out: list[str] = []
    for text in dict.fromkeys(texts):
        if unk not in encode(tokenizer, text):
            continue
        for word in text.split():
            bare = word.strip(string.punctuation) or word
            if bare not in out and unk in encode(tokenizer, " " + word):
                out.append(bare)
    return out


def check_known(tokenizer: Any, texts: Sequence[str], task: str) -> None:
    """A ``TaskError`` naming the words of ``texts`` the tokenizer does not know (they would
    become its unknown token, and the prompts nonsense)."""
    bad = unknown_words(tokenizer, texts)
    if bad:
        raise TaskError(
            f"{task}: {len(bad)} prompt words are unknown to this tokenizer and would become its unknown token "
            f"{getattr(tokenizer, 'unk_token', None)!r}: {', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}. "
            f"{task} needs every word of its prompts in the tokenizer's vocabulary"
        )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer: Any, text: str) -> int | None:
    """The id if ``text`` is exactly one known token, else None."""
    ids = encode(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if len(ids) == 1 and ids[0] != unk else None


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to right-pad prompts with")
    return int(pid)


def right_pad(
    tokenizer: Any, clean_texts: Sequence[str], corrupt_texts: Sequence[str], task: str = "this task"
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "n seq"], Int[Tensor, " n"]]:
    """Tokenize clean/corrupted text pairs and right-pad them to one length.

    Returns (clean, corrupted, end) with ``end`` the index of each prompt's last real token.
    Raises a ``TaskError`` if a word becomes the unknown token (:func:`check_known`), and if a
    clean prompt and its corruption tokenize to different lengths.
    """
    check_known(tokenizer, [*clean_texts, *corrupt_texts], task)
    clean_ids = [encode(tokenizer, t) for t in clean_texts]
    corrupt_ids = [encode(tokenizer, t) for t in corrupt_texts]
    return pad_ids(tokenizer, clean_ids, corrupt_ids, clean_texts, corrupt_texts)


def pad_ids(
    tokenizer: Any,
    clean_ids: Sequence[Sequence[int]],
    corrupt_ids: Sequence[Sequence[int]],
    clean_texts: Sequence[str] | None = None,
    corrupt_texts: Sequence[str] | None = None,
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "n seq"], Int[Tensor, " n"]]:
    """Right-pad token-id lists (see :func:`right_pad`)."""
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        if len(a) != len(b):
            what = f": {clean_texts[i]!r} / {corrupt_texts[i]!r}" if clean_texts and corrupt_texts else ""
            raise TaskError(
                f"clean and corrupted prompt {i} tokenize to different lengths ({len(a)} vs "
                f"{len(b)}){what}"
            )
    n, seq = len(clean_ids), max(len(a) for a in clean_ids)
    pid = pad_id(tokenizer)
    clean = torch.full((n, seq), pid, dtype=torch.long)
    corrupted = torch.full((n, seq), pid, dtype=torch.long)
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        clean[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        corrupted[i, : len(b)] = torch.tensor(b, dtype=torch.long)
    end = torch.tensor([len(a) - 1 for a in clean_ids], dtype=torch.long)
    return clean, corrupted, end


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_logits(model: Any, tokens: Tensor) -> Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def rows(x: Tensor) -> Int[Tensor, " n"]:
    return torch.arange(x.shape[0], device=x.device)


def at_end(logits: Float[Tensor, "n seq vocab"], end: Int[Tensor, " n"]) -> Float[Tensor, "n vocab"]:
    """The logits at each prompt's answer position."""
    return logits[rows(logits), end.to(logits.device)]


def answer_diff(
    logits: Float[Tensor, "n seq vocab"], end: Int[Tensor, " n"], good: Int[Tensor, " n"], bad: Int[Tensor, " n"],
) -> Float[Tensor, " n"]:
    """``logits[i, end_i, good_i] - logits[i, end_i, bad_i]``, in logits: the logit difference
    every two-answer task's metric is (IOI: IO vs S; SVA: correct vs wrong verb form)."""
    final = at_end(logits, end)
    r = rows(final)
    return final[r, good.to(final.device)] - final[r, bad.to(final.device)]


def first_minus_second(selected: Float[Tensor, "n 2"]) -> Float[Tensor, " n"]:
    """:func:`answer_diff` from the read-out logits ``[n, 2]`` = [logit(good), logit(bad)]."""
    return selected[:, 0] - selected[:, 1]


def normalize(
    m: Float[Tensor, " n"], m_clean: Float[Tensor, " n"], m_corrupt: Float[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """(m - m_corrupt) / (m_clean - m_corrupt): 1 = clean behaviour, 0 = corrupted."""
    lc, lx = m_clean.to(m.device), m_corrupt.to(m.device)
    return (m - lx) / (lc - lx)


class Normalized:
    """A task's raw metric (or readout) turned into (m - m_corrupt) / (m_clean - m_corrupt),
    with ``m_clean`` and ``m_corrupt`` [n] taken from the per-prompt data. Dimensionless.

    A small class rather than a closure so that tasks stay picklable and the metric keeps a
    readable name (``Normalized(logit_diff)``) in result-file fingerprints."""

    def __init__(self, raw: Callable[..., Tensor]) -> None:
        self.raw = raw
        self.__module__ = raw.__module__
        self.__qualname__ = f"Normalized({raw.__qualname__})"

    def __call__(
        self, x: Tensor, m_clean: Float[Tensor, " n"], m_corrupt: Float[Tensor, " n"], **per_prompt: Tensor
    ) -> Float[Tensor, " n"]:
        return normalize(self.raw(x, **per_prompt), m_clean, m_corrupt)

    def __repr__(self) -> str:
        return self.__qualname__


def build(
    model: Any,
    clean: Int[Tensor, "n seq"],
    corrupted: Int[Tensor, "n seq"],
    per_prompt: dict[str, Tensor],
    *,
    raw: Callable[..., Tensor],
    raw_readout: Callable[..., Tensor] | None,
    metric: str,
    metrics: Sequence[str],
    name: str,
    info: dict[str, Any],
) -> Task:
    """Move everything to the model's device and make the Task with the raw or normalised metric.

    ``metric`` is ``metrics[0]`` (the raw metric ``raw``) or ``'normalized'``; for the latter the
    mean raw metric on clean and corrupted prompts is measured here (``info['metric_clean']``,
    ``info['metric_corrupt']``; also ``per_prompt['m_clean']``/``['m_corrupt']`` for the metric).
    """
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r} for {name}; expected one of {tuple(metrics)}")
    dev = model_device(model)
    clean, corrupted = clean.to(dev), corrupted.to(dev)
    per_prompt = {k: v.to(dev) for k, v in per_prompt.items()}
    info = dict(info, metric=metric)
    fn, readout = raw, raw_readout
    if metric == "normalized":
        probe = Task(clean, corrupted, raw, per_prompt=per_prompt, name=name)
        with torch.no_grad():
            m_clean = probe.metric(model_logits(model, clean)).mean().item()
            m_corrupt = probe.metric(model_logits(model, corrupted)).mean().item()
        if abs(m_clean - m_corrupt) < 1e-6:
            raise ValueError(
                f"normalized metric undefined for {name}: the mean metric is the same on clean and "
                f"corrupted prompts ({m_clean:.4g})"
            )
        n = clean.shape[0]
        per_prompt["m_clean"] = torch.full((n,), m_clean, device=dev)
        per_prompt["m_corrupt"] = torch.full((n,), m_corrupt, device=dev)
        info.update(metric_clean=m_clean, metric_corrupt=m_corrupt)
        fn, readout = Normalized(raw), (Normalized(raw_readout) if raw_readout is not None else None)
    return Task(clean, corrupted, fn, per_prompt=per_prompt, readout=readout, name=name, info=info)


def sample_table(task: Task, k: int = 5) -> str:
    """A plain-text table of the first ``k`` prompts of a built-in task (columns from
    ``task.info['table_columns']``), like the seed notebook's ``make_table``."""
    info = task.info
    if "table_columns" not in info:
        raise ValueError(f"task {task.name!r} has no info['table_columns'] to tabulate")
    spec = info["table_columns"]
    cols = [h for h, _ in spec]
    k = min(k, len(info[spec[0][1]]))
    table_rows = [[str(info[key][i]) for _, key in spec] for i in range(k)]
    widths = [max(len(c), *(len(r[j]) for r in table_rows)) for j, c in enumerate(cols)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"

    def fmt(r: Sequence[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"

    title = info.get("table_title", task.name)
    return "\n".join([title, line, fmt(cols), line, *map(fmt, table_rows), line])
