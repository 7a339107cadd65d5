"""Validation's structure contracts: the fingerprint keys what decides the numbers (not
docstrings, not graph file I/O), one engine vocabulary, typed options and stats, executors
from any spec, Ctrl-C during exact patching."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch

import validation
import validation.fingerprints as vf
from eap.graph import Graph

ROOT = Path(__file__).resolve().parent.parent


def _tree(tmp_path: Path, name: str) -> Path:
    """A copy of the modules the patching-code hash reads, plus the graph file reader's module."""
    root = tmp_path / name
    reader = Path(inspect.getsourcefile(Graph.from_json)).resolve().relative_to(ROOT)
    for rel in [Path(*m.split(".")).with_suffix(".py") for m in vf.PATCHING_MODULES] + [reader]:
        if (ROOT / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, root / rel)
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_source_hash_ignores_docstrings_and_comments_not_code():
    src = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    assert vf.source_hash(src) == vf.source_hash('def f(x):\n    """Another doc."""\n    # note\n    return x + 1\n')
    assert vf.source_hash(src) == vf.source_hash('def f(x):\n    return (x +\n            1)\n')
    assert vf.source_hash(src) != vf.source_hash('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert vf.source_hash(src) != vf.source_hash('def f(x):\n    """Doc."""\n    return x - 1\n')


def test_patching_code_hash_follows_patching_code_not_graph_io_or_docs(tmp_path):
    base = vf.patching_code_hash(_tree(tmp_path, "base"))
    assert base == vf.patching_code_hash()  # the copy hashes like the imported modules

    reader = Path(inspect.getsourcefile(Graph.from_json)).resolve().relative_to(ROOT)
    io = _tree(tmp_path, "io")  # the graph file reader edited: code and docstring
    text = (io / reader).read_text()
    (io / reader).write_text(text + "\n\ndef _extra_reader_helper(path):\n    return open(path).read()\n")
    _edit(io / reader, "def from_json(", "def from_json(  # reads EAP-IG files\n")
    assert vf.patching_code_hash(io) == base

    doc = _tree(tmp_path, "doc")  # a docstring and a comment in the patching code
    _edit(doc / "validation/units.py", "How a unit is fast", "How a unit is quick")
    _edit(doc / "validation/units.py", "    items = torch.tensor(unit.items, dtype=torch.long)\n",
          "    # the unit's items\n    items = torch.tensor(unit.items, dtype=torch.long)\n")
    assert vf.patching_code_hash(doc) == base

    code = _tree(tmp_path, "code")  # negative control: the patching code computes something else
    _edit(code / "validation/units.py", "D = D * job.scale", "D = D * (job.scale * 1.0000001)")
    assert vf.patching_code_hash(code) != base
    runner = _tree(tmp_path, "runner")
    (runner / "validation/runner.py").write_text((runner / "validation/runner.py").read_text() + "\nSCALE = 2.0\n")
    assert vf.patching_code_hash(runner) != base


def test_fingerprint_keys_the_edge_list(tiny_model, make_random_task):
    graph = Graph.from_model(tiny_model)
    task = make_random_task(tiny_model, n=2, seq=5)
    idx = torch.arange(4)
    parts = vf.fingerprint_parts(tiny_model, graph, task, idx)
    assert parts["edges"] == vf.edge_list_hash(Graph.from_model(tiny_model))
    other = Graph.from_model(tiny_model)
    other.edge_names = list(other.edge_names)
    other.edge_names[0] = other.edge_names[1]  # negative control: another edge list
    assert vf.edge_list_hash(other) != parts["edges"]
