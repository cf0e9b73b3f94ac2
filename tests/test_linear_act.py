"""linear_act (a Linear and its activation: the GEMM, then bias + activation in one pass) against the eager
reference and against HF transformers' own activations (transformers.activations.ACT2FN) after an nn.Linear, as the
Qwen vision MLPs run them."""

import pytest
import torch
from conftest import devices
from tolerances import FLOAT_DTYPES, tol

from vlfuse import ops
from vlfuse import reference as ref
from vlfuse.ops.linear_act import ACTIVATIONS, HF_ACTIVATIONS

# (leading shape of x, in_features, out_features): out_features not a multiple of any vector width, so every
# kernel runs its tail path; 3-D x; one row; the Qwen2-VL MLP's 1280 -> 5120 over a few tokens.
SHAPES = {"tail": ((9,), 33, 70), "3d": ((2, 5), 16, 48), "one_row": ((1,), 7, 3), "qwen2_fc1": ((6,), 1280, 5120)}


def make(shape, dtype, device, bias=True, seed=0):
    lead, k, n = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def close(got, want, dtype):
    # A reduced type rounds the pre-activation, then the activation: two roundings, against one in the reference.
    if dtype in (torch.float16, torch.bfloat16):
        t = tol(dtype)
        scale = want.float().abs().max().clamp_min(1.0).item()
        torch.testing.assert_close(got.float(), want.float(), rtol=t["rtol"], atol=2 * t["atol"] * scale)
    else:
        torch.testing.assert_close(got, want, **tol(dtype, scale=4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, act, shape, bias):
    x, w, b = make(shape, dtype, device, bias)
    got = ops.linear_act(x, w, b, act)
    want = ref.linear_act(x, w, b, act)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    close(got, want, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("hidden_act", list(HF_ACTIVATIONS))
def test_matches_hf_linear_and_activation(device, hidden_act):
    from transformers.activations import ACT2FN

    x, w, b = make("qwen2_fc1", torch.float32, device)
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(device)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
        want = ACT2FN[hidden_act](linear(x))
    torch.testing.assert_close(ops.linear_act(x, w, b, HF_ACTIVATIONS[hidden_act]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_reduced_type_as_accurate_as_nn_linear(device, dtype, act):
    """The bias joins the GEMM's float32 sum before its one rounding, as in nn.Linear's addmm: a bias added to the
    GEMM's rounded output rounds every value twice, and that doubled error compounds through a tower's Linears."""
    x, w, b = make("qwen2_fc1", dtype, device)
    exact = ref.linear_act(x.double(), w.double(), b.double(), act)
    activation = {"none": lambda t: t, "gelu": torch.nn.functional.gelu}[act]
    linear = activation(torch.nn.functional.linear(x, w, b))
    # relative error: where the bias cancels most of the GEMM's output, a rounding before the bias shows in full
    judged = exact.abs() > 1e-2

    def error(t):
        return ((t.double() - exact).abs() / exact.abs())[judged].max().item()

    assert error(ops.linear_act(x, w, b, act)) <= 1.25 * error(linear)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    x, w, b = make("tail", dtype, device)
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # every other element of a wider block
    w_transposed = w.t().contiguous().t()  # column-major weight
    b_strided = torch.stack([b, b], dim=1)[:, 0]
    assert not (x_strided.is_contiguous() or w_transposed.is_contiguous() or b_strided.is_contiguous())
    got = ops.linear_act(x_strided, w_transposed, b_strided, "gelu_tanh")
    close(got, ref.linear_act(x, w, b, "gelu_tanh"), dtype)


@pytest.mark.parametrize("device", devices())
def test_empty_rows_and_columns(device):
    x, w, b = make("tail", torch.float32, device)
    assert ops.linear_act(x[:0], w, b, "silu").shape == (0, 70)
    out = ops.linear_act(x[:, :0], w[:, :0], b, "silu")  # no inputs: act(bias) on every row
    torch.testing.assert_close(out, ref.activation(b, "silu").expand(9, 70))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradients_match_reference(device, act):
    x, w, b = make("3d", torch.float32, device)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    out = ops.linear_act(*args, act)
    want = ref.linear_act(*ref_args, act)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for got_arg, want_arg in zip(args, ref_args):
        torch.testing.assert_close(got_arg.grad, want_arg.grad, **tol(torch.float32, scale=8))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(device, act):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*size, dtype=torch.float64, generator=g).to(device) for size in ((4, 6), (5, 6), (5,)))
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.linear_act(*a, act), inputs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep_preact", [False, True])
@pytest.mark.parametrize("act", ["none", "quick_gelu", "gelu_tanh"])
def test_opcheck(device, keep_preact, act):
    x, w, b = make("tail", torch.float32, device)
    torch.library.opcheck(torch.ops.vlfuse.linear_act.default, (x, w, b, act, keep_preact))
    torch.library.opcheck(torch.ops.vlfuse.linear_act.default, (x.requires_grad_(), w, None, act, keep_preact))
    out, preact = torch.ops.vlfuse.linear_act.default(x.detach(), w, b, act, True)
    if act != "none":
        torch.library.opcheck(torch.ops.vlfuse.linear_act_backward.default, (torch.randn_like(out), preact, act))


@pytest.mark.parametrize("device", devices())
def test_preact_is_kept_only_for_a_backward(device):
    x, w, b = make("tail", torch.float32, device)
    out, preact = torch.ops.vlfuse.linear_act.default(x, w, b, "silu", True)
    torch.testing.assert_close(preact, ref.linear_act(x, w, b, "none"), **tol(torch.float32, scale=4))
    torch.testing.assert_close(out, ref.activation(preact, "silu"))
    assert torch.ops.vlfuse.linear_act.default(x, w, b, "silu", False)[1].numel() == 0
    assert torch.ops.vlfuse.linear_act.default(x, w, b, "none", True)[1].numel() == 0


@pytest.mark.parametrize("device", devices())
def test_output_may_be_modified_in_place_under_autograd(device):
    # Qwen2.5-VL's gated MLP multiplies the activated gate by up_proj's output in place.
    x, w, b = make("tail", torch.float32, device)
    x.requires_grad_()
    gate = ops.linear_act(x, w, b, "silu")
    gate.mul_(2.0).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (2.0 * ref.linear_act(xr, w, b, "silu")).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **tol(torch.float32, scale=8))


@pytest.mark.parametrize("device", devices())
def test_autocast_like_linear(device):
    x, w, b = make("tail", torch.float32, device)
    w.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.linear_act(x, w, b, "quick_gelu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32
    close(out, ref.linear_act(x.bfloat16(), w.detach().bfloat16(), b.bfloat16(), "quick_gelu"), torch.bfloat16)


@pytest.mark.parametrize("device", devices())
def test_compiles_without_graph_breaks(device):
    x, w, b = make("3d", torch.float32, device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.linear_act(*a, "gelu"), fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, w, b), ops.linear_act(x, w, b, "gelu"))
    xr = x.clone().requires_grad_()
    compiled(xr, w, b).sum().backward()
    xe = x.clone().requires_grad_()
    ops.linear_act(xe, w, b, "gelu").sum().backward()
    torch.testing.assert_close(xr.grad, xe.grad)


def test_nan_and_inf_propagate():
    x, w, b = make("tail", torch.float32, "cpu")
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    out = ops.linear_act(x, w, b, "gelu_tanh")
    assert torch.isnan(out[0]).all() and not torch.isfinite(out[1]).all() and torch.isfinite(out[2:]).all()
