"""Built-in tasks refuse prompts their tokenizer cannot read (issue 23, items 1 and 4): a word
that would become the unknown token, an answer word that is not a single token, or no tokenizer
at all gives a ``TaskError`` naming what failed, never a task of ``<unk>`` prompts."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eap.task import TaskError
from eap.tasks import TASKS, greater_than, induction, ioi, sva
from eap.tasks.vocab import vocabulary

from test_ioi import ToyLM


def word_tokenizer(drop: set[str]) -> PreTrainedTokenizerFast:
    """The embedded word-level tokenizer's construction (written out here) over the shared
    vocabulary minus the words ``drop``."""
    vocab = {w: i for i, w in enumerate(w for w in vocabulary() if w not in drop)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def test_full_vocabulary_builds_every_task_without_unknown_tokens():
    """The control: with every word known, each task builds and no prompt holds <unk>."""
    tok = word_tokenizer(set())
    model = ToyLM(tok)
    for name, builder in TASKS.items():
        task = builder(model, 8, seed=0, **({"length": 4} if name == "induction" else {}))
        assert not (task.clean == tok.unk_token_id).any() and not (task.corrupted == tok.unk_token_id).any(), name


@pytest.mark.parametrize("drop", [{"went", "gave"}, {"store", "said"}])
def test_ioi_refuses_template_words_the_tokenizer_lacks(drop):
    tok = word_tokenizer(drop)
    # what main built: prompts holding the unknown token
    texts = ["Then, Mary and John went to the store. John gave a ring to"]
    assert tok.unk_token_id in tok(texts[0], add_special_tokens=False)["input_ids"]
    with pytest.raises(TaskError, match="unknown to this tokenizer") as info:
        ioi(ToyLM(tok), 32, seed=0)
    msg = str(info.value)
    assert "IOI" in msg and "'<unk>'" in msg and "every word" in msg
    named = msg.split("'<unk>': ")[1].split(".")[0].split(", ")
    assert set(named) <= drop and named  # exactly words that were dropped, nothing else


def test_ioi_refuses_too_few_single_token_names():
    from eap.tasks.ioi import NAMES

    tok = word_tokenizer(set(NAMES[3:]))
    with pytest.raises(TaskError, match="only 3 of the names.*single tokens"):
        ioi(ToyLM(tok), 4)


def test_greater_than_names_the_failing_words():
    tok = word_tokenizer({"lasted"})
    with pytest.raises(TaskError, match="greater-than: 1 prompt words .*: lasted\\."):
        greater_than(ToyLM(tok), 8)
    tok = word_tokenizer({"07", "42"})
    with pytest.raises(TaskError, match="single token.*07, 42"):
        greater_than(ToyLM(tok), 8)


def test_agreement_names_the_failing_words():
    with pytest.raises(TaskError, match="agreement: .*: near"):
        sva(ToyLM(word_tokenizer({"near"})), 32, templates=["pp"], seed=0)
    with pytest.raises(TaskError, match="' was' and ' were' as single tokens"):
        sva(ToyLM(word_tokenizer({"were"})), 4)


def test_induction_refuses_special_tokens():
    tok = word_tokenizer(set())
    with pytest.raises(TaskError, match="special token ids \\[1\\]"):
        induction(ToyLM(tok), 2, length=2, tokens=[1, 10, 11, 12, 13])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_without_a_tokenizer_say_one_is_needed(name):
    model = ToyLM(word_tokenizer(set()))
    model.tokenizer = None
    with pytest.raises(TaskError, match="model has no tokenizer.*needs one"):
        TASKS[name](model, 2)
