"""The benchmark cases of the GPU check, run through ``vlfuse.bench``.

``ops``: rope_qkv, patch_embed, embed_frames, merge2x2 and the 2B PatchMerger at 16384 tokens (16 images of
448 x 448; rope_qkv also at one image), against HF eager and torch.compile, each beside a copy of as many bytes
(memory-bound ops) or plain GEMMs of its sizes (patch_embed, the merger) timed in the same loop.
``tower``: the suite's Qwen2-VL vision tower cases (one image, 4 and 16 images of mixed sizes, the 4 also forward
and backward; bfloat16) at depth 8, against
HF's tower with the same weights (no torch.compile: inductor over the HF tower takes longer than the check's budget).
``--tiny`` shrinks every case to a few tokens, float32 and one block for a dry run on the CPU. The JSON (the
``vlfuse bench`` format, {machine, results}) is rewritten after every case.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from vlfuse.bench import report, suite
from vlfuse.bench.core import Case
from vlfuse.bench.machine import machine_info
from vlfuse.bench.runner import RunOptions, run_case
from vlfuse.bench.timing import TimingConfig

# in the order they run: the targets first (rope_qkv and merge2x2 at >= 16k tokens bf16, patch_embed)
OPS = (
    "rope_qkv/16 images 448x448/bfloat16/fwd",
    "rope_qkv/16 images 448x448/bfloat16/fwd+bwd",
    "merge2x2/16 images 448x448/bfloat16/fwd",
    "merge2x2/16 images 448x448/bfloat16/fwd+bwd",
    "patch_embed/16 images 448x448/bfloat16/fwd",
    "patch_embed/16 images 448x448/bfloat16/fwd+bwd",
    "rope_qkv/1 image 448x448/bfloat16/fwd",
    "rope_qkv/16 images 448x448/float32/fwd",
    "merge2x2/16 images 448x448/float32/fwd",
    "embed_frames/4 images 448x448/bfloat16/fwd",
    "PatchMerger 2B/4 images 448x448/bfloat16/fwd",
)
TOWER = (
    "vision tower/1 image 448x448/bfloat16/fwd",
    "vision tower/4 images, mixed sizes/bfloat16/fwd",
    "vision tower/16 images, mixed sizes/bfloat16/fwd",
    "vision tower/4 images, mixed sizes/bfloat16/fwd+bwd",
)
TOWER_DEPTH = 8
TINY_GRID = ((1, 4, 4),)
TINY_GRIDS = {
    "1 image 448x448": TINY_GRID,
    "4 images, mixed sizes": ((1, 4, 4), (1, 2, 4), (2, 2, 2)),
    "16 images, mixed sizes": ((1, 4, 4), (1, 2, 4), (2, 2, 2), (1, 2, 2)),
}


def _suite_cases(ids: tuple[str, ...]) -> list[Case]:
    by_id = {case.id: case for case in suite.all_cases()}
    missing = [case_id for case_id in ids if case_id not in by_id]
    if missing:
        raise SystemExit(f"vlfuse.gpucheck.bench: the bench suite has no case {missing}")
    return [by_id[case_id] for case_id in ids]


def op_cases(tiny: bool) -> list[Case]:
    cases = _suite_cases(OPS)
    if tiny:
        cases = [_tiny(c, dict(c.params, grid=TINY_GRID)) for c in cases]
    return cases


def tower_cases(tiny: bool) -> list[Case]:
    cases = _suite_cases(TOWER)
    if tiny:
        return [_tiny(c, dict(c.params, grid=TINY_GRIDS[c.name], depth=1)) for c in cases]
    return [replace(c, params=tuple(dict(c.params, depth=TOWER_DEPTH).items())) for c in cases]


def _tiny(case: Case, params: dict) -> Case:
    """The dry run's stand-in for a case: a few tokens, float32 (a CPU without native bfloat16 GEMMs runs those ~50x
    slower), the same builders and runner."""
    return replace(case, name=f"tiny stand-in for {case.name}", dtype=torch.float32, params=tuple(params.items()))


def options(device: torch.device, group: str, tiny: bool) -> RunOptions:
    if tiny:
        timing = TimingConfig(warmup=0, repeats=1, min_sample_s=0.0, max_case_s=1.0)
    else:
        timing = TimingConfig(warmup=3, repeats=15, min_sample_s=0.02, max_case_s=4.0)
    return RunOptions(
        device=device,
        timing=timing,
        compile=group == "ops" and not tiny,
        memory=not tiny,
        profile=False,
        quick=tiny,
        max_call_s=5.0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlfuse.gpucheck.bench", description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=("ops", "tower"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="FILE", required=True)
    parser.add_argument("--tiny", action="store_true", help="a few tokens, float32, one tower block, no torch.compile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = op_cases(args.tiny) if args.group == "ops" else tower_cases(args.tiny)
    run_options = options(device, args.group, args.tiny)
    results = {"machine": machine_info(device, measure_limits=True, quick=args.tiny), "results": []}
    run_options.gemm_tflops = dict(results["machine"].get("gemm_tflops", {}))
    report.write_json(results, args.json)
    for case in cases:
        record = run_case(case, run_options)
        results["results"].append(record)
        report.write_json(results, args.json)
        run_options.log(f"{case.id}: {record['check']}")
    results["machine"]["timing"] = {
        "warmup": run_options.timing.warmup,
        "repeats": run_options.timing.repeats,
        "min_sample_s": run_options.timing.min_sample_s,
        "statistic": "median",
        "interleaved": True,
    }
    report.write_json(results, args.json)
    print(report.format_report(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
