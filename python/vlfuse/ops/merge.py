"""Norm + m x m token merge: the LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL) of every vision token fused with
the gather of each m x m window of tokens into one row, the input of the patch merger's MLP.

Statistics are computed in float32 (float64 for float64 inputs) whatever the input dtype; the normalized
value is rounded to the input dtype once. Argument checks live in the C++ ops (csrc/merge/merge.cpp); the fake
kernels below repeat those a fake tensor can show (all but grid_thw's values), so torch.compile reports a bad call
as eager does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._native import call_op, register_autograd
from ._checks import (
    check,
    check_choice,
    check_dim,
    check_float_tensor,
    check_same_device,
    check_type,
    check_value,
    dtype_name,
    number,
    shape,
)

__all__ = ["merge2x2"]


def merge2x2(
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
    """Normalizes every token and concatenates each merge_size x merge_size window into one row (or, with
    postshuffle_norm, concatenates each window and normalizes the merged row).

    x:        [S, C]          tokens of all items, concatenated (unit stride on C is fastest; any strides work)
    grid_thw: [items, 3] int  (t, h, w) per image or video, in patches; h and w multiples of merge_size, and
                              sum(t * h * w) == S. On the host it is checked value by value; on the GPU it is
                              read there (no host sync) and a bad grid raises a device-side assertion.
                              May be None for order="merge", which does not need it.
    weight:   [C]             norm scale; bias: [C] or None (LayerNorm only); both [m^2 * C] with postshuffle_norm
    norm:     "layernorm"  y = (x - mean) / sqrt(var + eps) * weight + bias
              "rmsnorm"    y = x / sqrt(mean(x^2) + eps) * weight
    order:    "merge"   tokens already in Qwen2-VL patch order: row r holds tokens r*m^2 .. r*m^2 + m^2 - 1
                        (HF's ``ln_q(x).view(-1, m * m * C)``)
              "raster"  each frame row-major over (h, w): rows run over items, frames, h-blocks, w-blocks and
                        row (hb, wb) holds tokens (hb*m + a, wb*m + b) for a, b in [0, m), a major
    postshuffle_norm: the norm's statistics over each merged row's m^2 * C values instead of each token's C
                      (Qwen3-VL's deepstack mergers, use_postshuffle_norm=True: ``norm(x.view(-1, m * m * C))``)
    returns:  [S / m^2, m^2 * C] in x's dtype. Differentiable w.r.t. x, weight and bias.
    """
    return call_op(
        torch.ops.vlfuse.merge2x2.default, x, grid_thw, weight, bias, eps, norm, order, merge_size, postshuffle_norm
    )[0]


# ---- fake (meta) kernels: the C++ checks (csrc/merge/merge.cpp), in its order, and the output shapes -----------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(op, x, merge_size) -> None:
    check_float_tensor(x, op, "x")
    check_dim(x, 2, op, "x", "[tokens, channels]")
    check_value(x.shape[1] > 0, op, "x must have at least one channel, got shape ", shape(x))
    check_value(merge_size >= 1, op, "merge_size must be >= 1, got ", merge_size)
    mm = merge_size * merge_size
    check_value(
        x.shape[0] % mm == 0, op, f"x has {x.shape[0]} tokens, which is not a multiple of merge_size^2 = ", mm
    )


def _check_param(op, t, name, x, merge_size, postshuffle_norm) -> None:
    check_same_device(t, name, x, "x", op)
    check_float_tensor(t, op, name)
    want = merge_size * merge_size * x.shape[1] if postshuffle_norm else x.shape[1]
    what = "merge_size^2 * channels" if postshuffle_norm else "channels"
    check_value(t.dim() == 1 and t.shape[0] == want, op, f"{name} must be [{what}] = [{want}], got shape ", shape(t))


def _check_grid(op, grid_thw, x, order) -> None:
    """set_grid's checks but those of grid_thw's values, which only the C++ op can read."""
    if grid_thw is None:
        check_value(order == "merge", op, 'grid_thw is required for order="raster", got None')
        return
    check(
        grid_thw.device == x.device or grid_thw.device.type == "cpu",
        op,
        f"grid_thw is on {grid_thw.device} but x is on {x.device}; grid_thw must be on x's device or on the CPU",
    )
    check_type(
        grid_thw.dtype in (torch.int64, torch.int32), op, "grid_thw must be int64 or int32, got ",
        dtype_name(grid_thw.dtype),
    )
    check_value(
        grid_thw.dim() == 2 and grid_thw.shape[1] == 3,
        op,
        "grid_thw must be [items, 3] (t, h, w per image or video), got shape ",
        shape(grid_thw),
    )


def _check_norm_and_order(op, norm, order) -> None:
    check_choice(op, "norm", norm, ("layernorm", "rmsnorm"))
    check_choice(op, "order", order, ("merge", "raster"))


@torch.library.register_fake("vlfuse::merge2x2")
def _(x, grid_thw, weight, bias, eps, norm, order, merge_size, postshuffle_norm=False):
    op = "merge2x2"
    _check_norm_and_order(op, norm, order)
    _check_x(op, x, merge_size)
    check_value(math.isfinite(eps) and eps >= 0, op, "eps must be finite and >= 0, got ", number(eps))
    check_value(
        not (norm == "rmsnorm" and bias is not None), op, 'bias must be None for norm="rmsnorm" (RMSNorm has no bias)'
    )
    _check_param(op, weight, "weight", x, merge_size, postshuffle_norm)
    if bias is not None:
        _check_param(op, bias, "bias", x, merge_size, postshuffle_norm)
    _check_grid(op, grid_thw, x, order)
    S, C = x.shape
    mm = merge_size * merge_size
    acc = _acc_dtype(x.dtype)
    stats_rows = S // mm if postshuffle_norm else S  # one mean and rstd per normalized row
    mean = x.new_empty((stats_rows if norm == "layernorm" else 0,), dtype=acc)
    return x.new_empty((S // mm, mm * C)), mean, x.new_empty((stats_rows,), dtype=acc)


@torch.library.register_fake("vlfuse::merge2x2_backward")
def _(grad_out, x, grid_thw, weight, mean, rstd, norm, order, merge_size, output_mask, postshuffle_norm=False):
    op = "merge2x2_backward"
    _check_norm_and_order(op, norm, order)
    _check_x(op, x, merge_size)
    S, C = x.shape
    mm = merge_size * merge_size
    check_same_device(grad_out, "grad_out", x, "x", op)
    check_type(
        grad_out.dtype == x.dtype, op, "grad_out has dtype ", dtype_name(grad_out.dtype), " but x has ",
        dtype_name(x.dtype),
    )
    check_value(
        grad_out.dim() == 2 and grad_out.shape[0] == S // mm and grad_out.shape[1] == mm * C,
        op,
        f"grad_out must be [tokens / merge_size^2, merge_size^2 * channels] = [{S // mm}, {mm * C}], got shape ",
        shape(grad_out),
    )
    acc = _acc_dtype(x.dtype)
    for stat, name in ((mean, "mean"), (rstd, "rstd")):
        want = 0 if name == "mean" and norm == "rmsnorm" else (S // mm if postshuffle_norm else S)
        check_same_device(stat, name, x, "x", op)
        check_value(
            stat.dtype == acc and stat.dim() == 1 and stat.shape[0] == want,
            op,
            f"{name} must be [{want}] {dtype_name(acc)} (as returned by merge2x2), got {dtype_name(stat.dtype)} "
            "of shape ",
            shape(stat),
        )
    _check_param(op, weight, "weight", x, merge_size, postshuffle_norm)
    _check_grid(op, grid_thw, x, order)
    # Gradients that output_mask does not ask for come back as empty [0] tensors.
    P = weight.shape[0]
    grad_x = x.new_empty((S, C) if output_mask[0] else (0,))
    grad_w = weight.new_empty((P,) if output_mask[1] else (0,))
    grad_b = weight.new_empty((P,) if output_mask[2] else (0,))
    return grad_x, grad_w, grad_b


# ---- autograd --------------------------------------------------------------------------------------------------


def _merge2x2_setup(ctx, inputs, output):
    x, grid_thw, weight, bias, eps, norm, order, merge_size, *rest = inputs
    _, mean, rstd = output
    ctx.config = (norm, order, merge_size, bool(rest[0]) if rest else False)
    ctx.has_bias = bias is not None
    # The statistics are outputs only for the backward to reuse: marked so, and with gradients left None rather
    # than materialized, autograd neither tracks them nor builds two zero tensors for them in every backward.
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, grid_thw, weight, mean, rstd)


def _merge2x2_backward(ctx, grad_out, grad_mean, grad_rstd):
    x, grid_thw, weight, mean, rstd = ctx.saved_tensors
    norm, order, merge_size, postshuffle_norm = ctx.config
    n_inputs = len(ctx.needs_input_grad)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
    if grad_out is None or not any(mask):
        return (None,) * n_inputs
    op = torch.ops.vlfuse.merge2x2_backward.default
    grad_x, grad_w, grad_b = call_op(
        op, grad_out, x, grid_thw, weight, mean, rstd, norm, order, merge_size, mask, postshuffle_norm
    )
    grads = (grad_x if mask[0] else None, None, grad_w if mask[1] else None, grad_b if mask[2] else None)
    return grads + (None,) * (n_inputs - len(grads))


register_autograd(torch.ops.vlfuse.merge2x2.default, _merge2x2_backward, _merge2x2_setup)
