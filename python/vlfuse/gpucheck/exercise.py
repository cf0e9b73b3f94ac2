"""Every vlfuse op forward and backward on small odd shapes, checked against vlfuse.reference in float64.

The script compute-sanitizer runs (``python -m vlfuse.gpucheck.exercise --device cuda``): odd token counts, odd
frame counts, every head_dim the vision towers use (64, 72, 80, 128), row strides that break vector alignment
and ones that keep it, int32 and int64 positions, both output layouts, merge sizes 2 and 3. ``--profile`` instead
runs the memory-bound kernels once at a full Qwen2-VL size (16 images of 448 x 448: 16384 tokens, bfloat16, the
merge at C = 1280, Qwen3-VL's 48 x 48 position table at C = 1152), the workload the Nsight Compute step measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import vlfuse.ops as ops
from vlfuse import reference

# relative to the largest magnitude of each expected tensor: one rounding to the dtype, with room for float32
# accumulation order in the reductions and GEMMs
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-6}


@dataclass
class Call:
    name: str
    dtype: torch.dtype
    vlfuse: Callable[..., Tensor | tuple]
    reference: Callable[..., Tensor | tuple]
    inputs: list[Tensor]
    grad: tuple[int, ...] = ()  # indices of the inputs gradients are taken for


def _flat(value) -> list[Tensor]:
    return [value] if isinstance(value, Tensor) else [t for item in value for t in _flat(item)]


def _relative_error(got: list[Tensor], expected: list[Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, expected, strict=True):
        a64, b64 = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
        if a64.numel() != b64.numel():
            return float("inf")
        if not bool(torch.isfinite(a64).all()):
            return float("inf")
        scale = max(float(b64.abs().max()) if b64.numel() else 0.0, 1e-12)
        worst = max(worst, float((a64 - b64).abs().max()) / scale if a64.numel() else 0.0)
    return worst


def run_call(call: Call) -> dict:
    """vlfuse's outputs and input gradients against the reference's on float64 copies of the same inputs."""
    leaves = [t.detach().clone().requires_grad_(i in call.grad) for i, t in enumerate(call.inputs)]
    outputs = _flat(call.vlfuse(*leaves))
    grads_out = [torch.randn_like(o) for o in outputs if o.is_floating_point()]
    got = [o.detach() for o in outputs]
    if call.grad:
        torch.autograd.backward([o for o in outputs if o.is_floating_point()], grads_out)
        got += [leaves[i].grad for i in call.grad]
    ref_leaves = [
        (t.detach().double() if t.is_floating_point() else t.detach()).requires_grad_(i in call.grad)
        for i, t in enumerate(call.inputs)
    ]
    ref_outputs = _flat(call.reference(*ref_leaves))
    expected = [o.detach() for o in ref_outputs]
    if call.grad:
        torch.autograd.backward([o for o in ref_outputs if o.is_floating_point()], [g.double() for g in grads_out])
        expected += [ref_leaves[i].grad for i in call.grad]
    err = _relative_error(got, expected)
    tol = TOLERANCE[call.dtype]
    return {
        "name": call.name,
        "dtype": str(call.dtype).removeprefix("torch."),
        "max_err": err,
        "tol": tol,
        "ok": err <= tol,
    }


def _randint(high: int, shape, dtype, device) -> Tensor:
    return torch.randint(0, high, shape, device=device).to(dtype)


def rope_qkv_calls(device: str) -> list[Call]:
    calls = []
    tokens, heads = 37, 3
    # (head_dim, dtype, out_layout, positions dtype, row padding: 8 keeps 16-byte rows, 3 breaks them, freqs grad)
    for head_dim, dtype, layout, pos_dtype, pad, freqs_grad in (
        (64, torch.float32, "shd", torch.int64, 3, False),
        (72, torch.bfloat16, "hsd", torch.int32, 8, False),
        (80, torch.bfloat16, "hsd", torch.int64, 3, False),
        (80, torch.float16, "shd", torch.int32, 0, False),
        (128, torch.float32, "hsd", torch.int64, 8, False),
        (80, torch.float32, "shd", torch.int64, 0, True),
    ):
        width = 3 * heads * head_dim
        base = torch.randn(tokens, width + pad, device=device, dtype=dtype)
        positions = _randint(40, (tokens, 2), pos_dtype, device)
        freqs = ops.vision_rope_freqs(head_dim, device=device)

        def fn(op, base, freqs, positions=positions, width=width, layout=layout):
            return op(base[:, :width], positions, freqs, heads, layout)

        calls.append(
            Call(
                f"rope_qkv D={head_dim} {layout} pos={str(pos_dtype)[6:]} pad={pad}"
                + (" +dfreqs" if freqs_grad else ""),
                dtype,
                lambda b, f, fn=fn: fn(ops.rope_qkv, b, f),
                lambda b, f, fn=fn: fn(reference.rope_qkv, b, f),
                [base, freqs],
                (0, 1) if freqs_grad else (0,),
            )
        )
    return calls


def rope_calls(device: str) -> list[Call]:
    calls = []
    tokens, q_heads, k_heads, axes = 29, 4, 2, 3  # the LLM's 3-axis multimodal RoPE, grouped k heads
    for head_dim, dtype in ((128, torch.float32), (80, torch.bfloat16), (64, torch.float16)):
        q_base = torch.randn(tokens, q_heads + 1, head_dim, device=device, dtype=dtype)  # q = heads 1.. : strided
        k = torch.randn(tokens, k_heads, head_dim, device=device, dtype=dtype)
        positions = _randint(50, (tokens, axes), torch.int64, device)
        freqs = torch.rand(axes, head_dim // 2, device=device) * 0.2

        def rotate(qb, k, positions=positions, freqs=freqs):
            return ops.rope(qb[:, 1:], k, positions, freqs)

        def rotate_reference(qb, k, positions=positions, freqs=freqs):
            return reference.rope(qb[:, 1:], positions, freqs), reference.rope(k, positions, freqs)

        calls.append(Call(f"rope A={axes} D={head_dim} Hq={q_heads} Hk={k_heads}", dtype, rotate, rotate_reference,
                          [q_base, k], (0, 1)))  # fmt: skip

        def rotate_inplace(qb, k, positions=positions, freqs=freqs):
            q, k = qb[:, 1:].clone(), k.clone()
            return ops.rope_(q, k, positions, freqs)

        calls.append(Call(f"rope_ D={head_dim}", dtype, rotate_inplace, rotate_reference, [q_base, k]))
    for head_dim, dtype in ((80, torch.bfloat16), (64, torch.float32)):
        q = torch.randn(tokens, q_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(tokens, k_heads, head_dim, device=device, dtype=dtype)
        angle = torch.rand(tokens, head_dim // 2, device=device) * 30
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        calls.append(
            Call(f"rope_cos_sin D={head_dim}", dtype, lambda q, k, c=cos, s=sin: ops.rope_cos_sin(q, k, c, s),
                 lambda q, k, c=cos, s=sin: reference.rope_cos_sin(q, k, c, s), [q, k], (0, 1))
        )  # fmt: skip
    return calls


def _frames(device: str, dtype: torch.dtype = torch.uint8) -> list[Tensor]:
    """An odd frame count (3 frames: the last is repeated) and an image, of different sizes."""
    shapes = ((3, 3, 56, 84), (1, 3, 28, 28))
    if dtype == torch.uint8:
        return [torch.randint(0, 256, s, dtype=torch.uint8).to(device) for s in shapes]
    return [torch.rand(s, device=device, dtype=dtype) for s in shapes]


def patchify_calls(device: str) -> list[Call]:
    calls = []
    patches_dim, embed = 3 * 2 * 14 * 14, 72
    for dtype, bias, pad in ((torch.bfloat16, False, 5), (torch.float32, True, 0)):
        base = torch.randn(37, patches_dim + pad, device=device)  # float32 rows as the processor emits them
        weight = torch.randn(embed, 3, 2, 14, 14, device=device, dtype=dtype) * 0.05
        inputs = [base, weight] + ([torch.randn(embed, device=device, dtype=dtype)] if bias else [])

        def embed_fn(op, base, weight, *bias, pad=pad):
            return op(base[:, pad // 2 : pad // 2 + patches_dim], weight, *bias)

        calls.append(
            Call(f"patch_embed N=37 pad={pad}{' +bias' if bias else ''}", dtype,
                 lambda *a, f=embed_fn: f(ops.patch_embed, *a), lambda *a, f=embed_fn: f(reference.patch_embed, *a),
                 inputs, tuple(range(len(inputs))))
        )  # fmt: skip
    for frames_dtype, out_dtype in (
        (torch.uint8, torch.float32),
        (torch.uint8, torch.bfloat16),
        (torch.float32, torch.float32),
    ):
        frames = _frames(device, frames_dtype)
        calls.append(
            Call(f"patchify frames 3+1 {str(frames_dtype)[6:]} -> {str(out_dtype)[6:]}", out_dtype,
                 lambda *f, o=out_dtype: ops.patchify(list(f), out_dtype=o)[0],
                 lambda *f, o=out_dtype: reference.patchify([x.cpu() for x in f], out_dtype=o)[0], frames)
        )  # fmt: skip
    frames = _frames(device)
    weight = torch.randn(embed, 3, 2, 14, 14, device=device, dtype=torch.bfloat16) * 0.05

    def embed_frames_reference(w, *f):
        patches = reference.patchify([x.cpu() for x in f], out_dtype=w.dtype)[0].to(w.device)
        return reference.patch_embed(patches, w)

    calls.append(
        Call("embed_frames frames 3+1", torch.bfloat16, lambda w, *f: ops.embed_frames(list(f), w)[0],
             embed_frames_reference, [weight, *frames], (0,))
    )  # fmt: skip
    return calls


def merge_calls(device: str) -> list[Call]:
    calls = []
    # (grid, merge size, channels, dtype, norm, order, column offset of x inside a wider buffer)
    for grid, m, channels, dtype, norm, order, offset in (
        (((3, 4, 6), (1, 2, 2)), 2, 80, torch.bfloat16, "layernorm", "merge", 2),
        (((3, 4, 6), (1, 2, 2)), 2, 1280, torch.bfloat16, "layernorm", "raster", 0),
        (((3, 4, 6), (1, 2, 2)), 2, 96, torch.float32, "rmsnorm", "merge", 1),
        (((1, 6, 4),), 2, 1280, torch.float32, "layernorm", "merge", 0),
        (((1, 3, 6), (2, 3, 3)), 3, 64, torch.float32, "layernorm", "raster", 0),
    ):
        grid_thw = torch.tensor(grid, device=device)
        tokens = sum(t * h * w for t, h, w in grid)
        base = torch.randn(tokens, channels + 2 * offset, device=device, dtype=dtype)
        weight = torch.rand(channels, device=device, dtype=dtype) + 0.5
        bias = torch.rand(channels, device=device, dtype=dtype) - 0.5
        inputs = [base, weight] + ([bias] if norm == "layernorm" else [])

        def merge_fn(
            op, base, weight, *bias, grid_thw=grid_thw, m=m, norm=norm, order=order, offset=offset, c=channels
        ):
            x = base[:, offset : offset + c]
            return op(x, grid_thw, weight, bias[0] if bias else None, 1e-6, norm, order, m)

        calls.append(
            Call(f"merge2x2 m={m} C={channels} {norm} {order} grid={list(grid)}", dtype,
                 lambda *a, f=merge_fn: f(ops.merge2x2, *a), lambda *a, f=merge_fn: f(reference.merge2x2, *a),
                 inputs, tuple(range(len(inputs))))
        )  # fmt: skip
    grid_thw = torch.tensor(((3, 4, 6), (1, 2, 2)), device=device)
    calls.append(
        Call("vision_positions grid=[(3,4,6),(1,2,2)]", torch.float32, lambda g: ops.vision_positions(g).double(),
             lambda g: reference.vision_positions(g.cpu()).double(), [grid_thw])
    )  # fmt: skip
    return calls


def pos_embed_calls(device: str) -> list[Call]:
    calls = []
    # (table side, grid, channels, dtype, bias, grid on the device (with tokens) or on the host)
    for side, grid, channels, dtype, bias, grid_on_device in (
        (48, ((1, 16, 22), (3, 8, 12)), 1152, torch.bfloat16, True, False),
        (48, ((1, 16, 22), (3, 8, 12)), 1152, torch.bfloat16, True, True),
        (6, ((1, 10, 14), (2, 2, 4)), 77, torch.float32, True, True),
        (5, ((1, 2, 8), (1, 6, 2)), 40, torch.float16, False, False),
    ):
        grid_thw = torch.tensor(grid)
        tokens = sum(t * h * w for t, h, w in grid)
        table = torch.randn(side * side, channels, device=device, dtype=dtype)
        inputs = [table] + ([torch.randn(channels, device=device, dtype=dtype)] if bias else [])

        def pos_fn(op, table, *bias, grid_thw=grid_thw, tokens=tokens, on_device=grid_on_device):
            grid_arg = grid_thw.to(table.device) if on_device else grid_thw
            return op(table, grid_arg, 2, bias[0] if bias else None, tokens if on_device else None)

        calls.append(
            Call(f"interp_pos_embed side={side} C={channels} grid={list(grid)}{' +bias' if bias else ''}"
                 f"{' device grid' if grid_on_device else ''}", dtype,
                 lambda *a, f=pos_fn: f(ops.interp_pos_embed, *a),
                 lambda *a, f=pos_fn: f(reference.interp_pos_embed, *a), inputs, tuple(range(len(inputs))))
        )  # fmt: skip
    return calls


def linear_act_calls(device: str) -> list[Call]:
    calls = []
    # (rows, in_features, out_features, act, dtype, bias, x's row stride: one that breaks the 16-byte packs)
    for rows, k, n, act, dtype, bias, stride in (
        (37, 1280, 5120, "quick_gelu", torch.bfloat16, True, 1280),
        (37, 1152, 4304, "gelu_tanh", torch.bfloat16, True, 1152),
        (29, 96, 70, "silu", torch.float32, True, 97),
        (13, 64, 3 * 64, "none", torch.float16, True, 64),
        (11, 40, 24, "gelu", torch.float32, False, 40),
    ):
        base = torch.randn(rows, stride, device=device, dtype=dtype)
        inputs = [base, torch.randn(n, k, device=device, dtype=dtype) / k**0.5]
        inputs += [torch.randn(n, device=device, dtype=dtype)] if bias else []

        def linear_fn(op, base, weight, *bias, k=k, act=act):
            return op(base[:, :k], weight, bias[0] if bias else None, act)

        calls.append(
            Call(f"linear_act {rows}x{k}->{n} {act}{' +bias' if bias else ''} stride={stride}", dtype,
                 lambda *a, f=linear_fn: f(ops.linear_act, *a), lambda *a, f=linear_fn: f(reference.linear_act, *a),
                 inputs, tuple(range(len(inputs))))
        )  # fmt: skip
    return calls


def all_calls(device: str) -> list[Call]:
    return (
        rope_qkv_calls(device) + rope_calls(device) + patchify_calls(device) + merge_calls(device)
        + pos_embed_calls(device) + linear_act_calls(device)
    )  # fmt: skip


def profile_workload(device: str, tiny: bool) -> None:
    """One forward and one backward of each memory-bound kernel at a full size (bfloat16), nothing else of
    vlfuse's: what Nsight Compute replays and measures."""
    items, side, channels, heads, head_dim = (1, 8, 64, 2, 80) if tiny else (16, 32, 1280, 16, 80)
    grid = torch.tensor([[1, side, side]] * items, device=device)
    tokens = items * side * side
    x = torch.randn(tokens, channels, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(channels, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(channels, device=device, dtype=torch.bfloat16, requires_grad=True)
    merged = ops.merge2x2(x, grid, weight, bias)
    merged.backward(torch.randn_like(merged))
    qkv = torch.randn(tokens, 3 * heads * head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    positions = ops.vision_positions(grid)
    q, k, v = ops.rope_qkv(qkv, positions, ops.vision_rope_freqs(head_dim, device=device), heads, "hsd")
    torch.autograd.backward([q, k, v], [torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)])
    frames = [torch.randint(0, 256, (1, 3, side * 14, side * 14), dtype=torch.uint8, device=device)] * items
    ops.patchify(frames, out_dtype=torch.bfloat16)
    # Qwen3-VL's 48 x 48 table at its tower width, resampled to the same grid (the device grid, as its tower has it)
    table_side, table_width = (4, 64) if tiny else (48, 1152)
    table = torch.randn(table_side**2, table_width, device=device, dtype=torch.bfloat16, requires_grad=True)
    positions = ops.interp_pos_embed(table, grid, 2, tokens=tokens)
    positions.backward(torch.randn_like(positions))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"profile workload: {tokens} tokens, merge C={channels}, rope_qkv {heads}x{head_dim}, position table "
          f"{table_side}x{table_side} C={table_width}, bfloat16, on {device}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlfuse.gpucheck.exercise", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="FILE", help="write {device, cases: [...]} here after every call")
    parser.add_argument("--profile", action="store_true", help="the Nsight Compute workload instead of the checks")
    parser.add_argument("--tiny", action="store_true", help="with --profile: tiny sizes (a dry run on the CPU)")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="PREFIX", help="leave out the calls whose name starts so"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.profile:
        profile_workload(args.device, args.tiny)
        return 0
    results = []
    for call in all_calls(args.device):
        if call.name.startswith(tuple(args.skip)):
            continue
        result = run_call(call)
        results.append(result)
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {call.name} [{result['dtype']}]: max relative error "
              f"{result['max_err']:.2e} (tolerance {result['tol']:.1e})", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"device": args.device, "cases": results}, handle, indent=1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
