"""Every public op under each grad mode, in both recording modes of vlfuse._native (eager autograd on, and off
as with VLFUSE_EAGER_AUTOGRAD=0). With nothing for autograd to record the call must give the same values as the
recorded call, with outputs that do not require grad; with a differentiable argument that requires grad it is
recorded, in eager mode by the op's own autograd.Function (vlfuse._native.register_autograd), which must agree
bit for bit with the autograd kernel torch.library.register_autograd registers (what torch.ops callers and the
plain mode get). Under torch.func transforms the eager mode records the call by the same pieces in the form those
accept, and must give autograd's gradients, while the plain mode meets torch's own limitation
(pytorch/pytorch#179652); forward mode, which the ops do not implement, must raise rather than drop the tangents
in eager mode."""

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vlfuse import _native, ops

S, H, D, C = 16, 2, 8, 12


def _cases():
    torch.manual_seed(0)
    grid = torch.tensor([[1, 4, 4]])
    positions = ops.vision_positions(grid)
    freqs = ops.vision_rope_freqs(D)
    qkv = torch.randn(S, 3 * H * D)
    q, k = torch.randn(S, H, D), torch.randn(S, 1, D)
    cos, sin = torch.randn(S, D), torch.randn(S, D)
    x, weight, bias = torch.randn(S, C), torch.rand(C) + 0.5, torch.randn(C)
    patches, embed_w = torch.randn(S, 24), torch.randn(5, 24)
    table = torch.randn(9, C)  # a 3 x 3 position table
    # (name: the op, then what the case varies; function, its tensor arguments, which of them are differentiable)
    return [
        ("rope_qkv", lambda a, b, c: ops.rope_qkv(a, b, c, H, "hsd"), [qkv, positions, freqs], [0, 2]),
        ("rope", ops.rope, [q, k, positions, freqs], [0, 1, 3]),
        ("rope_cos_sin", ops.rope_cos_sin, [q, k, cos, sin], [0, 1, 2, 3]),
        ("merge2x2", lambda a, g, w, b: ops.merge2x2(a, g, w, b), [x, grid, weight, bias], [0, 2, 3]),
        ("merge2x2 postshuffle_norm", lambda a, g, w, b: ops.merge2x2(a, g, w, b, postshuffle_norm=True),
         [x, grid, weight.repeat(4), bias.repeat(4)], [0, 2, 3]),
        ("patch_embed", ops.patch_embed, [patches, embed_w], [0, 1]),
        ("interp_pos_embed", lambda t, g, b: ops.interp_pos_embed(t, g, 2, b), [table, grid, bias], [0, 2]),
        ("linear_act", lambda a, w, b: ops.linear_act(a, w, b, "quick_gelu"), [x, embed_w[:, :C], bias[:5]], [0, 1, 2]),
        ("segment_attention", lambda a, b, c: ops.segment_attention(a, b, c, ((0, 2, S // 2),)),
         [x.T.reshape(2, S, -1), x.T.reshape(2, S, -1).flip(1), x.T.reshape(2, S, -1) * 0.5], [0, 1, 2]),
    ]


CASES = _cases()
# Public functions that record themselves with a Function of their own in both modes (rope_qkv: its v is a view
# of qkv, which no op may return; see vlfuse._native). That Function is in torch.func's form in both modes.
SELF_RECORDING = {"rope_qkv"}


def _plain_raises_under_torch_func(name, recording):
    return recording == "plain" and name not in SELF_RECORDING


@contextlib.contextmanager
def _eager_autograd(enabled):
    previous = _native.set_eager_autograd(enabled)
    try:
        yield
    finally:
        _native.set_eager_autograd(previous)


@pytest.fixture(params=["eager", "plain"])
def recording(request):
    """Runs a test in each recording mode; the value says which."""
    with _eager_autograd(request.param == "eager"):
        yield request.param


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad_no_requires"])
def test_unrecorded_calls_match_recorded_ones(name, fn, args, diff, mode, recording):
    leaves = [a.detach().clone().requires_grad_(i in diff) for i, a in enumerate(args)]
    recorded = _outputs(fn(*leaves))
    assert all(o.requires_grad for o in recorded)

    plain = [a.detach().clone() for a in args]
    if mode == "no_grad":
        ctx, call_args = torch.no_grad(), leaves  # arguments that require grad, grad mode off
    elif mode == "inference_mode":
        ctx, call_args = torch.inference_mode(), plain
    else:
        ctx, call_args = contextlib.nullcontext(), plain  # grad mode on, nothing requires grad
    with ctx:
        out = _outputs(fn(*call_args))
    assert len(out) == len(recorded)
    for o, r in zip(out, recorded):
        assert not o.requires_grad and o.grad_fn is None
        torch.testing.assert_close(o, r.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_one_differentiable_argument_is_enough_to_record(name, fn, args, diff, recording):
    for i in diff:
        call = [a.detach().clone().requires_grad_(j == i) for j, a in enumerate(args)]
        out = _outputs(fn(*call))
        sum(o.float().sum() for o in out).backward()
        assert call[i].grad is not None, f"{name}: no gradient reached argument {i}"


def _values_and_grads(fn, args, diff, autocast=False):
    leaves = [a.detach().clone().requires_grad_(i in diff) for i, a in enumerate(args)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _outputs(fn(*leaves))
    torch.autograd.backward(out, _cotangents(out))  # outside autocast, as in training
    return out, [leaves[i].grad for i in diff]


def _cotangents(outputs):
    torch.manual_seed(1)
    return [torch.randn_like(o) for o in outputs]


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_eager_function_matches_the_registered_autograd_kernel(name, fn, args, diff):
    with _eager_autograd(True):
        out, grads = _values_and_grads(fn, args, diff)
    assert all(type(o.grad_fn).__name__.startswith(f"vlfuse_{name.split()[0]}_Function") for o in out)

    with _eager_autograd(False):  # every call goes through torch.ops' Autograd kernel, or its own Function
        registered_out, registered_grads = _values_and_grads(fn, args, diff)
    plain_node = f"vlfuse_{name}_Function" if name in SELF_RECORDING else "GeneratedBackwardFor_vlfuse"
    assert all(type(o.grad_fn).__name__.startswith(plain_node) for o in registered_out)
    for a, b in zip(out + grads, registered_out + registered_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_autocast_calls_are_recorded_by_the_registered_kernel(name, fn, args, diff):
    # patch_embed's autocast rule casts above autograd, as nn.Linear does: autograd records the casts and the
    # bf16 GEMM, so the eager Function (which would sit above the casts) must step aside under autocast.
    with _eager_autograd(True):
        out, grads = _values_and_grads(fn, args, diff, autocast=True)
    with _eager_autograd(False):
        registered_out, registered_grads = _values_and_grads(fn, args, diff, autocast=True)
    for a, b in zip(out + grads, registered_out + registered_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _loss(fn, cotangents):
    # A scalar whose gradient is the vector-Jacobian product of fn with the fixed cotangents.
    return lambda *a: sum((o * g).sum() for o, g in zip(_outputs(fn(*a)), cotangents))


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_torch_func_grad_matches_autograd(name, fn, args, diff, recording):
    # torch.func transforms accept only autograd.Functions with a separate setup_context; call_op switches to
    # that form under them (the one-piece eager Function, and torch.library's generated one, raise there).
    cotangents = _cotangents(_outputs(fn(*args)))
    if _plain_raises_under_torch_func(name, recording):
        with pytest.raises(RuntimeError, match="must override the setup_context"):
            torch.func.grad(_loss(fn, cotangents), argnums=tuple(diff))(*args)
        return  # pytorch/pytorch#179652
    grads = torch.func.grad(_loss(fn, cotangents), argnums=tuple(diff))(*args)
    for got, want in zip(grads, _values_and_grads(fn, args, diff)[1]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap runs the ops sample by sample
def test_torch_func_vmap_of_grad_gives_per_sample_gradients(name, fn, args, diff, recording):
    torch.manual_seed(3)
    batch = [torch.stack([a, a + 0.25 * torch.randn_like(a)]) if i == diff[0] else a for i, a in enumerate(args)]
    cotangents = _cotangents(_outputs(fn(*args)))
    in_dims = tuple(0 if i == diff[0] else None for i in range(len(args)))
    per_sample_grad = torch.func.vmap(torch.func.grad(_loss(fn, cotangents), argnums=diff[0]), in_dims=in_dims)
    if _plain_raises_under_torch_func(name, recording):
        with pytest.raises(RuntimeError, match="must override the setup_context"):
            per_sample_grad(*batch)
        return  # pytorch/pytorch#179652
    per_sample = per_sample_grad(*batch)
    for s in range(2):
        sample = [batch[i][s] if i == diff[0] else a for i, a in enumerate(args)]
        torch.testing.assert_close(per_sample[s], _values_and_grads(fn, sample, diff[:1])[1][0])


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_func_jacrev_matches_autograd_jacobian(recording):
    _, fn, (x, _, weight, bias), _ = CASES[3]
    x, weight, bias, grid = x[:4].double(), weight.double(), bias.double(), torch.tensor([[1, 2, 2]])
    if recording == "plain":
        with pytest.raises(RuntimeError, match="must override the setup_context"):
            torch.func.jacrev(lambda w: fn(x, grid, w, bias))(weight)
        return  # pytorch/pytorch#179652
    jac = torch.func.jacrev(lambda w: fn(x, grid, w, bias))(weight)
    assert jac.shape == (1, 4 * C, C)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda w: fn(x, grid, w, bias), weight))


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["torch.func.jvp", "torch.func.jacfwd", "forward_ad"])
def test_forward_mode_raises_instead_of_dropping_tangents(name, fn, args, diff, mode):
    # Below autograd the tangents would be lost and the output's tangent left zero (torch.func) or None. Only the
    # eager mode can tell (it reads the open forward-AD level); in the plain mode they are lost (see _native).
    i = diff[0]

    def of_one(a):
        return fn(*args[:i], a, *args[i + 1 :])

    with _eager_autograd(True), pytest.raises(RuntimeError, match=f"vlfuse::{name.split()[0]} has no forward-mode derivative"):
        if mode == "torch.func.jvp":
            torch.func.jvp(of_one, (args[i],), (torch.ones_like(args[i]),))
        elif mode == "torch.func.jacfwd":
            torch.func.jacfwd(of_one)(args[i])
        else:
            with torch.autograd.forward_ad.dual_level():
                of_one(torch.autograd.forward_ad.make_dual(args[i], torch.ones_like(args[i])))


def test_plain_mode_drops_forward_mode_tangents():
    # What _native documents for the plain mode: nothing reads the forward-AD level there, so the tangent is lost.
    _, fn, (x, grid, weight, bias), _ = CASES[3]
    with _eager_autograd(False):
        _, tangent = torch.func.jvp(lambda a: fn(a, grid, weight, bias), (x,), (torch.ones_like(x),))
        assert not tangent.any()
        with torch.autograd.forward_ad.dual_level():
            out = fn(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), grid, weight, bias)
            assert torch.autograd.forward_ad.unpack_dual(out).tangent is None


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_func_vmap_matches_a_loop(name, fn, args, diff, recording):
    torch.manual_seed(4)
    i = diff[0]
    batch = torch.stack([args[i], torch.randn_like(args[i])])
    in_dims = tuple(0 if j == i else None for j in range(len(args)))
    batched = _outputs(torch.func.vmap(fn, in_dims=in_dims)(*args[:i], batch, *args[i + 1 :]))
    for s in range(2):
        for got, want in zip(batched, _outputs(fn(*args[:i], batch[s], *args[i + 1 :]))):
            torch.testing.assert_close(got[s], want, rtol=0, atol=0)


def test_rope_inplace_is_recorded_alike_in_both_modes(recording):
    # rope_ writes into q and k: torch.library registers autograd for functional ops only, so its Function
    # (register_autograd's mutated_args) records it in both modes, with rope's gradient.
    _, fn, (q, k, positions, freqs), _ = CASES[1]
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    q2, k2 = (t * 1 for t in leaves)
    out = ops.rope_(q2, k2, positions, freqs)
    assert out[0] is q2 and out[1] is k2 and type(q2.grad_fn).__name__.startswith("vlfuse_rope__Function")
    want = fn(q, k, positions, freqs)
    torch.testing.assert_close(list(out), list(want), rtol=0, atol=0)
    cotangents = _cotangents(want)
    torch.autograd.backward(out, cotangents)
    _, grads = _values_and_grads(fn, [q, k, positions, freqs], [0, 1])
    for got, expected in zip(leaves, grads):
        torch.testing.assert_close(got.grad, expected, rtol=0, atol=0)


def test_switch_reports_and_restores_its_setting():
    with _eager_autograd(False):
        assert not _native.eager_autograd_enabled()
        assert _native.set_eager_autograd(True) is False
        assert _native.eager_autograd_enabled()
        _native.set_eager_autograd(False)
    assert _native.eager_autograd_enabled() == (_native.private_api_problem() is None)


@pytest.mark.parametrize("version", ["2.11.0", "2.14.1+cu130", "2.12.0a0+git1234"])
def test_tested_torch_versions_allow_the_eager_mode(version):
    assert _native.private_api_problem(version) is None


@pytest.mark.parametrize("version", ["2.10.0", "2.15.0", "3.0.0", "nightly"])
def test_other_torch_versions_keep_the_plain_mode(version):
    assert "tested on torch 2.11 to 2.14" in _native.private_api_problem(version)


def test_missing_private_api_keeps_the_plain_mode_with_one_warning(monkeypatch):
    with _eager_autograd(False), monkeypatch.context() as patch:
        # a name this torch lacks, as a later torch may lack one of the real ones
        patch.setattr(_native, "_PRIVATE_C_APIS", (*_native._PRIVATE_C_APIS, "_vlfuse_missing"))
        patch.setattr(_native, "_warned", False)
        assert "lacks torch._C._vlfuse_missing" in _native.private_api_problem()
        with pytest.warns(RuntimeWarning, match="eager autograd recording is off because .* lacks"):
            _native.set_eager_autograd(True)
        assert not _native.eager_autograd_enabled()
        _, fn, args, diff = CASES[1]
        out, _ = _values_and_grads(fn, args, diff)
        assert all(type(o.grad_fn).__name__.startswith("GeneratedBackwardFor_vlfuse") for o in out)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _native.set_eager_autograd(True)  # warned once already


def test_environment_switch_is_read_at_import():
    code = "from vlfuse import _native; print(_native.eager_autograd_enabled())"
    env = {**os.environ, _native.EAGER_AUTOGRAD_VARIABLE: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_op_gradient_tests_pass_in_the_plain_mode():
    """The autograd tests of the op test files, rerun with VLFUSE_EAGER_AUTOGRAD=0 (test_grad_mode runs both)."""
    tests = Path(__file__).parent
    files = [str(tests / f"test_{op}.py") for op in ("rope", "merge", "patchify")]
    env = {**os.environ, _native.EAGER_AUTOGRAD_VARIABLE: "0"}
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-k", "grad or backward"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
