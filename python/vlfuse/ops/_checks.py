"""The argument checks of csrc/common.h in Python, for the fake kernels: the same conditions, exception types
(TORCH_CHECK -> RuntimeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError) and message text as
the C++ ops, so that a bad call fails under torch.compile or FakeTensorMode as it fails in eager. The conditions
go through torch._check*, which also accepts symbolic sizes (a dynamic-shape guard instead of a bool).

What a fake tensor cannot show, the values of a tensor (merge2x2's grid_thw rows), only the C++ op checks, when
the compiled graph runs it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# c10's names of the dtypes, as the C++ messages print them.
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def shape(t: Tensor) -> list:
    """t's sizes as C++ prints them: [4, 2, 16]."""
    return list(t.shape)


def number(value: float) -> str:
    """A double as a C++ stream prints it: -1, 1e-06, nan."""
    return f"{value:g}"


def numbers(values: Sequence[float]) -> str:
    return "[" + ", ".join(number(v) for v in values) + "]"


def _message(op: str, parts: tuple) -> str:
    return f"vlfuse.{op}: " + "".join(str(part) for part in parts)


def check(cond, op: str, *parts) -> None:
    """VLFUSE_CHECK: RuntimeError "vlfuse.<op>: <parts>"."""
    torch._check(cond, lambda: _message(op, parts))


def check_value(cond, op: str, *parts) -> None:
    """VLFUSE_CHECK_VALUE: ValueError."""
    torch._check_value(cond, lambda: _message(op, parts))


def check_type(cond, op: str, *parts) -> None:
    """VLFUSE_CHECK_TYPE: TypeError."""
    torch._check_type(cond, lambda: _message(op, parts))


def check_float_tensor(t: Tensor, op: str, name: str) -> None:
    check_type(
        t.dtype in FLOAT_DTYPES, op, name, " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.dtype)
    )


def check_dim(t: Tensor, dim: int, op: str, name: str, described: str) -> None:
    check_value(t.dim() == dim, op, name, " must be ", dim, "-D ", described, ", got shape ", shape(t))


def check_same_device(a: Tensor, a_name: str, b: Tensor, b_name: str, op: str) -> None:
    check(
        a.device == b.device,
        op,
        a_name,
        " is on ",
        a.device,
        " but ",
        b_name,
        " is on ",
        b.device,
        "; all tensors must be on the same device",
    )


def check_choice(op: str, name: str, value: str, choices: tuple[str, str]) -> None:
    """A string argument with two allowed values, as the C++ parse_* functions check it."""
    check_value(value in choices, op, name, f' must be "{choices[0]}" or "{choices[1]}", got "{value}"')
