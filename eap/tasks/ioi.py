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
models (:func:`word_level_tokenizer`) splits on whitespace and isolates punctuation, so it
reads the same text as "Then , John and Mary went to the store . John gave a ring to".

Metric sign and units: ``logit_diff`` is logit(IO) - logit(S) at the last prompt token, in
logits; positive means the model prefers the correct answer. ``normalized`` is
(LD - LD_corrupt) / (LD_clean - LD_corrupt), dimensionless: 1 = clean behaviour, 0 = corrupted.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eap.task import Task

# --------------------------------------------------------------------------------- word lists
# The 15 BABA templates of the IOI paper; [B] is the subject S, [A] the indirect object IO.
BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def _mirror(template: str) -> str:
    """BABA -> ABBA: swap the first [B] and the first [A] (the two names of the first clause)."""
    i, j = template.index("[B]"), template.index("[A]")
    assert i < j
    return template[:i] + "[A]" + template[i + 3 : j] + "[B]" + template[j + 3 :]


ABBA_TEMPLATES: tuple[str, ...] = tuple(_mirror(t) for t in BABA_TEMPLATES)

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)
# 100 common English first names.
NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas",
    "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven",
    "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany",
    "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul",
    "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis",
    "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie",
    "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison",
    "Bradley", "Samuel", "George",
)
PUNCTUATION: tuple[str, ...] = (",", ".")
PROMPT_TYPES = ("BABA", "ABBA", "mixed")
METRICS = ("logit_diff", "normalized")
MIN_NAMES = 5  # IO, S and three fresh corrupted names must be distinct

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


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


# ------------------------------------------------------------------------ word-level tokenizer
def vocabulary() -> list[str]:
    """Every word the generator can emit (deterministic order), special tokens first."""
    words: list[str] = []
    seen: set[str] = set()

    def add(w: str) -> None:
        if w not in seen:
            seen.add(w)
            words.append(w)

    for w in SPECIAL_TOKENS + PUNCTUATION:
        add(w)
    for t in BABA_TEMPLATES + ABBA_TEMPLATES:
        for p in PUNCTUATION:
            t = t.replace(p, f" {p} ")
        for w in t.split():
            if not w.startswith("["):
                add(w)
    for w in PLACES + OBJECTS + NAMES:
        add(w)
    return words


def word_level_tokenizer():
    """A deterministic word-level tokenizer over the IOI vocabulary (a ``PreTrainedTokenizerFast``).

    Pre-tokenization splits on whitespace (``WhitespaceSplit``) and then isolates punctuation, so
    "store." and "store ." both give ["store", "."]. Special tokens: ``<pad>`` (pad), ``<unk>``
    (unk), ``<eos>`` (eos and bos; never added automatically). Ids are stable: specials 0-2, then
    punctuation, template words, places, objects and names in a fixed order.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<eos>",
        model_max_length=1024,
    )


# ----------------------------------------------------------------------------- prompt generator
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_names(tokenizer, names: Sequence[str] | None = None) -> dict[str, int]:
    """Names that are exactly one (known) token with a leading space, mapped to that token id."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out: dict[str, int] = {}
    for name in NAMES if names is None else names:
        ids = _encode(tokenizer, " " + name)
        if len(ids) == 1 and ids[0] != unk:
            out[name] = ids[0]
    return out


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to right-pad prompts with")
    return int(pid)


@dataclass
class IOIPrompts:
    """Token tensors and bookkeeping for n IOI prompt pairs (no model needed)."""

    clean: Int[Tensor, "n seq"]
    corrupted: Int[Tensor, "n seq"]
    end: Int[Tensor, " n"]  # index of the last real token
    io: Int[Tensor, " n"]  # IO token id (the answer)
    s: Int[Tensor, " n"]  # S token id
    info: dict[str, Any] = field(default_factory=dict)


def generate(
    tokenizer,
    n: int,
    seed: int = 0,
    prompt_type: str = "mixed",
    names: Sequence[str] | None = None,
    pairs: Sequence[Sequence[str]] | None = None,
    exclude_pairs: Sequence[Sequence[str]] | None = None,
) -> IOIPrompts:
    """Sample ``n`` clean IOI prompts and their ABC corruptions, reproducibly from ``seed``.

    ``names``: the name pool (default :data:`NAMES`), reduced to single-token names.
    ``pairs``: if given, the (IO, S) name pairs to draw from (uniformly); ``exclude_pairs``:
    unordered name pairs never used as {IO, S} (to hold pairs out of training). Corrupted names
    are drawn from the whole pool minus the clean prompt's names.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer number of prompts, got {n!r}")
    templates = templates_for(prompt_type)
    pool = single_token_names(tokenizer, names)
    if len(pool) < MIN_NAMES:
        raise ValueError(
            f"only {len(pool)} of the names are a single token for this tokenizer; IOI needs at "
            f"least {MIN_NAMES} (IO, S and three fresh corrupted names)"
        )
    name_list = list(pool)
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        missing = sorted({x for p in pairs for x in p} - pool.keys())
        if missing:
            raise ValueError(f"pair names not single tokens / not in the name pool: {missing[:5]}")
        if any(a == b for a, b in pairs) or not pairs:
            raise ValueError("pairs must be a non-empty list of (IO, S) with IO != S")
    excluded = {frozenset(p) for p in exclude_pairs} if exclude_pairs else set()

    n = int(n)
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

    clean_ids = [_encode(tokenizer, t) for t in clean_texts]
    corrupt_ids = [_encode(tokenizer, t) for t in corrupt_texts]
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        if len(a) != len(b):
            raise ValueError(
                f"clean and corrupted prompt {i} tokenize to different lengths ({len(a)} vs "
                f"{len(b)}): {clean_texts[i]!r} / {corrupt_texts[i]!r}"
            )
    seq = max(len(a) for a in clean_ids)
    pid = pad_id(tokenizer)
    clean = torch.full((n, seq), pid, dtype=torch.long)
    corrupted = torch.full((n, seq), pid, dtype=torch.long)
    for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
        clean[i, : len(a)] = torch.tensor(a)
        corrupted[i, : len(b)] = torch.tensor(b)
    end = torch.tensor([len(a) - 1 for a in clean_ids], dtype=torch.long)
    io_t = torch.tensor([pool[w] for w in io_names], dtype=torch.long)
    s_t = torch.tensor([pool[w] for w in s_names], dtype=torch.long)
    info = dict(
        clean_texts=clean_texts,
        corrupted_texts=corrupt_texts,
        io_names=io_names,
        s_names=s_names,
        corrupted_names=corrupt_names,
        templates=used_templates,
        seed=seed,
        prompt_type=prompt_type,
    )
    return IOIPrompts(clean, corrupted, end, io_t, s_t, info)


# ------------------------------------------------------------------------------------ metrics
def logit_diff(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    io: Int[Tensor, " n"],
    s: Int[Tensor, " n"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """logits[i, end_i, io_i] - logits[i, end_i, s_i], in logits (positive = IO preferred)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    end, io, s = end.to(logits.device), io.to(logits.device), s.to(logits.device)
    return logits[rows, end, io] - logits[rows, end, s]


def logit_diff_readout(selected: Float[Tensor, "n 2"], **_: Any) -> Float[Tensor, " n"]:
    """Same as :func:`logit_diff` from the gathered logits [n, 2] = [logit(IO), logit(S)]."""
    return selected[:, 0] - selected[:, 1]


def normalized(
    logits: Float[Tensor, "n seq vocab"],
    end: Int[Tensor, " n"],
    io: Int[Tensor, " n"],
    s: Int[Tensor, " n"],
    ld_clean: Float[Tensor, " n"],
    ld_corrupt: Float[Tensor, " n"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """(LD - LD_corrupt) / (LD_clean - LD_corrupt), dimensionless (1 = clean, 0 = corrupted)."""
    ld = logit_diff(logits, end, io, s)
    lc, lx = ld_clean.to(ld.device), ld_corrupt.to(ld.device)
    return (ld - lx) / (lc - lx)


def normalized_readout(
    selected: Float[Tensor, "n 2"],
    ld_clean: Float[Tensor, " n"],
    ld_corrupt: Float[Tensor, " n"],
    **_: Any,
) -> Float[Tensor, " n"]:
    """Same as :func:`normalized` from the gathered logits [n, 2] = [logit(IO), logit(S)]."""
    ld = logit_diff_readout(selected)
    lc, lx = ld_clean.to(ld.device), ld_corrupt.to(ld.device)
    return (ld - lx) / (lc - lx)


# ------------------------------------------------------------------------------------- task
def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits(model, tokens: Tensor) -> Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


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
    prompts, computed once here. Both use the CLEAN prompt's IO/S tokens, so the metric averages
    to exactly 1 on clean and 0 on corrupted logits. (The seed notebook measured the corrupted
    baseline with the corrupted dataset's own names instead.) Stored in ``task.info``.

    ``names`` restricts the name pool; ``pairs`` (keyword-only) restricts the clean (IO, S)
    pairs, e.g. to name pairs held out of a toy model's training.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("model has no .tokenizer; IOI needs it to tokenize the prompts")
    p = generate(tokenizer, n, seed=seed, prompt_type=prompt_type, names=names, pairs=pairs)
    dev = _device(model)
    per_prompt = {
        "end": p.end.to(dev),
        "io": p.io.to(dev),
        "s": p.s.to(dev),
        "readout_pos": p.end.to(dev),
        "readout_tokens": torch.stack([p.io, p.s], dim=1).to(dev),
    }
    info = dict(p.info, metric=metric)
    clean, corrupted = p.clean.to(dev), p.corrupted.to(dev)
    if metric == "logit_diff":
        fn, readout = logit_diff, logit_diff_readout
    else:
        with torch.no_grad():
            ld_clean = logit_diff(_logits(model, clean), **per_prompt).mean().item()
            ld_corrupt = logit_diff(_logits(model, corrupted), **per_prompt).mean().item()
        if abs(ld_clean - ld_corrupt) < 1e-6:
            raise ValueError(
                f"normalized metric undefined: clean and corrupted mean logit differences are "
                f"equal ({ld_clean:.4g})"
            )
        per_prompt["ld_clean"] = torch.full((n,), ld_clean, device=dev)
        per_prompt["ld_corrupt"] = torch.full((n,), ld_corrupt, device=dev)
        info.update(ld_clean=ld_clean, ld_corrupt=ld_corrupt)
        fn, readout = normalized, normalized_readout
    return Task(
        clean, corrupted, fn, per_prompt=per_prompt, readout=readout, name=f"ioi-{prompt_type}",
        info=info,
    )


def sample_table(task: Task, k: int = 5) -> str:
    """A plain-text table of the first ``k`` prompts, like the seed's ``make_table``."""
    info = task.info
    k = min(k, len(info["clean_texts"]))
    cols = ["IOI prompt", "IOI subj", "IOI indirect obj", "ABC prompt"]
    rows = [
        [info["clean_texts"][i], info["s_names"][i], info["io_names"][i], info["corrupted_texts"][i]]
        for i in range(k)
    ]
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"

    def fmt(r: Sequence[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"

    title = "Sentences from IOI vs ABC distribution"
    return "\n".join([title, line, fmt(cols), line, *map(fmt, rows), line])
