"""Tensor accounting for memory tests: the peak of live tensor bytes allocated during a call.

``torch.profiler`` with ``profile_memory=True`` records every CPU tensor allocation and free
with the profiler's running total of live bytes ("Total Allocated"; the total carries over
between profiling sessions, so the value before the first event is subtracted). Its maximum is
the call's peak of live tensor memory: exact, independent of how the C allocator hands pages
back to the OS (the resident set size also counts freed memory that glibc keeps). Slow (every
op is recorded): for tests and one-off measurements only.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile


def live_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak bytes of CPU tensors allocated and alive at once during the call)``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return out, 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return out, max(e["args"]["Total Allocated"] for e in mem) - base
