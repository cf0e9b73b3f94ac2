"""merge2x2 and vlfuse.nn.PatchMerger against the eager reference and HF transformers' own Qwen2-VL (LayerNorm)
and Qwen2.5-VL (RMSNorm) patch mergers."""

import pytest
import torch
from conftest import devices
from tolerances import FLOAT_DTYPES, tol

from vlfuse import ops
from vlfuse import reference as ref
from vlfuse.nn import PatchMerger

# Grids in merge blocks (t, h / m, w / m): scaled by the merge size under test so that every m gets the same
# shapes: one image, several images of different sizes, a video with an odd frame count, non-square grids.
BLOCK_GRIDS = {
    "one_image": [[1, 2, 3]],
    "two_images": [[1, 2, 2], [1, 3, 1]],
    "video_odd_t": [[3, 2, 2]],
    "non_square": [[1, 1, 4]],
    "image_and_video": [[1, 1, 1], [5, 2, 1]],
}
CHANNELS = 40  # not a multiple of any vector width: every kernel runs its tail path


def make_grid(blocks, m):
    return torch.tensor([[t, h * m, w * m] for t, h, w in blocks])


def make_inputs(grid, dtype, device, channels=CHANNELS, norm="layernorm", row_pad=8):
    S = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    wide = (torch.randn(S, channels + row_pad) * 2 + 0.5).to(device=device, dtype=dtype)
    x = wide[:, :channels]  # row stride larger than the row
    weight = (torch.randn(channels) + 1).to(device=device, dtype=dtype)
    bias = torch.randn(channels).to(device=device, dtype=dtype) if norm == "layernorm" else None
    return x, weight, bias


def op_and_ref(x, grid, weight, bias, norm, order, m):
    got = ops.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m)
    want = ref.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m)
    return got, want


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocks", list(BLOCK_GRIDS.values()), ids=list(BLOCK_GRIDS))
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_merge2x2_matches_reference(device, dtype, blocks, norm, order, m):
    grid = make_grid(blocks, m)
    x, weight, bias = make_inputs(grid, dtype, device, norm=norm)
    got, want = op_and_ref(x, grid, weight, bias, norm, order, m)
    assert got.shape == (x.shape[0] // (m * m), m * m * CHANNELS) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol(dtype, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_raster_order_agrees_with_vision_positions(device, norm):
    """An independent oracle for the raster gather: place each merge-order token at its (h, w) patch position
    (vlfuse.ops.vision_positions) in a row-major frame; raster order on that must equal merge order."""
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    x, weight, bias = make_inputs(grid, torch.float32, device, norm=norm)
    pos = ops.vision_positions(grid).to(device)
    raster = torch.empty_like(x)
    start = 0
    for t, h, w in grid.tolist():
        for f in range(t):
            seg = slice(start + f * h * w, start + (f + 1) * h * w)
            raster[start + f * h * w + pos[seg, 0] * w + pos[seg, 1]] = x[seg]
        start += t * h * w
    merged = ops.merge2x2(x, grid, weight, bias, norm=norm, order="merge")
    torch.testing.assert_close(ops.merge2x2(raster, grid, weight, bias, norm=norm, order="raster"), merged,
                               rtol=0, atol=0)


def hf_merger(norm, dim, context_dim, m):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Qwen2VLPatchMerger

    cls = Qwen2VLPatchMerger if norm == "layernorm" else Qwen2_5_VLPatchMerger
    merger = cls(dim, context_dim, m)
    with torch.no_grad():
        for p in merger.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p.shape[0] == context_dim else 0.0))
    return merger


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_merge2x2_equals_hf_ln_q_view(device, dtype, norm):
    """merge2x2 in merge order is exactly HF's `ln_q(x).view(-1, 4 * C)` of the Qwen2-VL / Qwen2.5-VL merger."""
    hf = hf_merger(norm, 32, CHANNELS, 2).to(device=device, dtype=dtype)
    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    x, _, _ = make_inputs(grid, dtype, device)
    with torch.no_grad():
        want = hf.ln_q(x).view(-1, 4 * CHANNELS)
    got = ops.merge2x2(x, grid, hf.ln_q.weight, getattr(hf.ln_q, "bias", None), eps=1e-6, norm=norm)
    # HF's RMSNorm rounds x * rstd to dtype before multiplying by the weight: one more rounding than ours.
    torch.testing.assert_close(got, want, **tol(dtype, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_patch_merger_loads_hf_weights_and_matches_hf(device, dtype, norm, m):
    dim, C = 24, CHANNELS
    hf = hf_merger(norm, dim, C, m).to(device)
    ours = PatchMerger(dim, C, merge_size=m, norm=norm).to(device)
    ours.load_state_dict(hf.state_dict())  # strict: same keys and shapes
    assert set(ours.state_dict()) == set(hf.state_dict())
    grid = make_grid(BLOCK_GRIDS["image_and_video"], m)
    x, _, _ = make_inputs(grid, torch.float32, device, channels=C)
    with torch.no_grad():
        exact = hf(x)  # float32 HF is the yardstick for the low-precision runs
        hf_low, ours_low = hf.to(dtype), ours.to(dtype)
        got = ours_low(x.to(dtype), grid)
        hf_err = (hf_low(x.to(dtype)).float() - exact).abs().max().item()
    assert got.shape == (x.shape[0] // (m * m), dim) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, exact, **tol(dtype, scale=16))
    else:
        # Both run the same GEMMs in dtype; ours rounds the norm output once, HF once or twice. Allow twice
        # HF's own error against float32.
        assert (got.float() - exact).abs().max().item() <= 2 * hf_err + 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_patch_merger_backward_matches_hf(device, norm):
    hf = hf_merger(norm, 24, CHANNELS, 2).to(device)
    ours = PatchMerger(24, CHANNELS, norm=norm).to(device)
    ours.load_state_dict(hf.state_dict())
    grid = make_grid(BLOCK_GRIDS["video_odd_t"], 2)
    x, _, _ = make_inputs(grid, torch.float32, device)
    x_hf = x.detach().clone().requires_grad_()
    x_ours = x.detach().clone().requires_grad_()
    g = torch.randn(x.shape[0] // 4, 24, device=device)
    (hf(x_hf) * g).sum().backward()
    (ours(x_ours, grid) * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, **tol(torch.float32, scale=64))
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, **tol(torch.float32, scale=64), msg=name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
def test_backward_matches_float64_autograd_of_reference(device, dtype, norm, order):
    m = 2
    grid = make_grid(BLOCK_GRIDS["two_images"], m)
    x, weight, bias = make_inputs(grid, dtype, device, norm=norm)
    params = [x, weight] + ([bias] if bias is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in params]
    out = ops.merge2x2(leaves[0], grid, leaves[1], leaves[2] if bias is not None else None, norm=norm, order=order)
    g = torch.randn(out.shape, device=device).to(dtype)
    got = torch.autograd.grad(out, leaves, g)
    exact_leaves = [t.detach().double().requires_grad_() for t in params]
    exact_out = ref.merge2x2(exact_leaves[0], grid, exact_leaves[1], exact_leaves[2] if bias is not None else None,
                             norm=norm, order=order)
    want = torch.autograd.grad(exact_out, exact_leaves, g.double())
    for name, a, b in zip(["x", "weight", "bias"], got, want):
        assert a.dtype == dtype
        # weight/bias gradients sum over tokens: a float32 sum of S terms, then one rounding to dtype.
        torch.testing.assert_close(a, b.to(dtype), **tol(dtype, scale=16), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1280, 1284])
def test_outputs_larger_than_the_last_level_cache_match_reference(dtype, channels):
    # >= 64 MiB read and written in all: the CPU kernels write merged rows and grad_x with streaming stores
    # (cpu::prefer_streaming_stores) where a row is aligned for them, plain stores elsewhere (1284 channels:
    # rows alternate), and the values must not depend on which.
    grid = torch.tensor([[1, 64, 64], [2, 64, 32]]) if dtype == torch.float32 else torch.tensor([[4, 64, 64]])
    x, weight, bias = make_inputs(grid, dtype, "cpu", channels=channels, row_pad=0)
    assert 2 * x.numel() * x.element_size() >= 64 << 20
    leaf = x.detach().requires_grad_()
    out = ops.merge2x2(leaf, grid, weight, bias)
    torch.testing.assert_close(out, ref.merge2x2(x, grid, weight, bias), **tol(dtype, scale=4))
    g = torch.randn(out.shape, dtype=dtype)
    out.backward(g)
    exact = x.detach().double().requires_grad_()
    ref.merge2x2(exact, grid, weight.double(), bias.double()).backward(g.double())
    torch.testing.assert_close(leaf.grad, exact.grad.to(dtype), **tol(dtype, scale=16))


@pytest.mark.parametrize("device", devices())
def test_backward_frozen_input_and_partial_grads(device):
    """Training only the merger (frozen ViT): x needs no gradient; rmsnorm has no bias."""
    grid = make_grid(BLOCK_GRIDS["one_image"], 2)
    x, weight, _ = make_inputs(grid, torch.float32, device, norm="rmsnorm")
    w = weight.clone().requires_grad_()
    ops.merge2x2(x, grid, w, norm="rmsnorm", order="raster").square().sum().backward()
    w_ref = weight.clone().requires_grad_()
    ref.merge2x2(x, grid, w_ref, norm="rmsnorm", order="raster").square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, **tol(torch.float32, scale=16))
    # only x wanted (weight frozen)
    xl = x.detach().clone().requires_grad_()
    ops.merge2x2(xl, grid, weight, torch.zeros_like(weight)).sum().backward()
    assert xl.grad is not None and xl.grad.shape == x.shape


@pytest.mark.parametrize("recorded_by", ["eager_function", "torch_ops"])
def test_statistics_outputs_are_not_differentiable(recorded_by):
    """The op's mean and rstd outputs exist for its backward: neither recording path lets a loss reach them."""
    from vlfuse._native import call_op

    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    x, weight, bias = make_inputs(grid, torch.float32, "cpu")
    leaf = x.detach().requires_grad_()
    args = (leaf, grid, weight, bias, 1e-6, "layernorm", "merge", 2)
    op = torch.ops.vlfuse.merge2x2.default
    out, mean, rstd = call_op(op, *args) if recorded_by == "eager_function" else op(*args)
    assert out.requires_grad and not mean.requires_grad and not rstd.requires_grad
    out.sum().backward()
    exact = x.detach().double().requires_grad_()
    ref.merge2x2(exact, grid, weight.double(), bias.double()).sum().backward()
    torch.testing.assert_close(leaf.grad, exact.grad.float(), **tol(torch.float32, scale=16))


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inner_stride_int32_grid_and_no_grid(device):
    grid = make_grid(BLOCK_GRIDS["two_images"], 2).to(torch.int32)
    x, weight, bias = make_inputs(grid, torch.float32, device)
    xt = x.t().contiguous().t()  # stride (1, S): not unit stride on channels
    assert xt.stride(1) != 1
    for order in ("merge", "raster"):
        got = ops.merge2x2(xt, grid, weight, bias, order=order)
        torch.testing.assert_close(got, ref.merge2x2(x, grid, weight, bias, order=order), **tol(torch.float32, 4))
    torch.testing.assert_close(ops.merge2x2(x, None, weight, bias), ops.merge2x2(x, grid, weight, bias))


@pytest.mark.parametrize("device", devices())
def test_qwen2vl_width_and_statistics_are_stable(device):
    """C = 1280 (Qwen2-VL ViT width), and tokens with a large common offset, where E[x^2] - E[x]^2 in float32
    loses every digit: the corrected two-pass statistics are at least as close to a float64 reference as
    torch's own float32 layer_norm."""
    grid = torch.tensor([[1, 8, 8]])
    for offset in (1e2, 1e4):
        x = (offset + torch.randn(64, 1280)).to(device)
        weight, bias = torch.randn(1280, device=device), torch.randn(1280, device=device)
        got = ops.merge2x2(x, grid, weight, bias)
        exact = ref.merge2x2(x.double(), grid, weight.double(), bias.double())
        torch_ln = torch.nn.functional.layer_norm(x, (1280,), weight, bias, 1e-6).view(-1, 4 * 1280)
        assert (got - exact).abs().max() <= (torch_ln - exact).abs().max()
        rms = ops.merge2x2(x, grid, weight, norm="rmsnorm")
        rms_exact = ref.merge2x2(x.double(), grid, weight.double(), norm="rmsnorm")
        torch.testing.assert_close(rms, rms_exact.float(), **tol(torch.float32, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("channels", [1, 31, 33, 256, 257, 600, 1280])
def test_statistics_on_both_sides_of_the_centered_test(device, dtype, channels):
    """The CPU kernel's bfloat16 statistics (AVX512_BF16 build) keep plain sums for a token whose
    mean^2 <= 8 var and sum the others again, shifted: tokens whose |mean| / std runs across sqrt(8) ~ 2.83, in
    one call (each token picks its own path), at widths with and without a partial last vector (and the plain
    sums' 256-value steps); the other types' shifted sums see the same tokens."""
    torch.manual_seed(0)
    ratios = torch.tensor([0.0, 1.0, -2.5, 2.8, -2.9, 3.5, 10.0, -30.0])
    S = 4 * len(ratios)
    x = (torch.randn(S, channels) + ratios.repeat_interleave(4)[:, None]).to(device=device, dtype=dtype)
    weight = (torch.randn(channels) + 1).to(device=device, dtype=dtype)
    bias = torch.randn(channels).to(device=device, dtype=dtype)
    grid = torch.tensor([[1, 2, S // 2]])
    got = ops.merge2x2(x, grid, weight, bias, order="raster")
    exact = ref.merge2x2(x.double(), grid, weight.double(), bias.double(), order="raster")
    torch.testing.assert_close(got.double(), exact.to(dtype).double(), **tol(dtype, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_token_stays_in_its_rows(device, dtype):
    """A NaN or inf in one token makes that token's output (and input gradient) NaN and leaves the other tokens
    exact: the kernels' whole-block paths (bf16: even/odd lanes, its own rounding) keep NaN a NaN."""
    x = torch.randn(8, 1280).to(device=device, dtype=dtype)
    x[1, 5], x[6, 1279] = float("nan"), float("inf")
    weight = (torch.rand(1280) + 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(1280).to(device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    got = ops.merge2x2(xg, None, weight, bias).view(8, 1280)
    got.float().sum().backward()
    finite = [0, 2, 3, 4, 5, 7]
    assert got[[1, 6]].isnan().all() and xg.grad[[1, 6]].isnan().all()
    assert torch.isfinite(got[finite]).all() and torch.isfinite(xg.grad[finite]).all()
    want = ref.merge2x2(x[finite], None, weight, bias, merge_size=1)
    torch.testing.assert_close(got[finite], want, **tol(dtype, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("grid", [torch.zeros(0, 3, dtype=torch.int64), torch.tensor([[1, 0, 4], [0, 2, 2]])])
def test_zero_tokens(device, grid):
    x = torch.zeros(0, CHANNELS, device=device, requires_grad=True)
    w = torch.ones(CHANNELS, device=device, requires_grad=True)
    b = torch.zeros(CHANNELS, device=device, requires_grad=True)
    for order in ("merge", "raster"):
        out = ops.merge2x2(x, grid, w, b, order=order)
        assert out.shape == (0, 4 * CHANNELS)
        out.sum().backward()
        assert x.grad.shape == (0, CHANNELS) and torch.equal(w.grad, torch.zeros_like(w))
    merger = PatchMerger(16, CHANNELS).to(device)
    assert merger(x.detach(), grid).shape == (0, 16)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gradcheck_float64(norm, order, m):
    grid = make_grid([[1, 1, 2], [2, 1, 1]], m)
    x, weight, bias = make_inputs(grid, torch.float64, "cpu", channels=5, norm=norm)
    inputs = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
    if bias is not None:
        inputs.append(bias.detach().requires_grad_())

    def f(x, weight, bias=None):
        return ops.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m)

    assert torch.autograd.gradcheck(f, inputs)


def _opcheck_samples(device):
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    for norm in ("layernorm", "rmsnorm"):
        for order in ("merge", "raster"):
            for dtype in (torch.float32, torch.bfloat16):
                x, weight, bias = make_inputs(grid, dtype, device, norm=norm)
                yield (x.requires_grad_(), grid, weight.requires_grad_(), bias, 1e-6, norm, order, 2)
    x, weight, bias = make_inputs(torch.tensor([[2, 3, 3]]), torch.float32, device)
    yield (x, None, weight, bias, 1e-5, "layernorm", "merge", 3)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.vlfuse.merge2x2.default, args)
        _, mean, rstd = torch.ops.vlfuse.merge2x2(*[a.detach() if torch.is_tensor(a) else a for a in args])
        x, grid, weight, _, _, norm, order, m = args
        grad_out = torch.randn(x.shape[0] // (m * m), m * m * x.shape[1], device=device).to(x.dtype)
        for mask in ([True, True, True], [False, True, False], [True, False, False]):
            torch.library.opcheck(
                torch.ops.vlfuse.merge2x2_backward.default,
                (grad_out, x.detach(), grid, weight.detach(), mean, rstd, norm, order, m, mask),
            )


def test_compile_fullgraph_no_graph_break():
    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    merger = PatchMerger(24, CHANNELS, norm="layernorm", order="raster")
    x, _, _ = make_inputs(grid, torch.float32, "cpu")
    x = x.contiguous().requires_grad_()

    def f(x, grid):
        merged = ops.merge2x2(x, grid, merger.ln_q.weight, merger.ln_q.bias, order="raster")
        return merged.sum() + merger(x, grid).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, grid)
    (gx,) = torch.autograd.grad(got, x)
    want = f(x, grid)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(grid=[[1, 3, 4]]), ValueError, r"vlfuse\.merge2x2: grid_thw row 0 = \(1, 3, 4\) has h or w not a multiple of merge_size = 2"),
        (dict(grid=[[1, 4, 4]], tokens=12), ValueError, r"vlfuse\.merge2x2: grid_thw describes 16 tokens .* but x has 12 tokens"),
        (dict(grid=[[1, 2, 2], [1, 2, -2]], tokens=4), ValueError, r"grid_thw row 1 = \(1, 2, -2\) has a negative size"),
        (dict(grid=[[1, 2, 2]], tokens=6), ValueError, r"x has 6 tokens, which is not a multiple of merge_size\^2 = 4"),
        (dict(grid=None, order="raster"), ValueError, r"grid_thw is required for order=\"raster\""),
        (dict(norm="rmsnorm", bias=True), ValueError, r"bias must be None for norm=\"rmsnorm\""),
        (dict(norm="batchnorm"), ValueError, r"norm must be \"layernorm\" or \"rmsnorm\", got \"batchnorm\""),
        (dict(order="zigzag"), ValueError, r"order must be \"merge\" or \"raster\", got \"zigzag\""),
        (dict(weight_len=7), ValueError, r"weight must be \[channels\] = \[8\], got shape \[7\]"),
        (dict(x_dtype=torch.int32), TypeError, r"x must be float32, float64, float16 or bfloat16, got Int"),
        (dict(grid_dtype=torch.float32), TypeError, r"grid_thw must be int64 or int32, got Float"),
        (dict(grid=[[1, 2]]), ValueError, r"grid_thw must be \[items, 3\]"),
        (dict(merge_size=0), ValueError, r"merge_size must be >= 1, got 0"),
        (dict(eps=-1.0), ValueError, r"eps must be finite and >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    grid = kwargs.get("grid", [[1, 2, 2]])
    grid_t = None if grid is None else torch.tensor(grid, dtype=kwargs.get("grid_dtype", torch.int64))
    S = kwargs.get("tokens", 4)
    x = torch.randn(S, 8).to(kwargs.get("x_dtype", torch.float32))
    weight = torch.ones(kwargs.get("weight_len", 8))
    bias = torch.zeros(8) if kwargs.get("bias", kwargs.get("norm", "layernorm") == "layernorm") else None
    with pytest.raises(error, match=match):
        ops.merge2x2(x, grid_t, weight, bias, eps=kwargs.get("eps", 1e-6), norm=kwargs.get("norm", "layernorm"),
                     order=kwargs.get("order", "merge"), merge_size=kwargs.get("merge_size", 2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("channels", [40, 1280, 3 * 1024 + 8, 5000])
def test_cuda_matches_cpu_with_host_and_device_grids(dtype, norm, order, channels):
    """Both grid placements (host: checked on the host; device: read on the GPU with no sync), the CUDA kernels'
    ways of walking a row (channels: held in registers; streamed with the backward's partial sums in shared
    memory; streamed with them in global memory, 5000), forward and backward against the CPU kernel."""
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    x, weight, bias = make_inputs(grid, dtype, "cpu", channels=channels, norm=norm)
    leaves_cpu = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out_cpu = ops.merge2x2(leaves_cpu[0], grid, *leaves_cpu[1:2], *(leaves_cpu[2:] or [None]), norm=norm, order=order)
    g = torch.randn(out_cpu.shape).to(dtype)
    grads_cpu = torch.autograd.grad(out_cpu, leaves_cpu, g)
    for grid_dev in (grid, grid.cuda()):
        leaves = [t.detach().cuda().requires_grad_() for t in leaves_cpu]
        out = ops.merge2x2(leaves[0], grid_dev, *leaves[1:2], *(leaves[2:] or [None]), norm=norm, order=order)
        torch.testing.assert_close(out.cpu(), out_cpu, **tol(dtype, scale=4))
        grads = torch.autograd.grad(out, leaves, g.cuda())
        for a, b in zip(grads, grads_cpu):
            torch.testing.assert_close(a.cpu(), b, **tol(dtype, scale=16))


@pytest.mark.cuda
def test_cuda_unaligned_rows_use_the_scalar_path():
    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    x, weight, bias = make_inputs(grid, torch.bfloat16, "cuda", channels=37, row_pad=3)
    torch.testing.assert_close(ops.merge2x2(x, grid, weight, bias, order="raster"),
                               ref.merge2x2(x, grid, weight, bias, order="raster"), **tol(torch.bfloat16, 4))


# ---- postshuffle_norm: the norm over each merged row (Qwen3-VL's deepstack mergers) ---------------------------


def make_postshuffle_inputs(grid, dtype, device, m=2, channels=CHANNELS, norm="layernorm"):
    x, _, _ = make_inputs(grid, dtype, device, channels=channels, norm=norm)
    n = m * m * channels
    weight = (torch.randn(n) + 1).to(device=device, dtype=dtype)
    bias = torch.randn(n).to(device=device, dtype=dtype) if norm == "layernorm" else None
    return x, weight, bias


def postshuffle(x, grid, weight, bias, norm="layernorm", order="merge", m=2, impl=ops):
    return impl.merge2x2(x, grid, weight, bias, norm=norm, order=order, merge_size=m, postshuffle_norm=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_postshuffle_float32_weights_of_reduced_tokens(dtype):
    """The CPU kernel keeps the post-shuffle tables in the tokens' type only when that is exact: float32 weights
    that the type cannot hold are used as they are, not rounded."""
    grid = make_grid(list(BLOCK_GRIDS.values())[0], 2)
    x, weight, bias = make_postshuffle_inputs(grid, torch.float32, "cpu")
    x = x.to(dtype)
    weight, bias = weight + 1e-3, bias + 1e-3  # not representable in bf16/fp16
    got = postshuffle(x, grid, weight, bias)
    want = postshuffle(x, grid, weight, bias, impl=ref)
    rounded = postshuffle(x, grid, weight.to(dtype).float(), bias.to(dtype).float(), impl=ref)
    torch.testing.assert_close(got, want, **tol(dtype, scale=4))
    assert (got.float() - want.float()).abs().max() < (rounded.float() - want.float()).abs().max()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocks", list(BLOCK_GRIDS.values()), ids=list(BLOCK_GRIDS))
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_postshuffle_matches_reference(device, dtype, blocks, norm, order, m):
    grid = make_grid(blocks, m)
    x, weight, bias = make_postshuffle_inputs(grid, dtype, device, m, norm=norm)
    got = postshuffle(x, grid, weight, bias, norm, order, m)
    want = postshuffle(x, grid, weight, bias, norm, order, m, impl=ref)
    assert got.shape == (x.shape[0] // (m * m), m * m * CHANNELS) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol(dtype, scale=4))


def hf_qwen3_merger(channels, out_dim=32):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    config = Qwen3VLVisionConfig(hidden_size=channels, out_hidden_size=out_dim, spatial_merge_size=2)
    merger = Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=True)
    with torch.no_grad():
        merger.norm.weight.copy_(torch.randn_like(merger.norm.weight) * 0.1 + 1)
        merger.norm.bias.copy_(torch.randn_like(merger.norm.bias) * 0.1)
    return merger


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [BLOCK_GRIDS["two_images"], [[3, 2, 1]], BLOCK_GRIDS["non_square"]],
                         ids=["two_images", "video_odd_t_non_square", "non_square"])
@pytest.mark.parametrize("channels", [CHANNELS, 1152])
def test_postshuffle_equals_hf_qwen3_deepstack_norm(device, dtype, blocks, channels):
    """merge order with postshuffle_norm is HF's Qwen3VLVisionPatchMerger(use_postshuffle_norm=True) norm path,
    `norm(x.view(-1, 4 * C))` (LayerNorm over 4 * C, eps 1e-6); 1152 is Qwen3-VL's width."""
    hf = hf_qwen3_merger(channels).to(device=device, dtype=dtype)
    grid = make_grid(blocks, 2)
    x, _, _ = make_inputs(grid, dtype, device, channels=channels)
    with torch.no_grad():
        want = hf.norm(x.reshape(-1, 4 * channels))
    got = ops.merge2x2(x, grid, hf.norm.weight, hf.norm.bias, eps=hf.norm.eps, postshuffle_norm=True)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, **tol(dtype))


def test_postshuffle_merger_matches_hf_qwen3_merger_end_to_end():
    """The whole deepstack merger with our norm in front of HF's MLP equals HF's merger."""
    hf = hf_qwen3_merger(CHANNELS)
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    x, _, _ = make_inputs(grid, torch.float32, "cpu")
    with torch.no_grad():
        normed = ops.merge2x2(x, grid, hf.norm.weight, hf.norm.bias, postshuffle_norm=True)
        got = hf.linear_fc2(hf.act_fn(hf.linear_fc1(normed)))
        want = hf(x.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
def test_postshuffle_backward_matches_float64_autograd_of_reference(device, dtype, norm, order):
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    x, weight, bias = make_postshuffle_inputs(grid, dtype, device, norm=norm)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out = postshuffle(leaves[0], grid, leaves[1], leaves[2] if bias is not None else None, norm, order)
    out64 = postshuffle(leaves64[0], grid, leaves64[1], leaves64[2] if bias is not None else None, norm, order,
                        impl=ref)
    g = torch.randn(out.shape, device=device)
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    grads64 = torch.autograd.grad(out64, leaves64, g.double().to(dtype).double())
    for got, want in zip(grads, grads64):
        scale = want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        limit = 1e-4 if dtype == torch.float32 else 4 * tol(dtype)["rtol"]
        assert err <= limit * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("device", devices())
def test_postshuffle_non_contiguous_x_and_statistics_per_merged_row(device):
    grid = make_grid(BLOCK_GRIDS["video_odd_t"], 2)
    x, weight, bias = make_postshuffle_inputs(grid, torch.float32, device)
    transposed = x.t().contiguous().t()  # inner stride S: not unit
    assert transposed.stride(1) != 1
    want = postshuffle(x, grid, weight, bias, impl=ref)
    for variant in (x, transposed):
        torch.testing.assert_close(postshuffle(variant, grid, weight, bias), want, rtol=1e-5, atol=1e-5)
    _, mean, rstd = torch.ops.vlfuse.merge2x2(x, grid, weight, bias, 1e-6, "layernorm", "merge", 2, True)
    rows = x.reshape(-1, 4 * CHANNELS).double()
    assert mean.shape == rstd.shape == (x.shape[0] // 4,)
    torch.testing.assert_close(mean.double(), rows.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(rows.var(-1, unbiased=False) + 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_postshuffle_statistics_of_rows_with_a_large_common_offset(device):
    """Shifted sums keep the variance of a merged row whose tokens share a large offset (mean^2 = 2e8 var),
    measured against the float64 reference: the float32 mean alone is good to half an ulp of 300 (1.5e-5, 1e-3
    of a standard deviation), and the float32 reference is twice as far off as the kernel."""
    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    x, weight, bias = make_postshuffle_inputs(grid, torch.float32, device, channels=1152)
    x = x * 0.01 + 300.0
    exact = postshuffle(x.double(), grid, weight.double(), bias.double(), impl=ref)
    got = postshuffle(x, grid, weight, bias)
    assert (got.double() - exact).abs().max().item() <= 1e-3 * exact.abs().max().item()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_postshuffle_gradcheck_float64(norm, order, m):
    grid = make_grid([[1, 1, 2], [3, 1, 1]], m)
    x, weight, bias = make_postshuffle_inputs(grid, torch.float64, "cpu", m, channels=5, norm=norm)
    inputs = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
    if bias is not None:
        inputs.append(bias.detach().requires_grad_())

    def f(x, weight, bias=None):
        return postshuffle(x, grid, weight, bias, norm, order, m)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", devices())
def test_postshuffle_opcheck(device):
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    for norm in ("layernorm", "rmsnorm"):
        for order in ("merge", "raster"):
            for dtype in (torch.float32, torch.bfloat16):
                x, weight, bias = make_postshuffle_inputs(grid, dtype, device, norm=norm)
                args = (x.requires_grad_(), grid, weight.requires_grad_(), bias, 1e-6, norm, order, 2, True)
                torch.library.opcheck(torch.ops.vlfuse.merge2x2.default, args)
                _, mean, rstd = torch.ops.vlfuse.merge2x2(*[a.detach() if torch.is_tensor(a) else a for a in args])
                grad_out = torch.randn(x.shape[0] // 4, 4 * CHANNELS, device=device).to(dtype)
                for mask in ([True, True, True], [False, True, False], [True, False, False]):
                    torch.library.opcheck(
                        torch.ops.vlfuse.merge2x2_backward.default,
                        (grad_out, x.detach(), grid, weight.detach(), mean, rstd, norm, order, 2, mask, True),
                    )


def test_postshuffle_compile_fullgraph():
    grid = make_grid(BLOCK_GRIDS["two_images"], 2)
    x, weight, bias = make_postshuffle_inputs(grid, torch.float32, "cpu")
    x = x.contiguous().requires_grad_()

    def f(x):
        return postshuffle(x, grid, weight, bias, order="raster").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (gx,) = torch.autograd.grad(got, x)
    want = f(x)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize(
    "weight_len, bias_len, match",
    [
        (8, 32, r"vlfuse\.merge2x2: weight must be \[merge_size\^2 \* channels\] = \[32\], got shape \[8\]"),
        (32, 8, r"vlfuse\.merge2x2: bias must be \[merge_size\^2 \* channels\] = \[32\], got shape \[8\]"),
    ],
)
def test_postshuffle_bad_parameter_size_raises_clear_error(weight_len, bias_len, match):
    x = torch.randn(8, 8)
    for mode in ("eager", "fake"):
        with pytest.raises(ValueError, match=match):
            if mode == "eager":
                postshuffle(x, None, torch.ones(weight_len), torch.zeros(bias_len))
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode() as fake:
                    args = [fake.from_tensor(t) for t in (x, torch.ones(weight_len), torch.zeros(bias_len))]
                    postshuffle(args[0], None, args[1], args[2])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("order", ["merge", "raster"])
@pytest.mark.parametrize("channels", [40, 37, 1152, 5000])
def test_postshuffle_cuda_matches_cpu_with_host_and_device_grids(dtype, norm, order, channels):
    """The CUDA walks of a merged row (held in registers at 40; streamed at 1152, Qwen3-VL; the global-memory
    partial sums at 5000; the scalar path at 37) against the CPU kernel, forward and backward."""
    grid = make_grid(BLOCK_GRIDS["image_and_video"], 2)
    x, weight, bias = make_postshuffle_inputs(grid, dtype, "cpu", channels=channels, norm=norm)
    leaves_cpu = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out_cpu = postshuffle(leaves_cpu[0], grid, leaves_cpu[1], leaves_cpu[2] if bias is not None else None, norm, order)
    g = torch.randn(out_cpu.shape).to(dtype)
    grads_cpu = torch.autograd.grad(out_cpu, leaves_cpu, g)
    for grid_dev in (grid, grid.cuda()):
        leaves = [t.detach().cuda().requires_grad_() for t in leaves_cpu]
        out = postshuffle(leaves[0], grid_dev, leaves[1], leaves[2] if bias is not None else None, norm, order)
        torch.testing.assert_close(out.cpu(), out_cpu, **tol(dtype, scale=4))
        grads = torch.autograd.grad(out, leaves, g.cuda())
        for a, b in zip(grads, grads_cpu):
            torch.testing.assert_close(a.cpu(), b, **tol(dtype, scale=64))
