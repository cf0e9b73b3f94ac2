"""A Linear and its activation as one op: the GEMM, then one pass that adds the bias and applies the activation
(csrc/linear_act; a GEMM that writes bf16/fp16 takes the bias itself, as nn.Linear's addmm, so each output is
rounded once). The vision MLP's first Linear (fc1 + quick-GELU / tanh-GELU, Qwen2.5-VL's gate_proj + SiLU) and the
attention's qkv projection (act="none": the bias alone) go through it.

Argument checks live in the C++ op (csrc/linear_act/linear_act.cpp); the fake kernels below repeat them (same
conditions and messages), so torch.compile reports a bad call as eager does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._native import call_op, register_autograd
from ._checks import check_dim, check_float_tensor, check_same_device, check_type, check_value, dtype_name, shape

__all__ = ["linear_act", "cpu_gemm_is_native", "ACTIVATIONS", "HF_ACTIVATIONS"]

# The activations the op takes, and the names HF's configs give them (hidden_act).
ACTIVATIONS = ("none", "quick_gelu", "gelu", "gelu_tanh", "silu")
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
}

# Whether ATen's CPU GEMM has a fast (oneDNN) kernel for a reduced type on this CPU (bf16 needs AVX-512, fp16
# AVX512-FP16 or AMX-FP16); without one it runs a scalar fallback. Asked once, as the C++ front asks.
_NATIVE_CPU_GEMM = {
    torch.bfloat16: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    torch.float16: bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
}


def cpu_gemm_is_native(dtype: torch.dtype) -> bool:
    """Whether a CPU GEMM in dtype is fast here (float32 and float64 always are)."""
    return _NATIVE_CPU_GEMM.get(dtype, True)


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none") -> Tensor:
    """act(x @ weight^T + bias), equal to ``ACT2FN[hidden_act](nn.Linear(...)(x))`` in HF.

    x:      [..., in_features] (any strides)
    weight: [out_features, in_features], x's dtype
    bias:   [out_features] or None, x's dtype
    act:    "none", "quick_gelu" (x * sigmoid(1.702 x)), "gelu" (erf), "gelu_tanh" or "silu"
    returns [..., out_features] in x's dtype. Differentiable w.r.t. x, weight and bias.

    bfloat16/float16 on a CPU without a native GEMM for them run the GEMM in float32 and round once at the end.
    """
    needs_grad = act != "none" and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out, _ = call_op(torch.ops.vlfuse.linear_act.default, x, weight, bias, act, needs_grad)
    return out


def _check_act(op: str, act: str) -> None:
    names = ", ".join(f"'{a}'" for a in ACTIVATIONS)
    check_value(act in ACTIVATIONS, op, f"act must be one of {names}, got '{act}'")


@torch.library.register_fake("vlfuse::linear_act")
def _(x, weight, bias, act, keep_preact):
    op = "linear_act"
    _check_act(op, act)
    check_float_tensor(x, op, "x")
    check_value(x.dim() >= 1, op, "x must be [..., in_features], got a 0-D tensor")
    check_float_tensor(weight, op, "weight")
    check_dim(weight, 2, op, "weight", "[out_features, in_features]")
    check_same_device(weight, "weight", x, "x", op)
    check_type(
        weight.dtype == x.dtype, op, f"weight has dtype {dtype_name(weight.dtype)} but x has {dtype_name(x.dtype)}",
        "; a Linear takes both in one dtype",
    )
    k, n = x.shape[-1], weight.shape[0]
    check_value(
        weight.shape[1] == k, op, f"weight {shape(weight)} takes in_features = {weight.shape[1]} but x has {k} ",
        f"values per row (shape {shape(x)})",
    )
    if bias is not None:
        check_same_device(bias, "bias", x, "x", op)
        check_type(bias.dtype == x.dtype, op, f"bias has dtype {dtype_name(bias.dtype)} but x has {dtype_name(x.dtype)}")
        check_value(
            bias.dim() == 1 and bias.shape[0] == n, op, f"bias must be [out_features] = [{n}], got shape {shape(bias)}"
        )
    out_shape = (*x.shape[:-1], n)
    keep = keep_preact and act != "none"
    return x.new_empty(out_shape), x.new_empty(out_shape if keep else (0,))


@torch.library.register_fake("vlfuse::linear_act_backward")
def _(grad_out, preact, act):
    op = "linear_act_backward"
    _check_act(op, act)
    check_float_tensor(grad_out, op, "grad_out")
    check_same_device(preact, "preact", grad_out, "grad_out", op)
    check_type(
        preact.dtype == grad_out.dtype, op,
        f"preact has dtype {dtype_name(preact.dtype)} but grad_out has {dtype_name(grad_out.dtype)}",
    )
    check_value(
        preact.shape == grad_out.shape, op,
        f"preact {shape(preact)} must have grad_out's shape {shape(grad_out)} (as linear_act returned it)",
    )
    check_value(grad_out.dim() >= 1, op, "grad_out must be [..., out_features], got a 0-D tensor")
    return torch.empty_like(grad_out, memory_format=torch.contiguous_format)


# ---- autograd --------------------------------------------------------------------------------------------------


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, act, _ = inputs
    ctx.act = act
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output[1])
    # the kept pre-activation is saved state, not a result to differentiate: without this autograd would fill a
    # zero gradient of its size (the MLP's widest tensor) on every backward
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _linear_act_backward(ctx, grad_out, _grad_preact):
    # The activation's derivative in one pass, then the Linear's two GEMMs through the op itself (act "none", no
    # bias), so they take its GEMM choice (the float32 route for a reduced type on a CPU without a native GEMM).
    if grad_out is None:
        return None, None, None, None, None
    x, weight, bias, preact = ctx.saved_tensors
    gemm = torch.ops.vlfuse.linear_act.default
    grad = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.act != "none":
        if preact.numel() != grad.numel():
            # called through torch.ops with keep_preact=False: the pre-activation is recomputed
            preact = call_op(gemm, x, weight, bias, "none", False)[0]
        grad = call_op(torch.ops.vlfuse.linear_act_backward.default, grad, preact.reshape(grad.shape), ctx.act)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = call_op(gemm, grad, weight.t(), None, "none", False)[0].reshape(ctx.x_shape)
    if ctx.needs_input_grad[1]:
        grad_weight = call_op(gemm, grad.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", False)[0]
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(0)
    return grad_x, grad_weight, grad_bias, None, None


register_autograd(torch.ops.vlfuse.linear_act.default, _linear_act_backward, _linear_act_setup)


# ---- autocast ----------------------------------------------------------------------------------------------------
# Like nn.Linear under autocast: the GEMM runs in the autocast dtype and the casts sit above autograd, so the
# gradient reaches a float32 weight as float32.
_autocast_lib = torch.library.Library("vlfuse", "IMPL")


def _linear_act_autocast(device_type: str):
    def kernel(x: Tensor, weight: Tensor, bias: Tensor | None, act: str, keep_preact: bool):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            args = (x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
            return call_op(torch.ops.vlfuse.linear_act.default, *args, act, keep_preact)

    return kernel


for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _autocast_lib.impl("linear_act", _linear_act_autocast(_device), _key)
