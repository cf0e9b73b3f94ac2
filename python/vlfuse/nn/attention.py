"""Rotary (RoPE-2D) self-attention over packed tokens of several images/frames, each attending only to itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference

__all__ = ["RotaryAttention2D", "segment_attention"]


def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Scaled dot-product attention restricted to segments of the packed token axis.

    q, k, v:    [H, S, D]  (the "hsd" layout rope_qkv writes)
    cu_seqlens: [segments + 1] integer, cumulative segment boundaries (0, ..., S)
    returns:    [S, H * D]

    No Python loop over segments. When every segment has the same length (one image, the frames of one video,
    several images of one size: the common cases), the segments become SDPA's batch axis, which does no wasted
    work. Otherwise one SDPA call runs over all tokens with a block-diagonal boolean mask: it costs S^2 scores
    instead of sum(len^2), but stays a single fused kernel call (no per-image launches or host round trips per
    segment) and is what CPU SDPA supports; the only host read is the one equal-lengths test.
    """
    H, S, D = q.shape
    if S == 0:
        return q.new_empty(0, H * D)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    segments = lengths.numel()
    if bool((lengths == lengths[0]).all()):
        length = S // segments
        q, k, v = (t.view(H, segments, length, D).transpose(0, 1) for t in (q, k, v))  # [segments, H, len, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return out.permute(0, 2, 1, 3).reshape(S, H * D)
    segment_id = torch.repeat_interleave(torch.arange(segments, device=q.device), lengths.to(q.device), output_size=S)
    mask = segment_id[:, None] == segment_id[None, :]  # [S, S] block diagonal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [H, S, D]
    return out.transpose(0, 1).reshape(S, H * D)


class RotaryAttention2D(nn.Module):
    """qkv Linear -> fused split + RoPE-2D (``vlfuse.ops.rope_qkv``) -> attention within segments -> proj.

    State dict keys ``qkv.*`` and ``proj.*``, as HF Qwen2-VL's ``VisionAttention``, so its weights load as they are.
    ``backend="eager"`` runs the same weights through ``vlfuse.reference.rope_qkv`` instead of the fused op.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, backend: str = "vlfuse") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RotaryAttention2D: dim {dim} is not divisible by num_heads {num_heads}")
        if backend not in ("vlfuse", "eager"):
            raise ValueError(f"RotaryAttention2D: backend must be 'vlfuse' or 'eager', got {backend!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, positions: Tensor, freqs: Tensor, cu_seqlens: Tensor) -> Tensor:
        """x: [S, dim]; positions: [S, 2] (h, w) integer; freqs: [2, head_dim / 2] float32;
        cu_seqlens: [segments + 1] (tokens attend within their segment). Returns [S, dim]."""
        rope_qkv = ops.rope_qkv if self.backend == "vlfuse" else reference.rope_qkv
        q, k, v = rope_qkv(self.qkv(x), positions, freqs, self.num_heads, out_layout="hsd")
        return self.proj(segment_attention(q, k, v, cu_seqlens))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"
