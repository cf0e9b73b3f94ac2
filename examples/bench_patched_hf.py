"""Before/after of `vlfuse.patch` on HF transformers' own Qwen2-VL / Qwen2.5-VL vision tower.

Random weights at the real width (Qwen2-VL-2B: 1280 wide, 16 heads, merger to 1536; Qwen2.5-VL-3B: 1280 wide,
SwiGLU 3420, merger to 2048, window attention), a few blocks, one image. The same model object runs HF's code and
each patched variant, interleaved in every round so that machine noise hits all of them; the median is reported.
Outputs are checked against HF's before any time is printed.

    PYTHONPATH=python python examples/bench_patched_hf.py --depth 4 --dtype bf16 --image 448
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import vlfuse
import vlfuse.patch

VARIANTS = {
    "HF eager (unpatched)": None,
    "patch embed only": dict(patch_embed=True, rotary=False, merger=False),
    "rotary only": dict(patch_embed=False, rotary=True, merger=False),
    "merger only": dict(patch_embed=False, rotary=False, merger=True),
    "all three (vlfuse.patch)": dict(patch_embed=True, rotary=True, merger=True),
}


def build_tower(family: str, depth: int) -> torch.nn.Module:
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            vision_config=dict(depth=depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
        ).vision_config
        cls = transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel
    else:
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(
                depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                window_size=112, fullatt_block_indexes=[depth - 1],
            )  # fmt: skip
        ).vision_config
        cls = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


def merged_tokens(out) -> torch.Tensor:
    # transformers 4.57 returns the merged tokens, 5.x an output object holding them in pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def run(family: str, depth: int, dtype: torch.dtype, image: int, rounds: int) -> list[tuple[str, float]]:
    tower = build_tower(family, depth).to(dtype)
    side = image // 14
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14)
    patch = vlfuse.patch.qwen2_vl if family == "qwen2_vl" else vlfuse.patch.qwen2_5_vl

    def forward(variant: dict | None) -> tuple[torch.Tensor, float]:
        if variant is not None:
            patch(tower, **variant)
        start = time.perf_counter()
        out = merged_tokens(tower(pixels, grid_thw=grid))
        elapsed = time.perf_counter() - start
        vlfuse.patch.revert(tower)
        return out, elapsed

    with torch.inference_mode():
        reference, _ = forward(None)
        for name, variant in VARIANTS.items():  # also the warm-up round
            out, _ = forward(variant)
            scale = reference.float().abs().max()
            error = (out.float() - reference.float()).abs().max() / scale
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            if error > tolerance:
                raise AssertionError(f"{family} {name}: max error {error:.3g} of the output scale > {tolerance}")
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, variant in VARIANTS.items():
                times[name].append(forward(variant)[1])
    return [(name, statistics.median(t) * 1e3) for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "both"], default="both")
    parser.add_argument("--depth", type=int, default=4, help="vision blocks (the released towers have 32)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--image", type=int, default=448, help="square image side in pixels (multiple of 28)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    info = vlfuse.build_info()
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU ISA {info.get('cpu_isa')}, {args.dtype}, depth {args.depth}, one {args.image}x{args.image} image "
        f"({(args.image // 14) ** 2} patches), median of {args.rounds}"
    )
    families = ["qwen2_vl", "qwen2_5_vl"] if args.family == "both" else [args.family]
    print("\n| tower | variant | forward ms | speedup |\n|---|---|---:|---:|")
    for family in families:
        results = run(family, args.depth, dtype, args.image, args.rounds)
        base = results[0][1]
        label = "Qwen2-VL" if family == "qwen2_vl" else "Qwen2.5-VL"
        for name, ms in results:
            print(f"| {label} | {name} | {ms:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
