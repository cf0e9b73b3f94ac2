"""Every public op under each grad mode: with nothing for autograd to record the call skips the autograd
layer (vlfuse._native.call_op), and must give the same values as the recorded call, with outputs that do not
require grad; with a differentiable argument that requires grad it is recorded, in eager mode by the op's own
autograd.Function (vlfuse._native.register_autograd), which must agree bit for bit with the autograd kernel
torch.library.register_autograd registers (what torch.ops callers get). Under torch.func transforms the call
is recorded by the same pieces in the form those accept, and must give autograd's gradients; forward mode,
which the ops do not implement, must raise rather than drop the tangents."""

import contextlib

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
    # (name, function, its tensor arguments, which of them are differentiable)
    return [
        ("rope_qkv", lambda a, b, c: ops.rope_qkv(a, b, c, H, "hsd"), [qkv, positions, freqs], [0, 2]),
        ("rope", ops.rope, [q, k, positions, freqs], [0, 1, 3]),
        ("rope_cos_sin", ops.rope_cos_sin, [q, k, cos, sin], [0, 1, 2, 3]),
        ("merge2x2", lambda a, g, w, b: ops.merge2x2(a, g, w, b), [x, grid, weight, bias], [0, 2, 3]),
        ("patch_embed", ops.patch_embed, [patches, embed_w], [0, 1]),
    ]


CASES = _cases()


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad_no_requires"])
def test_unrecorded_calls_match_recorded_ones(name, fn, args, diff, mode):
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
def test_one_differentiable_argument_is_enough_to_record(name, fn, args, diff):
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
def test_eager_function_matches_the_registered_autograd_kernel(name, fn, args, diff, monkeypatch):
    out, grads = _values_and_grads(fn, args, diff)
    assert all(type(o.grad_fn).__name__.startswith(f"vlfuse_{name}_Function") for o in out)

    monkeypatch.setattr(_native, "_EAGER_AUTOGRAD", {})  # every call goes through torch.ops' Autograd kernel
    registered_out, registered_grads = _values_and_grads(fn, args, diff)
    assert all(type(o.grad_fn).__name__.startswith("GeneratedBackwardFor_vlfuse") for o in registered_out)
    for a, b in zip(out + grads, registered_out + registered_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_autocast_calls_are_recorded_by_the_registered_kernel(name, fn, args, diff, monkeypatch):
    # patch_embed's autocast rule casts above autograd, as nn.Linear does: autograd records the casts and the
    # bf16 GEMM, so the eager Function (which would sit above the casts) must step aside under autocast.
    out, grads = _values_and_grads(fn, args, diff, autocast=True)
    monkeypatch.setattr(_native, "_EAGER_AUTOGRAD", {})
    registered_out, registered_grads = _values_and_grads(fn, args, diff, autocast=True)
    for a, b in zip(out + grads, registered_out + registered_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _loss(fn, cotangents):
    # A scalar whose gradient is the vector-Jacobian product of fn with the fixed cotangents.
    return lambda *a: sum((o * g).sum() for o, g in zip(_outputs(fn(*a)), cotangents))


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
def test_torch_func_grad_matches_autograd(name, fn, args, diff):
    # torch.func transforms accept only autograd.Functions with a separate setup_context; call_op switches to
    # that form under them (the plain eager Function raises there).
    cotangents = _cotangents(_outputs(fn(*args)))
    grads = torch.func.grad(_loss(fn, cotangents), argnums=tuple(diff))(*args)
    for got, want in zip(grads, _values_and_grads(fn, args, diff)[1]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap runs the ops sample by sample
def test_torch_func_vmap_of_grad_gives_per_sample_gradients(name, fn, args, diff):
    torch.manual_seed(3)
    batch = [torch.stack([a, a + 0.25 * torch.randn_like(a)]) if i == diff[0] else a for i, a in enumerate(args)]
    cotangents = _cotangents(_outputs(fn(*args)))
    in_dims = tuple(0 if i == diff[0] else None for i in range(len(args)))
    per_sample = torch.func.vmap(torch.func.grad(_loss(fn, cotangents), argnums=diff[0]), in_dims=in_dims)(*batch)
    for s in range(2):
        sample = [batch[i][s] if i == diff[0] else a for i, a in enumerate(args)]
        torch.testing.assert_close(per_sample[s], _values_and_grads(fn, sample, diff[:1])[1][0])


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_func_jacrev_matches_autograd_jacobian():
    _, fn, (x, _, weight, bias), _ = CASES[3]
    x, weight, bias, grid = x[:4].double(), weight.double(), bias.double(), torch.tensor([[1, 2, 2]])
    jac = torch.func.jacrev(lambda w: fn(x, grid, w, bias))(weight)
    assert jac.shape == (1, 4 * C, C)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda w: fn(x, grid, w, bias), weight))


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["torch.func.jvp", "torch.func.jacfwd", "forward_ad"])
def test_forward_mode_raises_instead_of_dropping_tangents(name, fn, args, diff, mode):
    # Below autograd the tangents would be lost and the output's tangent left zero (torch.func) or None.
    i = diff[0]

    def of_one(a):
        return fn(*args[:i], a, *args[i + 1 :])

    with pytest.raises(RuntimeError, match=f"vlfuse::{name} has no forward-mode derivative"):
        if mode == "torch.func.jvp":
            torch.func.jvp(of_one, (args[i],), (torch.ones_like(args[i]),))
        elif mode == "torch.func.jacfwd":
            torch.func.jacfwd(of_one)(args[i])
        else:
            with torch.autograd.forward_ad.dual_level():
                of_one(torch.autograd.forward_ad.make_dual(args[i], torch.ones_like(args[i])))


@pytest.mark.parametrize("name,fn,args,diff", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_torch_func_vmap_matches_a_loop(name, fn, args, diff):
    torch.manual_seed(4)
    i = diff[0]
    batch = torch.stack([args[i], torch.randn_like(args[i])])
    in_dims = tuple(0 if j == i else None for j in range(len(args)))
    batched = _outputs(torch.func.vmap(fn, in_dims=in_dims)(*args[:i], batch, *args[i + 1 :]))
    for s in range(2):
        for got, want in zip(batched, _outputs(fn(*args[:i], batch[s], *args[i + 1 :]))):
            torch.testing.assert_close(got[s], want, rtol=0, atol=0)
