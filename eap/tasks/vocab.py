"""The word-level vocabulary and tokenizer of the embedded models (and of ``random:`` models).

One vocabulary covers every built-in task: the IOI templates, places, objects and names; the
two-digit year tokens ``00``-``99`` and the greater-than template and nouns; the subject-verb
agreement nouns (singular and plural), prepositions and verbs. Induction draws random tokens
from whatever vocabulary the model has, so it adds no words.

Ids are stable and deterministic: special tokens 0-2, punctuation, then the IOI words in the
order of the original IOI-only vocabulary (so IOI token ids did not move when the other tasks
were added), then greater-than, then agreement words.
"""

from __future__ import annotations

from eap.tasks.common import PUNCTUATION
from eap.tasks.greater_than import words as greater_than_words
from eap.tasks.ioi_words import words as ioi_words
from eap.tasks.sva import words as sva_words

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<eos>")


def vocabulary() -> list[str]:
    """Every word the built-in task generators can emit (deterministic order), specials first."""
    words: list[str] = []
    seen: set[str] = set()
    for w in (*SPECIAL_TOKENS, *PUNCTUATION, *ioi_words(), *greater_than_words(), *sva_words()):
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def word_level_tokenizer():
    """A deterministic word-level tokenizer over :func:`vocabulary` (a ``PreTrainedTokenizerFast``).

    Pre-tokenization splits on whitespace, isolates punctuation and cuts digit runs into pairs,
    so "store." gives ["store", "."] and "1732" gives ["17", "32"] (as GPT-2's BPE reads " 1732"
    as " 17" + "32"). Special tokens: ``<pad>`` (pad), ``<unk>`` (unk), ``<eos>`` (eos and bos;
    never added automatically).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<eos>",
        model_max_length=1024,
    )
