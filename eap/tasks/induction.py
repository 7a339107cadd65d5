"""Induction: repeated random-token sequences, ``[A][B] ... [A] -> [B]``.

Clean prompt: ``length`` distinct random tokens t_1..t_L, then the same sequence again up to
t_{L-1}: ``t_1 .. t_L t_1 .. t_{L-1}`` (2L - 1 tokens). At the last token (the second t_{L-1},
"A") an induction mechanism predicts t_L ("B"), the token that followed A the first time.
Corrupted prompt: the first occurrence replaced by L fresh tokens f_1..f_L (distinct from each
other and from the t's): ``f_1 .. f_L t_1 .. t_{L-1}``; nothing in it says what follows A.

Tokens are drawn uniformly from the model's vocabulary without its special tokens (pad, unk,
eos, ... : the tokenizer's ``all_special_ids``), so the task works with any tokenizer; ``tokens=``
restricts the pool. All prompts have the same length; there is no padding.

Metric sign and units (``metric='logit_diff'``): logit(t_L) minus the mean logit of the other
tokens of the sequence, t_1..t_{L-1}, at the last position, in logits; positive means the model
prefers the token that completes the repeat over the other tokens it has seen in the sequence.
(Chosen over log p(t_L) because it is readable from L logits, so the task has a fast readout,
and because it is in logits like IOI's and agreement's metrics; the plausible alternatives to
t_L are the sequence's own tokens, not the whole vocabulary.) ``metric='normalized'``:
(m - m_corrupt) / (m_clean - m_corrupt) (see :mod:`eap.tasks.common`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task, TaskError
from eap.tasks import common

METRICS = ("logit_diff", "normalized")
DEFAULT_LENGTH = 10


def eligible_tokens(tokenizer, d_vocab: int | None = None) -> Int[Tensor, " k"]:
    """Token ids induction may use: the tokenizer's ids below ``d_vocab`` minus special tokens."""
    size = len(tokenizer) if d_vocab is None else min(len(tokenizer), int(d_vocab))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)


def generate(
    tokenizer,
    n: int,
    seed: int = 0,
    length: int = DEFAULT_LENGTH,
    tokens: Sequence[int] | Tensor | None = None,
    d_vocab: int | None = None,
) -> common.Prompts:
    """Sample ``n`` repeated random-token prompts and their corruptions, reproducibly from ``seed``.

    ``tokens``: the pool to draw from (default :func:`eligible_tokens`). ``answers``: ``answer``
    [n] (t_L) and ``others`` [n, L-1] (t_1..t_{L-1}).
    """
    n = common.check_n(n)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 (tokens A and B at least), got {length!r}")
    pool = eligible_tokens(tokenizer, d_vocab) if tokens is None else torch.as_tensor(tokens).long().unique()
    special = sorted(set(pool.tolist()) & set(getattr(tokenizer, "all_special_ids", []) or []))
    if special:
        raise TaskError(f"induction: tokens= holds special token ids {special[:10]} (pad/unknown/eos); it needs "
                        "ordinary tokens only")
    if pool.numel() < 2 * length:
        raise TaskError(
            f"induction with length {length} needs {2 * length} distinct tokens per prompt (sequence "
            f"+ fresh corruption); only {pool.numel()} are available"
        )
    g = torch.Generator().manual_seed(int(seed))  # local generator: global RNG untouched
    draw = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[: 2 * length]] for _ in range(n)])
    seq, fresh = draw[:, :length], draw[:, length:]
    clean = torch.cat([seq, seq[:, :-1]], dim=1)
    corrupted = torch.cat([fresh, seq[:, :-1]], dim=1)
    end = torch.full((n,), 2 * length - 2, dtype=torch.long)

    def text(ids: Tensor) -> str:
        return " ".join(tokenizer.convert_ids_to_tokens(ids.tolist()))

    answer_tokens = tokenizer.convert_ids_to_tokens(seq[:, -1].tolist())
    info = dict(
        clean_texts=[text(r) for r in clean],
        corrupted_texts=[text(r) for r in corrupted],
        answers=answer_tokens,
        length=length,
        seed=seed,
        table_title=f"Induction prompts (length {length}: t_1..t_L t_1..t_(L-1) -> t_L)",
        table_columns=[("clean prompt", "clean_texts"), ("answer", "answers"), ("corrupted prompt", "corrupted_texts")],
    )
    return common.Prompts(clean, corrupted, end, {"answer": seq[:, -1].clone(), "others": seq[:, :-1].clone()}, info)


# ------------------------------------------------------------------------------------ metrics
def logit_diff_readout(selected: Float[Tensor, "n k"], **_: Any) -> Float[Tensor, " n"]:
    """selected[:, 0] - mean(selected[:, 1:]): the answer's logit minus the others' mean, in logits."""
    return selected[:, 0] - selected[:, 1:].mean(1)


def logit_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    answer: Int[Tensor, " n"],
    others: Int[Tensor, "n k"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """logit(t_L) - mean_j logit(t_j), j < L, at ``end``; in logits (positive = repeat preferred)."""
    toks = torch.cat([answer[:, None], others], 1).to(logits.device).long()
    return logit_diff_readout(common.at_end(logits, end).gather(1, toks))






# ------------------------------------------------------------------------------------- task
def induction(
    model,
    n: int,
    seed: int = 0,
    length: int = DEFAULT_LENGTH,
    metric: str = "logit_diff",
    *,
    tokens: Sequence[int] | Tensor | None = None,
) -> Task:
    """The induction task for ``model``: prompts of 2 * ``length`` - 1 random tokens (see the
    module docstring); readout over [t_L, t_1..t_{L-1}] at the last position."""
    tokenizer = common.tokenizer_of(model, "induction")
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    p = generate(tokenizer, n, seed=seed, length=length, tokens=tokens, d_vocab=d_vocab)
    readout_tokens = torch.cat([p.answers["answer"][:, None], p.answers["others"]], 1)
    per_prompt = {"end": p.end, **p.answers, "readout_pos": p.end, "readout_tokens": readout_tokens}
    return common.build(
        model, p.clean, p.corrupted, per_prompt, raw=logit_diff, raw_readout=logit_diff_readout, metric=metric,
        metrics=METRICS,
        name="induction", info=p.info,
    )
