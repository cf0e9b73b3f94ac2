"""Before/after of `vlfuse.patch` on HF transformers' own Qwen2-VL / Qwen2.5-VL vision tower.

Random weights at the real width (Qwen2-VL-2B: 1280 wide, 16 heads, merger to 1536; Qwen2.5-VL-3B: 1280 wide,
SwiGLU 3420, merger to 2048, window attention), a few blocks, one image. Each swapped piece is timed on the tensors
it sees in the tower (HF's module vs the same module patched), then the whole tower; HF and patched calls alternate
in every round so that machine noise hits both, and the median is reported. Outputs are checked against HF's
before any time is printed.

    PYTHONPATH=python python examples/bench_patched_hf.py --depth 2 --dtype fp32 --image 448
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

import vlfuse
import vlfuse.patch

PIECES = {  # keyword arguments of vlfuse.patch.qwen2_vl / qwen2_5_vl for each variant
    "patch embed": dict(patch_embed=True, rotary=False, merger=False),
    "rotary": dict(patch_embed=False, rotary=True, merger=False),
    "merger": dict(patch_embed=False, rotary=False, merger=True),
}
ALL = dict(patch_embed=True, rotary=True, merger=True)


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


def interleaved_medians(calls: dict, rounds: int) -> dict[str, float]:
    """Median ms of each callable, all called once per round (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run(family: str, depth: int, dtype: torch.dtype, image: int, rounds: int) -> list[tuple[str, float, float]]:
    """(what, HF ms, patched ms) for each swapped piece on this tower's tensors, then for the whole tower."""
    tower = build_tower(family, depth).to(dtype)
    side = image // 14
    grid = torch.tensor([[1, side, side]])
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14)
    patch = vlfuse.patch.qwen2_vl if family == "qwen2_vl" else vlfuse.patch.qwen2_5_vl
    modeling = sys.modules[type(tower).__module__]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2

    def checked(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        error = (got.float() - want.float()).abs().max() / want.float().abs().max()
        if error > tolerance:
            raise AssertionError(f"{family} {name}: max error {error:.3g} of the output scale > {tolerance}")

    def patched(pieces: dict, fn):
        def call():
            patch(tower, **pieces)
            try:
                return fn()
            finally:
                vlfuse.patch.revert(tower)

        return call

    # the tensors each piece sees inside the tower
    width = tower.patch_embed.proj.weight.shape[0]
    heads = tower.blocks[0].attn.num_heads
    tokens = torch.randn(side * side, width, dtype=dtype)
    qkv = torch.randn(side * side, 3, heads, width // heads, dtype=dtype)
    q, k = qkv.permute(1, 0, 2, 3).unbind(0)[:2]  # strided views, as HF's attention hands them over
    position_ids = torch.randn(side * side, width // heads, dtype=torch.float32)
    cos, sin = position_ids.cos(), position_ids.sin()
    hf_rotary = modeling.apply_rotary_pos_emb_vision
    ln_q = tower.merger.ln_q
    rms = family == "qwen2_5_vl"
    norm_args = dict(bias=None if rms else ln_q.bias, eps=ln_q.variance_epsilon if rms else ln_q.eps)
    norm_args["norm"] = "rmsnorm" if rms else "layernorm"
    tower_out = lambda: merged_tokens(tower(pixels, grid_thw=grid))  # noqa: E731
    cases = {
        "patch embed": (lambda: tower.patch_embed(pixels), patched(PIECES["patch embed"], lambda: tower.patch_embed(pixels))),
        "rotary (q and k of one block)": (
            lambda: torch.stack(hf_rotary(q, k, cos, sin)),
            lambda: torch.stack(vlfuse.ops.rope_cos_sin(q, k, cos, sin)),
        ),
        "merger norm + 2x2 merge": (
            lambda: ln_q(tokens).view(-1, 4 * width),
            lambda: vlfuse.ops.merge2x2(tokens, None, ln_q.weight, order="merge", **norm_args),
        ),
        "merger (norm + 2x2 merge + MLP)": (lambda: tower.merger(tokens), patched(PIECES["merger"], lambda: tower.merger(tokens))),
        f"whole tower, {depth} blocks": (tower_out, patched(ALL, tower_out)),
    }
    results = []
    with torch.inference_mode():
        for name, (hf, ours) in cases.items():
            checked(name, ours(), hf())
            medians = interleaved_medians({"hf": hf, "vlfuse": ours}, rounds)
            results.append((name, medians["hf"], medians["vlfuse"]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl", "both"], default="both")
    parser.add_argument("--depth", type=int, default=2, help="vision blocks (the released towers have 32)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
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
    print("\n| tower | piece | HF ms | patched ms | speedup |\n|---|---|---:|---:|---:|")
    for family in families:
        label = "Qwen2-VL" if family == "qwen2_vl" else "Qwen2.5-VL"
        for name, hf_ms, ours_ms in run(family, args.depth, dtype, args.image, args.rounds):
            print(f"| {label} | {name} | {hf_ms:.1f} | {ours_ms:.1f} | {hf_ms / ours_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
