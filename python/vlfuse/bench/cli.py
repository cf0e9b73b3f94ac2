"""``python -m vlfuse bench``: the benchmark table, its JSON and a speedup chart, in one command."""

from __future__ import annotations

import argparse


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
    import torch

    from . import report, suite
    from .runner import RunOptions, failed, run_suite
    from .timing import TimingConfig

    cases = suite.select(suite.all_cases(), quick=args.quick, patterns=args.cases)
    if args.list:
        for case in cases:
            print(case.id)
        return 0
    if not cases:
        print("vlfuse bench: no case matches the selection")
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = TimingConfig(
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        repeats=args.repeats if args.repeats is not None else (5 if args.quick else 9),
        min_sample_s=args.min_sample_ms / 1e3 if args.min_sample_ms is not None else (0.01 if args.quick else 0.05),
        max_case_s=6.0 if args.quick else 40.0,
    )
    options = RunOptions(
        device=device,
        timing=timing,
        compile=not args.no_compile,
        memory=not args.no_memory,
        profile=not args.no_profile,
        quick=args.quick,
        max_call_s=args.max_call_s if args.max_call_s is not None else (3.0 if args.quick else 10.0),
    )
    results = run_suite(cases, options)
    results["machine"]["selection"] = {"quick": args.quick, "cases": list(args.cases), "count": len(cases)}
    print(report.format_report(results))
    if args.json:
        report.write_json(results, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        report.plot_speedups(results, args.plot)
        print(f"wrote {args.plot}")
    bad = failed(results)
    if bad:
        print(f"\n{len(bad)} case(s) failed the correctness check; their timings are not reported")
        return 1
    return 0
