"""Rotary (RoPE-2D) self-attention over packed tokens of several images/frames, each attending only to itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from . import backends

__all__ = ["RotaryAttention2D", "SegmentLayout", "segment_attention"]


@dataclass(frozen=True)
class SegmentLayout:
    """Attention segments of a packed token axis, as runs of equal-length segments.

    groups: ((first token, segment count, segment length), ...): segment count x segment length tokens from the
            first token on form that many consecutive segments of that length; the runs tile [0, tokens).
    tokens: the total token count.

    Plain host integers: building one reads the device at most once (``from_cu_seqlens``), using one reads nothing,
    and under ``torch.compile(dynamic=True)`` the integers become symbolic, so other sizes reuse the graph.
    """

    groups: tuple[tuple[int, int, int], ...]
    tokens: int

    @classmethod
    def from_lengths(cls, lengths) -> SegmentLayout:
        """From the segment lengths in token order (host integers; empty segments are dropped): adjacent equal
        lengths form one run."""
        groups: list[tuple[int, int, int]] = []
        start = 0
        for length in lengths:
            if length < 0:
                raise ValueError(f"segment lengths must be non-negative, got {list(lengths)}")
            if length and groups and groups[-1][2] == length:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, length)
            elif length:
                groups.append((start, 1, length))
            start += length
        return cls(tuple(groups), start)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> SegmentLayout:
        """From cumulative boundaries [segments + 1] (0, ..., S): one host read."""
        bounds = cu_seqlens.detach().to("cpu", torch.int64).tolist()
        if any(end < start for start, end in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        return cls.from_lengths([end - start for start, end in zip(bounds[:-1], bounds[1:])])


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: SegmentLayout | Tensor) -> Tensor:
    """Scaled dot-product attention restricted to segments of the packed token axis.

    q, k, v:  [H, S, D]  (the "hsd" layout of rope_qkv; unit stride on D, other strides free: its v is a view)
    segments: a SegmentLayout, or cu_seqlens [segments + 1] (0, ..., S) read once on the host
    returns:  [S, H * D]

    ``vlfuse.ops.segment_attention``: the vlfuse kernel on CPU, SDPA per run of equal-length segments on CUDA;
    no S x S mask, sum(length^2) scores in all. Lay equal lengths out next to each other (the vision tower's plan
    does) and there is one run per distinct length.
    """
    return _segment_attention(q, k, v, segments, ops.segment_attention)


def _segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: SegmentLayout | Tensor, attend) -> Tensor:
    layout = segments if isinstance(segments, SegmentLayout) else SegmentLayout.from_cu_seqlens(segments)
    if layout.tokens != q.shape[1]:
        raise ValueError(f"segment_attention: the segments cover {layout.tokens} tokens but q has {q.shape[1]}")
    return attend(q, k, v, layout.groups)


class RotaryAttention2D(nn.Module):
    """qkv Linear (``vlfuse.ops.linear_act``) -> fused split + RoPE-2D (``vlfuse.ops.rope_qkv``) -> attention within
    segments -> proj.

    State dict keys ``qkv.*`` and ``proj.*``, as HF Qwen2-VL's ``VisionAttention``, so its weights load as they are.
    ``backend="eager"`` runs the same weights through the eager reference (see :mod:`vlfuse.nn.backends`).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, backend: str = "vlfuse") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RotaryAttention2D: dim {dim} is not divisible by num_heads {num_heads}")
        self.ops = backends.get(backend)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    @property
    def backend(self) -> str:
        return self.ops.name

    def forward(self, x: Tensor, positions: Tensor, freqs: Tensor, segments: SegmentLayout | Tensor) -> Tensor:
        """x: [S, dim]; positions: [S, 2] (h, w) integer; freqs: [2, head_dim / 2] float32; segments: a
        SegmentLayout or cu_seqlens [segments + 1] (tokens attend within their segment). Returns [S, dim]."""
        return self.proj(self.attend(x, positions, freqs, segments))

    def attend(self, x: Tensor, positions: Tensor, freqs: Tensor, segments: SegmentLayout | Tensor) -> Tensor:
        """The attention output before ``proj`` ([S, dim]), for callers that fold proj into something else."""
        qkv = self.ops.linear_act(x, self.qkv.weight, self.qkv.bias)
        q, k, v = self.ops.rope_qkv(qkv, positions, freqs, self.num_heads, out_layout="hsd")
        if v.requires_grad:
            # Attention saves v for its backward: the view would keep all of qkv alive until then, a copy only
            # its third, as before the view (inference keeps the view and skips the copy).
            v = v.contiguous()
        return _segment_attention(q, k, v, segments, self.ops.segment_attention)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"
