"""A custom task for eap-bench: object recall (copying), on the embedded toy models.

    When Mary and John got a ring at the store, John decided to give the   -> " ring"

The model must copy the object named earlier in the sentence. Corrupted prompts name a
different object in that slot ("got a drink ..."), so the clean answer loses its support.
Metric: logit(clean object) - logit(corrupted object) at the last token, in logits (positive:
the model prefers the object of the clean prompt). Readout: those two logits at that position,
so attribution and exact patching compute only what the metric reads.

Use it from the command line (the module must be importable: ``PYTHONPATH=examples``)::

    PYTHONPATH=examples python -m bench run --models toy-gpt2-2l --task custom_task:object_recall \
        --methods eap,custom_method:eap_corrupted_grad --sizes 16 --out runs/objects

or from Python: ``eap.attribute(model, graph, object_recall(model, 16))``.
"""

from __future__ import annotations

import random

import torch

from eap import Task
from eap.tasks.ioi import NAMES, OBJECTS, PLACES

TEMPLATE = "When {s} and {io} got a {obj} at the {place}, {s} decided to give the"


def recall_diff(logits: torch.Tensor, end: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor,
                **_: torch.Tensor) -> torch.Tensor:
    """logits[i, end_i, answer_i] - logits[i, end_i, wrong_i], in logits."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, end, answer] - logits[rows, end, wrong]


def recall_diff_readout(selected: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
    """The same from the gathered logits [n, 2] = [logit(answer), logit(wrong)]."""
    return selected[:, 0] - selected[:, 1]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def object_recall(model, n: int, seed: int = 0, template: str = TEMPLATE) -> Task:
    """``n`` clean/corrupted prompt pairs (reproducible from ``seed``) for ``model``'s tokenizer.

    Every object, place and name must be one token (with a leading space for BPE tokenizers);
    clean and corrupted prompts must tokenize to the same length."""
    tok = model.tokenizer
    objects = [o for o in OBJECTS if len(_ids(tok, " " + o)) == 1]
    if len(objects) < 2:
        raise ValueError("object_recall needs at least two single-token objects in the tokenizer")
    rng = random.Random(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for _ in range(n):
        s, io = rng.sample(NAMES, 2)
        obj, other = rng.sample(objects, 2)
        place = rng.choice(PLACES)
        a = _ids(tok, template.format(s=s, io=io, obj=obj, place=place))
        b = _ids(tok, template.format(s=s, io=io, obj=other, place=place))
        if len(a) != len(b):
            raise ValueError(f"clean and corrupted prompts tokenize to different lengths: {len(a)} vs {len(b)}")
        clean.append(a)
        corrupted.append(b)
        answer.append(_ids(tok, " " + obj)[0])
        wrong.append(_ids(tok, " " + other)[0])
    seq = max(len(a) for a in clean)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device

    def tensor(rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((n, seq), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out.to(device)

    end = torch.tensor([len(a) - 1 for a in clean], device=device)
    answer_t, wrong_t = torch.tensor(answer, device=device), torch.tensor(wrong, device=device)
    return Task(
        tensor(clean), tensor(corrupted), recall_diff,
        per_prompt={"end": end, "answer": answer_t, "wrong": wrong_t,
                    "readout_pos": end, "readout_tokens": torch.stack([answer_t, wrong_t], dim=1)},
        readout=recall_diff_readout, name="object-recall", info={"seed": seed, "template": template},
    )
