"""Temporal patchify ops: Qwen2-VL's depth-2 Conv3d patch embedding as one GEMM, the packing of raw frames into
its patch rows, and the two fused.

A patch is a [C, Tp, P, P] block flattened (channel, frame, row, column), as HF's Qwen2-VL processors emit it and
its Conv3d weight [E, C, Tp, P, P] expects. Patches of one item with grid (t, h, w) run over temporal pairs,
h-blocks, w-blocks, then the merge_size x merge_size window row-major (the order of the rotary positions), so the
later 2 x 2 merge is contiguous. Argument checks live in the C++ ops (csrc/patchify/patchify.cpp); the fake
kernels below only compute output shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._native import call_op, register_autograd, require_native

__all__ = ["patch_embed", "patchify", "embed_frames", "smart_resize", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP normalization, Qwen2-VL's processor defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patch_embed(patches: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Conv3d patch embedding with kernel = stride, as one GEMM: equal to HF's Qwen2-VL ``PatchEmbed.forward``.

    patches: [N, C * Tp * P * P] (any float dtype and strides; cast to weight's dtype)
    weight:  [E, C, Tp, P, P]    (the Conv3d weight, or already flattened [E, C * Tp * P * P])
    bias:    [E] or None
    returns  [N, E] in weight's dtype. Differentiable w.r.t. patches, weight and bias.
    """
    return call_op(torch.ops.vlfuse.patch_embed.default, patches, weight, bias)


def _frame_list(frames: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [frames] if isinstance(frames, Tensor) else list(frames)


def patchify(
    frames: Tensor | Sequence[Tensor],
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Packs frames into normalized patch rows in merge order: HF's Qwen2-VL image/video processor output for
    already-resized input, in one pass.

    frames:   [T, C, H, W] (one item) or a list of them (one item each; sizes may differ), uint8 in [0, 255]
              (normalized as (pixel / 255 - mean) / std) or float in [0, 1] ((pixel - mean) / std); an image is
              T = 1. H and W must be multiples of patch_size * merge_size (see smart_resize). An odd T repeats the
              last frame; an image is repeated to temporal_patch_size frames.
    returns   patches  [N, C * Tp * P * P] in out_dtype (default float32; pass the patch_embed weight's dtype to
                       feed the GEMM without a float32 copy), N = sum over items of t * h * w;
              grid_thw [items, 3] int64 on the frames' device: (ceil(T / Tp), H / P, W / P) per item.
    """
    require_native()
    items = _frame_list(frames)
    if not items:
        # With no tensor the dispatcher cannot pick a device, so the C++ op (and its check) is never reached.
        raise ValueError("vlfuse.patchify: frames must hold at least one [T, C, H, W] tensor, got an empty list")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    patches = torch.ops.vlfuse.patchify(
        items, patch_size, temporal_patch_size, merge_size, [float(m) for m in mean], [float(s) for s in std], out_dtype
    )
    grid_thw = torch.tensor(
        [
            [-(-f.shape[0] // temporal_patch_size), f.shape[2] // patch_size, f.shape[3] // patch_size]
            for f in items
        ],
        dtype=torch.int64,
        device=items[0].device,
    )
    return patches, grid_thw


def embed_frames(
    frames: Tensor | Sequence[Tensor], weight: Tensor, bias: Tensor | None = None, **patchify_kwargs
) -> tuple[Tensor, Tensor]:
    """Raw frames to patch embeddings: patchify straight into weight's dtype, then the patch_embed GEMM.

    frames: as for patchify; weight [E, C, Tp, P, P]; bias [E] or None; patchify_kwargs: patch_size,
    temporal_patch_size (default: taken from weight's shape when it is 5-D), merge_size, mean, std.
    returns embeddings [N, E] in weight's dtype and grid_thw [items, 3] int64.
    """
    if weight.dim() == 5:
        patchify_kwargs.setdefault("temporal_patch_size", weight.shape[2])
        patchify_kwargs.setdefault("patch_size", weight.shape[3])
    patches, grid_thw = patchify(frames, out_dtype=weight.dtype, **patchify_kwargs)
    return patch_embed(patches, weight, bias), grid_thw


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The (height, width) that HF's Qwen2-VL processors resize to: both multiples of factor, the pixel count
    within [min_pixels, max_pixels], the aspect ratio kept as closely as possible."""
    if min(height, width) <= 0:
        raise ValueError(f"vlfuse.smart_resize: height and width must be positive, got {height} x {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"vlfuse.smart_resize: absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---- fake (meta) kernels: shapes only ------------------------------------------------------------------------


@torch.library.register_fake("vlfuse::patchify")
def _(frames, patch_size, temporal_patch_size, merge_size, mean, std, out_dtype):
    rows = 0
    for f in frames:
        rows += ((f.shape[0] + temporal_patch_size - 1) // temporal_patch_size) * (f.shape[2] // patch_size) * (
            f.shape[3] // patch_size
        )
    channels = frames[0].shape[1]
    return frames[0].new_empty((rows, channels * temporal_patch_size * patch_size * patch_size), dtype=out_dtype)


@torch.library.register_fake("vlfuse::patch_embed")
def _(patches, weight, bias):
    return patches.new_empty((patches.shape[0], weight.shape[0]), dtype=weight.dtype)


# ---- autograd --------------------------------------------------------------------------------------------------


def _patch_embed_setup(ctx, inputs, output):
    patches, weight, bias = inputs
    ctx.patches_dtype = patches.dtype
    ctx.weight_shape = weight.shape
    ctx.has_bias = bias is not None
    ctx.save_for_backward(patches, weight)


def _patch_embed_backward(ctx, grad_out):
    # Both gradients are GEMMs of patch_embed's own form (rows @ flat_weight.t()), so they go through the op and
    # take its device/dtype GEMM choice: grad_patches = grad_out @ W = patch_embed(grad_out, W.t()) and
    # grad_weight = grad_out.t() @ patches = patch_embed(grad_out.t(), patches.t()), in the weight's dtype.
    patches, weight = ctx.saved_tensors
    flat = weight.reshape(weight.shape[0], -1)
    grad_patches = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_patches = call_op(torch.ops.vlfuse.patch_embed.default, grad_out, flat.t(), None).to(ctx.patches_dtype)
    if ctx.needs_input_grad[1]:
        rows = patches.to(weight.dtype).t()
        grad_weight = call_op(torch.ops.vlfuse.patch_embed.default, grad_out.t(), rows, None).reshape(ctx.weight_shape)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(0)
    return grad_patches, grad_weight, grad_bias


register_autograd(torch.ops.vlfuse.patch_embed.default, _patch_embed_backward, _patch_embed_setup)


# ---- autocast ----------------------------------------------------------------------------------------------------
# Like nn.Linear under autocast: the GEMM runs in the autocast dtype and the casts sit above autograd, so the
# gradient reaches a float32 weight as float32. Without this rule the ATen GEMM inside the kernel would autocast on
# its own while autograd saw the float32 weight, and backward would mix dtypes.
_autocast_lib = torch.library.Library("vlfuse", "IMPL")


def _patch_embed_autocast(device_type: str):
    def kernel(patches: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            args = (patches.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
            return call_op(torch.ops.vlfuse.patch_embed.default, *args)

    return kernel


for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _autocast_lib.impl("patch_embed", _patch_embed_autocast(_device), _key)
