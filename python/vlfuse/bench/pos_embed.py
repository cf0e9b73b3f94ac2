"""interp_pos_embed against HF's Qwen3-VL position path: ``get_vision_interpolation_indices_and_weights``
(mode="bilinear", align_corners=True) and ``(pos_embed(indices) * weights[:, :, None]).sum(1)`` cast to the model
dtype, as Qwen3VLVisionModel.forward runs them on every call, for Qwen3-VL's 48 x 48 table."""

from __future__ import annotations

import torch

from .core import BANDWIDTH, FWD, FWD_BWD, Case, Setup, Unavailable
from .machine import copy_reference
from .workloads import WORKLOADS, grid_tensor, tokens, vlfuse_op

# Qwen3-VL's vision config: num_position_embeddings = 2304 (a 48 x 48 table), hidden_size = 1152.
TABLE_SIDE = 48
WIDTH = 1152


def build_interp_pos_embed(case: Case, device: torch.device) -> Setup:
    interp_pos_embed = vlfuse_op("interp_pos_embed")
    try:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights
    except ImportError as exc:
        raise Unavailable(f"transformers' vision_utils is not importable ({exc})") from exc

    grid = grid_tensor(case.param("grid"), device)
    count = tokens(case.param("grid"))
    table = torch.randn(TABLE_SIDE * TABLE_SIDE, WIDTH, device=device, dtype=case.dtype)

    def vlfuse_positions(table):
        return interp_pos_embed(table, grid, 2, tokens=count)

    def hf_positions(table):
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=TABLE_SIDE, mode="bilinear", align_corners=True, spatial_merge_size=2
        )
        return (torch.nn.functional.embedding(indices, table) * weights[:, :, None]).sum(1).to(table.dtype)

    # must move: write the rows (the table is read from cache); the backward reads their gradient, writes the table's
    element = table.element_size()
    moved = count * WIDTH * element + table.numel() * element
    if case.mode == FWD_BWD:
        moved *= 2
    return Setup(
        args=(table,),
        vlfuse=vlfuse_positions,
        eager=hf_positions,
        shape=f"[{TABLE_SIDE}*{TABLE_SIDE}, {WIDTH}] -> [{count}, {WIDTH}]",
        baseline="HF Qwen3-VL interpolation indices/weights + pos_embed gather + weighted sum",
        grad_args=(0,),
        reference=hf_positions,
        limit=copy_reference(moved, device),
        limit_kind=BANDWIDTH,
        work=moved,
    )


def cases() -> list[Case]:
    out = []
    for name in ("1 image 448x448", "16 images 448x448", "16 images, mixed sizes", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in (FWD, FWD_BWD):
                quick = name == "1 image 448x448" and mode == FWD and dtype == torch.bfloat16
                params = (("grid", WORKLOADS[name]),)
                out.append(Case("interp_pos_embed", name, dtype, mode, build_interp_pos_embed, params, None, quick))
    return out
