"""Timing that survives a noisy, shared machine: warm-up, calibrated inner loops, interleaved repeats, medians.

Every implementation of a case (vlfuse, HF eager, torch.compile, the machine-limit reference) is timed in the
same loop, one sample of each per round, with the order rotated every round, so a burst of machine noise lands
on all of them rather than on whichever happened to run then. On CUDA a sample is bracketed by CUDA events on the
current stream after a synchronize; on the CPU by ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2  # calls of each implementation before any sample (after the first, compiling call)
    repeats: int = 7  # samples of each implementation; the median is reported
    min_sample_s: float = 0.02  # a sample repeats a fast call until it lasts about this long
    max_case_s: float = 30.0  # fewer repeats (never under 3) when one round would blow this budget


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean seconds per call over `calls` back-to-back calls."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, config: TimingConfig
) -> dict[str, float]:
    """Median seconds per call of each function, sampled round-robin with a rotating order."""
    if not fns:
        return {}
    names = list(fns)
    estimate: dict[str, float] = {}
    for name in names:
        for _ in range(config.warmup):
            fns[name]()
        estimate[name] = _sample(fns[name], 1, device)
    calls = {name: max(1, round(config.min_sample_s / max(estimate[name], 1e-9))) for name in names}
    round_s = sum(calls[n] * estimate[n] for n in names)
    repeats = max(min(3, config.repeats), min(config.repeats, int(config.max_case_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_sample(fns[name], calls[name], device))
    return {name: statistics.median(values) for name, values in samples.items()}
