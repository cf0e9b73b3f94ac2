"""The workloads every case is drawn from: Qwen2-VL's sizes, read from the model package's presets (stated nowhere
else), and the image/video inputs of issue 7."""

from __future__ import annotations

import torch

from ..models.qwen2_vl.config import Qwen2VLConfig
from .core import Unavailable

# The published Qwen2-VL shapes. The 2B and 7B models share one vision tower and differ only in the merger's
# output width (the LLM's hidden size).
MODELS = {"2B": Qwen2VLConfig.preset("2b"), "7B": Qwen2VLConfig.preset("7b")}
VISION = MODELS["2B"].vision
LLM_WIDTH = {name: config.hidden_size for name, config in MODELS.items()}


def image_grid(height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
    """grid_thw row (t, h, w in patches) of `frames` frames of height x width pixels: the processor pads the frames
    to whole temporal patches (an image is one frame, repeated)."""
    temporal = -(-frames // VISION.temporal_patch_size)
    return (temporal, height // VISION.patch_size, width // VISION.patch_size)


IMAGE_448 = image_grid(448, 448)
WORKLOADS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "1 image 448x448": (IMAGE_448,),
    "4 images 448x448": (IMAGE_448,) * 4,
    "16 images 448x448": (IMAGE_448,) * 16,
    "video 16f 448x448": (image_grid(448, 448, frames=16),),
    # images of different sizes in one call (a training batch): the vision tower's segments of unequal length
    "4 images, mixed sizes": tuple(image_grid(h, w) for h, w in ((448, 448), (336, 560), (224, 224), (560, 392))),
    "16 images, mixed sizes": tuple(image_grid(112 + 56 * (i % 5), 112 + 56 * ((3 * i) % 7)) for i in range(16)),
}


def tokens(grid: tuple[tuple[int, int, int], ...]) -> int:
    return sum(t * h * w for t, h, w in grid)


def pixel_rows(
    grid: tuple[tuple[int, int, int], ...], channels: int, temporal: int, patch: int, device: torch.device
) -> torch.Tensor:
    """Random float32 patch rows [tokens, C * Tp * P * P] laid out as HF's processors emit them: an item with t = 1
    is an image, its one frame repeated Tp times in every row; an item with t > 1 is a video of distinct frames."""
    plane, rows = patch * patch, []
    for t, h, w in grid:
        n = t * h * w
        if t == 1:
            frame = torch.randn(n, channels, 1, plane)
            rows.append(frame.expand(n, channels, temporal, plane).reshape(n, -1))
        else:
            rows.append(torch.randn(n, channels * temporal * plane))
    return torch.cat(rows).to(device)


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
        mlp_ratio=int(VISION.mlp_ratio),
        in_channels=VISION.in_channels,
        patch_size=VISION.patch_size,
        temporal_patch_size=VISION.temporal_patch_size,
        spatial_merge_size=VISION.spatial_merge_size,
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
