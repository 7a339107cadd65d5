"""Which engine ran is visible (issue 23 item 2): ``eap.attribute`` logs it at INFO, with the
reason where the bridge ran (asked for, hooks attached, AtP, or the fast/bridge agreement check
failed and why); bench records it per cell in results.json and summary.md."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import eap
from eap.arch import UnsupportedModel

from conftest import TINY_SHAPE, random_task

pytestmark = pytest.mark.usefixtures("one_thread")


def engines(caplog):
    return [(r.eap_engine, r.eap_engine_reason) for r in caplog.records if hasattr(r, "eap_engine")]


def test_attribute_logs_the_engine_and_why_the_bridge(caplog):
    model = eap.random_model(TINY_SHAPE, seed=0, device="cpu", dtype=torch.float64)
    graph, task = eap.Graph.from_model(model), random_task(model)
    with caplog.at_level(logging.INFO, logger="eap.attribute"):
        eap.attribute(model, graph, task, progress=False)
        eap.attribute(model, graph, task, progress=False, engine="bridge")
        eap.attribute(model, graph, task, "atp-qk", progress=False)
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a)]):
            eap.attribute(model, graph, task, progress=False)
    got = engines(caplog)
    assert got[0] == ("fast", "")
    assert got[1] == ("bridge", "engine='bridge' was asked for")
    assert got[2][0] == "bridge" and "atp-qk" in got[2][1]
    assert got[3][0] == "bridge" and "hooks are attached" in got[3][1]
    assert "eap.attribute eap: fast engine" in caplog.text


def test_a_failed_agreement_check_is_logged_with_its_reason(caplog, monkeypatch):
    """The control for the fast path: when the adapter's fast/bridge check fails, auto runs the
    bridge, and the log says why (the scores stay the bridge's, equal to the fast engine's)."""
    from eap.fast import Arch

    def fails(self, model):
        raise UnsupportedModel("logits differ from the bridge's by 0.25")

    model = eap.random_model(TINY_SHAPE, seed=3, device="cpu", dtype=torch.float64)  # a fresh model: no verdict yet
    monkeypatch.setattr(Arch, "verify", fails)
    graph, task = eap.Graph.from_model(model), random_task(model)
    with caplog.at_level(logging.INFO, logger="eap.attribute"), pytest.warns(UserWarning, match="0.25"):
        eap.attribute(model, graph, task, progress=False)
    assert engines(caplog) == [("bridge", "the fast engine does not reproduce this model: logits differ from the "
                                          "bridge's by 0.25")]


def test_bench_records_the_engine_per_cell(tmp_path):
    from bench.matrix import Config, run

    cfg = Config(models=["toy-gpt2-2l"], tasks=["ioi"], sizes=[4], groups=1, edges="stratified:12", repeats=0,
                 bootstrap=0, methods=["eap", "atp-qk"], isolate="none", progress=False, figures=False,
                 faithfulness=False, threads=1)
    results = run(cfg, tmp_path / "r")
    by_method = {c["method"]: c["attribution"] for c in results["cells"]}
    assert by_method["eap"]["engine"] == "fast" and by_method["eap"]["engine_reason"] == ""
    assert by_method["atp-qk"]["engine"] == "bridge" and "atp-qk" in by_method["atp-qk"]["engine_reason"]
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {c["attribution"]["engine"] for c in saved["cells"]} == {"fast", "bridge"}
    summary = (tmp_path / "r" / "summary.md").read_text()
    header = next(ln for ln in summary.splitlines() if ln.startswith("| model") and "engine" in ln)
    col = [h.strip() for h in header.strip("|").split("|")].index("engine")
    rows = [ln for ln in summary.splitlines() if ln.startswith("| toy-gpt2-2l")][:2]
    assert sorted(r.strip("|").split("|")[col].strip() for r in rows) == ["bridge", "fast"]
