"""CUDA-graph capture and replay of the vlfuse vision tower (depth 8, bfloat16, one 448 x 448 image).

The tower is captured with its grid on the GPU and, if that fails, on the host; the first capture that works is
replayed, compared with the eager tower's output and timed against it. A tower that cannot be captured is a
result, not a crash: the JSON says why (``captured: false, reason``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vlfuse.models.qwen2_vl import Qwen2VLVisionConfig, VisionTransformer


def _median_ms(fn, repeats: int = 20) -> float:
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


def capture(tower: VisionTransformer, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict:
    with torch.no_grad():
        expected = tower(pixel_values, grid_thw.cuda())
        reasons = []
        for grid_on, grid in (("device", grid_thw.cuda()), ("host", grid_thw.cpu())):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                    tower(pixel_values, grid)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    out = tower(pixel_values, grid)
            except Exception as exc:  # not capturable: the reason is the result
                reasons.append(f"grid on the {grid_on}: {_describe(exc)}")
                continue
            graph.replay()
            torch.cuda.synchronize()
            err = _max_relative_error(out, expected)
            return {
                "captured": True,
                "grid_on": grid_on,
                "failed_first": reasons,
                "max_err": err,
                "replay_matches": err <= 1e-2,
                "replay_ms": _median_ms(graph.replay),
                "eager_ms": _median_ms(lambda: tower(pixel_values, grid_thw.cuda())),
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
    tower = VisionTransformer(config).to(device=args.device, dtype=torch.bfloat16).eval()
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
            out = tower(pixel_values, grid_thw)
        result.update(captured=False, reason="CUDA graphs need a GPU", eager_output=list(out.shape))
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
