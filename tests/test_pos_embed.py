"""interp_pos_embed (Qwen3-VL's learned position table resampled to each item's patch grid) against the eager
reference and against HF transformers' own path: get_vision_interpolation_indices_and_weights(mode="bilinear",
align_corners=True) and ``(table[indices] * weights[:, :, None]).sum(1)``, as Qwen3VLVisionModel.forward runs it."""

import pytest
import torch
from conftest import devices
from tolerances import FLOAT_DTYPES, tol

from vlfuse import ops
from vlfuse import reference as ref

# (table side, grid_thw) per case; every grid is in patches, h and w multiples of merge size 2.
CASES = {
    # two images of different sizes and a video with an odd frame count, in one call; 10 x 14 from a 6 x 6 table
    "images_and_odd_video": (6, [[1, 10, 14], [1, 4, 6], [3, 6, 4]]),
    "upsample_non_square": (6, [[1, 10, 14]]),
    "downsample": (12, [[1, 4, 6], [2, 8, 2]]),
    # h or w equal to the merge size: n - 1 = 1, every target on a table corner
    "h_or_w_is_merge_size": (5, [[1, 2, 8], [1, 6, 2], [1, 2, 2]]),
    "qwen3_vl_table": (48, [[1, 16, 22], [2, 64, 48]]),
    "side_2": (2, [[1, 4, 6]]),
    "side_1": (1, [[2, 4, 2]]),
}
CHANNELS = 40  # not a multiple of any vector width: every kernel runs its tail path


def make_table(side, dtype, device, channels=CHANNELS):
    return torch.randn(side * side, channels).to(device=device, dtype=dtype)


def tokens_of(grid):
    return int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())


def hf_positions(table, grid, merge_size=2):
    """HF's Qwen3VLVisionModel.forward: the gather indices and float32 weights, then the weighted row sum."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    side = int(table.shape[0] ** 0.5)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=merge_size
    )
    return (table[indices.to(table.device)] * weights.to(table.device)[:, :, None]).sum(1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(device, dtype, case, with_bias):
    side, grid = CASES[case]
    grid = torch.tensor(grid)
    table = make_table(side, dtype, device)
    bias = torch.randn(CHANNELS).to(device=device, dtype=dtype) if with_bias else None
    got = ops.interp_pos_embed(table, grid, 2, bias)
    want = ref.interp_pos_embed(table, grid, 2, bias)
    assert got.shape == (tokens_of(grid), CHANNELS) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("m", [1, 2, 3])
def test_merge_sizes_match_reference_and_hf(device, m):
    grid = torch.tensor([[1, 2 * m, 3 * m], [3, m, 4 * m]])
    table = make_table(7, torch.float32, device)
    got = ops.interp_pos_embed(table, grid, m)
    torch.testing.assert_close(got, ref.interp_pos_embed(table, grid, m), **tol(torch.float32))
    torch.testing.assert_close(got, hf_positions(table, grid, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(CASES))
def test_float32_and_float64_match_hf(device, case):
    side, grid = CASES[case]
    grid = torch.tensor(grid)
    table = make_table(side, torch.float32, device)
    torch.testing.assert_close(ops.interp_pos_embed(table, grid), hf_positions(table, grid), rtol=1e-5, atol=1e-5)
    # In float64 only the summation differs (HF's weights are float32 too): the taps and weights are HF's bit for bit.
    table64 = table.double()
    torch.testing.assert_close(ops.interp_pos_embed(table64, grid), hf_positions(table64, grid), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["images_and_odd_video", "qwen3_vl_table"])
def test_low_precision_is_no_worse_than_hf(device, dtype, case):
    """HF's bf16 model gathers bf16 rows, sums them in float32 (the weights are float32) and rounds the sum to the
    model dtype (``pos_embeds.to(hidden_states.dtype)``): ours must be as close to the float64 truth."""
    side, grid = CASES[case]
    grid = torch.tensor(grid)
    table = make_table(side, dtype, device)
    exact = hf_positions(table.double(), grid)
    hf_err = (hf_positions(table, grid).to(dtype).double() - exact).abs().max().item()
    got = ops.interp_pos_embed(table, grid)
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max().item() <= hf_err


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", ["images_and_odd_video", "downsample", "h_or_w_is_merge_size", "side_1"])
def test_backward_matches_float64_autograd_of_reference(device, dtype, case):
    side, grid = CASES[case]
    grid = torch.tensor(grid)
    table = make_table(side, dtype, device).requires_grad_()
    bias = torch.randn(CHANNELS).to(device=device, dtype=dtype).requires_grad_()
    out = ops.interp_pos_embed(table, grid, 2, bias)
    g = torch.randn(out.shape, device=device).to(dtype)
    got = torch.autograd.grad(out, [table, bias], g)
    exact_leaves = [table.detach().double().requires_grad_(), bias.detach().double().requires_grad_()]
    want = torch.autograd.grad(ref.interp_pos_embed(exact_leaves[0], grid, 2, exact_leaves[1]), exact_leaves,
                               g.double())  # fmt: skip
    for name, a, b in zip(["table", "bias"], got, want):
        assert a.dtype == dtype and a.shape == b.shape
        # each table row sums up to (tokens per table row) weighted gradient rows: float32 sums, one rounding.
        torch.testing.assert_close(a, b.to(dtype), **tol(dtype, scale=16), msg=name)


@pytest.mark.parametrize("device", devices())
def test_backward_matches_hf_autograd(device):
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    table = make_table(side, torch.float32, device)
    ours, theirs = table.clone().requires_grad_(), table.clone().requires_grad_()
    g = torch.randn(tokens_of(grid), CHANNELS, device=device)
    (ops.interp_pos_embed(ours, grid) * g).sum().backward()
    (hf_positions(theirs, grid) * g).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic_and_independent_of_thread_count():
    side, grid = CASES["qwen3_vl_table"]
    grid = torch.tensor(grid)
    g = torch.randn(tokens_of(grid), 72)
    first = torch.ops.vlfuse.interp_pos_embed_backward(g, grid, side, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.vlfuse.interp_pos_embed_backward(g, grid, side, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first, torch.ops.vlfuse.interp_pos_embed_backward(g, grid, side, 2))


def test_backward_of_non_contiguous_grad_out():
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    wide = torch.randn(tokens_of(grid), CHANNELS + 6)
    g = wide[:, 3 : 3 + CHANNELS]
    want = torch.ops.vlfuse.interp_pos_embed_backward(g.contiguous(), grid, side, 2)
    torch.testing.assert_close(torch.ops.vlfuse.interp_pos_embed_backward(g, grid, side, 2), want, rtol=0, atol=0)
    gt = g.t().contiguous().t()
    assert gt.stride(1) != 1
    torch.testing.assert_close(torch.ops.vlfuse.interp_pos_embed_backward(gt, grid, side, 2), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_table_int32_and_strided_grid(device):
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    table = make_table(side, torch.float32, device)
    want = ref.interp_pos_embed(table, grid)
    wide = torch.randn(side * side, CHANNELS + 8, device=device)
    wide[:, 5 : 5 + CHANNELS] = table
    row_strided = wide[:, 5 : 5 + CHANNELS]  # row stride larger than the row, unaligned start
    col_strided = table.t().contiguous().t()  # not unit stride on channels
    assert row_strided.stride(0) != CHANNELS and col_strided.stride(1) != 1
    strided_grid = torch.tensor(grid.tolist()).t().contiguous().t()
    for t in (row_strided, col_strided):
        torch.testing.assert_close(ops.interp_pos_embed(t, grid), want, **tol(torch.float32))
    torch.testing.assert_close(ops.interp_pos_embed(table, grid.to(torch.int32)), want, **tol(torch.float32))
    torch.testing.assert_close(ops.interp_pos_embed(table, strided_grid), want, **tol(torch.float32))


@pytest.mark.parametrize("device", devices())
def test_tokens_argument(device):
    """The tokens path that a GPU grid_thw needs: given with a host grid it must agree, and then changes nothing."""
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    table = make_table(side, torch.float32, device)
    n = tokens_of(grid)
    torch.testing.assert_close(ops.interp_pos_embed(table, grid, tokens=n), ops.interp_pos_embed(table, grid),
                               rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match=rf"vlfuse\.interp_pos_embed: tokens = {n + 4} but grid_thw describes {n} "
                                         r"tokens \(sum of t \* h \* w\)"):  # fmt: skip
        ops.interp_pos_embed(table, grid, tokens=n + 4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("grid", [torch.zeros(0, 3, dtype=torch.int64), torch.tensor([[1, 0, 4], [0, 2, 2]])])
def test_zero_tokens(device, grid):
    table = make_table(4, torch.float32, device).requires_grad_()
    bias = torch.zeros(CHANNELS, device=device, requires_grad=True)
    out = ops.interp_pos_embed(table, grid, 2, bias)
    assert out.shape == (0, CHANNELS)
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device", devices())
def test_empty_items_between_others(device):
    grid = torch.tensor([[1, 4, 6], [0, 4, 4], [2, 2, 2], [1, 0, 6], [1, 6, 4]])
    table = make_table(6, torch.float32, device).requires_grad_()
    out = ops.interp_pos_embed(table, grid)
    torch.testing.assert_close(out, ref.interp_pos_embed(table, grid), **tol(torch.float32))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    exact = table.detach().double().requires_grad_()
    (ref.interp_pos_embed(exact, grid) * g.double()).sum().backward()
    torch.testing.assert_close(table.grad, exact.grad.float(), **tol(torch.float32, scale=16))


def test_non_finite_table_entry_spreads_as_in_hf():
    """A NaN in the table reaches exactly the tokens whose taps read it with a non-zero weight, as in HF (a zero
    weight times NaN is NaN in both: a tap with weight 0 still reads its row)."""
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    table = make_table(side, torch.float32, "cpu")
    table[7, 3] = float("nan")
    got, want = ops.interp_pos_embed(table, grid), hf_positions(table, grid)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], rtol=1e-5, atol=1e-5)


def test_fused_patch_embed_gemm():
    """The use the bias argument is for: patch embedding + its bias + positions as one addmm."""
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    n, k = tokens_of(grid), 3 * 2 * 16 * 16
    patches, weight, bias = torch.randn(n, k), torch.randn(CHANNELS, k) * 0.02, torch.randn(CHANNELS)
    table = make_table(side, torch.float32, "cpu")
    fused = torch.addmm(ops.interp_pos_embed(table, grid, 2, bias, tokens=n), patches, weight.t())
    separate = patches @ weight.t() + bias + hf_positions(table, grid)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    grid = torch.tensor([[2, 2, 4], [1, 4, 2], [1, 2, 2]])
    table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(table, bias):
        return ops.interp_pos_embed(table, grid, 2, bias)

    assert torch.autograd.gradcheck(f, (table, bias))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    n = tokens_of(grid)
    for dtype in (torch.float32, torch.bfloat16):
        table = make_table(side, dtype, device).requires_grad_()
        bias = torch.randn(CHANNELS).to(device=device, dtype=dtype).requires_grad_()
        for args in ((table, grid, 2, bias, n), (table, grid, 2, None, n), (table, grid, 2, bias, None)):
            torch.library.opcheck(torch.ops.vlfuse.interp_pos_embed.default, args)
        g = torch.randn(n, CHANNELS, device=device).to(dtype)
        torch.library.opcheck(torch.ops.vlfuse.interp_pos_embed_backward.default, (g, grid, side, 2))


@pytest.mark.parametrize("with_tokens", [True, False])
def test_compile_fullgraph_no_graph_break(with_tokens):
    side, grid = CASES["images_and_odd_video"]
    grid = torch.tensor(grid)
    n, k = tokens_of(grid), 12
    table = make_table(side, torch.float32, "cpu").requires_grad_()
    bias = torch.randn(CHANNELS, requires_grad=True)
    patches, weight = torch.randn(n, k), torch.randn(CHANNELS, k)

    def f(table, bias, patches, grid):
        pos = ops.interp_pos_embed(table, grid, 2, bias, tokens=patches.shape[0] if with_tokens else None)
        return (torch.addmm(pos, patches, weight.t()) if with_tokens else pos).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(table, bias, patches, grid)
    got_grads = torch.autograd.grad(got, [table, bias])
    want = f(table, bias, patches, grid)
    want_grads = torch.autograd.grad(want, [table, bias])
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# ---- bad arguments -------------------------------------------------------------------------------------------

OP = r"vlfuse\.interp_pos_embed: "
ERRORS = [
    ("table not square", dict(table_rows=35), ValueError,
     OP + r"table must have side \* side rows \(a square grid of learned positions\), got 35 rows"),
    ("table empty", dict(table_rows=0), ValueError, OP + r"table must have side \* side rows .* got 0 rows"),
    ("table int", dict(table_dtype=torch.int32), TypeError,
     OP + r"table must be float32, float64, float16 or bfloat16, got Int"),
    ("table 1-D", dict(table_1d=True), ValueError,
     OP + r"table must be 2-D \[side \* side, channels\], got shape \[144\]"),
    ("table no channels", dict(channels=0), ValueError,
     OP + r"table must have at least one channel, got shape \[36, 0\]"),
    ("grid h not multiple", dict(grid=[[1, 3, 4]]), ValueError,
     OP + r"grid_thw row 0 = \(1, 3, 4\) has h or w not a multiple of merge_size = 2"),
    ("grid w not multiple", dict(grid=[[1, 2, 2], [2, 4, 5]]), ValueError,
     OP + r"grid_thw row 1 = \(2, 4, 5\) has h or w not a multiple of merge_size = 2"),
    ("grid negative", dict(grid=[[1, 2, 2], [-1, 2, 2]]), ValueError,
     OP + r"grid_thw row 1 = \(-1, 2, 2\) has a negative size"),
    ("grid shape 2 columns", dict(grid=[[1, 2]]), ValueError,
     OP + r"grid_thw must be \[items, 3\] \(t, h, w per image or video\), got shape \[1, 2\]"),
    ("grid shape 1-D", dict(grid=[1, 2, 2]), ValueError, OP + r"grid_thw must be \[items, 3\] .* got shape \[3\]"),
    ("grid float", dict(grid_dtype=torch.float32), TypeError, OP + r"grid_thw must be int64 or int32, got Float"),
    ("bias size", dict(bias_len=5), ValueError, OP + r"bias must be \[channels\] = \[6\], got shape \[5\]"),
    ("bias dtype", dict(bias_dtype=torch.float64), TypeError, OP + r"bias has dtype Double but table has Float"),
    ("tokens mismatch", dict(tokens=9), ValueError,
     OP + r"tokens = 9 but grid_thw describes 8 tokens \(sum of t \* h \* w\)"),
    ("tokens negative", dict(tokens=-1), ValueError, OP + r"tokens must be >= 0, got -1"),
    ("merge_size 0", dict(merge_size=0), ValueError, OP + r"merge_size must be >= 1, got 0"),
]  # fmt: skip
# What a fake tensor cannot show (grid_thw's values) only the C++ op checks.
VALUE_CHECKS = ("grid h not multiple", "grid w not multiple", "grid negative", "tokens mismatch")


def _bad_call(kwargs):
    channels = kwargs.get("channels", 6)
    rows = kwargs.get("table_rows", 36)
    table = torch.randn(rows, channels).to(kwargs.get("table_dtype", torch.float32))
    if kwargs.get("table_1d"):
        table = torch.randn(144)
    grid = torch.tensor(kwargs.get("grid", [[2, 2, 2]]), dtype=kwargs.get("grid_dtype", torch.int64))
    bias = None
    if "bias_len" in kwargs or "bias_dtype" in kwargs:
        bias = torch.randn(kwargs.get("bias_len", channels)).to(kwargs.get("bias_dtype", torch.float32))
    return lambda: ops.interp_pos_embed(table, grid, kwargs.get("merge_size", 2), bias, kwargs.get("tokens"))


@pytest.mark.parametrize("name,kwargs,error,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_arguments_raise_clear_errors(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        _bad_call(kwargs)()


@pytest.mark.parametrize("name,kwargs,error,match", [e for e in ERRORS if e[0] not in VALUE_CHECKS],
                         ids=[e[0] for e in ERRORS if e[0] not in VALUE_CHECKS])  # fmt: skip
def test_fake_kernel_raises_the_eager_error(name, kwargs, error, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call = _bad_call(kwargs)
    with pytest.raises(error) as eager:
        call()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(error) as fake:
        call()
    assert str(fake.value) == str(eager.value)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda g, grid: (g.long(), grid, 6, 2), TypeError,
         r"interp_pos_embed_backward: grad_out must be float32, float64, float16 or bfloat16, got Long"),
        (lambda g, grid: (g, grid, 0, 2), ValueError, r"interp_pos_embed_backward: side must be >= 1, got 0"),
        (lambda g, grid: (g[:5], grid, 6, 2), ValueError,
         r"interp_pos_embed_backward: grad_out.size\(0\) = 5 but grid_thw describes 8 tokens"),
        (lambda g, grid: (g, grid[:, :2], 6, 2), ValueError,
         r"interp_pos_embed_backward: grid_thw must be \[items, 3\]"),
    ],
)  # fmt: skip
def test_backward_op_bad_arguments(args, error, match):
    g, grid = torch.randn(8, 6), torch.tensor([[2, 2, 2]])
    with pytest.raises(error, match=match):
        torch.ops.vlfuse.interp_pos_embed_backward(*args(g, grid))


# ---- CUDA ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("channels", [CHANNELS, 1152, 77])
def test_cuda_matches_cpu(dtype, channels):
    """CUDA forward and backward against the CPU kernels (16-byte packs at 40 and 1152 channels, scalar ones at
    77), with the grid on the host and on the device (read there only, tokens given); the CUDA backward is
    deterministic."""
    side, grid = CASES["qwen3_vl_table"]
    grid = torch.tensor(grid + CASES["images_and_odd_video"][1])
    n = tokens_of(grid)
    table = make_table(side, dtype, "cpu", channels)
    bias = torch.randn(channels).to(dtype)
    want = ops.interp_pos_embed(table, grid, 2, bias)
    table_cuda, bias_cuda = table.cuda(), bias.cuda()
    host_grid = ops.interp_pos_embed(table_cuda, grid, 2, bias_cuda)
    device_grid = ops.interp_pos_embed(table_cuda, grid.cuda(), 2, bias_cuda, tokens=n)
    for got in (host_grid, device_grid):
        torch.testing.assert_close(got.cpu(), want, **tol(dtype))
    g = torch.randn(n, channels).to(dtype)
    grad_cpu = torch.ops.vlfuse.interp_pos_embed_backward(g, grid, side, 2)
    grad_host = torch.ops.vlfuse.interp_pos_embed_backward(g.cuda(), grid, side, 2)
    grad_device = torch.ops.vlfuse.interp_pos_embed_backward(g.cuda(), grid.cuda(), side, 2)
    assert torch.equal(grad_host, grad_device)
    assert torch.equal(grad_host, torch.ops.vlfuse.interp_pos_embed_backward(g.cuda(), grid, side, 2))
    torch.testing.assert_close(grad_host.cpu(), grad_cpu, **tol(dtype, scale=16))


@pytest.mark.cuda
def test_cuda_taps_are_hf_bit_for_bit():
    """The CUDA division (the fast path of nvcc's, spelled out) gives HF's float32 taps: in float64 the outputs
    differ from HF's only by summation order."""
    side, grid = CASES["qwen3_vl_table"]
    grid = torch.tensor(grid + CASES["h_or_w_is_merge_size"][1])
    table = make_table(side, torch.float64, "cuda")
    torch.testing.assert_close(ops.interp_pos_embed(table, grid.cuda(), tokens=tokens_of(grid)),
                               hf_positions(table, grid.cuda()), rtol=1e-14, atol=1e-14)  # fmt: skip


@pytest.mark.cuda
def test_cuda_device_grid_needs_tokens():
    table = make_table(6, torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"grid_thw is on cuda:0: pass tokens"):
        ops.interp_pos_embed(table, torch.tensor([[1, 2, 2]], device="cuda"))
