"""Subject-verb agreement (SVA): "The keys to the cabinet [is/are]".

Clean prompts end just before the main verb, in one of three templates:
    simple  "The keys"
    pp      "The keys near the cabinet"        (a prepositional phrase with an attractor noun)
    rc      "The keys that the man found"      (an object relative clause with an attractor)
The subject is singular or plural (50/50); the attractor's number is drawn independently, so
half the attractors disagree with the subject. Corrupted prompt: the same text with the
subject's number flipped ("The key near the cabinet"); nothing else changes.

Each prompt is scored on one verb pair, drawn per prompt from is/are, was/were, has/have.
Metric sign and units (``metric='logit_diff'``): logit(correct form) - logit(wrong form) at the
last token, in logits, where "correct" agrees with the CLEAN subject; positive means the model
agrees with the subject. On the corrupted prompt the same tokens are scored, so a model that
agrees gives a negative value there. ``metric='normalized'``: (LD - LD_corrupt) / (LD_clean -
LD_corrupt) (see :mod:`eap.tasks.common`).

Tokenizer requirements: each verb form is one token with a leading space (" is", " are", ...),
and a noun is used only where both its singular and plural are one token with a leading space
(others are dropped, like IOI's names); GPT-2's BPE has all of the built-in ones.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task, TaskError
from eap.tasks import common

# (singular, plural); both forms single words.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("cabinet", "cabinets"), ("pilot", "pilots"), ("author", "authors"),
    ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("senator", "senators"),
    ("officer", "officers"), ("student", "students"), ("artist", "artists"), ("manager", "managers"),
    ("dog", "dogs"), ("cat", "cats"), ("car", "cars"), ("book", "books"), ("bird", "birds"),
    ("girl", "girls"), ("boy", "boys"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("friend", "friends"), ("player", "players"), ("singer", "singers"), ("king", "kings"),
    ("guard", "guards"), ("driver", "drivers"), ("painting", "paintings"), ("letter", "letters"),
    ("window", "windows"), ("table", "tables"), ("door", "doors"), ("tower", "towers"),
    ("bridge", "bridges"), ("river", "rivers"), ("picture", "pictures"), ("lawyer", "lawyers"),
)
PREPOSITIONS: tuple[str, ...] = ("near", "behind", "beside", "by", "of", "with", "to", "from")
RC_VERBS: tuple[str, ...] = ("liked", "saw", "found", "helped", "met", "knew")
VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))  # (singular, plural)
TEMPLATES: dict[str, str] = {
    "simple": "The {s}",
    "pp": "The {s} {prep} the {a}",
    "rc": "The {s} that the {a} {rc}",
}
METRICS = ("logit_diff", "normalized")


def words() -> list[str]:
    """Words of the agreement prompts: nouns (both numbers), template words, verbs."""
    out = ["The", "the", "that"]
    for sg, pl in NOUNS:
        out += [sg, pl]
    out += list(PREPOSITIONS) + list(RC_VERBS)
    for sg, pl in VERBS:
        out += [sg, pl]
    return out


def _usable_nouns(tokenizer, nouns: Sequence[str] | None) -> dict[str, tuple[str, str]]:
    """Singular -> (singular, plural) for nouns whose two forms are single tokens."""
    table = dict((sg, (sg, pl)) for sg, pl in NOUNS)
    chosen = list(table) if nouns is None else list(nouns)
    unknown = [w for w in chosen if w not in table]
    if unknown:
        raise ValueError(f"unknown nouns {unknown[:5]}; known (singular forms): {sorted(table)[:8]}...")
    return {
        sg: table[sg] for sg in chosen
        if all(common.single_token(tokenizer, " " + f) is not None for f in table[sg])
    }


def _verb_ids(tokenizer) -> list[tuple[int, int]]:
    ids = []
    for sg, pl in VERBS:
        a, b = common.single_token(tokenizer, " " + sg), common.single_token(tokenizer, " " + pl)
        if a is None or b is None:
            raise TaskError(f"agreement reads ' {sg}' and ' {pl}' as single tokens (its metric compares their "
                            "logits); this tokenizer splits or does not know them")
        ids.append((a, b))
    return ids


def _template_names(templates: Sequence[str] | None) -> tuple[str, ...]:
    """The template names to draw from (all of :data:`TEMPLATES` for None); unknown ones are a ValueError."""
    names = tuple(TEMPLATES) if templates is None else tuple(templates)
    bad = [t for t in names if t not in TEMPLATES]
    if bad or not names:
        raise ValueError(f"unknown templates {bad or 'none'}; expected some of {tuple(TEMPLATES)}")
    return names


def _noun_pool(tokenizer, nouns: Sequence[str] | None) -> dict[str, tuple[str, str]]:
    """:func:`_usable_nouns`, at least two of them (subject and attractor), else a TaskError."""
    pool = _usable_nouns(tokenizer, nouns)
    if len(pool) < 2:
        raise TaskError(
            f"only {len(pool)} nouns have single-token singular and plural forms for this tokenizer; "
            "agreement needs at least 2 (subject and attractor)"
        )
    return pool


def _checked_pairs(pairs: Sequence[Sequence[str]] | None, pool: dict[str, tuple[str, str]]
                   ) -> list[tuple[str, ...]] | None:
    """``pairs`` as tuples, checked: singular nouns of ``pool``, subject != attractor (None stays None)."""
    if pairs is None:
        return None
    pairs = [tuple(p) for p in pairs]
    missing = sorted({x for p in pairs for x in p} - pool.keys())
    if missing or not pairs or any(a == b for a, b in pairs):
        raise ValueError(
            f"pairs must be (subject, attractor) singular nouns from the pool, subject != attractor"
            f"{'; not in the pool: ' + str(missing[:5]) if missing else ''}"
        )
    return pairs


def generate(
    tokenizer,
    n: int,
    seed: int = 0,
    nouns: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    pairs: Sequence[Sequence[str]] | None = None,
    exclude_pairs: Sequence[Sequence[str]] | None = None,
) -> common.Prompts:
    """Sample ``n`` agreement prompts and their number-flipped corruptions, from ``seed``.

    ``nouns`` (singular forms) restricts the noun pool, ``templates`` the templates (names in
    :data:`TEMPLATES`). ``pairs``: (subject, attractor) pairs (singular forms) to draw from;
    ``exclude_pairs``: (subject, attractor) pairs never used (to hold them out of training).
    A template without an attractor uses only the pair's subject. ``answers``: ``correct`` and
    ``wrong`` verb token ids [n] and ``plural`` [n] (1 if the clean subject is plural).
    """
    n = common.check_n(n)
    names = _template_names(templates)
    pool = _noun_pool(tokenizer, nouns)
    noun_list = list(pool)
    pairs = _checked_pairs(pairs, pool)
    excluded = {tuple(p) for p in exclude_pairs} if exclude_pairs else set()
    verb_ids = _verb_ids(tokenizer)

    rng = random.Random(seed)
    clean_texts, corrupt_texts, subjects, attractors, used_templates, verbs = [], [], [], [], [], []
    correct, wrong, plural = [], [], []
    for _ in range(n):
        tmpl = rng.choice(names)
        if pairs is not None:
            s, a = rng.choice(pairs)
        else:
            while True:
                s, a = rng.sample(noun_list, 2)
                if (s, a) not in excluded:
                    break
        s_pl, a_pl = rng.random() < 0.5, rng.random() < 0.5
        fields = dict(prep=rng.choice(PREPOSITIONS), rc=rng.choice(RC_VERBS), a=pool[a][int(a_pl)])
        clean_texts.append(TEMPLATES[tmpl].format(s=pool[s][int(s_pl)], **fields))
        corrupt_texts.append(TEMPLATES[tmpl].format(s=pool[s][int(not s_pl)], **fields))
        v = rng.randrange(len(VERBS))
        correct.append(verb_ids[v][int(s_pl)])
        wrong.append(verb_ids[v][int(not s_pl)])
        plural.append(int(s_pl))
        subjects.append(pool[s][int(s_pl)])
        attractors.append(fields["a"] if "{a}" in TEMPLATES[tmpl] else "")
        used_templates.append(tmpl)
        verbs.append(f"{VERBS[v][int(s_pl)]} (not {VERBS[v][int(not s_pl)]})")
    clean, corrupted, end = common.right_pad(tokenizer, clean_texts, corrupt_texts, "agreement")
    info = dict(
        clean_texts=clean_texts,
        corrupted_texts=corrupt_texts,
        subjects=subjects,
        attractors=attractors,
        templates=used_templates,
        verbs=verbs,
        seed=seed,
        table_title="Subject-verb agreement (clean subject vs number-flipped subject)",
        table_columns=[("clean prompt", "clean_texts"), ("verb", "verbs"), ("corrupted prompt", "corrupted_texts")],
    )
    answers = {
        "correct": torch.tensor(correct, dtype=torch.long),
        "wrong": torch.tensor(wrong, dtype=torch.long),
        "plural": torch.tensor(plural, dtype=torch.long),
    }
    return common.Prompts(clean, corrupted, end, answers, info)


# ------------------------------------------------------------------------------------ metrics
def logit_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    correct: Int[Tensor, " n"],
    wrong: Int[Tensor, " n"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """logit(correct verb form) - logit(wrong form) at ``end``, in logits (positive = agrees)."""
    return common.answer_diff(logits, end, correct, wrong)


def logit_diff_readout(selected: Float[Tensor, "n 2"], **_: Any) -> Float[Tensor, " n"]:
    """:func:`logit_diff` from the gathered logits [n, 2] = [logit(correct), logit(wrong)]."""
    return common.first_minus_second(selected)


# ------------------------------------------------------------------------------------- task
def sva(
    model,
    n: int,
    seed: int = 0,
    metric: str = "logit_diff",
    *,
    nouns: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    pairs: Sequence[Sequence[str]] | None = None,
) -> Task:
    """The subject-verb agreement task for ``model`` (see the module docstring); readout over
    [correct, wrong] verb tokens at the last token. ``nouns``, ``templates`` and ``pairs``
    restrict the prompts (e.g. to (subject, attractor) pairs held out of a toy's training)."""
    tokenizer = common.tokenizer_of(model, "agreement")
    p = generate(tokenizer, n, seed=seed, nouns=nouns, templates=templates, pairs=pairs)
    c, w = p.answers["correct"], p.answers["wrong"]
    per_prompt = {"end": p.end, **p.answers, "readout_pos": p.end, "readout_tokens": torch.stack([c, w], 1)}
    return common.build(
        model, p.clean, p.corrupted, per_prompt, raw=logit_diff, raw_readout=logit_diff_readout, metric=metric,
        metrics=METRICS,
        name="sva", info=p.info,
    )
