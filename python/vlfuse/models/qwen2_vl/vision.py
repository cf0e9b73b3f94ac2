"""Qwen2-VL's vision tower is the family's tower (``vlfuse.models.vision_tower.VisionTower``) with Qwen2-VL's
config: LayerNorm, quick-GELU MLP, attention within each frame. ``VisionTransformer`` is its name here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.backends import BACKENDS
from ..vision_tower import VisionTower, activation

__all__ = ["BACKENDS", "VisionTransformer", "activation", "frame_cu_seqlens"]

VisionTransformer = VisionTower


def frame_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """[frames + 1] int32 boundaries of each frame's h * w tokens (Qwen2-VL attends within one frame)."""
    grid = grid_thw.to(torch.int64)
    per_frame = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))
