"""Runs cases: build, check vlfuse against the baseline, compile the baseline, measure memory, then time every
implementation and the machine-limit reference interleaved. A case whose outputs disagree gets no timings."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .core import (
    BANDWIDTH,
    FWD,
    FWD_BWD,
    GEMM,
    Case,
    Setup,
    Unavailable,
    dtype_name,
    flatten_tensors,
    max_relative_error,
    tolerance,
)
from .machine import machine_info
from .memory import peak_bytes
from .timing import TimingConfig, synchronize, time_interleaved


@dataclass
class RunOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timing: TimingConfig = field(default_factory=TimingConfig)
    compile: bool = True  # time torch.compile of each baseline (default mode)
    memory: bool = True  # peak memory of vlfuse and eager per case
    profile: bool = True  # per-part breakdowns where a case offers one
    measure_limits: bool = True  # machine-wide copy bandwidth and GEMM throughput in `machine`
    quick: bool = False
    max_call_s: float = 20.0  # a case whose single call takes longer is timed from one call, not repeats
    seed: int = 0
    gemm_tflops: dict = field(default_factory=dict)  # dtype name -> this machine's measured GEMM rate
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


def make_call(
    fn: Callable[..., Any], setup: Setup, mode: str, params: Sequence[Tensor], grad_outputs: Sequence[Tensor]
) -> Callable[[], list[Tensor]]:
    """A zero-argument call of one implementation in the case's pass; returns what is compared: the outputs,
    then (fwd+bwd) the gradients of the differentiable args and of the implementation's own parameters."""
    args = setup.args
    if mode == FWD:

        def forward() -> list[Tensor]:
            with torch.no_grad():
                return flatten_tensors(fn(*args))

        return forward
    leaves = [args[i] for i in setup.grad_args] + list(params)

    def forward_backward() -> list[Tensor]:
        for leaf in leaves:
            leaf.grad = None
        outputs = flatten_tensors(fn(*args))
        torch.autograd.backward(outputs, [g.view(o.shape) for g, o in zip(grad_outputs, outputs)])
        return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]

    return forward_backward


@dataclass
class Prepared:
    """A built case ready to call: each implementation as a zero-argument call in the case's pass."""

    case: Case
    setup: Setup
    grad_outputs: list[Tensor]

    def clear_grads(self) -> None:
        setup = self.setup
        for leaf in [setup.args[i] for i in setup.grad_args] + [*setup.vlfuse_params, *setup.eager_params]:
            leaf.grad = None

    def call(self, impl: str) -> Callable[[], list[Tensor]]:
        """impl: "vlfuse", "eager", or "compile" (torch.compile of the baseline, default mode, compiled on the
        first call)."""
        setup = self.setup
        if impl == "vlfuse":
            return make_call(setup.vlfuse, setup, self.case.mode, setup.vlfuse_params, self.grad_outputs)
        if impl == "eager":
            return make_call(setup.eager, setup, self.case.mode, setup.eager_params, self.grad_outputs)
        if impl == "compile":
            torch._dynamo.reset()  # a fresh cache: every case compiles its own specialization
            compiled = torch.compile(setup.eager, dynamic=False)
            return make_call(compiled, setup, self.case.mode, setup.eager_params, self.grad_outputs)
        raise ValueError(f"vlfuse.bench: unknown implementation {impl!r}")


def prepare_setup(case: Case, setup: Setup) -> Prepared:
    """Marks the differentiable args and draws the fixed output gradients of a fwd+bwd case."""
    grad_outputs: list[Tensor] = []
    if case.mode == FWD_BWD:
        for i in setup.grad_args:
            setup.args[i].requires_grad_(True)
        with torch.no_grad():
            outputs = flatten_tensors(setup.eager(*setup.args))
        grad_outputs = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in outputs]
    return Prepared(case, setup, grad_outputs)


def _timed_call(call: Callable[[], list[Tensor]], device: torch.device) -> tuple[list[Tensor], float]:
    synchronize(device)
    begin = time.perf_counter()
    value = call()
    synchronize(device)
    return value, time.perf_counter() - begin


def _base_record(case: Case) -> dict:
    return {
        "op": case.op,
        "case": case.name,
        "shape": None,
        "dtype": dtype_name(case.dtype),
        "pass": case.mode,
        "check": None,
        "max_err": None,
        "tol": None,
        "vlfuse_ms": None,
        "eager_ms": None,
        "compile_ms": None,
        "limit_ms": None,
        "speedup_eager": None,
        "speedup_compile": None,
        "limit_kind": None,
        "rate_unit": None,
        "vlfuse_rate": None,
        "limit_rate": None,
        "pct_of_limit": None,
        "mem_vlfuse_bytes": None,
        "mem_eager_bytes": None,
        "compile_s": None,
        "target": case.target.describe() if case.target else None,
        "target_met": None,
        "baseline": None,
        "notes": [],
    }


def run_case(case: Case, options: RunOptions) -> dict:
    record = _base_record(case)
    device = options.device
    torch.manual_seed(options.seed)
    try:
        setup = case.build(case, device)
    except Unavailable as exc:
        record["check"] = f"skipped: {exc}"
        return record
    except Exception as exc:  # a builder that breaks is one failed case, not a dead suite
        record["check"] = f"error: {type(exc).__name__}: {exc}"
        options.log(traceback.format_exc())
        return record
    record["shape"] = setup.shape
    record["baseline"] = setup.baseline
    if setup.note:
        record["notes"].append(setup.note)
    rate = options.gemm_tflops.get(dtype_name(case.dtype))
    if setup.flops and rate:
        estimate = setup.flops / (rate * 1e12)
        if estimate > 2 * options.max_call_s:
            record["check"] = (
                f"skipped: ~{estimate:.0f} s per call at this machine's measured {dtype_name(case.dtype)} "
                f"GEMM rate ({rate * 1e3:.1f} GFLOP/s)"
            )
            return record

    prepared = prepare_setup(case, setup)
    calls = {"vlfuse": prepared.call("vlfuse"), "eager": prepared.call("eager")}

    # correctness first: no timing is reported for a case whose outputs disagree
    tol = tolerance(case.dtype, setup.tol_scale)
    try:
        expected, eager_s = _timed_call(calls["eager"], device)
        got, vlfuse_s = _timed_call(calls["vlfuse"], device)
        single = {"eager": eager_s, "vlfuse": vlfuse_s}
        err = max_relative_error(got, expected)
    except Exception as exc:  # a crash is a failed check, reported, not a dead suite
        record["check"] = f"error: {type(exc).__name__}: {exc}"
        options.log(traceback.format_exc())
        return record
    record["max_err"], record["tol"] = err, tol
    oracle = None  # the baseline's code in float64, run when a comparison with eager is not conclusive
    allowed = tol
    if not err <= tol and setup.reference is not None:
        oracle = _float64_outputs(prepared)
        err, allowed = _judge_by_float64(got, expected, oracle, record, tol)
    if not err <= allowed:
        record["check"] = f"FAIL: max relative error {err:.3g} > {allowed:.3g}"
        return record
    record["check"] = "ok"
    del got

    if max(single.values()) > options.max_call_s:
        # too slow here for warm-up and repeats: report the checked calls themselves, and say so
        record["notes"].append("timed from a single call (one call takes longer than max_call_s)")
        _fill_timings(record, setup, single)
        if case.target is not None:
            record["target_met"] = case.target.met(record)
        return record

    if options.compile and setup.compile:
        compiled = _compile_baseline(prepared, expected, tol, record, oracle)
        if compiled is not None:
            calls["compile"] = compiled
    del expected

    if options.memory:
        # the previous call's gradients are dropped first, or freeing them inside the window hides the new ones
        prepared.clear_grads()
        record["mem_vlfuse_bytes"] = peak_bytes(calls["vlfuse"], device)
        prepared.clear_grads()
        record["mem_eager_bytes"] = peak_bytes(calls["eager"], device)

    timed: dict[str, Callable[[], object]] = dict(calls)
    if setup.limit is not None:
        timed["limit"] = setup.limit
    timed.update({f"extra:{name}": call for name, call in setup.extras.items()})
    seconds = time_interleaved(timed, device, options.timing)
    _fill_timings(record, setup, seconds)
    _fill_extras(record, seconds)
    if case.target is not None:
        record["target_met"] = case.target.met(record)
    if options.profile and setup.profile is not None:
        record["profile"] = setup.profile()
    return record


def _float64_outputs(prepared: Prepared) -> list[Tensor]:
    """What the baseline's code computes in float64 from the same inputs and output gradients."""
    setup = prepared.setup
    args64 = tuple(
        a.detach().double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in setup.args
    )
    setup64 = replace(setup, args=args64)
    grads64 = [g.double() for g in prepared.grad_outputs]
    for i in setup.grad_args:
        args64[i].requires_grad_(True)
    return make_call(setup.reference, setup64, prepared.case.mode, setup.reference_params, grads64)()


def _judge_by_float64(
    got: list[Tensor], expected: list[Tensor], oracle: list[Tensor], record: dict, tol: float
) -> tuple[float, float]:
    """(vlfuse's error against the baseline's code run in float64, the error it may have): tol, or HF eager's own
    error where that is larger (bf16 LayerNorm bias gradients summed over thousands of tokens are off by most of
    their magnitude in HF's tower too, and two such results differ from each other by as much)."""
    vlfuse_err = max_relative_error(got, oracle)
    eager_err = max_relative_error(expected, oracle)
    record["notes"].append(
        f"vlfuse and HF eager differ by {record['max_err']:.3g}; against HF's code in float64 vlfuse is off by "
        f"{vlfuse_err:.3g} and HF eager by {eager_err:.3g}"
    )
    record["max_err"] = vlfuse_err
    record["tol"] = max(tol, eager_err)
    return vlfuse_err, record["tol"]


def _compile_baseline(
    prepared: Prepared, expected: list[Tensor], tol: float, record: dict, oracle: list[Tensor] | None
) -> Callable[[], list[Tensor]] | None:
    """torch.compile (default mode) of the baseline, compiled by its first call (timed as compile_s) and checked
    against the eager outputs; None, with a note, when compilation is unavailable or disagrees. Where it
    disagrees with eager and the baseline has a float64 run (oracle, run here if not yet), it is timed when it
    is no further from that than tol or than eager itself: eager's rounding (bfloat16 weight gradients summed in
    bfloat16) is no reason to leave out a compiled baseline that is at least as accurate."""
    try:
        call = prepared.call("compile")
        begin = time.perf_counter()
        out = call()
        record["compile_s"] = time.perf_counter() - begin
    except Exception as exc:
        record["notes"].append(f"torch.compile unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None
    err = max_relative_error(out, expected)
    if err <= tol:
        return call
    if prepared.setup.reference is None:
        record["notes"].append(f"torch.compile output differs from eager (max relative error {err:.3g}); not timed")
        return None
    oracle = oracle if oracle is not None else _float64_outputs(prepared)
    compile_err, eager_err = max_relative_error(out, oracle), max_relative_error(expected, oracle)
    accurate = compile_err <= max(tol, eager_err)
    record["notes"].append(
        f"torch.compile differs from eager by {err:.3g}; against HF's code in float64 it is off by "
        f"{compile_err:.3g} and HF eager by {eager_err:.3g}: " + ("timed" if accurate else "not timed")
    )
    return call if accurate else None


def _fill_timings(record: dict, setup: Setup, seconds: dict[str, float]) -> None:
    vlfuse_s = seconds["vlfuse"]
    record["vlfuse_ms"] = vlfuse_s * 1e3
    record["eager_ms"] = seconds["eager"] * 1e3
    record["speedup_eager"] = seconds["eager"] / vlfuse_s
    if "compile" in seconds:
        record["compile_ms"] = seconds["compile"] * 1e3
        record["speedup_compile"] = seconds["compile"] / vlfuse_s
    if setup.limit_kind is not None and setup.work:
        scale, unit = (1e9, "GB/s") if setup.limit_kind == BANDWIDTH else (1e12, "TFLOP/s")
        assert setup.limit_kind in (BANDWIDTH, GEMM)
        record["limit_kind"] = setup.limit_kind
        record["rate_unit"] = unit
        record["vlfuse_rate"] = setup.work / vlfuse_s / scale
        if "limit" in seconds:
            record["limit_ms"] = seconds["limit"] * 1e3
            record["limit_rate"] = setup.work / seconds["limit"] / scale
            record["pct_of_limit"] = 100.0 * seconds["limit"] / vlfuse_s


def _fill_extras(record: dict, seconds: dict[str, float]) -> None:
    extras = {name[6:]: value * 1e3 for name, value in seconds.items() if name.startswith("extra:")}
    if not extras:
        return
    record["extra_ms"] = extras
    vlfuse_ms = record["vlfuse_ms"]
    record["notes"].append(
        "; ".join(f"{name}: {ms:.4g} ms ({ms / vlfuse_ms:.2f}x vlfuse's time)" for name, ms in extras.items())
    )


def run_suite(cases: Sequence[Case], options: RunOptions) -> dict:
    """{"machine": ..., "results": [...]} for the given cases, in order."""
    begin = time.perf_counter()
    machine = machine_info(options.device, options.measure_limits, options.quick)
    if not options.gemm_tflops and "gemm_tflops" in machine:
        options.gemm_tflops = dict(machine["gemm_tflops"])
    results = []
    for index, case in enumerate(cases, 1):
        started = time.perf_counter()
        record = run_case(case, options)
        results.append(record)
        options.log(
            f"[{index}/{len(cases)}] {case.id}: {record['check']}"
            + (f", {record['speedup_eager']:.2f}x eager" if record["speedup_eager"] else "")
            + f" ({time.perf_counter() - started:.1f} s)"
        )
    machine["run_s"] = time.perf_counter() - begin
    machine["timing"] = {
        "warmup": options.timing.warmup,
        "repeats": options.timing.repeats,
        "min_sample_s": options.timing.min_sample_s,
        "statistic": "median",
        "interleaved": True,
    }
    return {"machine": machine, "results": results}


def failed(report: dict) -> list[dict]:
    """Records whose correctness check failed or errored (skipped cases are not failures)."""
    return [r for r in report["results"] if r["check"] and r["check"].startswith(("FAIL", "error"))]
