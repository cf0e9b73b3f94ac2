"""``python -m vlfuse bench``: the benchmark table, its JSON and a speedup chart, in one command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark vlfuse against HF transformers eager and torch.compile",
        description="Time vlfuse ops, modules and models against HF transformers' own Qwen2-VL code (eager and "
        "torch.compile), check their outputs first, and report speedups, achieved bandwidth/throughput as a "
        "share of this machine's measured limits, and peak memory.",
    )
    p.add_argument("--quick", action="store_true", help="a few small cases (finishes within ~2 minutes on a CPU)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ({machine, results})")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart of the speedups (PNG)")
    p.add_argument(
        "--cases",
        nargs="+",
        default=(),
        metavar="PATTERN",
        help='keep cases whose id "op/case/dtype/pass" matches a shell pattern, e.g. "rope_qkv/*/bfloat16/*"',
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's current setting)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    p.add_argument(
        "--min-sample-ms", type=float, default=None, help="repeat fast calls within a sample up to this long"
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="time a case from its single checked call when one call takes longer (default 3 quick, 10 full)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the per-part time breakdowns")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_bench(
        quick=args.quick,
        patterns=args.cases,
        json_path=args.json,
        plot_path=args.plot,
        list_only=args.list,
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        min_sample_ms=args.min_sample_ms,
        max_call_s=args.max_call_s,
        compile=not args.no_compile,
        memory=not args.no_memory,
        profile=not args.no_profile,
    )


def run_bench(
    quick: bool = False,
    patterns: Sequence[str] = (),
    json_path: str | None = None,
    plot_path: str | None = None,
    list_only: bool = False,
    device: str | None = None,
    threads: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    min_sample_ms: float | None = None,
    max_call_s: float | None = None,
    compile: bool = True,
    memory: bool = True,
    profile: bool = True,
) -> int:
    """The ``bench`` command as a function (the options of ``vlfuse bench``; None: the command's default): prints
    the table, writes the JSON / chart when asked; returns the exit code (1 when a case failed its check)."""
    import torch

    from . import report, suite
    from .runner import RunOptions, failed, run_suite
    from .timing import TimingConfig

    cases = suite.select(suite.all_cases(), quick=quick, patterns=patterns)
    if list_only:
        for case in cases:
            print(case.id)
        return 0
    if not cases:
        print("vlfuse bench: no case matches the selection")
        return 2
    if threads is not None:
        torch.set_num_threads(threads)
    timing = TimingConfig(
        warmup=warmup if warmup is not None else (1 if quick else 2),
        repeats=repeats if repeats is not None else (5 if quick else 9),
        min_sample_s=min_sample_ms / 1e3 if min_sample_ms is not None else (0.01 if quick else 0.05),
        max_case_s=6.0 if quick else 40.0,
    )
    options = RunOptions(
        device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        timing=timing,
        compile=compile,
        memory=memory,
        profile=profile,
        quick=quick,
        max_call_s=max_call_s if max_call_s is not None else (3.0 if quick else 10.0),
    )
    results = run_suite(cases, options)
    results["machine"]["selection"] = {"quick": quick, "cases": list(patterns), "count": len(cases)}
    print(report.format_report(results))
    if json_path:
        report.write_json(results, json_path)
        print(f"\nwrote {json_path}")
    if plot_path:
        report.plot_speedups(results, plot_path)
        print(f"wrote {plot_path}")
    bad = failed(results)
    if bad:
        print(f"\n{len(bad)} case(s) failed the correctness check; their timings are not reported")
        return 1
    return 0
