"""The workloads every case is drawn from: Qwen2-VL's vision sizes and the image/video inputs of issue 7."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import Unavailable


@dataclass(frozen=True)
class VisionSizes:
    """Qwen2-VL's vision tower; the 2B and 7B models share it and differ only in the merger's output width."""

    embed_dim: int = 1280
    num_heads: int = 16
    depth: int = 32
    mlp_ratio: int = 4
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


VISION = VisionSizes()
LLM_WIDTH = {"2B": 1536, "7B": 3584}  # PatchMerger output width (the LLM's hidden size)

# name -> grid_thw rows (t, h, w in patches); 448 x 448 pixels = 32 x 32 patches of 14 pixels
IMAGE_448 = (1, 32, 32)
WORKLOADS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "1 image 448x448": (IMAGE_448,),
    "4 images 448x448": (IMAGE_448,) * 4,
    "16 images 448x448": (IMAGE_448,) * 16,
    "video 16f 448x448": ((8, 32, 32),),  # 16 frames, two per temporal patch
    # images of different sizes in one call (a training batch): the vision tower's segments of unequal length
    "4 images, mixed sizes": ((1, 32, 32), (1, 24, 40), (1, 16, 16), (1, 40, 28)),
    "16 images, mixed sizes": tuple((1, 8 + 4 * (i % 5), 8 + 4 * ((3 * i) % 7)) for i in range(16)),
}


def tokens(grid: tuple[tuple[int, int, int], ...]) -> int:
    return sum(t * h * w for t, h, w in grid)


def grid_tensor(grid: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(grid, dtype=torch.int64, device=device).reshape(-1, 3)


def hf_qwen2_vl():
    """transformers' Qwen2-VL modeling module, the baselines' source."""
    try:
        from transformers.models.qwen2_vl import modeling_qwen2_vl
    except ImportError as exc:
        raise Unavailable(f"transformers' Qwen2-VL is not importable ({exc})") from exc
    return modeling_qwen2_vl


def hf_vision_config(depth: int = VISION.depth, llm_width: int = LLM_WIDTH["2B"]):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    config = Qwen2VLVisionConfig(
        depth=depth,
        embed_dim=VISION.embed_dim,
        hidden_size=llm_width,
        num_heads=VISION.num_heads,
        mlp_ratio=VISION.mlp_ratio,
        in_channels=VISION.in_channels,
        patch_size=VISION.patch_size,
        temporal_patch_size=VISION.temporal_patch_size,
        spatial_merge_size=VISION.merge_size,
    )
    config._attn_implementation = "sdpa"
    return config


def vlfuse_op(name: str):
    """A public vlfuse op or module, or Unavailable when this build does not have it yet."""
    import vlfuse.nn
    import vlfuse.ops

    for namespace in (vlfuse.ops, vlfuse.nn):
        try:
            return getattr(namespace, name)
        except (AttributeError, ImportError):
            continue
    raise Unavailable(f"vlfuse.{name} is not in this build")
