"""The vocabulary of the suite: a Case (what to measure), the Setup its builder returns (inputs and the
implementations to compare), the Target it is judged by, and the Record the runner writes for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FWD = "fwd"
FWD_BWD = "fwd+bwd"

BANDWIDTH = "bandwidth"  # memory-bound: work is bytes moved, the limit a copy of a buffer of that size
GEMM = "gemm"  # compute-bound: work is flops, the limit plain GEMMs of the same sizes


class Unavailable(Exception):
    """Raised by a builder when what it measures is not in this build (an op not landed, no transformers)."""


@dataclass(frozen=True)
class Target:
    """What the issue asks this case to reach; reported next to the measurement, never asserted."""

    speedup_eager: float | None = None
    speedup_compile: float | None = None
    pct_of_limit: float | None = None

    def describe(self) -> str:
        parts = []
        if self.speedup_eager is not None:
            parts.append(f">={self.speedup_eager:g}x eager")
        if self.speedup_compile is not None:
            parts.append(f">={self.speedup_compile:g}x compile")
        if self.pct_of_limit is not None:
            parts.append(f">={self.pct_of_limit:.4g}% of limit")
        return ", ".join(parts)

    def met(self, record: dict) -> bool | None:
        """True/False when every figure the target names was measured, None when one is missing."""
        checks = [
            (self.speedup_eager, record.get("speedup_eager")),
            (self.speedup_compile, record.get("speedup_compile")),
            (self.pct_of_limit, record.get("pct_of_limit")),
        ]
        wanted = [(goal, got) for goal, got in checks if goal is not None]
        if any(got is None for _, got in wanted):
            return None
        return all(got >= goal for goal, got in wanted)


@dataclass
class Setup:
    """Inputs and implementations of one case, built on the target device.

    vlfuse(*args) and eager(*args) return a Tensor or a tuple of Tensors holding the same values (compared
    flattened, so a [1, H, S, D] view may stand against a [H, S, D] tensor). In the fwd+bwd pass the runner sets
    requires_grad on args[i] for i in grad_args, backpropagates fixed random gradients from the outputs, and also
    compares the gradients of vlfuse_params[j] against eager_params[j] (same order, same shapes).
    """

    args: tuple
    vlfuse: Callable[..., Any]
    eager: Callable[..., Any]
    shape: str  # what the table prints, e.g. "[1024, 3*16*80]"
    baseline: str  # what `eager` is, e.g. "HF Qwen2-VL PatchEmbed (Conv3d)"
    grad_args: tuple[int, ...] = ()
    vlfuse_params: Sequence[Tensor] = ()
    eager_params: Sequence[Tensor] = ()
    limit: Callable[[], Any] | None = None  # the machine-limit reference, timed alongside the implementations
    limit_kind: str | None = None  # BANDWIDTH or GEMM
    work: float = 0.0  # bytes (BANDWIDTH) or flops (GEMM) one call must move or compute
    flops: float = 0.0  # GEMM flops of one call, to skip cases this machine cannot run in reasonable time
    tol_scale: float = 1.0  # multiplies the dtype tolerance where rounding compounds (deep models)
    compile: bool = True  # False where torch.compile of the baseline is not attempted (note says why)
    note: str = ""
    profile: Callable[[], dict] | None = None  # optional per-part time breakdown, run once after timing
    # the baseline's own code in float64 (float64 copies of its parameters in reference_params, same order as
    # eager_params): the judge when vlfuse and the baseline disagree, since the baseline may be the inexact one
    reference: Callable[..., Any] | None = None
    reference_params: Sequence[Tensor] = ()
    # more zero-argument calls timed interleaved with the implementations, each already in the case's pass (e.g.
    # HF's model with vlfuse.patch, or the floor of plain GEMM and SDPA calls); not checked by the runner (the
    # builder checks what needs checking), reported in the record's "extra_ms"
    extras: dict[str, Callable[[], Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    op: str
    name: str  # the workload, e.g. "1 image 448x448"
    dtype: torch.dtype
    mode: str  # FWD or FWD_BWD
    build: Callable[["Case", torch.device], Setup] = field(compare=False, repr=False)
    params: tuple = ()  # builder-specific, hashable (token counts, grids, depth)
    target: Target | None = None
    quick: bool = False  # part of --quick

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}/{dtype_name(self.dtype)}/{self.mode}"

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# relative tolerance (of the output's largest magnitude) for one float32 computation rounded once to dtype,
# with room for a different summation order in reductions and GEMMs
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    return _TOLERANCE[dtype] * scale


def flatten_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten_tensors(item)]
    if hasattr(value, "to_tuple"):  # HF ModelOutput
        return flatten_tensors(value.to_tuple())
    raise TypeError(f"vlfuse.bench: an implementation returned {type(value).__name__}, expected tensors")


def max_relative_error(got: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """Largest |got - expected| over all pairs, each relative to that expected tensor's largest magnitude."""
    if len(got) != len(expected):
        raise ValueError(f"vlfuse.bench: {len(got)} outputs against {len(expected)} expected")
    worst = 0.0
    for a, b in zip(got, expected):
        if a.numel() != b.numel():
            raise ValueError(f"vlfuse.bench: output of shape {tuple(a.shape)} against {tuple(b.shape)}")
        if a.numel() == 0:
            continue
        a64 = a.detach().reshape(-1).double().cpu()
        b64 = b.detach().reshape(-1).double().cpu()
        if not bool(torch.isfinite(a64).all()):
            return float("inf")
        scale = max(float(b64.abs().max()), 1e-12)
        worst = max(worst, float((a64 - b64).abs().max()) / scale)
    return worst
