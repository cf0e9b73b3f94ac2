"""One place for the comparison tolerances of every op test.

A kernel that computes in float32 and rounds once to the output dtype differs from a float32 reference by at
most half an ulp of the output dtype at the result's magnitude; the reference itself was rounded the same way,
so two roundings apart gives one ulp. We allow 2x that (flash-attention's rule: twice the reference's own
rounding error in the target dtype), i.e. rtol = 2 * eps(dtype), plus an atol for results near zero.
"""

import torch

_EPS = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """assert_close kwargs for an op that computes in float32 and rounds once to dtype.

    scale: how many float32 roundings the op's arithmetic chains (e.g. a reduction over C terms) relative to
    one, for float32 / float64 outputs where accumulated float32 error dominates the output rounding."""
    eps = _EPS[dtype]
    if dtype in (torch.float32, torch.float64):
        rt = 8 * _EPS[torch.float32] * scale
        return {"rtol": rt, "atol": rt}
    return {"rtol": 2 * eps, "atol": 2 * eps}


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rope_tol(dtype: torch.dtype, max_angle: float, scale: float = 1.0) -> dict:
    """tol() widened for rotations whose float32 angle sums several non-zero axes per pair: the kernel may
    contract that sum into FMAs, so angles agree to a few float32 ulps of the angle's own magnitude."""
    t = tol(dtype, scale)
    return {"rtol": t["rtol"], "atol": t["atol"] + 16 * max_angle * _EPS[torch.float32]}
