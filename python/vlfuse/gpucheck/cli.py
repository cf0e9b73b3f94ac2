"""The ``gpu-check`` command."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from .steps import DEFAULT_BUDGET_S, STEPS

    p = subparsers.add_parser(
        "gpu-check",
        help="build for this GPU and run the CUDA tests, sanitizers, Nsight Compute, benchmarks and CUDA graphs",
        description="The GPU verification of a vlfuse checkout in one command: an in-place build for the present "
        "GPU's architecture, then every check as a time-boxed child process. Writes gpu-check.json and "
        "gpu-check.log (and the benchmark's JSON) into --out after every step, prints a summary table, and exits "
        "non-zero when the build, a parity check or a sanitizer fails.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for gpu-check.json, gpu-check.log, bench-*.json")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the steps on this machine without a GPU: CPU-only configure, tiny sizes, CUDA-only steps skipped",
    )
    p.add_argument("--source", metavar="DIR", help="the vlfuse checkout to build and test (default: found from here)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f}); steps left when it runs out are skipped",
    )
    p.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], metavar="STEP", help="run only these steps")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .steps import run_check

    return run_check(
        out=args.out,
        dry_run=args.dry_run,
        source=args.source,
        budget_s=args.budget_s,
        only=args.steps,
        jobs=args.jobs,
    )
