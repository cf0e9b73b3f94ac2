"""The Conv3d patch embedding of Qwen2-VL-style vision towers (kernel = stride), run as one GEMM."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .. import ops
from . import backends


class PatchEmbed3d(nn.Module):
    """Drop-in for HF's Qwen2-VL ``PatchEmbed``: same constructor defaults and the same state dict
    (``proj.weight`` [E, C, Tp, P, P], plus ``proj.bias`` [E] when bias=True), so HF weights load unchanged.

    forward(patches [N, C * Tp * P * P]) -> [N, E] in the weight's dtype; embed_frames() takes raw frames.
    backend: "vlfuse" (the fused op) or "eager" (the reference; see vlfuse.nn.backends)
    """

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        in_channels: int = 3,
        embed_dim: int = 1152,
        bias: bool = False,
        backend: str = "vlfuse",
    ) -> None:
        super().__init__()
        self.ops = backends.get(backend)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        kernel_size = (temporal_patch_size, patch_size, patch_size)
        # A Conv3d holds the parameters so that initialization and state dicts match HF's module exactly.
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel_size, stride=kernel_size, bias=bias)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def forward(self, patches: Tensor) -> Tensor:
        """patches [N, C * Tp * P * P] (or any shape whose last dims flatten to it, as HF's view allows) -> [N, E]."""
        if patches.dim() != 2:
            patches = patches.reshape(-1, self.patch_dim)
        return self.ops.patch_embed(patches, self.proj.weight, self.proj.bias)

    def embed_frames(
        self,
        frames: Tensor | Sequence[Tensor],
        merge_size: int = 2,
        mean: Sequence[float] = ops.CLIP_MEAN,
        std: Sequence[float] = ops.CLIP_STD,
    ) -> tuple[Tensor, Tensor]:
        """Raw frames ([T, C, H, W] uint8 or float in [0, 1], or a list of them, H and W multiples of
        patch_size * merge_size) -> embeddings [N, E] in merge order and grid_thw [items, 3] int64."""
        return ops.embed_frames(
            frames,
            self.proj.weight,
            self.proj.bias,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            merge_size=merge_size,
            mean=mean,
            std=std,
        )

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
            f"in_channels={self.in_channels}, embed_dim={self.embed_dim}, bias={self.proj.bias is not None}"
        )


__all__ = ["PatchEmbed3d"]
