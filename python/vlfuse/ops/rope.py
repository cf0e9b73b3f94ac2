"""Rotary embedding ops: the fused qkv split + RoPE-2D of Qwen2-VL's vision attention, the general
multi-axis rotary (1-D, 2-D and the LLM's 3-axis multimodal RoPE), and a drop-in for HF's cos/sin form.

Pairing is rotate-half: element i pairs with i + D/2. The angle of pair i for a token with integer positions
pos[0..A) is sum_a pos[a] * freqs[a, i], in float32; the rotation is computed in float32 and cast back.
Argument checks live in the C++ ops (csrc/rope/rope.cpp); the fake kernels below repeat them (same conditions
and messages), so torch.compile reports a bad call as eager does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._native import call_op, call_op_eager, forward_mode_error, must_record, register_autograd
from ._checks import check_dim, check_float_tensor, check_same_device, check_type, check_value, dtype_name, shape

__all__ = ["rope_qkv", "rope", "rope_", "rope_cos_sin", "vision_rope_freqs", "vision_positions"]

_LAYOUTS = ("shd", "hsd")


def rope_qkv(
    qkv: Tensor, positions: Tensor, freqs: Tensor, num_heads: int, out_layout: str = "shd"
) -> tuple[Tensor, Tensor, Tensor]:
    """Splits the qkv projection and rotates q and k in one pass.

    qkv:       [S, 3 * num_heads * D]  (q, k, v blocks in that order, each [num_heads, D]); any strides
    positions: [S, A] int64/int32      (A = 2 for the vision tower: h, w)
    freqs:     [A, D / 2] float32      (see vision_rope_freqs)
    returns q, k, v: [S, H, D] for out_layout="shd", [H, S, D] for "hsd" (what SDPA takes). q and k are new
    contiguous tensors; v is a view of qkv's v block in that layout (strides [3 * H * D, D, 1] for "shd"), as
    HF's own split hands it out: nothing copies it. Differentiable w.r.t. qkv (the gradients of q, k and v are
    packed into one in one pass), and w.r.t. freqs when it requires grad.
    """
    if must_record(qkv, freqs):
        function = _RopeQKVCompiledFunction if torch.compiler.is_compiling() else _RopeQKVFunction
        return function.apply(qkv, positions, freqs, num_heads, out_layout)
    q, k = call_op(torch.ops.vlfuse.rope_qkv.default, qkv, positions, freqs, num_heads, out_layout)
    # Unrecorded, as q and k are: a view of a tensor that requires grad would require grad even under no_grad.
    return q, k, _v_block(qkv.detach(), num_heads, out_layout)


def _v_block(qkv: Tensor, num_heads: int, out_layout: str) -> Tensor:
    """qkv's v block as a view: [S, H, D] ("shd") or [H, S, D] ("hsd"). Called after the op has checked qkv."""
    v = qkv.unflatten(1, (3, num_heads, -1)).select(1, 2)
    return v.transpose(0, 1) if out_layout == "hsd" else v


def rope(q: Tensor, k: Tensor, positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotates q [S, Hq, D] and k [S, Hk, D] (Hq may differ from Hk; unit stride on D, other strides free).

    positions: [S, A] integer, A in 1..4; freqs: [A, D / 2] float32. Returns new contiguous tensors.
    """
    return call_op(torch.ops.vlfuse.rope.default, q, k, positions, freqs, False)


def rope_(q: Tensor, k: Tensor, positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """In-place rope: rotates q [S, Hq, D] and k [S, Hk, D] where they are (unit stride on D, no overlapping
    memory). Returns (q, k). Differentiable w.r.t. q and k (not freqs) when they are non-leaf tensors."""
    call_op(torch.ops.vlfuse.rope_.default, q, k, positions, freqs, False)
    return q, k


def rope_cos_sin(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Exactly HF transformers' ``apply_rotary_pos_emb_vision(q, k, cos, sin)``, fused.

    q: [S, Hq, D], k: [S, Hk, D]; cos, sin: [S, D] (any float dtype; used in float32).
    out = x * cos + rotate_half(x) * sin, computed in float32, returned in q's dtype.
    """
    return call_op(torch.ops.vlfuse.rope_cos_sin.default, q, k, cos, sin, False)


def vision_rope_freqs(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> Tensor:
    """[2, head_dim / 2] float32 frequency matrix of Qwen2-VL's vision RoPE-2D.

    With Q = head_dim / 4 and inv_freq[j] = 1 / theta ** (2j / (head_dim / 2)) (HF's float32 rounding): pairs [0, Q) turn with the h
    position, pairs [Q, 2Q) with w; the remaining pairs (head_dim / 2 - 2Q of them) do not turn.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"vlfuse.vision_rope_freqs: head_dim must be a positive even number, got {head_dim}")
    half = head_dim // 2
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    freqs = torch.zeros(2, half, dtype=torch.float32, device=device)
    freqs[0, :quarter] = inv_freq[:quarter]
    freqs[1, quarter : 2 * quarter] = inv_freq[:quarter]
    return freqs


def vision_positions(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """[S, 2] int64 (h, w) patch positions for grid_thw [items, 3] (t, h, w in patches), in Qwen2-VL order:
    per item, t frames, each over h-blocks, w-blocks, then the merge_size x merge_size window row-major.
    Built on grid_thw's device with no per-item Python loop (one host read of the total token count)."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"vlfuse.vision_positions: grid_thw must be [items, 3], got shape {tuple(grid_thw.shape)}")
    if merge_size < 1:
        raise ValueError(f"vlfuse.vision_positions: merge_size must be >= 1, got {merge_size}")
    g = grid_thw.to(torch.int64)
    t, h, w = g.unbind(-1)
    if bool(((h % merge_size) != 0).any() | ((w % merge_size) != 0).any() | (g < 0).any()):
        raise ValueError(
            f"vlfuse.vision_positions: grid_thw h and w must be non-negative multiples of merge_size={merge_size}, "
            f"got {grid_thw.tolist()}"
        )
    per_frame = h * w
    counts = t * per_frame
    total = int(counts.sum())
    device = g.device
    item = torch.repeat_interleave(torch.arange(g.shape[0], device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    idx = torch.arange(total, device=device) - starts[item]
    idx = idx % per_frame[item]  # every frame repeats the same positions
    m = merge_size
    wb_count = w[item] // m
    window = idx % (m * m)
    block = idx // (m * m)
    hpos = (block // wb_count) * m + window // m
    wpos = (block % wb_count) * m + window % m
    return torch.stack([hpos, wpos], dim=-1)


# ---- fake (meta) kernels: the C++ checks (csrc/rope/rope.cpp), in its order, and the output shapes ------------

_MAX_AXES = 4  # rope::kMaxAxes


def _check_angle_source(op, positions, freqs, tokens, head_dim, x, x_name) -> None:
    check_same_device(positions, "positions", x, x_name, op)
    check_same_device(freqs, "freqs", x, x_name, op)
    check_type(
        positions.dtype in (torch.int64, torch.int32),
        op,
        "positions must be int64 or int32, got ",
        dtype_name(positions.dtype),
    )
    check_value(positions.dim() == 2, op, "positions must be 2-D [tokens, axes], got shape ", shape(positions))
    check_value(
        positions.shape[0] == tokens, op, "positions has ", positions.shape[0], " rows but ", x_name, " has ",
        tokens, " tokens",
    )
    axes = positions.shape[1]
    check_value(1 <= axes <= _MAX_AXES, op, "positions must have 1 to ", _MAX_AXES, " axes (columns), got ", axes)
    check_type(
        freqs.dtype in (torch.float32, torch.float64), op, "freqs must be float32 (or float64), got ",
        dtype_name(freqs.dtype),
    )
    check_value(
        freqs.dim() == 2 and freqs.shape[0] == axes and freqs.shape[1] == head_dim // 2,
        op,
        f"freqs must be [axes, head_dim / 2] = [{axes}, {head_dim // 2}], got shape ",
        shape(freqs),
    )


def _check_qk(op, t, name, q=None) -> None:
    """q [S, Hq, D] / k [S, Hk, D]; q is the tensor t must agree with, None for that first one."""
    check_float_tensor(t, op, name)
    check_dim(t, 3, op, name, "[tokens, heads, head_dim]")
    if q is not None:
        check_same_device(t, name, q, "q", op)
        check_type(
            t.dtype == q.dtype, op, name, " has dtype ", dtype_name(t.dtype), " but q has ", dtype_name(q.dtype)
        )
        check_value(
            t.shape[0] == q.shape[0] and t.shape[2] == q.shape[2],
            op,
            f"{name} must be [tokens, heads, {q.shape[2]}] with {q.shape[0]} tokens like q, got shape ",
            shape(t),
        )
    check_value(
        t.shape[2] % 2 == 0 and t.shape[2] > 0, op, "head_dim (last dimension of ", name,
        ") must be even and positive, got ", t.shape[2],
    )


def _parse_layout(op, out_layout) -> bool:
    check_value(out_layout in _LAYOUTS, op, f'out_layout must be "shd" or "hsd", got "{out_layout}"')
    return out_layout == "hsd"


def _as_shd(t, hsd):
    return t.transpose(0, 1) if hsd else t


@torch.library.register_fake("vlfuse::rope_qkv")
def _(qkv, positions, freqs, num_heads, out_layout):
    op = "rope_qkv"
    hsd = _parse_layout(op, out_layout)
    check_float_tensor(qkv, op, "qkv")
    check_dim(qkv, 2, op, "qkv", "[tokens, 3 * heads * head_dim]")
    check_value(num_heads > 0, op, "num_heads must be positive, got ", num_heads)
    width = qkv.shape[1]
    check_value(
        width % (3 * num_heads) == 0 and width > 0,
        op,
        f"last dimension of qkv must be 3 * num_heads * head_dim = 3 * {num_heads} * head_dim, got ",
        width,
    )
    head_dim = width // (3 * num_heads)
    check_value(head_dim % 2 == 0, op, "head_dim = qkv.size(1) / (3 * num_heads) must be even, got ", head_dim)
    S = qkv.shape[0]
    _check_angle_source(op, positions, freqs, S, head_dim, qkv, "qkv")
    shape_out = (num_heads, S, head_dim) if hsd else (S, num_heads, head_dim)
    return qkv.new_empty(shape_out), qkv.new_empty(shape_out)


@torch.library.register_fake("vlfuse::rope_qkv_backward")
def _(grad_q, grad_k, grad_v, positions, freqs, out_layout):
    op = "rope_qkv_backward"
    hsd = _parse_layout(op, out_layout)
    gq, gk = _as_shd(grad_q, hsd), _as_shd(grad_k, hsd)
    _check_qk(op, gq, "grad_q")
    _check_qk(op, gk, "grad_k", gq)
    if grad_v is not None:
        gv = _as_shd(grad_v, hsd)
        _check_qk(op, gv, "grad_v", gq)
    check_value(
        gk.shape[1] == gq.shape[1] and (grad_v is None or gv.shape[1] == gq.shape[1]),
        op,
        "grad_q, grad_k and grad_v must have the same number of heads",
    )
    S, H, D = gq.shape
    _check_angle_source(op, positions, freqs, S, D, gq, "grad_q")
    return grad_q.new_empty((S, 3 * H * D))


@torch.library.register_fake("vlfuse::rope")
def _(q, k, positions, freqs, inverse=False):
    op = "rope"
    _check_qk(op, q, "q")
    _check_qk(op, k, "k", q)
    _check_angle_source(op, positions, freqs, q.shape[0], q.shape[2], q, "q")
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _shares_memory(q, k) -> bool:
    """Whether at::get_overlap_status(q, k) is not No: the same tensor, or non-empty tensors of one storage whose
    byte ranges meet, or either not non-overlapping-and-dense (which the C++ status calls too hard to tell)."""
    if q is k:
        return True
    if q.numel() == 0 or k.numel() == 0:
        return False
    if torch._debug_has_internal_overlap(q) != 0 or torch._debug_has_internal_overlap(k) != 0:
        return True
    if q.untyped_storage() is not k.untyped_storage():
        return False
    q_begin, k_begin = q.storage_offset() * q.element_size(), k.storage_offset() * k.element_size()
    return q_begin < k_begin + k.numel() * k.element_size() and k_begin < q_begin + q.numel() * q.element_size()


@torch.library.register_fake("vlfuse::rope_")
def _(q, k, positions, freqs, inverse=False):
    op = "rope_"
    _check_qk(op, q, "q")
    _check_qk(op, k, "k", q)
    check_value(
        q.stride(2) == 1 and k.stride(2) == 1,
        op,
        "the in-place rotation needs unit stride on head_dim for q and k, got strides ",
        list(q.stride()),
        " and ",
        list(k.stride()),
    )
    for t, name in ((q, "q"), (k, "k")):
        check_value(
            torch._debug_has_internal_overlap(t) != 1,
            op,
            name,
            " has overlapping memory (e.g. a zero stride from expand()); an in-place rotation needs distinct "
            f"elements: pass {name}.contiguous()",
        )
    check_value(
        not _shares_memory(q, k), op, "q and k share memory; the in-place rotation needs them to be distinct tensors"
    )
    _check_angle_source(op, positions, freqs, q.shape[0], q.shape[2], q, "q")
    return None


@torch.library.register_fake("vlfuse::rope_cos_sin")
def _(q, k, cos, sin, inverse=False):
    op = "rope_cos_sin"
    _check_qk(op, q, "q")
    _check_qk(op, k, "k", q)
    S, D = q.shape[0], q.shape[2]
    for t, name in ((cos, "cos"), (sin, "sin")):
        check_same_device(t, name, q, "q", op)
        check_float_tensor(t, op, name)
        check_value(
            t.dim() == 2 and t.shape[0] == S and t.shape[1] == D,
            op,
            f"{name} must be [tokens, head_dim] = [{S}, {D}], got shape ",
            shape(t),
        )
    return q.new_empty(q.shape), k.new_empty(k.shape)


# ---- autograd --------------------------------------------------------------------------------------------------


def _angle_grad(outs, grads, half: int) -> Tensor:
    """dL/dangle [S, D/2] from rotated outputs o and their gradients g: sum over heads of g_hi o_lo - g_lo o_hi."""
    total = None
    for o, g in zip(outs, grads):
        if g is None:
            continue
        acc = torch.float64 if o.dtype == torch.float64 else torch.float32
        o, g = o.to(acc), g.to(acc)
        term = (g[..., half:] * o[..., :half] - g[..., :half] * o[..., half:]).sum(dim=1)
        total = term if total is None else total + term
    return total


def _freqs_grad(positions: Tensor, dangle: Tensor | None, freqs: Tensor) -> Tensor | None:
    if dangle is None:
        return None
    return (positions.to(dangle.dtype).transpose(0, 1) @ dangle).to(freqs.dtype)


def _rope_qkv_setup(ctx, inputs, output):
    qkv, positions, freqs, num_heads, out_layout = inputs
    ctx.out_layout = out_layout
    ctx.freqs_grad = freqs.requires_grad
    saved = [positions, freqs]
    if ctx.freqs_grad:
        saved += [output[0], output[1]]
    ctx.save_for_backward(*saved)


def _rope_qkv_backward(ctx, grad_q, grad_k):
    return _rope_qkv_grads(ctx, grad_q, grad_k, None, call_op)


def _rope_qkv_grads(ctx, grad_q, grad_k, grad_v, call):
    """The gradients of (qkv, positions, freqs, num_heads, out_layout) from those of q, k and the v view (None
    for the op, which has no v output), the backward op called by call."""
    positions, freqs, *outs = ctx.saved_tensors
    ref = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
    grad_q, grad_k = (torch.zeros_like(ref) if g is None else g for g in (grad_q, grad_k))
    grad_qkv = call(
        torch.ops.vlfuse.rope_qkv_backward.default, grad_q, grad_k, grad_v, positions, freqs, ctx.out_layout
    )
    grad_freqs = None
    if ctx.freqs_grad:
        if ctx.out_layout == "hsd":
            outs = [o.transpose(0, 1) for o in outs]
            gqk = [None if g is None else g.transpose(0, 1) for g in (grad_q, grad_k)]
        else:
            gqk = [grad_q, grad_k]
        dangle = _angle_grad(outs, gqk, freqs.shape[-1])
        grad_freqs = _freqs_grad(positions, dangle, freqs)
    return grad_qkv, None, grad_freqs, None, None


register_autograd(torch.ops.vlfuse.rope_qkv.default, _rope_qkv_backward, _rope_qkv_setup)


def _rope_qkv_function_forward(qkv, positions, freqs, num_heads, out_layout):
    q, k = call_op_eager(torch.ops.vlfuse.rope_qkv.default, qkv, positions, freqs, num_heads, out_layout)
    return q, k, _v_block(qkv, num_heads, out_layout)


def _rope_qkv_function_backward(ctx, grad_q, grad_k, grad_v):
    return _rope_qkv_grads(ctx, grad_q, grad_k, grad_v, call_op_eager)


def _rope_qkv_jvp(ctx, *tangents):
    raise forward_mode_error("vlfuse::rope_qkv")


# vlfuse.ops.rope_qkv's Function: the op and the v view recorded as one node, whose backward writes the gradient
# of qkv in one pass (see vlfuse._native on public functions that record themselves). Dynamo does not trace a
# Function that defines jvp, so torch.compile gets the same Function without the jvp that refuses forward mode.
_RopeQKVCompiledFunction = type(
    "vlfuse_rope_qkv_Function",
    (torch.autograd.Function,),
    {
        "forward": staticmethod(_rope_qkv_function_forward),
        "setup_context": staticmethod(_rope_qkv_setup),
        "backward": staticmethod(_rope_qkv_function_backward),
        "generate_vmap_rule": True,
    },
)
_RopeQKVFunction = type(
    "vlfuse_rope_qkv_Function", (_RopeQKVCompiledFunction,), {"jvp": staticmethod(_rope_qkv_jvp)}
)


def _rope_qkv_backward_setup(ctx, inputs, output):
    grad_q, grad_k, grad_v, positions, freqs, out_layout = inputs
    ctx.out_layout = out_layout
    ctx.num_heads = grad_q.shape[0] if out_layout == "hsd" else grad_q.shape[1]
    ctx.freqs_grad = freqs.requires_grad
    ctx.has_grad_v = grad_v is not None
    ctx.save_for_backward(positions, freqs)


def _rope_qkv_double_backward(ctx, grad_grad_qkv):
    # rope_qkv_backward is the transpose of the linear map qkv -> (q, k, v), so its own gradient is that map.
    if ctx.freqs_grad:
        raise NotImplementedError("vlfuse.rope_qkv: second derivatives with respect to freqs are not supported")
    positions, freqs = ctx.saved_tensors
    gq, gk = call_op(
        torch.ops.vlfuse.rope_qkv.default, grad_grad_qkv, positions, freqs, ctx.num_heads, ctx.out_layout
    )
    gv = _v_block(grad_grad_qkv, ctx.num_heads, ctx.out_layout) if ctx.has_grad_v else None
    return gq, gk, gv, None, None, None


register_autograd(
    torch.ops.vlfuse.rope_qkv_backward.default, _rope_qkv_double_backward, _rope_qkv_backward_setup
)


def _rope_setup(ctx, inputs, output):
    q, k, positions, freqs, inverse = inputs
    ctx.inverse = inverse
    ctx.shapes = (q.shape, k.shape)
    ctx.freqs_grad = freqs.requires_grad
    saved = [positions, freqs]
    if ctx.freqs_grad:
        saved += list(output)
    ctx.save_for_backward(*saved)


def _zeros_if_none(grad_q, grad_k, shapes):
    like = grad_q if grad_q is not None else grad_k
    gq = like.new_zeros(shapes[0]) if grad_q is None else grad_q
    gk = like.new_zeros(shapes[1]) if grad_k is None else grad_k
    return gq, gk


def _rope_backward(ctx, grad_q, grad_k):
    positions, freqs, *outs = ctx.saved_tensors
    grads = _zeros_if_none(grad_q, grad_k, ctx.shapes)
    gq, gk = call_op(torch.ops.vlfuse.rope.default, *grads, positions, freqs, not ctx.inverse)
    grad_freqs = None
    if ctx.freqs_grad:
        dangle = _angle_grad(outs, [grad_q, grad_k], freqs.shape[-1])
        # rotating by -angle flips the sign of the derivative
        grad_freqs = _freqs_grad(positions, -dangle if ctx.inverse else dangle, freqs)
    return gq, gk, None, grad_freqs, None


register_autograd(torch.ops.vlfuse.rope.default, _rope_backward, _rope_setup)


def _rope_inplace_setup(ctx, inputs, output):
    q, k, positions, freqs, inverse = inputs
    ctx.inverse = inverse
    ctx.shapes = (q.shape, k.shape)
    ctx.save_for_backward(positions, freqs)


def _rope_inplace_backward(ctx, grad_q, grad_k):
    positions, freqs = ctx.saved_tensors
    grads = _zeros_if_none(grad_q, grad_k, ctx.shapes)
    gq, gk = call_op(torch.ops.vlfuse.rope.default, *grads, positions, freqs, not ctx.inverse)
    return gq, gk, None, None, None


register_autograd(
    torch.ops.vlfuse.rope_.default, _rope_inplace_backward, _rope_inplace_setup, mutated_args=(0, 1)
)


def _rope_cos_sin_setup(ctx, inputs, output):
    q, k, cos, sin, inverse = inputs
    ctx.inverse = inverse
    ctx.shapes = (q.shape, k.shape)
    ctx.table_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grad else ()))


def _rope_cos_sin_backward(ctx, grad_q, grad_k):
    cos, sin, *inputs = ctx.saved_tensors
    gq, gk = call_op(
        torch.ops.vlfuse.rope_cos_sin.default, *_zeros_if_none(grad_q, grad_k, ctx.shapes), cos, sin, not ctx.inverse
    )
    grad_cos = grad_sin = None
    if ctx.table_grad:
        if ctx.inverse:
            raise NotImplementedError("vlfuse.rope_cos_sin: gradients w.r.t. cos/sin of the transposed rotation")
        # out = x * cos + rotate_half(x) * sin, so dcos = sum_h g * x and dsin = sum_h g * rotate_half(x).
        acc = torch.float64 if cos.dtype == torch.float64 else torch.float32
        grad_cos = torch.zeros(cos.shape, dtype=acc, device=cos.device)
        grad_sin = torch.zeros(sin.shape, dtype=acc, device=sin.device)
        for x, g in zip(inputs, (grad_q, grad_k)):
            if g is None:
                continue
            x, g = x.to(acc), g.to(acc)
            half = x.shape[-1] // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            grad_cos += (g * x).sum(dim=1)
            grad_sin += (g * rotated).sum(dim=1)
        grad_cos, grad_sin = grad_cos.to(cos.dtype), grad_sin.to(sin.dtype)
    return gq, gk, grad_cos, grad_sin, None


register_autograd(torch.ops.vlfuse.rope_cos_sin.default, _rope_cos_sin_backward, _rope_cos_sin_setup)
