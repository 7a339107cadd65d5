"""The words of IOI prompts (Wang et al. 2022): the 15 BABA templates of the IOI paper, their
ABBA mirrors, places, objects and names. Data only: ``eap.tasks.ioi`` builds prompts from it and
``eap.tasks.vocab`` puts its words into the shared word-level vocabulary (neither imports the other
for it)."""

from __future__ import annotations

from eap.tasks.common import PUNCTUATION

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


def words() -> list[str]:
    """The words IOI prompts use (template words, places, objects, names), in a fixed order;
    :func:`eap.tasks.vocab.vocabulary` puts them in the shared word-level vocabulary."""
    out: list[str] = []
    for t in BABA_TEMPLATES + ABBA_TEMPLATES:
        for p in PUNCTUATION:
            t = t.replace(p, f" {p} ")
        out.extend(w for w in t.split() if not w.startswith("["))
    return out + list(PLACES + OBJECTS + NAMES)
