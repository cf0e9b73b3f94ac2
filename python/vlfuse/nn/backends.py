"""The one place where a module chooses between vlfuse's fused ops and the plain eager reference.

Every ``vlfuse.nn`` module takes ``backend="vlfuse" | "eager"`` and asks :func:`get` for its functions, so model
code never branches on the backend. ``"eager"`` runs the same weights through ``vlfuse.reference`` (the tests'
oracle, no native library needed): a debugging and parity aid, not a fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops, reference

__all__ = ["BACKENDS", "Backend", "get"]

BACKENDS = ("vlfuse", "eager")


@dataclass(frozen=True)
class Backend:
    """The functions a module needs, with the signatures of ``vlfuse.ops``."""

    name: str
    rope_qkv: Callable[..., tuple[Tensor, Tensor, Tensor]]
    rope: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    patch_embed: Callable[..., Tensor]
    merge2x2: Callable[..., Tensor]
    vision_positions: Callable[[Tensor, int], Tensor]
    vision_rope_freqs: Callable[..., Tensor]


def _eager_rope(q: Tensor, k: Tensor, positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    return reference.rope(q, positions, freqs), reference.rope(k, positions, freqs)


def _eager_patch_embed(patches: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    # Under autocast the op's own rule (a Linear's) casts its operands; the reference gets the same cast operands.
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        patches, weight, bias = patches.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return reference.patch_embed(patches, weight, bias)


def _eager_vision_positions(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    return reference.vision_positions(grid_thw.cpu(), merge_size).to(grid_thw.device)


def _eager_vision_rope_freqs(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    return reference.vision_rope_freqs(head_dim, theta).to(device)


_TABLE = {
    "vlfuse": Backend(
        name="vlfuse",
        rope_qkv=ops.rope_qkv,
        rope=ops.rope,
        patch_embed=ops.patch_embed,
        merge2x2=ops.merge2x2,
        vision_positions=ops.vision_positions,
        vision_rope_freqs=ops.vision_rope_freqs,
    ),
    "eager": Backend(
        name="eager",
        rope_qkv=reference.rope_qkv,
        rope=_eager_rope,
        patch_embed=_eager_patch_embed,
        merge2x2=reference.merge2x2,
        vision_positions=_eager_vision_positions,
        vision_rope_freqs=_eager_vision_rope_freqs,
    ),
}


def get(name: str) -> Backend:
    """The functions of backend ``name`` ("vlfuse" or "eager"); a clear error for anything else."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"vlfuse.nn: backend must be one of {BACKENDS}, got {name!r}") from None
