"""Temporal patchify ops: Qwen2-VL's depth-2 Conv3d patch embedding as one GEMM, the packing of raw frames into
its patch rows, and the two fused.

A patch is a [C, Tp, P, P] block flattened (channel, frame, row, column), as HF's Qwen2-VL processors emit it and
its Conv3d weight [E, C, Tp, P, P] expects. Patches of one item with grid (t, h, w) run over temporal pairs,
h-blocks, w-blocks, then the merge_size x merge_size window row-major (the order of the rotary positions), so the
later 2 x 2 merge is contiguous. Argument checks live in the C++ ops (csrc/patchify/patchify.cpp); the fake
kernels below repeat them (same conditions and messages), so torch.compile reports a bad call as eager does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._native import call_op, register_autograd, require_native
from ._checks import (
    FLOAT_DTYPES,
    check,
    check_dim,
    check_float_tensor,
    check_same_device,
    check_type,
    check_value,
    dtype_name,
    numbers,
    shape,
)

__all__ = ["patch_embed", "patchify", "embed_frames", "smart_resize", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP normalization, Qwen2-VL's processor defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patch_embed(patches: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Conv3d patch embedding with kernel = stride, as one GEMM: equal to HF's Qwen2-VL ``PatchEmbed.forward``.

    patches: [N, C * Tp * P * P] (any float dtype and strides; cast to weight's dtype)
    weight:  [E, C, Tp, P, P]    (the Conv3d weight, or already flattened [E, C * Tp * P * P])
    bias:    [E], or one row per patch [N, E] (the GEMM's added term: Qwen3-VL's conv bias plus its resampled
             position table, see interp_pos_embed), or None; weight's dtype
    returns  [N, E] in weight's dtype. Differentiable w.r.t. patches, weight and bias.

    On the CPU, with the 5-D weight, rows whose Tp frames are bitwise equal (an image, which HF's processors repeat
    to Tp frames, or an odd video's repeated last frame) take a GEMM over the weight's taps summed over Tp: half the
    work at Tp = 2, for runs of at least 32 such rows. The summed taps are rounded once to the weight's dtype, so in
    bf16/fp16 those rows carry one more weight rounding than HF's Conv3d (float32: within 1e-5 of it). CUDA runs
    the whole GEMM: choosing the rows would need a device-to-host read.
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


# ---- fake (meta) kernels: the C++ checks (csrc/patchify/patchify.cpp), in its order, and the output shapes ------

_MAX_CHANNELS = 4  # patchify::kMaxChannels


def _check_extent(op, item, what, extent, factor) -> None:
    nearest = max(factor, (extent + factor // 2) // factor * factor)
    check_value(
        extent > 0 and extent % factor == 0,
        op,
        f"frames[{item}] {what} {extent} is not a positive multiple of patch_size * merge_size = {factor}; the "
        f"nearest valid {what} is {nearest} (resize first, e.g. to vlfuse.ops.smart_resize(height, width, "
        f"factor={factor}))",
    )


@torch.library.register_fake("vlfuse::patchify")
def _(frames, patch_size, temporal_patch_size, merge_size, mean, std, out_dtype):
    op = "patchify"
    check_value(len(frames) > 0, op, "frames must hold at least one [T, C, H, W] tensor, got an empty list")
    check_value(patch_size > 0, op, "patch_size must be positive, got ", patch_size)
    check_value(temporal_patch_size > 0, op, "temporal_patch_size must be positive, got ", temporal_patch_size)
    check_value(merge_size > 0, op, "merge_size must be positive, got ", merge_size)
    check_type(
        out_dtype in FLOAT_DTYPES, op, "out_dtype must be float32, float64, float16 or bfloat16, got ",
        dtype_name(out_dtype),
    )
    first = frames[0]
    factor = patch_size * merge_size
    for i, f in enumerate(frames):
        check_type(
            f.dtype == torch.uint8 or f.dtype in FLOAT_DTYPES,
            op,
            f"frames[{i}] must be uint8 or float32/float64/float16/bfloat16, got ",
            dtype_name(f.dtype),
        )
        check_value(f.dim() == 4, op, f"frames[{i}] must be 4-D [T, C, H, W] (an image is T = 1), got shape ", shape(f))
        check(
            f.device == first.device,
            op,
            f"frames[{i}] is on {f.device} but frames[0] is on {first.device}; all frames must be on the same device",
        )
        check_type(
            f.dtype == first.dtype,
            op,
            f"frames[{i}] has dtype {dtype_name(f.dtype)} but frames[0] has {dtype_name(first.dtype)}; all frames "
            "must share one dtype",
        )
        check_value(
            f.shape[1] == first.shape[1],
            op,
            f"frames[{i}] has {f.shape[1]} channels but frames[0] has {first.shape[1]}",
        )
        check_value(f.shape[0] > 0, op, f"frames[{i}] must have at least one frame, got shape ", shape(f))
        _check_extent(op, i, "height", f.shape[2], factor)
        _check_extent(op, i, "width", f.shape[3], factor)
    channels = first.shape[1]
    check_value(1 <= channels <= _MAX_CHANNELS, op, f"frames must have 1 to {_MAX_CHANNELS} channels, got ", channels)
    check_value(len(mean) == channels, op, f"mean must have one value per channel ({channels}), got ", len(mean))
    check_value(len(std) == channels, op, f"std must have one value per channel ({channels}), got ", len(std))
    check_value(
        all(s != 0.0 and math.isfinite(s) and math.isfinite(m) for m, s in zip(mean, std)),
        op,
        f"mean and std must be finite and std non-zero, got mean {numbers(mean)} and std {numbers(std)}",
    )
    rows = 0
    for f in frames:
        rows += ((f.shape[0] + temporal_patch_size - 1) // temporal_patch_size) * (f.shape[2] // patch_size) * (
            f.shape[3] // patch_size
        )
    return first.new_empty((rows, channels * temporal_patch_size * patch_size * patch_size), dtype=out_dtype)


@torch.library.register_fake("vlfuse::patch_embed")
def _(patches, weight, bias):
    op = "patch_embed"
    check_float_tensor(patches, op, "patches")
    check_dim(patches, 2, op, "patches", "[N, C * Tp * P * P]")
    check_float_tensor(weight, op, "weight")
    check_value(
        weight.dim() >= 2,
        op,
        "weight must be the Conv3d weight [E, C, Tp, P, P] (or [E, K]), got shape ",
        shape(weight),
    )
    check_same_device(weight, "weight", patches, "patches", op)
    embed = weight.shape[0]
    k = 0 if embed == 0 else weight.numel() // embed
    check_value(
        k == patches.shape[1],
        op,
        f"patches has {patches.shape[1]} values per patch but weight {shape(weight)} takes C * Tp * P * P = {k}",
    )
    if bias is not None:
        check_same_device(bias, "bias", patches, "patches", op)
        check_type(
            bias.dtype == weight.dtype, op, f"bias has dtype {dtype_name(bias.dtype)} but weight has ",
            dtype_name(weight.dtype),
        )
        rows = patches.shape[0]
        check_value(
            (bias.dim() == 1 and bias.shape[0] == embed)
            or (bias.dim() == 2 and bias.shape[0] == rows and bias.shape[1] == embed),
            op,
            f"bias must be [E] = [{embed}] or one row per patch [N, E] = [{rows}, {embed}], got shape ",
            shape(bias),
        )
    return patches.new_empty((patches.shape[0], embed), dtype=weight.dtype)


# ---- autograd --------------------------------------------------------------------------------------------------


def _patch_embed_setup(ctx, inputs, output):
    patches, weight, bias = inputs
    ctx.patches_dtype = patches.dtype
    ctx.weight_shape = weight.shape
    ctx.bias_dim = None if bias is None else bias.dim()
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
    if ctx.bias_dim is not None and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(0) if ctx.bias_dim == 1 else grad_out
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
