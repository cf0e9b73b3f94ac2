"""Learned position table resampling: Qwen3-VL's square table of learned position embeddings (``pos_embed``,
side x side entries) bilinearly resampled (align_corners=True) to every item's patch grid, in one op, where HF
transformers gathers four table rows per patch with indices and weights from
``get_vision_interpolation_indices_and_weights`` and sums them.

The taps and weights are HF's float32 arithmetic step by step; rows are summed in float32 (float64 for a float64
table) and rounded to the table's dtype once. Argument checks live in the C++ ops (csrc/pos_embed/pos_embed.cpp);
the fake kernels below repeat those a fake tensor can show (all but grid_thw's values), so torch.compile reports a
bad call as eager does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._native import call_op, register_autograd
from ._checks import check, check_dim, check_float_tensor, check_same_device, check_type, check_value, dtype_name, shape

__all__ = ["interp_pos_embed"]


def interp_pos_embed(
    table: Tensor,
    grid_thw: Tensor,
    merge_size: int = 2,
    bias: Tensor | None = None,
    tokens: int | None = None,
) -> Tensor:
    """The position table resampled to each item's patch grid, one row per token: HF's
    ``(pos_embed(idx) * weights[:, :, None]).sum(1)`` of Qwen3-VL's vision tower (and Qwen3.5, Qwen3-Omni).

    table:    [side * side, C]  the learned positions (``pos_embed.weight``), any float dtype and strides
    grid_thw: [items, 3] int    (t, h, w) per image or video, in patches; h and w multiples of merge_size. On the
                                host it is checked value by value; on the table's GPU it is read only there (no
                                host sync; a bad grid raises a device-side assertion) and tokens must be given.
    bias:     [C] or None       added to every row, in table's dtype: with the patch-embedding bias here, the patch
                                embedding plus its bias plus the positions is one GEMM,
                                ``torch.addmm(interp_pos_embed(table, grid, m, bias), patches, weight_flat.t())``
    tokens:   sum of t * h * w  the output's rows; optional with a host grid_thw (then checked against it),
                                required with a GPU grid_thw, and what gives torch.compile a static output size.
    returns:  [tokens, C] in table's dtype. Row n is token n's patch (r, c) of a frame h x w, sampled at
              (r * (side - 1) / max(h - 1, 1), c * (side - 1) / max(w - 1, 1)) of the table seen as [side, side];
              tokens run over items, frames (each frame the same rows), then merge order: m x m blocks
              row-major, each block's patches row-major. Differentiable w.r.t. table and bias.
    """
    return call_op(torch.ops.vlfuse.interp_pos_embed.default, table, grid_thw, merge_size, bias, tokens)


# ---- fake (meta) kernels: the C++ checks (csrc/pos_embed/pos_embed.cpp), in its order, and the output shapes ---


def _table_side(op: str, table: Tensor) -> int:
    rows = int(table.shape[0])
    side = math.isqrt(rows)
    check_value(
        rows > 0 and side * side == rows,
        op,
        f"table must have side * side rows (a square grid of learned positions), got {rows} rows",
    )
    return side


def _check_grid(op: str, grid_thw: Tensor, like: Tensor, like_name: str, tokens) -> None:
    """set_grid's checks but those of grid_thw's values, which only the C++ op can read."""
    check(
        grid_thw.device == like.device or grid_thw.device.type == "cpu",
        op,
        f"grid_thw is on {grid_thw.device} but {like_name} is on {like.device}; grid_thw must be on {like_name}'s "
        "device or on the CPU",
    )
    check_type(
        grid_thw.dtype in (torch.int64, torch.int32), op, "grid_thw must be int64 or int32, got ",
        dtype_name(grid_thw.dtype),
    )  # fmt: skip
    check_value(
        grid_thw.dim() == 2 and grid_thw.shape[1] == 3,
        op,
        "grid_thw must be [items, 3] (t, h, w per image or video), got shape ",
        shape(grid_thw),
    )
    check_value(tokens is None or tokens >= 0, op, "tokens must be >= 0, got ", tokens)
    if grid_thw.device.type != "cpu":
        check_value(
            tokens is not None,
            op,
            f"grid_thw is on {grid_thw.device}: pass tokens (its sum of t * h * w) so that the output size is known "
            "without reading grid_thw on the host",
        )


def _check_merge_size(op: str, merge_size: int) -> None:
    check_value(merge_size >= 1, op, "merge_size must be >= 1, got ", merge_size)


@torch.library.register_fake("vlfuse::interp_pos_embed")
def _(table, grid_thw, merge_size, bias=None, tokens=None):
    op = "interp_pos_embed"
    check_float_tensor(table, op, "table")
    check_dim(table, 2, op, "table", "[side * side, channels]")
    check_value(table.shape[1] > 0, op, "table must have at least one channel, got shape ", shape(table))
    _table_side(op, table)
    _check_merge_size(op, merge_size)
    C = table.shape[1]
    if bias is not None:
        check_same_device(bias, "bias", table, "table", op)
        check_type(
            bias.dtype == table.dtype, op, f"bias has dtype {dtype_name(bias.dtype)} but table has ",
            dtype_name(table.dtype),
        )  # fmt: skip
        check_value(bias.dim() == 1 and bias.shape[0] == C, op, f"bias must be [channels] = [{C}], got shape ",
                    shape(bias))  # fmt: skip
    _check_grid(op, grid_thw, table, "table", tokens)
    # Without tokens the row count is grid_thw's values, which a fake tensor does not have: a data-dependent size.
    rows = tokens if tokens is not None else torch.library.get_ctx().new_dynamic_size()
    return table.new_empty((rows, C))


@torch.library.register_fake("vlfuse::interp_pos_embed_backward")
def _(grad_out, grid_thw, side, merge_size):
    op = "interp_pos_embed_backward"
    check_float_tensor(grad_out, op, "grad_out")
    check_dim(grad_out, 2, op, "grad_out", "[tokens, channels]")
    check_value(side >= 1, op, "side must be >= 1, got ", side)
    _check_merge_size(op, merge_size)
    _check_grid(op, grid_thw, grad_out, "grad_out", grad_out.shape[0])
    return grad_out.new_empty((side * side, grad_out.shape[1]))


# ---- autograd --------------------------------------------------------------------------------------------------


def _interp_pos_embed_setup(ctx, inputs, output):
    table, grid_thw, merge_size, bias, tokens = inputs
    ctx.config = (math.isqrt(int(table.shape[0])), merge_size)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(grid_thw)


def _interp_pos_embed_backward(ctx, grad_out):
    (grid_thw,) = ctx.saved_tensors
    side, merge_size = ctx.config
    grad_table = grad_bias = None
    if ctx.needs_input_grad[0]:
        op = torch.ops.vlfuse.interp_pos_embed_backward.default
        grad_table = call_op(op, grad_out, grid_thw, side, merge_size)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.sum(0)
    return grad_table, None, None, grad_bias, None


register_autograd(torch.ops.vlfuse.interp_pos_embed.default, _interp_pos_embed_backward, _interp_pos_embed_setup)
