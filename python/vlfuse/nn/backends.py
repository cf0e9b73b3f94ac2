"""The one place where a module chooses between vlfuse's fused ops and the plain eager reference.

Every ``vlfuse.nn`` module takes ``backend="vlfuse" | "eager"`` and asks :func:`get` for its functions, so model
code never branches on the backend. ``"eager"`` runs the same weights through ``vlfuse.reference`` and the plain
torch functions below (the tests' oracle, no native library needed): a debugging and parity aid, not a fast path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops, reference
from ..ops.attention import sdpa_segment_attention

__all__ = ["BACKENDS", "Backend", "get"]

BACKENDS = ("vlfuse", "eager")


@dataclass(frozen=True)
class Backend:
    """The functions a module needs, with the signatures of ``vlfuse.ops``."""

    name: str
    rope_qkv: Callable[..., tuple[Tensor, Tensor, Tensor]]
    rope: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    rope_cos_sin: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    patch_embed: Callable[..., Tensor]
    merge2x2: Callable[..., Tensor]
    interp_pos_embed: Callable[..., Tensor]
    vision_positions: Callable[[Tensor, int], Tensor]
    vision_rope_freqs: Callable[..., Tensor]
    linear_act: Callable[..., Tensor]
    segment_attention: Callable[..., Tensor]


def _op(name: str) -> Callable[..., Tensor]:
    """``vlfuse.ops.<name>``, looked up at each call: whatever stands there then runs (a wrapper that counts or
    profiles calls, or an op that is added after this module was imported)."""

    def call(*args, **kwargs):
        return getattr(ops, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"vlfuse.ops.{name}"
    return call


def _eager_rope(q: Tensor, k: Tensor, positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    return reference.rope(q, positions, freqs), reference.rope(k, positions, freqs)


def _eager_patch_embed(patches: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    # Under autocast the op's own rule (a Linear's) casts its operands; the reference gets the same cast operands.
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        patches, weight, bias = patches.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return reference.patch_embed(patches, weight, bias)


def _eager_merge2x2(
    x: Tensor,
    grid_thw: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layernorm",
    order: str = "merge",
    merge_size: int = 2,
    postshuffle_norm: bool = False,
) -> Tensor:
    """vlfuse.ops.merge2x2 in plain torch. postshuffle_norm: the windows are concatenated first and each merged
    row [m^2 * C] is normalized as a whole (weight, bias [m^2 * C]; Qwen3-VL's deepstack mergers)."""
    if not postshuffle_norm:
        return reference.merge2x2(x, grid_thw, weight, bias, eps, norm, order, merge_size)
    if order == "raster":
        x = x[reference.raster_merge_index(grid_thw, merge_size).to(x.device)]
    rows = x.reshape(-1, merge_size * merge_size * x.shape[-1])
    # a merge of 1 x 1 windows is the norm of each row alone
    return reference.merge2x2(rows, None, weight, bias, eps, norm, "merge", 1)


def _axis_taps(size: int, side: int, device) -> tuple[Tensor, Tensor]:
    """[size, 2] taps into a side-long table axis and their float32 weights: bilinear with align_corners=True,
    in HF's float32 rounding (src = i * (side - 1) / (size - 1); the upper tap clamped to the edge)."""
    src = torch.arange(size, dtype=torch.float32, device=device) * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    frac = src - floor
    low = floor.long()
    taps = torch.stack([low, (low + 1).clamp(max=side - 1)], dim=-1)
    weights = torch.stack([1 - frac, 1 - (frac - 1).abs()], dim=-1)
    return taps, weights


def _eager_interp_pos_embed(
    table: Tensor, grid_thw: Tensor, merge_size: int = 2, bias: Tensor | None = None, tokens: int | None = None
) -> Tensor:
    """vlfuse.ops.interp_pos_embed in plain torch: the learned square position table [S * S, C] resampled
    bilinearly (align_corners=True) to each item's h x w grid, rows in merge order, repeated over the t frames,
    bias [C] added to every row. grid_thw [items, 3] is read on the host. Returns [N, C] in table's dtype."""
    side = math.isqrt(table.shape[0])
    if table.dim() != 2 or side * side != table.shape[0]:
        raise ValueError(f"interp_pos_embed: table must be [S * S, C] (a square grid), got {tuple(table.shape)}")
    grid = grid_thw.detach().to("cpu", torch.int64).reshape(-1, 3).tolist()
    m = merge_size
    for t, h, w in grid:
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(
                f"interp_pos_embed: grid_thw rows must be (t, h, w) positive with h and w multiples of merge_size "
                f"{m}, got {grid}"
            )
    total = sum(t * h * w for t, h, w in grid)
    if tokens is not None and tokens != total:
        raise ValueError(f"interp_pos_embed: grid_thw {grid} describes {total} patches but tokens is {tokens}")
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    parts = []
    for t, h, w in grid:
        h_taps, h_weights = _axis_taps(h, side, table.device)
        w_taps, w_weights = _axis_taps(w, side, table.device)
        index = (h_taps[:, None, :, None] * side + w_taps[None, :, None, :]).reshape(h, w, 4)
        weight = (h_weights[:, None, :, None] * w_weights[None, :, None, :]).reshape(h, w, 4)

        def merge_order(a: Tensor) -> Tensor:
            return a.reshape(h // m, m, w // m, m, 4).permute(0, 2, 1, 3, 4).reshape(h * w, 4)

        frame = (table[merge_order(index)].to(acc) * merge_order(weight).to(acc)[..., None]).sum(1)
        parts.append(frame.expand(t, h * w, table.shape[1]).reshape(t * h * w, table.shape[1]))
    out = torch.cat(parts) if parts else table.new_zeros(0, table.shape[1], dtype=acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(table.dtype)


def _eager_vision_positions(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    return reference.vision_positions(grid_thw.cpu(), merge_size).to(grid_thw.device)


def _eager_vision_rope_freqs(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    return reference.vision_rope_freqs(head_dim, theta).to(device)


_TABLE = {
    "vlfuse": Backend(
        name="vlfuse",
        rope_qkv=_op("rope_qkv"),
        rope=_op("rope"),
        rope_cos_sin=_op("rope_cos_sin"),
        patch_embed=_op("patch_embed"),
        merge2x2=_op("merge2x2"),
        interp_pos_embed=_op("interp_pos_embed"),
        vision_positions=_op("vision_positions"),
        vision_rope_freqs=_op("vision_rope_freqs"),
        linear_act=_op("linear_act"),
        segment_attention=_op("segment_attention"),
    ),
    "eager": Backend(
        name="eager",
        rope_qkv=reference.rope_qkv,
        rope=_eager_rope,
        rope_cos_sin=reference.rope_cos_sin,
        patch_embed=_eager_patch_embed,
        merge2x2=_eager_merge2x2,
        interp_pos_embed=_eager_interp_pos_embed,
        vision_positions=_eager_vision_positions,
        vision_rope_freqs=_eager_vision_rope_freqs,
        linear_act=reference.linear_act,
        segment_attention=sdpa_segment_attention,
    ),
}


def get(name: str) -> Backend:
    """The functions of backend ``name`` ("vlfuse" or "eager"); a clear error for anything else."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"vlfuse.nn: backend must be one of {BACKENDS}, got {name!r}") from None
