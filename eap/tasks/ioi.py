"""Indirect object identification (IOI), after Wang et al. (2022) and the seed notebook.

Clean prompts: "Then, Mary and John went to the store. John gave a ring to" (answer " Mary").
The indirect object (IO) is the name that appears once, the subject (S) the name that appears
twice. ``BABA`` templates name S first ("Then, [S] and [IO] ..."), ``ABBA`` templates name IO
first; ``mixed`` samples from both (15 + 15 templates of the IOI paper).

Corrupted prompts follow the IOI paper's 'ABC->XYZ, BAB->XYZ' distribution: the same template,
place and object, with the three name slots (IO, S1, S2) filled by three fresh, distinct names
none of which occurs in the clean prompt.

Text format: ordinary English ("Then, John and Mary went to the store. John gave a ring to").
GPT-2's BPE tokenizer reads it as is, with each name one token " Name" (names that are not a
single token with the leading space are dropped). The word-level tokenizer of the embedded
models (:func:`eap.tasks.vocab.word_level_tokenizer`) splits on whitespace and isolates
punctuation, so it reads the same text as "Then , John and Mary went to the store . John gave a
ring to".

Metric sign and units: ``logit_diff`` is logit(IO) - logit(S) at the last prompt token, in
logits; positive means the model prefers the correct answer. ``normalized`` is
(LD - LD_corrupt) / (LD_clean - LD_corrupt), dimensionless: 1 = clean behaviour, 0 = corrupted
(see :mod:`eap.tasks.common`).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task, TaskError
from eap.tasks import common
from eap.tasks.common import PUNCTUATION  # noqa: F401  (kept importable from here)
from eap.tasks.ioi_words import ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, OBJECTS, PLACES, words  # noqa: F401
from eap.tasks.vocab import vocabulary, word_level_tokenizer  # noqa: F401  (their old home; eap.models imports it)


PROMPT_TYPES = ("BABA", "ABBA", "mixed")
METRICS = ("logit_diff", "normalized")
MIN_NAMES = 5  # IO, S and three fresh corrupted names must be distinct


def templates_for(prompt_type: str) -> tuple[str, ...]:
    if prompt_type == "BABA":
        return BABA_TEMPLATES
    if prompt_type == "ABBA":
        return ABBA_TEMPLATES
    if prompt_type == "mixed":
        return BABA_TEMPLATES + ABBA_TEMPLATES
    raise ValueError(f"unknown prompt_type {prompt_type!r}; expected one of {PROMPT_TYPES}")


def fill(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    """Fill a template up to (not including) the answer: [A] -> io, the [B]s -> s1, s2.

    The final " [A]" (the answer) is cut off, so the text ends just before the IO name.
    """
    assert template.endswith(" [A]")
    text = template[: -len(" [A]")]
    text = text.replace("[PLACE]", place).replace("[OBJECT]", obj).replace("[A]", io)
    return text.replace("[B]", s1, 1).replace("[B]", s2, 1)


# ----------------------------------------------------------------------------- prompt generator
def single_token_names(tokenizer, names: Sequence[str] | None = None) -> dict[str, int]:
    """Names that are exactly one (known) token with a leading space, mapped to that token id."""
    out: dict[str, int] = {}
    for name in NAMES if names is None else names:
        tid = common.single_token(tokenizer, " " + name)
        if tid is not None:
            out[name] = tid
    return out


def generate(
    tokenizer,
    n: int,
    seed: int = 0,
    prompt_type: str = "mixed",
    names: Sequence[str] | None = None,
    pairs: Sequence[Sequence[str]] | None = None,
    exclude_pairs: Sequence[Sequence[str]] | None = None,
) -> common.Prompts:
    """Sample ``n`` clean IOI prompts and their ABC corruptions, reproducibly from ``seed``.

    ``names``: the name pool (default :data:`NAMES`), reduced to single-token names.
    ``pairs``: if given, the (IO, S) name pairs to draw from (uniformly); ``exclude_pairs``:
    unordered name pairs never used as {IO, S} (to hold pairs out of training). Corrupted names
    are drawn from the whole pool minus the clean prompt's names.

    ``answers``: ``io`` (the IO token, the correct answer) and ``s`` (the S token), each [n].
    """
    n = common.check_n(n)
    templates = templates_for(prompt_type)
    pool = single_token_names(tokenizer, names)
    if len(pool) < MIN_NAMES:
        raise TaskError(
            f"only {len(pool)} of the names are a single known token (with a leading space) for this tokenizer"
            f"{': ' + ', '.join(pool) if pool else ''}; IOI needs at least {MIN_NAMES} (IO, S and three fresh "
            "corrupted names), and reads the IO and S names as single tokens"
        )
    name_list = list(pool)
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        missing = sorted({x for p in pairs for x in p} - pool.keys())
        if missing:
            raise TaskError(f"IOI reads the pair names as single tokens; not single known tokens (with a leading "
                            f"space) or not in the name pool: {missing[:5]}")
        if any(a == b for a, b in pairs) or not pairs:
            raise ValueError("pairs must be a non-empty list of (IO, S) with IO != S")
    excluded = {frozenset(p) for p in exclude_pairs} if exclude_pairs else set()

    rng = random.Random(seed)  # local generator: global random/torch state is never touched
    clean_texts, corrupt_texts, io_names, s_names, used_templates = [], [], [], [], []
    corrupt_names = []
    for _ in range(n):
        tmpl = rng.choice(templates)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        if pairs is not None:
            io, s = rng.choice(pairs)
        else:
            while True:
                io, s = rng.sample(name_list, 2)
                if frozenset((io, s)) not in excluded:
                    break
        x, y, z = rng.sample([w for w in name_list if w not in (io, s)], 3)
        clean_texts.append(fill(tmpl, io, s, s, place, obj))
        corrupt_texts.append(fill(tmpl, x, y, z, place, obj))
        io_names.append(io)
        s_names.append(s)
        used_templates.append(tmpl)
        corrupt_names.append((x, y, z))

    clean, corrupted, end = common.right_pad(tokenizer, clean_texts, corrupt_texts, "IOI")
    answers = {
        "io": torch.tensor([pool[w] for w in io_names], dtype=torch.long),
        "s": torch.tensor([pool[w] for w in s_names], dtype=torch.long),
    }
    info = dict(
        clean_texts=clean_texts,
        corrupted_texts=corrupt_texts,
        io_names=io_names,
        s_names=s_names,
        corrupted_names=corrupt_names,
        templates=used_templates,
        seed=seed,
        prompt_type=prompt_type,
        table_title="Sentences from IOI vs ABC distribution",
        table_columns=[
            ("IOI prompt", "clean_texts"), ("IOI subj", "s_names"), ("IOI indirect obj", "io_names"),
            ("ABC prompt", "corrupted_texts"),
        ],
    )
    return common.Prompts(clean, corrupted, end, answers, info)


# ------------------------------------------------------------------------------------ metrics
def logit_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    io: Int[Tensor, " n"],
    s: Int[Tensor, " n"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """logits[i, end_i, io_i] - logits[i, end_i, s_i], in logits (positive = IO preferred)."""
    return common.answer_diff(logits, end, io, s)


def logit_diff_readout(selected: Float[Tensor, "n 2"], **_: Any) -> Float[Tensor, " n"]:
    """Same as :func:`logit_diff` from the gathered logits [n, 2] = [logit(IO), logit(S)]."""
    return common.first_minus_second(selected)


#: (LD - LD_corrupt) / (LD_clean - LD_corrupt), dimensionless (1 = clean, 0 = corrupted).
normalized = common.Normalized(logit_diff)






# ------------------------------------------------------------------------------------- task
def ioi(
    model,
    n: int,
    seed: int = 0,
    prompt_type: str = "mixed",
    metric: str = "logit_diff",
    names: Sequence[str] | None = None,
    *,
    pairs: Sequence[Sequence[str]] | None = None,
) -> Task:
    """The IOI task for ``model`` (tokenized with ``model.tokenizer``, no BOS, right-padded).

    ``metric='logit_diff'``: logit(IO) - logit(S) at the last real token, in logits.
    ``metric='normalized'``: (LD - LD_corrupt) / (LD_clean - LD_corrupt), where LD_clean and
    LD_corrupt are the mean logit differences of the model on the clean and on the corrupted
    prompts, computed once here (``info['metric_clean']``, ``info['metric_corrupt']``). Both use
    the CLEAN prompt's IO/S tokens, so the metric averages to exactly 1 on clean and 0 on
    corrupted logits. (The seed notebook measured the corrupted baseline with the corrupted
    dataset's own names instead.)

    ``names`` restricts the name pool; ``pairs`` (keyword-only) restricts the clean (IO, S)
    pairs, e.g. to name pairs held out of a toy model's training.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    tokenizer = common.tokenizer_of(model, "IOI")
    p = generate(tokenizer, n, seed=seed, prompt_type=prompt_type, names=names, pairs=pairs)
    io, s = p.answers["io"], p.answers["s"]
    per_prompt = {
        "end": p.end, "io": io, "s": s, "readout_pos": p.end, "readout_tokens": torch.stack([io, s], dim=1),
    }
    return common.build(
        model, p.clean, p.corrupted, per_prompt, raw=logit_diff, raw_readout=logit_diff_readout, metric=metric,
        metrics=METRICS,
        name=f"ioi-{prompt_type}", info=p.info,
    )
