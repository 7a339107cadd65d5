"""The metric calling convention (issue 23 item 5): a metric gets the per_prompt entries its
signature names, so one without **kwargs works on a task with read-out entries; one that asks
for an entry per_prompt lacks is a TaskError when the task is made."""

from __future__ import annotations


import pytest
import torch

import eap
from eap.task import Task, TaskError


def data(n=4, seq=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, seq), generator=g)
    corrupted = torch.randint(0, vocab, (n, seq), generator=g)
    end = torch.tensor([4, 3, 4, 2][:n])
    good, bad = torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n,), generator=g)
    logits = torch.randn(n, seq, vocab, generator=g, dtype=torch.float64)
    return clean, corrupted, end, good, bad, logits


def logit_diff(logits, end, good, bad):  # no **kwargs: the README's three-line example
    return logits[torch.arange(len(end)), end, good] - logits[torch.arange(len(end)), end, bad]


def naive(logits, end, good, bad):
    return torch.tensor([float(logits[i, end[i], good[i]] - logits[i, end[i], bad[i]]) for i in range(len(end))],
                        dtype=torch.float64)


def test_metric_without_kwargs_gets_only_its_entries():
    clean, corrupted, end, good, bad, logits = data()
    per_prompt = {"end": end, "good": good, "bad": bad, "readout_pos": end, "readout_tokens": torch.stack([good, bad], 1)}
    task = Task(clean, corrupted, logit_diff, per_prompt=per_prompt, readout=lambda sel: sel[:, 0] - sel[:, 1])
    torch.testing.assert_close(task.metric(logits), naive(logits, end, good, bad), rtol=0, atol=1e-12)
    sub = task.subset([1, 3])  # batches follow the entries
    torch.testing.assert_close(sub.metric(logits[[1, 3]]), naive(logits[[1, 3]], end[[1, 3]], good[[1, 3]], bad[[1, 3]]))
    sel = logits[torch.arange(4), end][torch.arange(4)[:, None], per_prompt["readout_tokens"]]
    torch.testing.assert_close(task.readout(sel), naive(logits, end, good, bad))
    assert task.subset_problem(11) is None


def test_keyword_only_and_defaults_and_kwargs():
    clean, corrupted, end, good, bad, logits = data()
    seen = {}

    def kw_only(logits, *, end, good, bad, scale=2.0):
        return scale * logit_diff(logits, end, good, bad)

    def everything(logits, **kw):
        seen.update(kw)
        return logit_diff(logits, kw["end"], kw["good"], kw["bad"])

    pp = {"end": end, "good": good, "bad": bad, "extra": end}
    torch.testing.assert_close(Task(clean, corrupted, kw_only, per_prompt=pp).metric(logits),
                               2.0 * naive(logits, end, good, bad))
    Task(clean, corrupted, everything, per_prompt=pp).metric(logits)
    assert set(seen) == set(pp)  # **kwargs: every entry, as before


def test_metric_asking_for_a_missing_entry_is_a_task_error():
    clean, corrupted, end, good, bad, _ = data()
    with pytest.raises(TaskError, match=r"requires \['bad'\] but per_prompt holds \['end', 'good'\]"):
        Task(clean, corrupted, logit_diff, per_prompt={"end": end, "good": good})
    with pytest.raises(TaskError, match="readout"):
        Task(clean, corrupted, lambda x: x[:, -1, 0],
             per_prompt={"readout_pos": end, "readout_tokens": good[:, None]}, readout=lambda sel, answer: sel[:, 0])


def test_closure_metric_taking_only_logits_with_per_prompt_data():
    """main called every metric with all entries: a logits-only metric on a task with per_prompt
    data raised a raw TypeError."""
    clean, corrupted, end, good, bad, logits = data()
    task = Task(clean, corrupted, lambda lg: naive(lg, end, good, bad), per_prompt={"end": end})
    torch.testing.assert_close(task.metric(logits), naive(logits, end, good, bad))
