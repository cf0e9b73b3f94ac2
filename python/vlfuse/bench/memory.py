"""Peak memory one call allocates beyond what was live before it (outputs and temporaries alike).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before the call.
CPU: the CPU allocator has no high-water mark, so the call runs once under ``torch.profiler`` with
``profile_memory=True``; the profiler records every allocation and free as a timed ``[memory]`` event, and the
peak is the highest point of their running sum.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of one call of fn, above the memory live when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    finally:
        os.unlink(path)
    running = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if event["args"].get("Device Type", 0) != 0:  # CPU allocations only
            continue
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return int(peak)
