"""Wall time and peak memory: the one place eap-bench measures them (``validation`` and
``bench`` both import from here; nothing here imports them).

Units: wall times in seconds, memory in MiB. Peak memory is *extra* memory over what was
resident just before the measured call (model, task and caches already loaded):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the
  allocated memory before the call.
* CPU, Linux: before the call freed heap pages are handed back (``malloc_trim``) and the
  kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), so ``VmHWM`` after the call
  is the call's own peak resident set size; the result is that peak minus the RSS before the
  call (method ``rss-hwm``).
* CPU elsewhere (no ``clear_refs``): the larger of a background sampler reading the RSS every
  2 ms and, when the call sets a new process high-water mark, ``getrusage().ru_maxrss``
  (method ``rss``; may miss peaks shorter than the sampling interval).

Memory that glibc keeps after a free is not visible as RSS: ``bench run`` starts its workers
with ``MALLOC_MMAP_THRESHOLD_=65536`` so large freed tensors leave the RSS at once.

Timing on a shared or busy machine: compare *ratios* measured interleaved in one process
(:func:`time_interleaved`) with one torch thread, never absolute times across processes.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import statistics
import threading
import time
from typing import Any, Callable, Mapping

import torch

MiB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the high-water mark
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if os.uname().sysname == "Darwin" else r * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM) via /proc/self/clear_refs (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_bytes() > 0
    except OSError:
        return False


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``Key:  N kB`` line of a Linux /proc file (``/proc/meminfo``'s
    ``MemAvailable``, ``/proc/self/status``'s ``VmHWM``); None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _hwm_bytes() -> int:
    return proc_kib_field("/proc/self/status", "VmHWM") or 0


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager measuring the extra peak memory (MiB) of the code inside it.

    ``with PeakMemory(device) as pm: ...`` then ``pm.mib`` and ``pm.method`` (see the module
    docstring for the methods).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.mib: float = float("nan")
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        self.method = "rss"
        gc.collect()
        _malloc_trim()  # hand freed heap pages back, so the baseline holds no reusable free memory
        self._hwm = _reset_hwm()  # Linux: reset VmHWM, then the kernel tracks this call's exact peak
        if self._hwm:
            self.method = "rss-hwm"
        self._base = _rss_bytes()
        self._maxrss0 = _maxrss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / MiB
            return
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, _rss_bytes())
        if self._hwm:
            peak = max(peak, _hwm_bytes())
        maxrss = _maxrss_bytes()
        if maxrss > self._maxrss0:  # this call set a new process high-water mark: exact
            peak = max(peak, maxrss)
        self.mib = max(0.0, (peak - self._base) / MiB)


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: Any = "cpu") -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1, device: Any = "cpu"
) -> dict[str, list[float]]:
    """Wall times (s) of several functions measured in turns: after ``warmup`` untimed rounds,
    each of ``repeats`` rounds calls every function once, in order. Load that comes and goes hits
    all of them alike, so ratios of their medians are far steadier than separate timings."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    """Median, NaN for an empty list."""
    return float(statistics.median(xs)) if xs else float("nan")
