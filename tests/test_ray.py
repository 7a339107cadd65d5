"""The Ray executor of exact patching (``validation.executor``), the results file's writer lock,
and what happens without Ray.

The Ray tests start one local cluster for the module (``ray.init(num_cpus=2)``, small object
store, no dashboard) and share one ``RayExecutor`` (two actors, made once per model) across
tests, in file order. The expectations are the local executor's results on the same float64
model: equal bit for bit (``torch.equal``), whatever the workers, kills and interruptions.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import eap
import validation
from eap.graph import Graph
from eap.task import Task
from eap.tasks.ioi import logit_diff
from validation.executor import ExecutorError, LocalExecutor, RayExecutor
from validation.store import ResultStore, StoreLocked, WriterLock, load_file, lock_path

try:
    import ray
except ImportError:  # the tests below that need Ray are skipped; the others still run
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed: pip install 'eap-bench[ray]'")
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "random:gpt2-tiny@0"  # made by the workers from its name (shape and seed)
#: A fixed budget: the default (half the free memory) can give another plan (copies per forward)
#: from one call to the next, and other row counts round differently in the last bit.
BUDGET = "256MiB"
SLEEP_S = 0.004  # per metric call in the kill test: units last long enough to be killed mid-way


class _Interrupt(Exception):
    """Stands for Ctrl-C / a crash of the driver."""


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def executor(cluster):
    ex = RayExecutor(workers=2)
    yield ex
    ex.close()


@pytest.fixture
def metric_by_value():
    """The workers cannot import this test module: functions defined here travel by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def model():
    return eap.load_model(MODEL, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def graph(model):
    return Graph.from_model(model)


@pytest.fixture(scope="module")
def task(model):
    return eap.tasks.ioi(model, 6, seed=0)


def _unit_count(graph, items, n_batches):
    return len(graph.edge_receiver[items].unique()) * n_batches


def _identical(a, b) -> bool:
    """Bit-for-bit equal, NaN (not requested) in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def _slow_logit_diff(logits, **per_prompt):
    time.sleep(SLEEP_S)
    return logit_diff(logits, **per_prompt)


# ------------------------------------------------------------------------------ same result
@needs_ray
def test_ray_equals_local_bit_for_bit_with_the_same_file(executor, model, graph, task, tmp_path):
    """All edges, two prompt batches (4 + 2): same values bit for bit, same results file."""
    local_stats, ray_stats = {}, {}
    want = validation.patch_edges(model, graph, task, batch_size=4, progress=False, memory_budget=BUDGET, out=tmp_path / "local.pt",
                                  stats=local_stats)
    got = validation.patch_edges(model, graph, task, batch_size=4, progress=False, memory_budget=BUDGET, out=tmp_path / "ray.pt",
                                 executor=executor, stats=ray_stats)
    assert torch.equal(got, want) and not torch.isnan(got).any()
    assert ray_stats["executor"] == "ray" and local_stats["executor"] == "local"
    assert ray_stats["n_batches"] == 2 and ray_stats["n_units"] == local_stats["n_units"] == graph.n_receivers * 2
    assert ray_stats["n_units_retried"] == 0 and ray_stats["workers_lost"] == 0
    assert executor.source.startswith("made from random:gpt2-tiny@0")
    a, b = load_file(tmp_path / "local.pt"), load_file(tmp_path / "ray.pt")
    assert a.keys() == b.keys()
    for key in ("format", "fingerprint", "kind", "n_items", "shard", "complete", "prompts_per_batch", "meta"):
        assert a[key] == b[key], key
    for key in ("values", "done", "requested", "assigned", "sums", "measured"):
        assert torch.equal(a[key], b[key]), key
    assert not lock_path(tmp_path / "ray.pt").exists()  # released at the end


@needs_ray
def test_interrupted_driver_resumes_without_recomputing(executor, model, graph, task, tmp_path, monkeypatch):
    """The driver stops after 5 recorded units; the re-run computes exactly the other units."""
    items = graph.select_edges("sample:60", seed=1)
    want = validation.patch_edges(model, graph, task, items, batch_size=4, progress=False, memory_budget=BUDGET)
    out = tmp_path / "r.pt"
    real_record, first, second = ResultStore.record_unit, [], []

    def interrupted(self, batch, items, sums):
        real_record(self, batch, items, sums)
        first.append((batch, tuple(items)))
        if len(first) == 5:
            raise _Interrupt

    monkeypatch.setattr(ResultStore, "record_unit", interrupted)
    with pytest.raises(_Interrupt):
        validation.patch_edges(model, graph, task, items, batch_size=4, progress=False, memory_budget=BUDGET, out=out, executor=executor)
    assert not executor.actors  # an interrupted run stops its workers

    def counting(self, batch, items, sums):
        real_record(self, batch, items, sums)
        second.append((batch, tuple(items)))

    monkeypatch.setattr(ResultStore, "record_unit", counting)
    stats = {}
    got = validation.patch_edges(model, graph, task, items, batch_size=4, progress=False, memory_budget=BUDGET, out=out, executor=executor,
                                 stats=stats)
    total = _unit_count(graph, items, 2)
    assert stats["n_units_resumed"] == 5 and stats["n_units"] == total - 5 == len(second)
    assert not set(first) & set(second)  # no finished unit computed again
    assert len(set(first) | set(second)) == total  # and none lost
    assert _identical(got, want)


@needs_ray
def test_killed_actor_loses_nothing(executor, model, graph, task, monkeypatch, metric_by_value):
    """``ray.kill`` of one of the two actors after the first recorded unit (both have units in
    flight): its units go to the other one; the result is the local one, bit for bit."""
    slow = Task(task.clean, task.corrupted, _slow_logit_diff, per_prompt=task.per_prompt, name="ioi-slow")
    want = validation.patch_edges(model, graph, slow, batch_size=4, progress=False, memory_budget=BUDGET)
    assert len(executor.actors) == 2
    victim = executor.actors[0]
    real_record, recorded = ResultStore.record_unit, []

    def kill_after_first(self, batch, items, sums):
        real_record(self, batch, items, sums)
        recorded.append((batch, tuple(items)))
        if len(recorded) == 1:
            ray.kill(victim)

    monkeypatch.setattr(ResultStore, "record_unit", kill_after_first)
    stats = {}
    got = validation.patch_edges(model, graph, slow, batch_size=4, progress=False, memory_budget=BUDGET, executor=executor, stats=stats)
    assert stats["workers_lost"] == 1 and stats["n_units_retried"] >= 1
    assert len(recorded) == len(set(recorded)) == graph.n_receivers * 2  # each unit recorded once
    assert torch.equal(got, want)
    assert len(executor.actors) == 1


@needs_ray
def test_other_weights_are_refused_and_a_shipped_model_equals_local(executor, model, graph, task):
    """Weights edited after loading: the workers make the model from its origin (unedited) and
    the fingerprint check refuses them instead of mixing; shipped through the object store
    (``model_source='ship'``), the edited model gives the local result (node patching here)."""
    edited = eap.load_model(MODEL, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        edited.blocks[1].mlp.W_out.mul_(2.0)
    with pytest.raises(ExecutorError, match="weights differ.*model_source='ship'"):
        validation.patch_edges(edited, graph, task, [0, 1, 2], progress=False, memory_budget=BUDGET, executor=executor)
    assert not executor.actors  # a failed run stops its workers (and frees the cluster's CPUs)
    want = validation.patch_nodes(edited, graph, task, batch_size=4, progress=False, memory_budget=BUDGET)
    stats = {}
    with RayExecutor(workers=2, model_source="ship") as shipping:
        got = validation.patch_nodes(edited, graph, task, batch_size=4, progress=False, memory_budget=BUDGET, executor=shipping, stats=stats)
        assert shipping.source == "shipped through the object store"
    assert torch.equal(got, want) and stats["n_units"] == len(graph.sender_groups) * 2
    assert not torch.equal(got, validation.patch_nodes(model, graph, task, batch_size=4, progress=False, memory_budget=BUDGET))


@needs_ray
def test_bench_exact_truth_with_ray_equals_local(executor, tmp_path):
    from bench.matrix import Config, run

    executor.close()  # the bench makes its own workers
    kw = dict(models=[MODEL], sizes=[4], methods=["eap"], tasks=["ioi"], repeats=0, groups=2, isolate="none",
              figures=False, progress=False, dtype="float64")
    run(Config(**kw), tmp_path / "local")
    run(Config(**kw, executor="ray", ray_workers=2), tmp_path / "ray")
    (a,), (b,) = (list((tmp_path / d / "cache" / "exact").glob("*/exact.pt")) for d in ("local", "ray"))
    assert torch.equal(torch.load(a), torch.load(b))


# --------------------------------------------------------------------------- failing fast
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
def test_workers_take_the_drivers_thread_count_bit_identical_and_recorded(executor, model, graph, task, tmp_path):
    """The guarantee: bit-identical to the local executor at equal torch thread counts. Workers
    take the driver's count by default (a new count makes new workers); it is in the results file."""
    torch.set_num_threads(2)  # the one_thread fixture restores it
    edges = graph.select_edges("sample:40", seed=3)
    local_st, ray_st = {}, {}
    want = validation.patch_edges(model, graph, task, edges, progress=False, memory_budget=BUDGET,
                                  out=tmp_path / "l.pt", stats=local_st)
    got = validation.patch_edges(model, graph, task, edges, progress=False, memory_budget=BUDGET,
                                 out=tmp_path / "r.pt", stats=ray_st, executor=executor)
    assert _identical(got, want)
    assert local_st["threads"] == ray_st["threads"] == 2
    assert load_file(tmp_path / "l.pt")["meta"]["threads"] == load_file(tmp_path / "r.pt")["meta"]["threads"] == 2
    executor.close()  # frees the cluster's two CPUs
    with RayExecutor(workers=1, threads=1) as one:  # negative control: an explicit count is what runs
        st = {}
        validation.patch_edges(model, graph, task, edges, progress=False, memory_budget=BUDGET, stats=st,
                               out=tmp_path / "one.pt", executor=one)
    assert st["threads"] == 1 and load_file(tmp_path / "one.pt")["meta"]["threads"] == 1


@needs_ray
def test_joining_the_session_this_process_has_is_silent_another_address_warns(cluster):
    import warnings

    session = ray.get_runtime_context().gcs_address
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = RayExecutor(address=session)
        ex.connect()
        ex.connect()
    with socket.socket() as s:  # something listens there, but it is not this process's Ray session
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.warns(UserWarning, match="using that session, not 127.0.0.1"):
            RayExecutor(address=f"127.0.0.1:{s.getsockname()[1]}").connect()


def test_same_cluster_compares_hosts_and_ports():
    from validation.executor import same_cluster

    here = socket.gethostbyname(socket.gethostname())
    assert same_cluster("127.0.0.1:6399", f"{here}:6399") and same_cluster(f"{here}:6399", "127.0.0.1:6399")
    assert same_cluster("localhost:6399", "127.0.0.1:6399")
    assert same_cluster("ray://127.0.0.1:10001", f"{here}:6379")  # the client port is not the GCS port
    assert not same_cluster("127.0.0.1:6400", f"{here}:6399")
    assert not same_cluster("192.0.2.7:6399", f"{here}:6399")
    assert same_cluster(None, f"{here}:6399") and not same_cluster("auto", None)


@needs_ray
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_address_fails_within_seconds(model, graph, task, scheme):
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"cannot reach the Ray cluster at {address}"):
        validation.patch_edges(model, graph, task, [0], progress=False, executor=RayExecutor(address=address,
                                                                                             connect_timeout=3))
    assert time.perf_counter() - t0 < 10


@needs_ray
def test_cli_unreachable_address_is_a_clear_error(capsys, monkeypatch):
    from validation.__main__ import _cli

    monkeypatch.setattr(sys, "argv", ["validation", "--executor", "ray", "--address", f"127.0.0.1:{_closed_port()}"])
    t0 = time.perf_counter()
    assert _cli() == 2
    assert time.perf_counter() - t0 < 15
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


def test_cli_ray_flags_need_the_ray_executor():
    from validation.__main__ import main

    with pytest.raises(SystemExit):
        main(["--workers", "2"])


def test_without_ray_the_local_executor_runs_and_ray_says_how_to_install(tiny_model, make_random_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    graph, task = Graph.from_model(tiny_model), make_random_task(tiny_model)
    with pytest.raises(ExecutorError, match=r"pip install 'eap-bench\[ray\]'"):
        validation.patch_edges(tiny_model, graph, task, [0], progress=False, executor="ray")
    with pytest.raises(ExecutorError, match=r"pip install 'eap-bench\[ray\]'"):
        RayExecutor()
    from bench.matrix import Config, ConfigError

    with pytest.raises(ConfigError, match=r"pip install 'eap-bench\[ray\]'"):
        Config(models=["toy-gpt2-2l"], executor="ray").check()
    want = validation.patch_edges(tiny_model, graph, task, progress=False)
    assert torch.equal(validation.patch_edges(tiny_model, graph, task, progress=False, executor=LocalExecutor()), want)
    with pytest.raises(validation.PatchError, match="executor must be"):
        validation.patch_edges(tiny_model, graph, task, progress=False, executor="dask")


# ------------------------------------------------------------------------- writer lock
def test_second_writer_is_refused(tiny_model, make_random_task, tmp_path):
    graph, task = Graph.from_model(tiny_model), make_random_task(tiny_model)
    out = tmp_path / "w.pt"
    with WriterLock(out) as held:
        with pytest.raises(StoreLocked, match=rf"being written by process {os.getpid()} on host {socket.gethostname()}"):
            validation.patch_edges(tiny_model, graph, task, progress=False, out=out)
        assert held.held and not out.exists()
    validation.patch_edges(tiny_model, graph, task, progress=False, out=out)  # free again
    assert out.exists() and not lock_path(out).exists()


def test_lock_of_a_killed_writer_is_stale_and_its_temp_files_are_removed(tiny_model, make_random_task, tmp_path):
    """A writer killed with kill -9 leaves its lock file and a temp file: refused while it runs,
    taken over (and the temp file deleted) once it is gone."""
    out = tmp_path / "k.pt"
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from validation.store import WriterLock
        lock = WriterLock({str(out)!r}).acquire()
        Path({str(out)!r}).with_name(".k.pt." + str(os.getpid()) + ".tmp").write_bytes(b"half a file")
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith(b"locked")
        graph, task = Graph.from_model(tiny_model), make_random_task(tiny_model)
        with pytest.raises(StoreLocked, match=f"process {proc.pid} on host"):
            validation.patch_edges(tiny_model, graph, task, progress=False, out=out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    temp = tmp_path / f".k.pt.{proc.pid}.tmp"
    assert lock_path(out).exists() and temp.exists()  # what the kill left
    store = ResultStore.open(out, "fp", 3, torch.arange(3), torch.arange(3), None, {}, "edges")
    assert store.lock.took_over["pid"] == proc.pid
    assert not temp.exists()
    store.close()
    assert not lock_path(out).exists()


def test_lock_without_flock_decides_by_the_record(tmp_path, monkeypatch):
    """On a filesystem without locks: a dead process's lock of this host is stale; a live
    process's, or another host's, is refused."""

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "n.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for rec, refused in [({"host": host, "pid": int(dead.stdout)}, False),
                         ({"host": host, "pid": os.getppid()}, True),
                         ({"host": host + "-elsewhere", "pid": 1}, True)]:
        lock_path(out).write_text(json.dumps(rec))
        if refused:
            with pytest.raises(StoreLocked, match=f"process {rec['pid']} on host {rec['host']}"):
                WriterLock(out).acquire()
        else:
            lock = WriterLock(out).acquire()
            assert lock.took_over == rec and json.loads(lock_path(out).read_text())["pid"] == os.getpid()
            lock.release()
