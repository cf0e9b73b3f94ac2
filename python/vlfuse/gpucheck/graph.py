"""CUDA-graph capture and replay of the vlfuse vision tower (depth 8, bfloat16, one 448 x 448 image).

The tower is captured given a plan built ahead (the form meant to read nothing from the device), then, if that
fails, given the grid on the host and on the device; the first capture that works is replayed, compared with the
eager tower's output and timed against it. A tower that cannot be captured is a result, not a crash: the JSON
says why (``captured: false, reason``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from vlfuse.models import VisionTower
from vlfuse.models.qwen2_vl import Qwen2VLVisionConfig


def _median_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max().float()) or 1.0
    return float((got.float() - expected.float()).abs().max()) / scale


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:240]}"


def capture(tower: VisionTower, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict:
    plan = tower.plan(grid_thw.cpu())
    forms = {
        "plan built ahead": lambda: tower(pixel_values, plan=plan),
        "grid on the host": lambda: tower(pixel_values, grid_thw.cpu()),
        "grid on the device": lambda: tower(pixel_values, grid_thw.cuda()),
    }
    with torch.no_grad():
        expected = tower(pixel_values, grid_thw.cpu())
        reasons = []
        for form, call in forms.items():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                    call()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    out = call()
            except Exception as exc:  # not capturable in this form: the reason is the result
                reasons.append(f"{form}: {_describe(exc)}")
                continue
            graph.replay()
            torch.cuda.synchronize()
            err = _max_relative_error(out, expected)
            return {
                "captured": True,
                "form": form,
                "failed_first": reasons,
                "max_err": err,
                "replay_matches": err <= 1e-2,
                "replay_ms": _median_ms(graph.replay),
                "eager_ms": _median_ms(forms["plan built ahead"]),
            }
    return {"captured": False, "reason": "; ".join(reasons)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlfuse.gpucheck.graph", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="FILE", required=True)
    parser.add_argument("--tiny", action="store_true", help="one block, 16 tokens (a dry run on the CPU)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    depth, grid = (1, [[1, 4, 4]]) if args.tiny else (8, [[1, 32, 32]])
    config = Qwen2VLVisionConfig(depth=depth)
    tower = VisionTower(config).to(device=args.device, dtype=torch.bfloat16).eval()
    grid_thw = torch.tensor(grid)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), config.patch_dim, device=args.device)
    result = {"depth": depth, "grid": grid, "dtype": "bfloat16"}
    if args.device == "cuda":
        try:
            result.update(capture(tower, pixel_values, grid_thw))
        except Exception as exc:  # a failed capture can leave the stream unusable: still a result, not a crash
            result.update(captured=False, reason=_describe(exc))
    else:
        with torch.no_grad():
            plan = tower.plan(grid_thw)
            out = tower(pixel_values, plan=plan)
        result.update(captured=False, reason="CUDA graphs need a GPU", eager_output=list(out.shape))
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
