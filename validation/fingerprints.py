"""The fingerprint of an exact-patching request: what decides its numbers, hashed.

A results file is only reused for the request it was written for (``validation.store``). The
key is :func:`fingerprint`, the sha256 of :func:`fingerprint_parts`:

* the model: config fields, dtype, a weights hash (:func:`weights_hash`);
* the edge list: the graph's spec and its edges (names, senders, receivers, hook groups), not
  the code of ``eap.graph`` (so editing the graph file reader, or any docstring, never
  invalidates cached truth);
* the prompts and per-prompt data; the metric's and readout's *code* (:func:`code_hash`:
  bytecode, constants, closed-over values, referenced globals);
* the requested items, scale, kind ('edges' | 'nodes') and the package version;
* the code that computes exact patching (:func:`patching_code_hash` over ``PATCHING_MODULES``):
  the syntax tree of each module with docstrings stripped (comments and formatting never
  count), so a fix to the patching, runner, adapter or hook code is a new version of the truth
  while a docstring edit is not.

bench uses these files as its cache of exact truth: :func:`fingerprint` / :func:`default_path`
give the key and the location.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

#: Format of results files (part of every fingerprint).
FORMAT = "eap-bench/validation/2"
#: Modules whose code determines exact-patching numbers (missing ones are skipped). The graph
#: module is not among them: the edge list itself is hashed (``fingerprint_parts["edges"]``).
PATCHING_MODULES = (
    "validation.patch", "validation.units", "validation.runner", "eap.arch.family", "eap.arch.spec", "eap.arch.norm",
    "eap.arch.rotary", "eap.arch.readout", "eap.arch.blocks", "eap.arch.ungroup", "eap.arch.postnorm",
    "eap.arch.mixednorm", "eap.hooks", "eap.task",
)
#: Elements per chunk when summing a parameter in float64 (bounds the transient copy).
_SUM_CHUNK = 2**18


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _sum64(flat: Tensor) -> float:
    """Float64 sum of a 1-d tensor in chunks (no float64 copy of the whole tensor)."""
    total = 0.0
    for chunk in flat.split(_SUM_CHUNK):
        total += float(chunk.sum(dtype=torch.float64))
    return total


def weights_hash(model: Any, sample: int = 2048) -> str:
    """Cheap hash of a model's weights: per parameter its name, shape, dtype, float64 sum and
    ``sample`` evenly spaced entries (any retraining or different seed changes it). The sum is
    taken in chunks, so no full float64 copy of a parameter is made."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(_tensor_bytes(flat[::step][:sample].double()))
        h.update(repr(_sum64(flat)).encode())
    return h.hexdigest()


def cfg_dict(model: Any) -> dict[str, Any]:
    """The model config's plain fields (device-independent)."""
    cfg = model.cfg
    items = cfg.items() if isinstance(cfg, dict) else vars(cfg).items()
    skip = {"device", "n_devices", "dtype", "model_name", "tokenizer_name"}  # names: temp dirs for random models
    return {
        k: v for k, v in sorted(items) if k not in skip and not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))
    }


def _fn_name(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# ------------------------------------------------------------------------ code of callables
def code_hash(fn: Any) -> str:
    """Hash (16 hex digits) of what a callable computes, for the fingerprint of its results.

    A Python function is hashed by its bytecode, constants (nested functions and lambdas
    included), names, default arguments, the values it closes over (tensors by their bytes),
    and the globals it reads: tensors and plain values by value, functions defined outside
    installed libraries recursively. ``functools.partial`` adds its arguments, a bound method
    its object's attributes, a callable object its class's ``__call__`` and attributes.
    Modules, classes, library and builtin functions count by name only, so do objects of other
    types (e.g. a model the metric calls). Line numbers and formatting do not count; editing
    what the function does, or a value it closes over, changes the hash. Bytecode differs
    between Python versions: a new interpreter means new truth."""
    if fn is None:
        return "none"
    h = hashlib.sha256()
    _feed(h, fn, set(), 0)
    return h.hexdigest()[:16]


def _library_function(fn: types.FunctionType) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    top = mod.split(".")[0]
    return top in {"torch", "numpy", "math", "functools", "builtins", "einops", "jaxtyping", "transformer_lens",
                   "transformers", "scipy", "typing"}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, code.co_kwonlyargcount)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _feed_code(h, c)
        else:
            h.update(repr(c).encode())


def _feed(h: Any, obj: Any, seen: set[int], depth: int) -> None:
    """Add ``obj``'s value (or code) to hash ``h``; see :func:`code_hash`."""
    if depth > 8:
        h.update(f"<deep {type(obj).__qualname__}>".encode())
        return
    if isinstance(obj, Tensor):
        t = obj.detach()
        if t.numel() > 2**24:  # huge: shape, dtype, a sample and the sum
            flat = t.reshape(-1)
            h.update(_tensor_bytes(flat[:: max(1, flat.numel() // 4096)][:4096]))
            h.update(repr(_sum64(flat)).encode())
        else:
            h.update(_tensor_bytes(t))
        return
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
        return
    if isinstance(obj, (tuple, list, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        h.update(f"<{type(obj).__name__} {len(items)}>".encode())
        for v in items:
            _feed(h, v, seen, depth + 1)
        return
    if isinstance(obj, dict):
        h.update(f"<dict {len(obj)}>".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], seen, depth + 1)
        return
    if isinstance(obj, (types.ModuleType, type)):
        h.update(f"<{type(obj).__name__} {getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj.__name__)}>".encode())
        return
    if id(obj) in seen:
        h.update(b"<seen>")
        return
    if isinstance(obj, functools.partial):
        seen.add(id(obj))
        h.update(b"<partial>")
        _feed(h, obj.func, seen, depth + 1)
        _feed(h, obj.args, seen, depth + 1)
        _feed(h, obj.keywords, seen, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        seen.add(id(obj))
        h.update(b"<method>")
        _feed(h, obj.__func__, seen, depth + 1)
        _feed(h, obj.__self__, seen, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        seen.add(id(obj))
        h.update(f"<function {obj.__qualname__}>".encode())
        if depth > 0 and _library_function(obj):
            h.update(str(obj.__module__).encode())
            return
        code = obj.__code__
        _feed_code(h, code)
        _feed(h, obj.__defaults__, seen, depth + 1)
        _feed(h, obj.__kwdefaults__, seen, depth + 1)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                h.update(b"<empty cell>")
                continue
            _feed(h, value, seen, depth + 1)
        g = obj.__globals__
        for name in sorted(_code_names(code)):
            if name in g:
                h.update(f"<global {name}>".encode())
                _feed(h, g[name], seen, depth + 1)
        return
    if callable(obj) and hasattr(type(obj), "__call__") and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
        seen.add(id(obj))
        h.update(f"<callable {type(obj).__module__}.{type(obj).__qualname__}>".encode())
        _feed(h, type(obj).__call__, seen, depth + 1)
        _feed(h, dict(vars(obj)), seen, depth + 1)
        return
    # builtins, library objects, models: by type (and qualified name where there is one)
    h.update(f"<{type(obj).__module__}.{type(obj).__qualname__} {getattr(obj, '__qualname__', '')}>".encode())


def source_hash(source: str) -> str:
    """Hash (16 hex digits) of Python source code by its syntax tree with docstrings removed:
    comments, formatting, line numbers and docstrings do not count, code does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()[:16]


def _module_file(name: str, root: Path | None) -> Path | None:
    if root is not None:
        path = Path(root, *name.split(".")).with_suffix(".py")
        return path if path.exists() else None
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=4)
def patching_code_hash(root: Path | None = None) -> str:
    """Hash (16 hex digits) of the code of the modules that compute exact patching
    (``PATCHING_MODULES``, each by :func:`source_hash`): a change to what they compute is a new
    version of the truth, a docstring or comment edit is not. ``root``: read the modules'
    files under this source tree instead of the imported ones (to check a change)."""
    h = hashlib.sha256()
    for name in PATCHING_MODULES:
        path = _module_file(name, Path(root) if root is not None else None)
        if path is None:
            continue
        h.update(name.encode())
        h.update(source_hash(path.read_text()).encode())
    return h.hexdigest()[:16]


def edge_list_hash(graph: Any) -> str:
    """Hash (16 hex digits) of a graph's edge list: edge names, sender and receiver of every
    edge, and the hook groups (hook, first index, heads, upstream senders, layer, kind)."""
    h = hashlib.sha256()
    h.update("\n".join(graph.edge_names).encode())
    h.update(_tensor_bytes(torch.as_tensor(graph.edge_sender).long()))
    h.update(_tensor_bytes(torch.as_tensor(graph.edge_receiver).long()))
    for groups in (graph.sender_groups, graph.receiver_groups):
        h.update(repr([(g.hook, g.start, g.n_heads, g.n_upstream, g.layer, g.kind, g.size) for g in groups]).encode())
    return h.hexdigest()[:16]


def package_version() -> str:
    try:
        return importlib.metadata.version("eap-bench")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def describe_request(model: Any, graph: Any, task: Any, items: Int[Tensor, " k"], scale: float, kind: str) -> dict:
    """Human-readable facts of a request (stored as ``meta``, used in mismatch messages)."""
    dtype = next(model.parameters()).dtype
    return {
        "kind": kind,
        "graph": repr(graph.spec),
        "dtype": str(dtype).replace("torch.", ""),
        "task": getattr(task, "name", "?"),
        "n_prompts": int(task.n_prompts),
        "seq_len": int(task.seq_len),
        "metric": _fn_name(task.metric_fn),
        "n_requested": int(items.numel()),
        "scale": float(scale),
        "seed": task.info.get("seed") if isinstance(getattr(task, "info", None), dict) else None,
        "package": package_version(),
    }


def fingerprint_parts(
    model: Any, graph: Any, task: Any, edges_idx: Int[Tensor, " k"], scale: float = 1.0, kind: str = "edges"
) -> dict[str, str]:
    """The hashed components of a request's fingerprint (see :func:`fingerprint`)."""

    def sha(*chunks: bytes) -> str:
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        return h.hexdigest()[:16]

    per_prompt = [key.encode() + _tensor_bytes(task.per_prompt[key]) for key in sorted(task.per_prompt)]
    return {
        "format": FORMAT,
        "model_cfg": sha(json.dumps(cfg_dict(model), sort_keys=True, default=str).encode()),
        "dtype": str(next(model.parameters()).dtype),
        "weights": weights_hash(model)[:16],
        "graph": repr(graph.spec),
        "edges": edge_list_hash(graph),
        "prompts": sha(_tensor_bytes(task.clean.long()), _tensor_bytes(task.corrupted.long())),
        "per_prompt": sha(*per_prompt),
        "metric": f"{_fn_name(task.metric_fn)}|{code_hash(task.metric_fn)}",
        "readout": f"{_fn_name(task.readout_fn)}|{code_hash(task.readout_fn)}",
        "items": sha(_tensor_bytes(torch.as_tensor(edges_idx).long())),
        "scale": repr(float(scale)),
        "kind": kind,
        "package": package_version(),
        "code": patching_code_hash(),
    }


def fingerprint_of(parts: dict[str, str]) -> str:
    """The sha256 of a request's :func:`fingerprint_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fingerprint(
    model: Any, graph: Any, task: Any, edges_idx: Int[Tensor, " k"], scale: float = 1.0, kind: str = "edges"
) -> str:
    """sha256 identifying an exact-patching request: model cfg + weights hash + dtype, graph
    spec and edge list, the task's token tensors, per-prompt tensors, the metric's and readout's names and
    code (:func:`code_hash`), the requested edge (or node) indices, ``scale``, ``kind`` ('edges'
    or 'nodes'), the package version and the patching code (:func:`patching_code_hash`)."""
    return fingerprint_of(fingerprint_parts(model, graph, task, edges_idx, scale, kind))


def default_path(
    model: Any, graph: Any, task: Any, edges_idx: Tensor, scale: float = 1.0, kind: str = "edges",
    root: str | os.PathLike | None = None, fp: str | None = None,
) -> Path:
    """Default cache file for a request: ``$EAP_VALIDATION_CACHE`` (or ``results/validation``)
    ``/<kind>-<fingerprint[:24]>.pt`` (``fp``: a fingerprint already computed)."""
    root = Path(root or os.environ.get("EAP_VALIDATION_CACHE", "results/validation"))
    fp = fp or fingerprint(model, graph, task, edges_idx, scale, kind)
    return root / f"{kind}-{fp[:24]}.pt"
