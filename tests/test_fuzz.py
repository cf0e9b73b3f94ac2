"""Property-based tests: every op against the eager reference over random grids, heads, head dims, dtypes and
strides, forward and backward (issue 9). VLFUSE_FUZZ_EXAMPLES sets the example budget (`make fuzz` raises it)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import rope_tol, tol

from vlfuse import ops
from vlfuse import reference as ref

EXAMPLES = int(os.environ.get("VLFUSE_FUZZ_EXAMPLES", "25"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("VLFUSE_FUZZ_EXAMPLES") is None,  # CI: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def grids(draw, merge_size=2, max_side=40):
    items = draw(st.integers(1, 3))
    side = st.integers(1, max_side // merge_size).map(lambda v: v * merge_size)
    return torch.tensor([[draw(st.integers(1, 5)), draw(side), draw(side)] for _ in range(items)])


def tokens(grid):
    return int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())


def strided(x, draw):
    """x as a view with a padded row stride (or as is), so kernels see non-contiguous inputs."""
    if draw(st.booleans()):
        wide = torch.empty(*x.shape[:-1], x.shape[-1] + 8, dtype=x.dtype)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    return x


@fuzz
@given(grid=grids(max_side=16), heads=st.integers(1, 4), half=st.integers(1, 24), dtype=DTYPES,
       layout=st.sampled_from(["shd", "hsd"]), data=st.data())
def test_rope_qkv_forward_backward(grid, heads, half, dtype, layout, data):
    D = 2 * half
    S = tokens(grid)
    qkv = strided(torch.randn(S, 3 * heads * D).to(dtype), data.draw)
    pos = ops.vision_positions(grid)
    freqs = ref.vision_rope_freqs(D) if D % 4 == 0 else torch.rand(2, half)
    got = ops.rope_qkv(qkv, pos, freqs, heads, layout)
    want = ref.rope_qkv(qkv, pos, freqs, heads, layout)
    max_angle = ref.rope_angles(pos, freqs).abs().max().item() if S else 0.0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **rope_tol(dtype, max_angle))
    x1 = qkv.float().detach().requires_grad_()
    x2 = qkv.float().detach().requires_grad_()
    grads = [torch.randn_like(t, dtype=torch.float32) for t in want]
    torch.autograd.backward(ops.rope_qkv(x1, pos, freqs, heads, layout), grads)
    torch.autograd.backward(ref.rope_qkv(x2, pos, freqs, heads, layout), grads)
    # two products of O(1) terms that may cancel: a few float32 ulps of the operands, not of the result
    torch.testing.assert_close(x1.grad, x2.grad, **rope_tol(torch.float32, max_angle, scale=4))


@fuzz
@given(S=st.integers(0, 64), hq=st.integers(1, 5), hk=st.integers(1, 3), half=st.integers(1, 40),
       axes=st.integers(1, 4), dtype=DTYPES, data=st.data())
def test_rope_multi_axis(S, hq, hk, half, axes, dtype, data):
    D = 2 * half
    q = strided(torch.randn(S, hq, D).to(dtype), data.draw)
    k = torch.randn(hk, S, D).to(dtype).transpose(0, 1)
    pos = torch.randint(0, 32, (S, axes), dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))
    freqs = torch.rand(axes, half) / axes
    gq, gk = ops.rope(q, k, pos, freqs)
    t = rope_tol(dtype, ref.rope_angles(pos, freqs).abs().max().item() if S else 0.0)
    torch.testing.assert_close(gq, ref.rope(q, pos, freqs), **t)
    torch.testing.assert_close(gk, ref.rope(k, pos, freqs), **t)
    # backward of a rotation is the inverse rotation
    back_q, _ = ops.rope(gq.float(), gk.float(), pos, freqs)
    torch.testing.assert_close(back_q, ref.rope(gq.float(), pos, freqs), **t)


@fuzz
@given(grid=grids(), dtype=DTYPES, data=st.data())
def test_patchify_and_embed(grid, dtype, data):
    frames = [torch.randint(0, 256, (int(t) * 2 - data.draw(st.integers(0, 1)), 3, int(h) * 14, int(w) * 14),
                            dtype=torch.uint8) for t, h, w in grid.tolist()]
    frames = [f if f.shape[0] > 0 else f[:1] for f in frames]
    patches, g = ops.patchify(frames, out_dtype=dtype)
    want, wg = ref.patchify(frames, out_dtype=dtype)
    torch.testing.assert_close(g, wg, rtol=0, atol=0)
    torch.testing.assert_close(patches, want, **tol(dtype))
    E = data.draw(st.integers(1, 24))
    weight = torch.randn(E, 3, 2, 14, 14).to(dtype) * 0.02
    got = ops.patch_embed(patches, weight)
    exp = ref.patch_embed(patches, weight)
    # a 1176-term dot product: float32 accumulation order differs between the GEMM libraries
    torch.testing.assert_close(got, exp, **tol(dtype, scale=64))


@fuzz
# C >= 4: a norm over one or two channels has variance ~0, and rstd = 1/sqrt(eps) amplifies rounding 1000x
@given(m=st.integers(1, 3), C=st.integers(4, 48), dtype=DTYPES, norm=st.sampled_from(["layernorm", "rmsnorm"]),
       order=st.sampled_from(["merge", "raster"]), data=st.data())
def test_merge2x2_forward_backward(m, C, dtype, norm, order, data):
    grid = data.draw(grids(merge_size=m, max_side=12 * m))
    S = tokens(grid)
    x = strided((torch.randn(S, C) * 3 + 1).to(dtype), data.draw)
    weight = torch.randn(C)
    bias = torch.randn(C) if norm == "layernorm" else None
    got = ops.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m)
    want = ref.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m)
    torch.testing.assert_close(got, want, **tol(dtype, scale=8))
    xs = [x.float().detach().requires_grad_() for _ in range(2)]
    ws = [weight.clone().requires_grad_() for _ in range(2)]
    g = torch.randn(S // (m * m), m * m * C)
    ops.merge2x2(xs[0], grid, ws[0], bias, norm=norm, order=order, merge_size=m).backward(g)
    ref.merge2x2(xs[1], grid, ws[1], bias, norm=norm, order=order, merge_size=m).backward(g)
    # the weight gradient sums over every token: float32 accumulation order differs with S
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol(torch.float32, scale=16))
    torch.testing.assert_close(ws[0].grad, ws[1].grad, **tol(torch.float32, scale=max(16, S // 4)))
