"""Attention within packed segments on the CPU (csrc/attention): each token of a packed [heads, tokens, head_dim]
q/k/v attends to the tokens of its own segment (image, frame or window), flash-attention style (no [L, L] score
matrix is stored). bfloat16 on an AVX512_BF16 CPU multiplies in bfloat16 pairs (vdpbf16ps) with float32 sums;
other types and ISAs in float32 FMA. The backward is ATen's CPU flash-attention backward, run by run, from the
saved output and log-sum-exp. On CUDA it is torch's SDPA (flash attention) run by run: no vlfuse kernel.

Argument checks live in the C++ op (csrc/attention/attention.cpp); the fake kernels below repeat them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._native import call_op, register_autograd
from ._checks import (
    check_dim,
    check_float_tensor,
    check_same_device,
    check_type,
    check_value,
    dtype_name,
    number,
    shape,
)

__all__ = ["segment_attention", "sdpa_segment_attention"]

Groups = tuple[tuple[int, int, int], ...]


def segment_attention(q: Tensor, k: Tensor, v: Tensor, groups: Groups, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v within each segment.

    q, k, v: [heads, tokens, head_dim] (unit stride over head_dim; other strides as they come), one float dtype
    groups:  ((first token, segment count, segment length), ...): runs of equal-length segments tiling [0, tokens)
             (``vlfuse.nn.SegmentLayout.groups``)
    scale:   default 1 / sqrt(head_dim)
    returns  [tokens, heads * head_dim] in q's dtype. Differentiable w.r.t. q, k and v.

    CPU tensors run the vlfuse kernel; CUDA tensors (and float64, the gradcheck type) torch's SDPA run by run.
    """
    if q.device.type != "cpu" or q.dtype == torch.float64:
        return sdpa_segment_attention(q, k, v, groups, scale)
    flat = [x for run in groups for x in run]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return call_op(torch.ops.vlfuse.segment_attention.default, q, k, v, flat, scale)[0]


def sdpa_segment_attention(q: Tensor, k: Tensor, v: Tensor, groups: Groups, scale: float | None = None) -> Tensor:
    """``segment_attention`` through ``torch.nn.functional.scaled_dot_product_attention``: one call per run of
    equal-length segments, over a [count, heads, length, head_dim] view (no [tokens, tokens] mask, no gather)."""
    H, S, D = q.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if len(groups) == 1:
        start, count, length = groups[0]
        out = sdpa(*(t.view(H, count, length, D).transpose(0, 1) for t in (q, k, v)), scale=scale)
        return out.transpose(1, 2).reshape(S, H * D)
    if groups and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # autograd of writes into one buffer would clone the whole output gradient once per run, and of slices of
        # q, k, v would fill a zero [H, S, D] gradient per run and add them up; split and cat take one pass each
        sizes = [count * length for _, count, length in groups]
        outs = [
            sdpa(*(t.view(H, count, length, D).transpose(0, 1) for t in run), scale=scale)
            .transpose(1, 2)
            .reshape(count * length, H * D)
            for (_, count, length), *run in zip(groups, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))
        ]
        return torch.cat(outs)
    # each run's [count, H, length, D] result is copied once, straight to its rows (no second pass to concatenate)
    result = q.new_empty(S, H * D)
    for start, count, length in groups:
        end = start + count * length
        qs, ks, vs = (t[:, start:end].view(H, count, length, D).transpose(0, 1) for t in (q, k, v))
        result[start:end].view(count, length, H, D).copy_(sdpa(qs, ks, vs, scale=scale).transpose(1, 2))
    return result


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    check_float_tensor(q, op, "q")
    check_dim(q, 3, op, "q", "[heads, tokens, head_dim]")
    check_value(q.shape[0] > 0 and q.shape[2] > 0, op,
                f"q must have at least one head and one channel, got {shape(q)}")
    for t, name in ((k, "k"), (v, "v")):
        check_same_device(t, name, q, "q", op)
        check_type(t.dtype == q.dtype, op, f"{name} has dtype {dtype_name(t.dtype)} but q has {dtype_name(q.dtype)}")
        check_value(t.shape == q.shape, op, f"{name} must have q's shape {shape(q)}, got {shape(t)}")
    check_value(q.device.type == "cpu", op, f"q is on {q.device}: this op runs on CPU (on CUDA, "
                "torch.nn.functional.scaled_dot_product_attention is flash attention)")


def _check_groups(op: str, groups, tokens) -> None:
    check_value(len(groups) % 3 == 0, op, "groups must be (first token, segment count, segment length) triples, "
                f"got {len(groups)} values")
    covered = 0
    for i in range(0, len(groups), 3):
        start, count, length = groups[i : i + 3]
        message = (f"groups[{i // 3}] = ({start}, {count}, {length}) must start where the previous run ends (token "
                   f"{covered}) with count >= 0 and length >= 1")
        for cond in (start == covered, count >= 0, length >= 1):
            check_value(cond, op, message)
        covered = covered + count * length
    check_value(covered == tokens, op, f"groups cover {covered} tokens but q has {tokens}")


@torch.library.register_fake("vlfuse::segment_attention")
def _(q, k, v, groups, scale):
    op = "segment_attention"
    _check_qkv(op, q, k, v)
    check_value(math.isfinite(scale), op, f"scale must be finite, got {number(scale)}")
    H, S, D = q.shape
    _check_groups(op, groups, S)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(S, H * D), q.new_empty(H, S, dtype=lse_dtype)


@torch.library.register_fake("vlfuse::segment_attention_backward")
def _(grad_out, q, k, v, out, logsumexp, groups, scale):
    op = "segment_attention_backward"
    _check_qkv(op, q, k, v)
    _check_groups(op, groups, q.shape[1])
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# ---- autograd --------------------------------------------------------------------------------------------------


def _setup(ctx, inputs, output):
    q, k, v, groups, scale = inputs
    out, lse = output
    ctx.groups = groups
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return None, None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    grads = call_op(torch.ops.vlfuse.segment_attention_backward.default, grad_out, q, k, v, out, lse, ctx.groups,
                    ctx.scale)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None)


register_autograd(torch.ops.vlfuse.segment_attention.default, _backward, _setup)
