"""A closure-style metric (EAP-IG style: it closes over the answer ids of all prompts) run as a
bench plug-in (issue 23 item 8): bench's split into prompt groups makes the same check as
``eap.attribute(batch_size=...)`` before any split, and names ``per_prompt=`` and ``--groups 1``.
With one group it runs."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = '''
import torch
import eap

def closure(model, n, seed=0):
    base = eap.tasks.ioi(model, n, seed=seed)
    io, s, end = base.per_prompt["io"], base.per_prompt["s"], base.per_prompt["end"]
    def metric(logits):  # closes over all n prompts' answers, as EAP-IG users write it
        rows = torch.arange(logits.shape[0])
        return logits[rows, end, io] - logits[rows, end, s]
    return eap.Task(base.clean, base.corrupted, metric, name="closure-ioi")
'''


@pytest.fixture
def plug(tmp_path, monkeypatch):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "closureplug.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(d))
    return d


ARGS = ["run", "--models", "toy-gpt2-2l", "--task", "closureplug:closure", "--sizes", "4", "--methods", "eap",
        "--edges", "stratified:12", "--repeats", "0", "--bootstrap", "0", "--no-figures", "--no-faithfulness",
        "--threads", "1", "--quiet"]


@pytest.mark.parametrize("isolate", ["none", "model"])
def test_closure_metric_with_groups_is_a_clear_task_error(plug, tmp_path, capsys, isolate):
    rc = main([*ARGS, "--groups", "2", "--isolate", isolate, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Task(per_prompt=...)" in err and "--groups 1" in err and "2 prompt groups" in err
    assert "the metric failed on 2 of the 4 prompts (IndexError" in err  # the probe's finding, before any split
    assert "Traceback" not in err and "validation/patch.py" not in err


def test_closure_metric_with_one_group_runs(plug, tmp_path, capsys):
    out = tmp_path / "r1"
    assert main([*ARGS, "--groups", "1", "--isolate", "none", "--out", str(out)]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 1 and cells[0]["task"] == "closureplug:closure"
