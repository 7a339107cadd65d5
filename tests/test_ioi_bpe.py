"""IOI with a GPT-2-style byte-level BPE tokenizer (built offline here, since GPT-2's own
tokenizer needs the hub): only names that are one token with their leading space are used."""

from __future__ import annotations

import pytest
import torch

from eap.tasks import ioi
from eap.tasks.ioi import NAMES, single_token_names
from eap.tasks.vocab import vocabulary

from bpe_tokenizer import byte_level_bpe
from test_ioi import ToyLM

KNOWN = NAMES[::2]  # names the tokenizer learns as whole words; the others get split


@pytest.fixture(scope="module")
def bpe():
    words = [w for w in vocabulary() if w not in NAMES and not w.startswith("<")]
    return byte_level_bpe([" ".join(words)] * 20 + [" " + " ".join(KNOWN)] * 50, vocab_size=600)


def test_single_token_filter(bpe):
    kept = single_token_names(bpe)
    assert kept and set(kept) < set(NAMES)
    for name, tid in kept.items():
        assert bpe(" " + name, add_special_tokens=False)["input_ids"] == [tid]
    split = [n for n in NAMES if n not in kept]
    assert split  # the filter really removes names
    assert all(len(bpe(" " + n, add_special_tokens=False)["input_ids"]) > 1 for n in split)


def test_ioi_prompts_with_bpe(bpe):
    task = ioi(ToyLM(bpe), 12, seed=3)
    kept = set(single_token_names(bpe))
    info = task.info
    assert set(info["io_names"]) <= kept and set(info["s_names"]) <= kept
    pp = task.per_prompt
    assert task.clean.shape == task.corrupted.shape
    pad = bpe.eos_token_id  # no pad token: right-padded with eos
    for i, text in enumerate(info["clean_texts"]):
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        end = int(pp["end"][i])
        assert end == len(ids) - 1
        assert task.clean[i, : end + 1].tolist() == ids
        assert (task.clean[i, end + 1 :] == pad).all()
        # the answer is the IO name with its leading space, one token
        assert bpe(" " + info["io_names"][i], add_special_tokens=False)["input_ids"] == [int(pp["io"][i])]
    assert torch.equal(pp["readout_tokens"][:, 0], pp["io"])
