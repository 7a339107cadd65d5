"""validation: exact activation patching of edges and nodes, the ground truth for eap-bench.

Sign and units (same as ``eap.attribute``): effect(u -> v) = mean over prompts of
metric(patched) - metric(clean), in the metric's units, where "patched" adds
``scale * (corrupted_u - clean_u)`` to receiver v's input only.

    patch_edges(model, graph, task, edges=None, scores=None, seed=0, *, options=None, stats=None,
                scale=1.0, memory_budget=None, batch_size=None, engine='auto', executor='local',
                out=None, shard=None, progress=True, readout=None)
    patch_nodes(model, graph, task, nodes=None, *, options=None, stats=None, ...same keywords)
    evaluate_circuit(model, graph, task, circuit=None, *, baselines=True, options=None, stats=None, ...)
        -> CircuitEval (per_prompt, mean, clean, corrupted, effect, faithfulness): the metric with
        every edge outside the circuit patched at once (MIB/EAP-IG evaluate_graph; several
        circuits per forward)
    certify(model, graph, task, scores, budget=K, threshold=tau, confidence=0.95, seed=0, out=None, ...)
        -> Certificate: verify the top edges exactly, sample the rest by an error signal, and bound
        the unsampled edges above tau that attribution missed (docs/certify.md)
    throughput(model, graph, task, n_edges=256) -> dict (edges_per_s, forward_equivalents_per_edge)
    fingerprint(model, graph, task, edges_idx, scale=1.0, kind='edges') -> str
    default_path(model, graph, task, edges_idx, scale=1.0, kind='edges', root=None) -> Path
    merge(paths, out=None) -> Tensor;  load_values(path) -> Tensor
    PatchOptions(edges, scale, memory_budget, batch_size, engine, executor, out, shard, progress,
        readout): the options as one frozen object (keywords override it); PatchStats /
        CircuitStats: what a run reports (``stats=`` a dict or one of these; read like dicts)
    engine='auto' | 'fast' | 'bridge' (as in ``eap.attribute``; ``method=``/'hooks' deprecated)
    executor='local' | 'ray' | dict spec | LocalExecutor() | RayExecutor(address=None, workers=None,
        gpus_per_worker=None, threads=None, ...): where the units are computed (same numbers at
        equal torch thread counts, same file; ``executor_from_spec``, ``validation.executor``,
        docs/scaling.md); the results file has one writer (``out.lock``).
Memory is bounded by ``memory_budget`` (bytes or '2GiB'; default a share of the free device
memory), not by the number of prompts: prompts are streamed in batches, and the work is done in
units (receiver, prompt batch) that are journalled as they finish (``validation.units.Unit``,
``compute_unit``; ``validation.store``); Ctrl-C raises ``PatchInterrupted`` saying how many
units are saved (a rerun resumes). CLI: ``python -m validation --help``.
"""

from validation.speed import forward_seconds, throughput
from validation.certify import Certificate, certify, run_certificate
from validation.certify_stats import CertifyError
from validation.circuit import CircuitError, CircuitEval, circuit_masks, evaluate_circuit
from validation.executor import Executor, ExecutorError, LocalExecutor, RayExecutor, executor_from_spec
from validation.options import CircuitStats, PatchOptions, PatchStats
from validation.patch import PatchError, PatchInterrupted, patch_edges, patch_nodes
from validation.runner import BlockRunner, UnsupportedModel
from validation.store import (
    StoreError, StoreLocked, StoreMismatch, default_path, fingerprint, load_file, load_values, merge,
)

__all__ = [
    "BlockRunner", "Certificate", "CertifyError", "CircuitError", "CircuitEval", "CircuitStats", "Executor", "ExecutorError", "LocalExecutor",
    "PatchError", "PatchInterrupted", "PatchOptions", "PatchStats", "RayExecutor",
    "StoreError", "StoreLocked", "StoreMismatch", "UnsupportedModel",
    "certify", "circuit_masks", "default_path", "evaluate_circuit", "fingerprint", "forward_seconds", "load_file", "load_values",
    "executor_from_spec", "merge",
    "patch_edges", "patch_nodes", "run_certificate", "throughput",
]
