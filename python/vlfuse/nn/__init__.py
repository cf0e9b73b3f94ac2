"""Reusable modules built on the vlfuse ops, for Qwen2-VL and for any other ViT.

- ``PatchEmbed3d``: the Conv3d patch embedding (kernel = stride) as one GEMM; Conv3d-compatible state dict.
- ``RotaryAttention2D``: qkv Linear + fused RoPE-2D split + SDPA restricted to each frame/image segment.
- ``PatchMerger``: fused LayerNorm/RMSNorm + 2x2 window merge, then the MLP; HF-compatible state dict.

Each takes ``backend="vlfuse" | "eager"``; ``vlfuse.nn.backends`` is the one place that maps it to functions.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "PatchEmbed3d": ".patch_embed",
    "RotaryAttention2D": ".attention",
    "PatchMerger": ".merger",
    "SegmentLayout": ".attention",
    "segment_attention": ".attention",
}

__all__ = [*_MODULES, "backends"]


def __getattr__(name: str):
    # Imported on first use so that `import vlfuse.nn` stays cheap and each module loads independently.
    if name == "backends":
        return importlib.import_module(".backends", __name__)
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name], __name__), name)
    raise AttributeError(f"module 'vlfuse.nn' has no attribute {name!r}")
