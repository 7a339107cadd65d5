"""examples/: the custom task, the custom method and the CI snippet, run end to end as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eap


pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_custom_method_is_eap_with_the_corrupted_gradient(tiny3_model, examples_path):
    """Against independent directional derivatives taken at the corrupted run."""
    from conftest import random_task
    from custom_method import eap_corrupted_grad
    from test_attribute import reference_scores

    graph = eap.Graph.from_model(tiny3_model)
    task = random_task(tiny3_model, n=3, seq=6, seed=7)
    ref = reference_scores(tiny3_model, graph, task, at_tokens=task.corrupted)[graph.edge_sender, graph.edge_receiver]
    got = eap_corrupted_grad(tiny3_model, graph, task)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    assert not torch.allclose(got, eap.attribute(tiny3_model, graph, task, progress=False))


def test_custom_task_builds_a_valid_task(examples_path):
    from custom_task import object_recall

    model = eap.load_model("toy-gpt2-2l", device="cpu")
    task = object_recall(model, 6, seed=3)
    assert task.has_readout and task.n_prompts == 6
    assert not torch.equal(task.clean, task.corrupted)
    with torch.no_grad():
        logits = model(task.clean)
    rows = torch.arange(6)
    sel = logits[rows, task.per_prompt["readout_pos"]].gather(1, task.per_prompt["readout_tokens"])
    torch.testing.assert_close(task.readout(sel), task.metric(logits))


def test_example_end_to_end(tmp_path):
    """The CI snippet's commands: run with the custom task and method, gate it, and the pytest file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fidelity"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--models", "toy-gpt2-2l", "--task", "custom_task:object_recall",
         "--methods", "eap,custom_method:eap_corrupted_grad", "--sizes", "8", "--groups", "2",
         "--edges", "stratified:60", "--repeats", "0", "--bootstrap", "20", "--no-figures", "--threads", "1",
         "--quiet", "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["method"] for c in cells} == {"eap", "custom_method:eap_corrupted_grad"}
    assert all(c["task"] == "custom_task:object_recall" for c in cells)
    gate = subprocess.run([sys.executable, "-m", "bench", "gate", str(out), "--min", "spearman=-1"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert gate.returncode == 0, gate.stdout
    gate = subprocess.run([sys.executable, "-m", "bench", "gate", str(out), "--min", "spearman=1.01"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert gate.returncode == 1
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_fidelity.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode == 0, test.stdout[-3000:]
