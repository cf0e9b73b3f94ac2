"""pytest-benchmark support shared by every benchmarks/bench_*.py file.

The cases are vlfuse.bench's (the same inputs, baselines and correctness check as ``python -m vlfuse bench``);
here each implementation of a case is one benchmark, grouped per op, workload, dtype and pass, so that
pytest-benchmark prints vlfuse, HF eager, torch.compile and the machine-limit reference side by side.
Threads are fixed (VLFUSE_BENCH_THREADS, default: torch's setting) and reported in the machine info.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import vlfuse  # noqa: F401  (loads the native library)
from vlfuse.bench.core import Case, Unavailable, dtype_name, max_relative_error, tolerance
from vlfuse.bench.runner import Prepared, prepare_setup

IMPLS = ("vlfuse", "eager", "compile", "limit")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if os.environ.get("VLFUSE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["VLFUSE_BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    from vlfuse.bench.machine import device_name

    machine_info["vlfuse_device"] = device_name(DEVICE)
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: set VLFUSE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords and os.environ.get("VLFUSE_SLOW") != "1":
            item.add_marker(skip_slow)


def case_params(cases: list[Case], quick_only: bool = False):
    """pytest params of (case, impl), the slow ones (not in --quick) marked slow; ids read "op/case/dtype/pass-impl"."""
    params = []
    for case in cases:
        marks = () if case.quick or not quick_only else (pytest.mark.slow,)
        for impl in IMPLS:
            params.append(pytest.param(case, impl, id=f"{case.id}-{impl}", marks=marks))
    return params


@functools.lru_cache(maxsize=4)
def _prepared(case: Case) -> Prepared | str:
    """The case built once for all its implementations and checked (vlfuse vs the baseline); a string says why
    it cannot run."""
    torch.manual_seed(0)
    try:
        setup = case.build(case, DEVICE)
    except Unavailable as exc:
        return f"{exc}"
    prepared = prepare_setup(case, setup)
    expected = prepared.call("eager")()
    err = max_relative_error(prepared.call("vlfuse")(), expected)
    tol = tolerance(case.dtype, setup.tol_scale)
    if not err <= tol:
        pytest.fail(f"{case.id}: vlfuse differs from the baseline (max relative error {err:.3g} > {tol:.3g})")
    return prepared


def run_benchmark(benchmark, case: Case, impl: str, rounds: int = 7) -> None:
    """Benchmarks one implementation of a case after the case passed its correctness check."""
    prepared = _prepared(case)
    if isinstance(prepared, str):
        pytest.skip(prepared)
    setup = prepared.setup
    if impl == "limit":
        if setup.limit is None:
            pytest.skip("no machine-limit reference for this case")
        call = setup.limit
    else:
        if impl == "compile" and not setup.compile:
            pytest.skip("torch.compile is not run for this case")
        try:
            call = prepared.call(impl)
            call()  # compiles (for "compile") outside the timed rounds
        except Exception as exc:
            if impl != "compile":
                raise
            pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    benchmark.group = f"{case.op} | {case.name} {setup.shape} | {dtype_name(case.dtype)} | {case.mode}"
    benchmark.extra_info.update(
        {"impl": impl, "baseline": setup.baseline, "limit_kind": setup.limit_kind, "work": setup.work}
    )
    if DEVICE.type == "cuda":

        def synchronized():
            call()
            torch.cuda.synchronize(DEVICE)

        benchmark.pedantic(synchronized, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
