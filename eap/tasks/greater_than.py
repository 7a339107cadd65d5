"""Greater-than, after Hanna, Liu & Variengien (2023), "How does GPT-2 compute greater-than?".

Clean prompts: "The war lasted from the year 1732 to the year 17" (a noun, a century CC, a start
year YY in 02..98); the model should continue with a year token > YY. Corrupted prompts: the
same text with the start year "01" ("... from the year 1701 to the year 17"), as in the paper.

Metric sign and units (``metric='prob_diff'``): the probability difference
    PD = sum_{y > YY} p(y) - sum_{y <= YY} p(y)
over the 100 two-digit year tokens y = 00..99 at the last prompt token (the century), in
probability (dimensionless, in [-1, 1]); positive means later years are preferred.

Which softmax (``softmax=``):
* ``'vocab'`` (default, the paper's): p is the softmax over the FULL vocabulary. The task then
  has no fast readout: a readout sees only k selected logits at one position, and the full
  softmax needs the normaliser logsumexp over every token, which k year logits cannot give.
  Exact patching and attribution compute the full unembedding at the answer position instead.
* ``'years'``: p is the softmax over the 100 year tokens only (the probability renormalised to
  "the next token is a year"). It has a readout over the 100 year tokens (exact and faster on
  large vocabularies). Since PD is linear in p, it is exactly the paper's PD divided by the
  total probability of the 100 year tokens; the two coincide when a model puts all its mass on
  years.

``metric='normalized'``: (PD - PD_corrupt) / (PD_clean - PD_corrupt) of the chosen softmax (see
:mod:`eap.tasks.common`).

Tokenizer requirements (checked; a clear error otherwise): every two-digit year "00".."99" is a
single token (the form it takes after a century, without a leading space), and for each century
used " CC" is a single token and " CCYY" tokenizes as [" CC", "YY"]. GPT-2's BPE meets this for
the paper's centuries for most start years: (century, start year) combinations that do not split
that way are skipped, as the paper skipped them. The embedded word-level tokenizer splits digit
runs into pairs, so "1732" reads as ["17", "32"].
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task, TaskError
from eap.tasks import common

TEMPLATE = "The {noun} lasted from the year {cc}{yy} to the year {cc}"
# Nouns of the paper's kind (events and periods that "last").
NOUNS: tuple[str, ...] = (
    "war", "dynasty", "siege", "empire", "expedition", "reign", "journey", "voyage", "campaign",
    "treaty", "plague", "kingdom", "alliance", "rebellion", "conflict", "occupation", "crisis",
    "marriage", "tour", "trial", "drought", "famine", "pilgrimage", "project",
)
CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17")
START_YEARS: tuple[int, ...] = tuple(range(2, 99))  # 02..98, as in the paper
CORRUPT_YEAR = 1  # the corrupted start year "01"
N_YEARS = 100  # year tokens 00..99
METRICS = ("prob_diff", "normalized")
SOFTMAXES = ("vocab", "years")


def words() -> list[str]:
    """Words of the greater-than prompts: the 100 two-digit year tokens, template words, nouns."""
    template_words = [w for w in TEMPLATE.split() if not w.startswith("{")]
    return [f"{y:02d}" for y in range(N_YEARS)] + template_words + list(NOUNS)


def year_token_ids(tokenizer) -> list[int]:
    """Token ids of "00".."99" (index = year), or a ValueError naming the years that are not
    single tokens."""
    ids = [common.single_token(tokenizer, f"{y:02d}") for y in range(N_YEARS)]
    missing = [f"{y:02d}" for y, t in enumerate(ids) if t is None]
    if missing:
        raise TaskError(
            f"greater-than needs every two-digit year 00-99 to be a single token; this tokenizer "
            f"splits or does not know {len(missing)} of them: {', '.join(missing[:10])}"
        )
    return [int(t) for t in ids]  # type: ignore[arg-type]


def valid_combinations(
    tokenizer, centuries: Sequence[str], years: Sequence[int], year_ids: Sequence[int]
) -> list[tuple[str, int]]:
    """(century, start year) pairs whose " CCYY" and " CC01" tokenize as [" CC", "YY"]."""
    out = []
    for cc in centuries:
        cid = common.single_token(tokenizer, " " + cc)
        if cid is None or common.encode(tokenizer, f" {cc}{CORRUPT_YEAR:02d}") != [cid, year_ids[CORRUPT_YEAR]]:
            continue
        out.extend((cc, yy) for yy in years if common.encode(tokenizer, f" {cc}{yy:02d}") == [cid, year_ids[yy]])
    return out


def generate(
    tokenizer,
    n: int,
    seed: int = 0,
    nouns: Sequence[str] | None = None,
    years: Sequence[int] | None = None,
    centuries: Sequence[str] | None = None,
    combinations: Sequence[Sequence[Any]] | None = None,
    exclude_combinations: Sequence[Sequence[Any]] | None = None,
) -> common.Prompts:
    """Sample ``n`` greater-than prompts and their "01" corruptions, reproducibly from ``seed``.

    ``nouns``, ``years`` (start years, ints in 2..98) and ``centuries`` restrict the pools;
    ``combinations`` restricts the (century, start year) pairs to the given ones and
    ``exclude_combinations`` removes some (to hold them out of a toy model's training). Nouns
    that are not a single token with a leading space are dropped. ``answers``: ``yy`` (start
    year, int) and ``year_tokens`` [n, 100].
    """
    n = common.check_n(n)
    years = START_YEARS if years is None else tuple(int(y) for y in years)
    bad = [y for y in years if not 2 <= y <= 98]
    if bad or not years:
        raise ValueError(f"start years must be ints in 2..98 (the paper's 02-98), got {bad or 'none'}")
    noun_pool = [w for w in (NOUNS if nouns is None else nouns) if common.single_token(tokenizer, " " + w) is not None]
    if not noun_pool:
        raise TaskError("greater-than: none of the nouns is a single token (known, with a leading space) for this "
                        f"tokenizer ({', '.join(NOUNS if nouns is None else nouns)[:80]}); it needs at least one")
    year_ids = year_token_ids(tokenizer)
    combos = valid_combinations(tokenizer, CENTURIES if centuries is None else centuries, years, year_ids)
    if combinations is not None:
        keep = {(str(c), int(y)) for c, y in combinations}
        combos = [c for c in combos if c in keep]
    if exclude_combinations:
        drop = {(str(c), int(y)) for c, y in exclude_combinations}
        combos = [c for c in combos if c not in drop]
    if not combos:
        raise TaskError(
            'no (century, start year) tokenizes as [" CC", "YY"] with this tokenizer; greater-than needs '
            f"single-token centuries (with a leading space; tried {', '.join(CENTURIES if centuries is None else centuries)}) "
            "and two-digit year tokens"
        )
    rng = random.Random(seed)
    clean_texts, corrupt_texts, used_nouns, used_cc, used_yy = [], [], [], [], []
    for _ in range(n):
        noun = rng.choice(noun_pool)
        cc, yy = rng.choice(combos)
        clean_texts.append(TEMPLATE.format(noun=noun, cc=cc, yy=f"{yy:02d}"))
        corrupt_texts.append(TEMPLATE.format(noun=noun, cc=cc, yy=f"{CORRUPT_YEAR:02d}"))
        used_nouns.append(noun)
        used_cc.append(cc)
        used_yy.append(yy)
    clean, corrupted, end = common.right_pad(tokenizer, clean_texts, corrupt_texts, "greater-than")
    year_t = torch.tensor(year_ids, dtype=torch.long)
    for i, yy in enumerate(used_yy):  # the start year is the only difference, one token each
        diff = (clean[i] != corrupted[i]).nonzero().flatten().tolist()
        if len(diff) != 1 or clean[i, diff[0]] != year_t[yy] or corrupted[i, diff[0]] != year_t[CORRUPT_YEAR]:
            raise TaskError(
                f"prompt {i} ({clean_texts[i]!r}) does not tokenize with the start year as one "
                f"year token that the corruption replaces by '01'"
            )
    info = dict(
        clean_texts=clean_texts,
        corrupted_texts=corrupt_texts,
        nouns=used_nouns,
        centuries=used_cc,
        years=used_yy,
        start_years=[f"{yy:02d}" for yy in used_yy],
        seed=seed,
        table_title="Greater-than prompts (clean start year YY vs corrupted 01)",
        table_columns=[("clean prompt", "clean_texts"), ("YY", "start_years"), ("corrupted prompt", "corrupted_texts")],
    )
    answers = {"yy": torch.tensor(used_yy, dtype=torch.long), "year_tokens": year_t.expand(n, N_YEARS).clone()}
    return common.Prompts(clean, corrupted, end, answers, info)


# ------------------------------------------------------------------------------------ metrics
def _later_minus_earlier(p: Float[Tensor, "n 100"], yy: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    later = torch.arange(p.shape[1], device=p.device)[None, :] > yy.to(p.device)[:, None]
    return (p * later).sum(1) - (p * ~later).sum(1)


def _wide(x: Tensor) -> Tensor:
    """At least float32 for the softmax (half-precision models)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prob_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    yy: Int[Tensor, " n"],
    year_tokens: Int[Tensor, "n 100"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """sum p(y > YY) - sum p(y <= YY), p = softmax over the full vocabulary at ``end``; in
    probability, positive = later years preferred."""
    p = _wide(common.at_end(logits, end)).softmax(-1).gather(1, year_tokens.to(logits.device).long())
    return _later_minus_earlier(p, yy)


def year_prob_diff_readout(
    selected: Float[Tensor, "n 100"], yy: Int[Tensor, " n"], **_: Any
) -> Float[Tensor, " n"]:
    """The same difference with p = softmax over the 100 year logits only (``softmax='years'``)."""
    return _later_minus_earlier(_wide(selected).softmax(-1), yy)


def year_prob_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    yy: Int[Tensor, " n"],
    year_tokens: Int[Tensor, "n 100"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """:func:`year_prob_diff_readout` from full logits."""
    selected = common.at_end(logits, end).gather(1, year_tokens.to(logits.device).long())
    return year_prob_diff_readout(selected, yy)








# ------------------------------------------------------------------------------------- task
def greater_than(
    model,
    n: int,
    seed: int = 0,
    metric: str = "prob_diff",
    softmax: str = "vocab",
    *,
    nouns: Sequence[str] | None = None,
    years: Sequence[int] | None = None,
    centuries: Sequence[str] | None = None,
    combinations: Sequence[Sequence[Any]] | None = None,
) -> Task:
    """The greater-than task for ``model`` (tokenized with ``model.tokenizer``, right-padded).

    ``metric='prob_diff'``: sum p(year > YY) - sum p(year <= YY) over the year tokens at the last
    token, in probability; ``'normalized'``: its (PD - PD_corrupt) / (PD_clean - PD_corrupt).
    ``softmax='vocab'`` (paper; no readout) or ``'years'`` (renormalised over the year tokens;
    with a readout over them): see the module docstring. ``nouns``/``years``/``centuries``
    restrict the pools and ``combinations`` the (century, start year) pairs, e.g. to those held
    out of a toy model's training.
    """
    if softmax not in SOFTMAXES:
        raise ValueError(f"unknown softmax {softmax!r}; expected one of {SOFTMAXES}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    tokenizer = common.tokenizer_of(model, "greater-than")
    p = generate(tokenizer, n, seed=seed, nouns=nouns, years=years, centuries=centuries, combinations=combinations)
    per_prompt = {"end": p.end, **p.answers}
    if softmax == "vocab":
        fns = dict(raw=prob_diff, raw_readout=None)
    else:
        per_prompt.update(readout_pos=p.end, readout_tokens=p.answers["year_tokens"])
        fns = dict(raw=year_prob_diff, raw_readout=year_prob_diff_readout)
    return common.build(
        model, p.clean, p.corrupted, per_prompt, **fns, metric=metric, metrics=METRICS,
        name="greater-than", info=dict(p.info, softmax=softmax),
    )
