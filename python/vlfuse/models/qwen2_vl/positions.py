"""Multimodal RoPE positions of the Qwen2-VL LLM (HF's ``get_rope_index``) and its frequency matrix.

Each token has three positions (t, h, w). Text tokens carry the same running index on all three axes. The
visual tokens of one image/video (after the 2x2 merge) carry (start + frame, start + row, start + column); the text
after them resumes at one past the largest position used so far, as the published Qwen2-VL code (and transformers
4.x) does. (transformers 5.x resumes at start + max(rows, columns), which differs only for videos with more
merged frames than rows and columns.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mrope_freqs", "rope_index", "text_positions"]


def mrope_freqs(head_dim: int, theta: float, mrope_section: list[int], device=None) -> Tensor:
    """[3, head_dim / 2] float32: pair i turns with the axis whose ``mrope_section`` span holds i (t, then h, then
    w), at HF's inverse frequency 1 / theta ** (2i / head_dim); zero on the other two axes."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    axis = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(mrope_section, device=device))
    freqs = torch.zeros(3, half, dtype=torch.float32, device=device)
    freqs[axis, torch.arange(half, device=device)] = inv_freq
    return freqs


def text_positions(start: Tensor, length: int) -> Tensor:
    """[3, B, length] positions start[b] + i on all three axes (text, and the tokens generated after a prompt)."""
    steps = torch.arange(length, device=start.device)
    return (start.view(1, -1, 1) + steps.view(1, 1, -1)).expand(3, -1, -1)


def _visual_positions(grid: tuple[int, int, int], merge: int, start: int) -> Tensor:
    """[3, t * h/m * w/m] (frame, row, column) + start, in the merged tokens' order (frames, rows, columns)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, -1, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, -1).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_index(
    input_ids: Tensor,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    attention_mask: Tensor | None = None,
    merge_size: int = 2,
) -> tuple[Tensor, Tensor]:
    """Positions of every token, and where generation continues.

    input_ids:      [B, L]; image (video) pad tokens mark the visual tokens, one per merged token, in order
    image_grid_thw: [images, 3], video_grid_thw: [videos, 3]  (in patches, consumed in order across the batch)
    attention_mask: [B, L] (0 = padding; padding is skipped and gets position 0)
    returns positions [3, B, L] int64 and next_position [B] int64 (the position of the first generated token)
    """
    B, L = input_ids.shape
    grids = {
        image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        video_token_id: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    ids_cpu = input_ids.detach().cpu()
    mask_cpu = None if attention_mask is None else attention_mask.detach().cpu().bool()
    positions = torch.zeros(3, B, L, dtype=torch.int64)
    next_position = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        keep = torch.arange(L) if mask_cpu is None else mask_cpu[b].nonzero().flatten()
        ids = ids_cpu[b, keep]
        kind = torch.where(ids == image_token_id, 1, torch.where(ids == video_token_id, 2, 0))
        # run boundaries: where the token kind changes
        change = torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), ids.numel()]
        chunks = []
        start = 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if kind[lo] == 0:
                chunks.append(torch.arange(hi - lo).expand(3, -1) + start)
                start += hi - lo
                continue
            token = image_token_id if kind[lo] == 1 else video_token_id
            name = "image" if kind[lo] == 1 else "video"
            remaining = hi - lo
            while remaining > 0:  # adjacent items without separators form one run: split it by their grids
                grid = next(grids[token], None)
                if grid is None:
                    raise ValueError(
                        f"the prompt has more {name} pad tokens than the {name} grids describe "
                        f"(row {b}: a run of {hi - lo} tokens left {remaining} without a grid)"
                    )
                count = grid[0] * (grid[1] // merge_size) * (grid[2] // merge_size)
                if count > remaining:
                    raise ValueError(
                        f"{name} grid {grid} needs {count} pad tokens but the prompt (row {b}) has a run of "
                        f"{remaining}"
                    )
                pos = _visual_positions(grid, merge_size, start)
                chunks.append(pos)
                start = int(pos.max()) + 1
                remaining -= count
        row = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.int64)
        positions[:, b, keep] = row
        next_position[b] = start
    for token, name in ((image_token_id, "image"), (video_token_id, "video")):
        if next(grids[token], None) is not None:
            raise ValueError(f"more {name} grids were given than the prompt has {name} pad-token runs for")
    return positions.to(input_ids.device), next_position.to(input_ids.device)
