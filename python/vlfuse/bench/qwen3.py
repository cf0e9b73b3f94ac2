"""The Qwen3-VL vision shapes (width 1152, 16 heads x 72, patch 16 with a Conv3d bias, a 48 x 48 learned position
table, deepstack mergers) against transformers' own Qwen3-VL code:

- patch embed + position table: HF's Conv3d PatchEmbed plus its bilinear resampling of the table
  (``get_vision_interpolation_indices_and_weights`` and a weighted embedding sum) against vlfuse's
  ``interp_pos_embed`` rows fed to ``patch_embed`` as its added term (one GEMM, as the vision tower runs it),
  beside a plain GEMM of the same size; the rows are laid out as HF's processors emit them, so image rows repeat
  their frame (and patch_embed folds the Conv3d's temporal taps) while the video row's frames differ;
- rotary at head_dim 72: HF's axial cos/sin, qkv split and ``apply_rotary_pos_emb_vision`` against ``rope_qkv``;
- post-shuffle merge: the deepstack mergers' ``LayerNorm(x.view(-1, 4C))`` against ``merge2x2(...,
  postshuffle_norm=True)``;
- the vision tower at depth 4 (three deepstack taps): HF's ``Qwen3VLVisionModel`` against vlfuse's tower holding its
  weights, with HF + ``vlfuse.patch.auto`` timed beside them.
"""

from __future__ import annotations

import copy

import torch

from .core import FWD, FWD_BWD, GEMM, Case, Setup, Target, Unavailable
from .merge import build_merge2x2
from .rope import build_rope_qkv
from .workloads import grid_tensor, pixel_rows, tokens, vlfuse_op

PATCH, MERGE, SIDE = 16, 2, 48
WIDTH, HEADS, HEAD_DIM = 1152, 16, 72
OUT_WIDTH = 2560  # the 4B model's LLM width
TOWER_DEPTH, DEEPSTACK = 4, (1, 2, 3)  # the 27-block tower's taps at 8, 16 and 24, scaled to 4 blocks
GRIDS = {  # patch grids (t, h, w) of 16-pixel patches: 448 x 448 is 28 x 28
    "1 image 448x448": ((1, 28, 28),),
    "4 images 448x448": ((1, 28, 28),) * 4,
    "4 images, mixed sizes": ((1, 28, 28), (1, 20, 36), (1, 44, 16), (3, 24, 24)),
    "video 16f 448x448": ((8, 28, 28),),
}

PATCH_TARGET = {  # issue 26
    torch.float32: Target(pct_of_limit=100 / 1.15),
    torch.bfloat16: Target(speedup_eager=5.0, pct_of_limit=100 / 1.15),
}
ROPE_TARGET = Target(speedup_eager=4.0, speedup_compile=1.5)
MERGE_TARGET = {torch.bfloat16: Target(speedup_eager=2.0)}
TOWER_TARGET = None  # reported side by side (HF, vlfuse's tower, HF + vlfuse.patch), no figure asked


def hf_qwen3_vl():
    """transformers' Qwen3-VL modeling module, the baselines' source."""
    try:
        from transformers.models.qwen3_vl import modeling_qwen3_vl
    except ImportError as exc:
        raise Unavailable(f"transformers' Qwen3-VL is not importable ({exc})") from exc
    return modeling_qwen3_vl


def hf_qwen3_config(depth: int = TOWER_DEPTH):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    config = Qwen3VLVisionConfig(
        depth=depth,
        hidden_size=WIDTH,
        num_heads=HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=OUT_WIDTH,
        num_position_embeddings=SIDE * SIDE,
        deepstack_visual_indexes=[i for i in DEEPSTACK if i < depth],
    )
    config._attn_implementation = "sdpa"
    return config


def _hf_position_rows(grid: torch.Tensor):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    def rows(table: torch.nn.Embedding) -> torch.Tensor:
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=SIDE, mode="bilinear", align_corners=True, spatial_merge_size=MERGE
        )
        return (table(indices) * weights[:, :, None]).sum(1)

    return rows


FOLD_NOTE = (
    "image rows repeat their frame, as HF's processors emit them: vlfuse's GEMM runs over the folded temporal taps "
    "(K / 2), the limit's over all of K"
)


def build_patch_embed_pos(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen3_vl()
    interp_pos_embed, patch_embed = vlfuse_op("interp_pos_embed"), vlfuse_op("patch_embed")
    config = hf_qwen3_config(depth=1)
    grid = grid_tensor(case.param("grid"), device)
    count = tokens(case.param("grid"))
    patch_dim = 3 * 2 * PATCH * PATCH
    embed = hf.Qwen3VLVisionPatchEmbed(config).to(device=device, dtype=case.dtype)
    table = torch.nn.Embedding(SIDE * SIDE, WIDTH).to(device=device, dtype=case.dtype)
    patches = pixel_rows(case.param("grid"), 3, 2, PATCH, device)
    weight, bias, rows_table = embed.proj.weight.detach(), embed.proj.bias.detach(), table.weight.detach()
    hf_rows = _hf_position_rows(grid)

    def vlfuse_embed(patches):
        return patch_embed(patches, weight, interp_pos_embed(rows_table, grid, MERGE, bias=bias, tokens=count))

    def hf_embed(patches):
        x = embed(patches)
        return x + hf_rows(table).to(x.dtype)

    embed64, table64 = copy.deepcopy(embed).double(), copy.deepcopy(table).double()

    def hf_embed_float64(patches):
        return embed64(patches.double()) + hf_rows(table64)

    gemm_patches = patches.to(case.dtype)
    gemm_weight = weight.reshape(WIDTH, -1).t().contiguous()
    flops = 2.0 * count * patch_dim * WIDTH
    return Setup(
        args=(patches,),
        vlfuse=vlfuse_embed,
        eager=hf_embed,
        shape=f"[{count}, {patch_dim}] x [{WIDTH}, {patch_dim}] + table [{SIDE}x{SIDE}, {WIDTH}]",
        baseline="HF Qwen3-VL PatchEmbed (Conv3d + bias) + bilinear position table (vision_utils taps)",
        reference=hf_embed_float64,
        limit=lambda: torch.mm(gemm_patches, gemm_weight),
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=2.0,
        note=FOLD_NOTE if any(t == 1 for t, _, _ in case.param("grid")) else "",
    )


def _tower_gemms(count: int, depth: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM of one Qwen3-VL tower forward: embedding, blocks, main and deepstack mergers."""
    config = hf_qwen3_config(depth)
    mlp, merged, hidden = config.intermediate_size, count // MERGE**2, WIDTH * MERGE**2
    per_block = [(count, WIDTH, 3 * WIDTH), (count, WIDTH, WIDTH), (count, WIDTH, mlp), (count, mlp, WIDTH)]
    merger = [(merged, hidden, hidden), (merged, hidden, OUT_WIDTH)]
    taps = len(config.deepstack_visual_indexes)
    return [(count, 3 * 2 * PATCH * PATCH, WIDTH)] + per_block * depth + merger * (1 + taps)


def build_qwen3_tower(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen3_vl()
    from vlfuse.models.vision_tower import VisionTower
    from vlfuse.patch import auto as patch_auto

    from .model import _plain_gemms, compile_hf_tower

    depth = case.param("depth")
    grid = case.param("grid")
    count = tokens(grid)
    torch.manual_seed(0)
    config = hf_qwen3_config(depth)
    hf_tower = hf.Qwen3VLVisionModel(config).to(device=device, dtype=case.dtype).eval()
    tower = VisionTower.from_hf(hf_tower).eval()
    patched = hf.Qwen3VLVisionModel(config).to(device=device, dtype=case.dtype).eval()
    patched.load_state_dict(hf_tower.state_dict())
    patch_auto(patched, tower=True)
    pixel_values = pixel_rows(grid, 3, 2, PATCH, device)
    grid_thw = grid_tensor(grid, device)  # HF's towers take it on the model's device
    host_grid = grid_thw.cpu()

    def vlfuse_tower(pixel_values):
        features = tower.features(pixel_values, host_grid)
        return (features.merged, *features.deepstack)

    def hf_vision_tower(pixel_values):
        out = hf_tower(pixel_values, grid_thw=grid_thw)
        return (out.pooler_output, *out.deepstack_features)

    def patched_call():
        with torch.no_grad():
            return patched(pixel_values, grid_thw=grid_thw).pooler_output

    with torch.no_grad():
        expected = hf_vision_tower(pixel_values)[0]
        err = float((patched_call() - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not err <= 4.0 * depth**0.5 * (2e-5 if case.dtype == torch.float32 else 2.0**-6):
        raise RuntimeError(f"vlfuse.bench: the patched HF Qwen3-VL tower is off HF's by {err:.3g}")
    shapes = _tower_gemms(count, depth)
    flops = float(sum(2 * m * k * n for m, k, n in shapes))
    return Setup(
        args=(pixel_values,),
        vlfuse=vlfuse_tower,
        eager=hf_vision_tower,
        shape=f"depth {depth} of 27, width {WIDTH}, {HEADS}x{HEAD_DIM} heads, [{count}, {3 * 2 * PATCH * PATCH}] -> "
        f"[{count // 4}, {OUT_WIDTH}] + {len(config.deepstack_visual_indexes)} deepstack",
        baseline="HF Qwen3VLVisionModel (SDPA), same weights; merged tokens and deepstack features",
        limit=_plain_gemms(shapes, device, case.dtype),
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=4.0 * depth**0.5,
        compile=compile_hf_tower(device, case.dtype),
        note=f"Qwen3-VL tower: {depth} of 27 blocks (real width); limit = the tower's GEMMs alone",
        extras={"HF + vlfuse.patch": patched_call},
    )


def cases() -> list[Case]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for name in ("1 image 448x448", "4 images 448x448", "video 16f 448x448"):
            grid = (("grid", GRIDS[name]),)
            quick = name == "1 image 448x448" and dtype == torch.float32
            out.append(Case("qwen3 patch embed + pos", name, dtype, FWD, build_patch_embed_pos, grid,
                            PATCH_TARGET[dtype], quick))  # fmt: skip
            if name.startswith("video"):  # the video row times the embedding of distinct frames (no fold)
                continue
            rope_params = grid + (("model", "qwen3_vl"), ("heads", HEADS), ("head_dim", HEAD_DIM))
            merge_params = grid + (("channels", WIDTH), ("postshuffle", True))
            for mode in (FWD, FWD_BWD):
                out.append(Case("qwen3 rope_qkv D=72", name, dtype, mode, build_rope_qkv, rope_params, ROPE_TARGET,
                                quick and mode == FWD))  # fmt: skip
                out.append(Case("qwen3 postshuffle merge", name, dtype, mode, build_merge2x2, merge_params,
                                MERGE_TARGET.get(dtype), quick and mode == FWD))  # fmt: skip
        for name in ("1 image 448x448", "4 images, mixed sizes"):
            params = (("grid", GRIDS[name]), ("depth", TOWER_DEPTH))
            out.append(Case("qwen3 vision tower", name, dtype, FWD, build_qwen3_tower, params, TOWER_TARGET))
    return out
