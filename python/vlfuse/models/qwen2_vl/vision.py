"""Qwen2-VL vision tower: patch embedding -> blocks (LayerNorm, RoPE-2D attention within each frame, LayerNorm,
quick-GELU MLP) -> 2x2 patch merger. Parameter names are HF's (``patch_embed.proj``, ``blocks.N.attn.qkv``, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ... import ops, reference
from ...nn import PatchEmbed3d, PatchMerger, RotaryAttention2D
from .config import Qwen2VLVisionConfig

__all__ = ["VisionTransformer", "frame_cu_seqlens", "activation"]

BACKENDS = ("vlfuse", "eager")


def activation(name: str):
    """The MLP activation by its HF name."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r} (quick_gelu, gelu, gelu_pytorch_tanh, silu)")


def frame_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """[frames + 1] int32 boundaries of each frame's h * w tokens (Qwen2-VL attends within one frame)."""
    grid = grid_thw.to(torch.int64)
    per_frame = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = activation(hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = RotaryAttention2D(config.embed_dim, config.num_heads, bias=True, backend=backend)
        self.mlp = VisionMlp(config.embed_dim, config.mlp_dim, config.hidden_act)

    def forward(self, x: Tensor, positions: Tensor, freqs: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, freqs, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``visual(pixel_values, grid_thw)``: pixel_values [N, C * Tp * P * P] (patches in Qwen2-VL order, as the
    processor emits them), grid_thw [items, 3] (t, h, w in patches) -> merged tokens [N / merge^2, hidden_size]."""

    def __init__(self, config: Qwen2VLVisionConfig, backend: str = "vlfuse") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        config.validate()
        self.config = config
        self.backend = backend
        self.patch_embed = PatchEmbed3d(
            in_channels=config.in_channels,
            embed_dim=config.embed_dim,
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
        )
        self.blocks = nn.ModuleList(VisionBlock(config, backend) for _ in range(config.depth))
        self.merger = PatchMerger(config.hidden_size, config.embed_dim, merge_size=config.spatial_merge_size)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def rope_freqs(self, device: torch.device) -> Tensor:
        """[2, head_dim / 2] float32 RoPE-2D frequency matrix (h pairs, then w pairs). Computed per call rather than
        held as a buffer, which ``model.to(bfloat16)`` would round; override it to change the rotation."""
        c = self.config
        if self.backend == "eager":
            return reference.vision_rope_freqs(c.head_dim, c.rope_theta).to(device)
        return ops.vision_rope_freqs(c.head_dim, c.rope_theta, device=device)

    def check_grid(self, pixel_values: Tensor, grid_thw: Tensor) -> None:
        """Clear errors for grids that do not describe pixel_values (shapes are static, so no device sync)."""
        c = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(
                f"pixel_values must be [patches, {c.patch_dim}] (C * Tp * P * P), got {tuple(pixel_values.shape)}"
            )
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [items, 3] (t, h, w in patches), got {tuple(grid_thw.shape)}")
        grid = grid_thw.detach().to("cpu", torch.int64)
        m = c.spatial_merge_size
        if bool((grid <= 0).any()) or bool((grid[:, 1:] % m != 0).any()):
            raise ValueError(
                f"grid_thw rows must be positive with h and w multiples of the merge size {m}, got {grid.tolist()}"
            )
        if int(grid.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"grid_thw {grid.tolist()} describes {int(grid.prod(-1).sum())} patches but pixel_values has "
                f"{pixel_values.shape[0]}"
            )

    def _embed_patches(self, pixel_values: Tensor) -> Tensor:
        """[N, C * Tp * P * P] -> [N, embed_dim]. Under autocast the weight is cast here, as autocast casts a
        Linear's (the patch_embed op's own autocast rule does the same), so both backends see the same operands."""
        weight, bias = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if self.backend == "eager":
            return reference.patch_embed(pixel_values, weight, bias)
        return ops.patch_embed(pixel_values, weight, bias)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        self.check_grid(pixel_values, grid_thw)
        c = self.config
        eager = self.backend == "eager"
        weight = self.patch_embed.proj.weight
        x = self._embed_patches(pixel_values)
        if eager:
            positions = reference.vision_positions(grid_thw.cpu(), c.spatial_merge_size).to(weight.device)
        else:
            positions = ops.vision_positions(grid_thw.to(weight.device), c.spatial_merge_size)
        freqs = self.rope_freqs(weight.device)
        cu_seqlens = frame_cu_seqlens(grid_thw.to(weight.device))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, positions, freqs, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, positions, freqs, cu_seqlens)
        if not eager:
            return self.merger(x, grid_thw)
        merger = self.merger
        merged = reference.merge2x2(
            x,
            grid_thw,
            merger.ln_q.weight,
            getattr(merger.ln_q, "bias", None),
            eps=merger.ln_q.eps,
            norm=merger.norm,
            merge_size=c.spatial_merge_size,
        )
        return merger.mlp[2](F.gelu(merger.mlp[0](merged)))
