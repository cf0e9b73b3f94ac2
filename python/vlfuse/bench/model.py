"""End to end: the Qwen2-VL vision tower (vlfuse model package vs HF's ``Qwen2VisionTransformerPretrainedModel``
with the same weights, real width; all 32 blocks on a GPU, fewer on a CPU, stated in the shape column), with a
per-part time breakdown; and a training step (loss + backward) of the ``tiny`` model, vlfuse kernels vs the
model package's eager backend (the same weights through vlfuse.reference).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .. import ops
from .core import FWD, FWD_BWD, GEMM, Case, Setup, Target, Unavailable
from .workloads import LLM_WIDTH, VISION, WORKLOADS, grid_tensor, hf_qwen2_vl, hf_vision_config, pixel_rows, tokens

TOWER_TARGET = {
    torch.float32: Target(speedup_eager=1.15, speedup_compile=1.0),
    torch.bfloat16: Target(speedup_eager=1.15, speedup_compile=1.0),
}
CPU_DEPTH = 8  # blocks of the tower on a CPU (a GPU runs all 32)


def _model_package():
    try:
        from vlfuse.models import qwen2_vl
    except ImportError as exc:
        raise Unavailable(f"the vlfuse model package is not in this build ({exc})") from exc
    return qwen2_vl


def tower_gemms(count: int, depth: int, llm_width: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM in one tower forward: patch embedding, per block qkv/proj/fc1/fc2, the merger MLP."""
    e, mlp = VISION.embed_dim, VISION.mlp_dim
    merged, hidden = count // VISION.spatial_merge_size**2, VISION.embed_dim * VISION.spatial_merge_size**2
    per_block = [(count, e, 3 * e), (count, e, e), (count, e, mlp), (count, mlp, e)]
    return [(count, VISION.patch_dim, e)] + per_block * depth + [(merged, hidden, hidden), (merged, hidden, llm_width)]


def _floor(make_calls: Callable[[], list[tuple[Callable[..., Tensor], tuple]]], backward: bool):
    """One call of every (function, operands) pair; with backward, each one's gradients too (the operands
    require grad, a fixed all-ones output gradient): the time of just those kernels, nothing around them."""
    calls = make_calls()
    if backward:
        for _, operands in calls:
            for t in operands:
                if isinstance(t, Tensor):
                    t.requires_grad_(True)

    def run() -> None:
        for fn, operands in calls:
            out = fn(*operands)
            if backward:
                out.backward(torch.ones_like(out))

    return run


def _plain_gemms(shapes, device: torch.device, dtype: torch.dtype, backward: bool = False) -> Callable[[], None]:
    """Every GEMM alone, in nn.Linear's layout (x [M, K] @ W^T, W [N, K]) as the towers run them; forward ones
    write into outputs they already hold (the GEMM's own time: fresh output pages would add page faults that are
    no part of it, and that the towers' own GEMMs may not pay)."""
    operands = {
        shape: (torch.randn(shape[0], shape[1], device=device, dtype=dtype),
                torch.randn(shape[2], shape[1], device=device, dtype=dtype))
        for shape in set(shapes)
    }  # fmt: skip
    if not backward:
        outputs = {shape: torch.empty(shape[0], shape[2], device=device, dtype=dtype) for shape in operands}
        return _floor(lambda: [(_linear_into, (*operands[shape], outputs[shape])) for shape in shapes], backward)
    return _floor(lambda: [(_linear, operands[shape]) for shape in shapes], backward)


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.mm(x, weight.t())


def _linear_into(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    return torch.mm(x, weight.t(), out=out)


def _plain_attention(plan, depth: int, device, dtype, backward: bool = False, sdpa: bool = False) -> Callable[[], None]:
    """The tower's attention calls alone on fresh operands: one ``vlfuse.ops.segment_attention`` per block over
    [H, S, D] (what the vlfuse tower issues), or with sdpa, one SDPA call per run of equal-length segments per
    block over [count, H, length, D] (what the tower issued before it had its own CPU kernel)."""
    heads, head_dim = VISION.num_heads, VISION.head_dim

    def make():
        if sdpa:
            per_block = [
                (torch.nn.functional.scaled_dot_product_attention,
                 tuple(torch.randn(count, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3)))
                for _, count, length in plan.full.groups
            ]  # fmt: skip
        else:
            qkv = tuple(torch.randn(heads, plan.tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
            per_block = [(ops.segment_attention, (*qkv, plan.full.groups))]
        return [call for _ in range(depth) for call in per_block]

    return _floor(make, backward)


def _attention_flops(grid, depth: int) -> float:
    """QK^T and PV within each frame, every block."""
    per_frame = sum(t * 4 * (h * w) ** 2 * VISION.embed_dim for t, h, w in grid)
    return float(per_frame * depth)


# op -> what it is, for the per-kind breakdown of a tower call; ops not listed are "other elementwise, copies".
OP_KINDS = {
    "GEMMs": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::cudnn_convolution", "aten::convolution_backward"),
    "attention": (
        "vlfuse::segment_attention", "vlfuse::segment_attention_backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_attention_math", "aten::_efficient_attention_forward",
        "aten::_flash_attention_forward", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention_backward",
        "aten::_scaled_dot_product_cudnn_attention_backward", "aten::_efficient_attention_backward",
        "aten::_flash_attention_backward",
    ),
    "norms and merge": ("aten::native_layer_norm", "aten::_fused_rms_norm", "aten::rms_norm", "vlfuse::merge2x2",
                        "aten::native_layer_norm_backward", "aten::_fused_rms_norm_backward",
                        "vlfuse::merge2x2_backward"),
    "rotary": ("vlfuse::rope_qkv", "vlfuse::rope", "vlfuse::rope_cos_sin", "vlfuse::rope_qkv_backward",
               "vlfuse::rope_backward"),
    "bias + activation epilogues": ("vlfuse::linear_act", "vlfuse::linear_act_backward", "aten::gelu", "aten::gelu_",
                                    "aten::silu", "aten::silu_", "aten::sigmoid", "aten::gelu_backward",
                                    "aten::silu_backward", "aten::sigmoid_backward"),
    "copies and concatenation": ("aten::copy_", "aten::cat", "aten::index", "aten::clone", "aten::contiguous",
                                 "aten::fill_", "aten::index_put_", "aten::_index_put_impl_"),
}


def part_breakdown(call: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of one call by kind of work: each op's own time (its children, e.g. the GEMM inside
    linear_act or addmm's bias copy, are counted as themselves), on the device where there is one. What no kind
    lists (residual adds, position ids, small elementwise ops) is "other". The kinds line up with a tower's floor:
    "GEMMs" and "attention" are what the floor times alone; the rest is the work around them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    call()  # warm
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e3
    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    parts = dict.fromkeys(OP_KINDS, 0.0)
    for event in prof.key_averages():
        kind = kind_of.get(event.key)
        if kind is None:
            continue
        own = event.self_device_time_total if cuda else event.self_cpu_time_total
        parts[kind] += own / 1e3
    parts["other (residual adds, positions, small ops)"] = max(total - sum(parts.values()), 0.0)
    parts["total"] = total
    return {k: round(v, 3) for k, v in parts.items()}


def _forward_backward(tower: Callable[[Tensor], Tensor], params: list, pixel_values: Tensor) -> Tensor:
    """One training step's tower work: forward, backward of an all-ones output gradient, fresh parameter grads;
    returns the output."""
    for p in params:
        p.grad = None
    out = tower(pixel_values)
    out.backward(torch.ones_like(out))
    return out


def compile_hf_tower(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.compile of HF's tower is timed: everywhere but in a reduced type on a CPU without a native GEMM
    for it, where the compiled tower runs the same scalar fallback GEMMs as eager, minutes per call."""
    from vlfuse.ops.linear_act import cpu_gemm_is_native

    return device.type != "cpu" or cpu_gemm_is_native(dtype)


def build_vision_tower(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen2_vl()
    _model_package()
    from vlfuse.models.vision_tower import VisionTower
    from vlfuse.patch import qwen2_vl as patch_qwen2_vl

    depth = case.param("depth") or (VISION.depth if device.type == "cuda" else CPU_DEPTH)
    llm_width = LLM_WIDTH["2B"]
    grid = case.param("grid")
    count = tokens(grid)
    backward = case.mode == FWD_BWD
    torch.manual_seed(0)
    hf_config = hf_vision_config(depth=depth, llm_width=llm_width)
    hf_tower = hf.Qwen2VisionTransformerPretrainedModel(hf_config).to(device=device, dtype=case.dtype).eval()
    tower = VisionTower.from_hf(hf_tower).eval()
    patched = hf.Qwen2VisionTransformerPretrainedModel(hf_config).to(device=device, dtype=case.dtype).eval()
    patched.load_state_dict(hf_tower.state_dict())
    patch_qwen2_vl(patched)
    pixel_values = pixel_rows(grid, VISION.in_channels, VISION.temporal_patch_size, VISION.patch_size, device)
    # HF's towers take the grid on the model's device (their rotary tables meet it there); the vlfuse tower plans
    # from the host grid a data loader hands over, which spares it a device-to-host copy
    grid_thw = grid_tensor(grid, device)
    host_grid = grid_thw.cpu()

    def vlfuse_tower(pixel_values):
        return tower(pixel_values, host_grid)

    def hf_vision_tower(pixel_values):
        return hf_tower(pixel_values, grid_thw=grid_thw).pooler_output

    def patched_tower(pixel_values):
        return patched(pixel_values, grid_thw=grid_thw).pooler_output

    def patched_call():
        if not backward:
            with torch.no_grad():
                return patched_tower(pixel_values)
        return _forward_backward(patched_tower, list(patched.parameters()), pixel_values)

    with torch.no_grad():
        expected = hf_vision_tower(pixel_values)
        err = float((patched_tower(pixel_values) - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not err <= 4.0 * math.sqrt(depth) * (2e-5 if case.dtype == torch.float32 else 2.0**-6):
        raise RuntimeError(f"vlfuse.bench: the patched HF tower is off HF's by {err:.3g}")

    shapes = tower_gemms(count, depth, llm_width)
    flops = float(sum(2 * m * k * n for m, k, n in shapes))
    plan = tower.plan(host_grid)
    # In a reduced type HF's tower is itself far from exact (its bf16 weight gradients most of all), so where the
    # two disagree HF's code in float64 judges; float32 towers agree within tolerance and skip the float64 copy.
    hf_tower64 = copy.deepcopy(hf_tower).double() if case.dtype != torch.float32 else None

    def hf_vision_tower64(pixel_values):
        return hf_tower64(pixel_values, grid_thw=grid_thw).pooler_output

    def profile() -> dict:
        if backward:
            return {
                "vlfuse": part_breakdown(
                    lambda: _forward_backward(vlfuse_tower, list(tower.parameters()), pixel_values)
                ),
                "HF eager": part_breakdown(
                    lambda: _forward_backward(hf_vision_tower, list(hf_tower.parameters()), pixel_values)
                ),
            }
        with torch.no_grad():
            return {
                "vlfuse": part_breakdown(lambda: vlfuse_tower(pixel_values)),
                "HF eager": part_breakdown(lambda: hf_vision_tower(pixel_values)),
            }

    passes = 3 if backward else 1  # a GEMM's backward is two GEMMs of its size
    return Setup(
        args=(pixel_values,),
        vlfuse=vlfuse_tower,
        eager=hf_vision_tower,
        vlfuse_params=list(tower.parameters()) if backward else (),
        eager_params=list(hf_tower.parameters()) if backward else (),
        reference=hf_vision_tower64 if hf_tower64 is not None else None,
        reference_params=list(hf_tower64.parameters()) if hf_tower64 is not None and backward else (),
        shape=f"depth {depth} of {VISION.depth}, width {VISION.embed_dim}, [{count}, {VISION.patch_dim}] -> "
        f"[{count // 4}, {llm_width}]",
        baseline="HF Qwen2VisionTransformerPretrainedModel (SDPA), same weights",
        limit=_plain_gemms(shapes, device, case.dtype, backward),
        limit_kind=GEMM,
        work=passes * flops,
        flops=passes * (flops + _attention_flops(grid, depth)),
        tol_scale=4.0 * math.sqrt(depth) * (4.0 if backward else 1.0),
        compile=compile_hf_tower(device, case.dtype),
        note=(f"vision tower: {depth} of {VISION.depth} blocks (real width); " if depth < VISION.depth
              else "") + "limit = the tower's GEMMs alone; 'attention alone' = its attention calls alone (floor = both); "
        "'SDPA alone' = the same attention through torch's SDPA",
        profile=profile,
        extras={
            "HF + vlfuse.patch": patched_call,
            "attention alone": _plain_attention(plan, depth, device, case.dtype, backward),
            "SDPA alone": _plain_attention(plan, depth, device, case.dtype, backward, sdpa=True),
        },
    )


def build_long_video(case: Case, device: torch.device) -> Setup:
    """Peak memory of inference over a long video, encoded in chunks of whole frames vs in one piece."""
    hf = hf_qwen2_vl()
    _model_package()
    from vlfuse.models.vision_tower import VisionTower

    depth, max_tokens = case.param("depth"), case.param("max_tokens")
    grid = case.param("grid")
    torch.manual_seed(0)
    hf_config = hf_vision_config(depth=depth, llm_width=LLM_WIDTH["2B"])
    tower = VisionTower.from_hf(hf.Qwen2VisionTransformerPretrainedModel(hf_config)).to(device, case.dtype).eval()
    pixel_values = pixel_rows(grid, VISION.in_channels, VISION.temporal_patch_size, VISION.patch_size, device)
    grid_thw = grid_tensor(grid, device).cpu()
    return Setup(
        args=(pixel_values,),
        vlfuse=lambda pixel_values: tower(pixel_values, grid_thw, max_tokens=max_tokens),
        eager=lambda pixel_values: tower(pixel_values, grid_thw),
        shape=f"depth {depth}, width {VISION.embed_dim}, [{tokens(grid)}, {VISION.patch_dim}], chunks of "
        f"<= {max_tokens} patches",
        baseline="the same vlfuse tower in one piece (no max_tokens)",
        tol_scale=4.0 * math.sqrt(depth),
        compile=False,
        note="memory row: compare mem_vlfuse (chunked) with mem_eager (one piece) across the frame counts",
    )


def build_train_step(case: Case, device: torch.device) -> Setup:
    qwen2_vl = _model_package()
    config = qwen2_vl.Qwen2VLConfig.preset("tiny")
    batch, image_side, text_tokens = case.param("batch"), case.param("image"), case.param("text")
    torch.manual_seed(0)
    model = qwen2_vl.Qwen2VL(config, backend="vlfuse").to(device=device, dtype=case.dtype).train()
    eager_model = qwen2_vl.Qwen2VL(config, backend="eager").to(device=device, dtype=case.dtype).train()
    eager_model.load_state_dict(model.state_dict())
    vision = config.vision
    side = image_side // vision.patch_size
    visual = side * side // vision.spatial_merge_size**2
    span = [config.vision_start_token_id] + [config.image_token_id] * visual + [config.vision_end_token_id]
    rows = [torch.randint(0, 256, (text_tokens,)).tolist() + span for _ in range(batch)]
    input_ids = torch.tensor(rows, device=device)
    grid_thw = torch.tensor([[1, side, side]] * batch, device=device)
    pixel_values = pixel_rows(((1, side, side),) * batch, vision.in_channels, vision.temporal_patch_size,
                              vision.patch_size, device)

    def vlfuse_step(pixel_values):
        return model(input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw, labels=input_ids).loss

    def eager_step(pixel_values):
        return eager_model(input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw, labels=input_ids).loss

    return Setup(
        args=(pixel_values,),
        vlfuse=vlfuse_step,
        eager=eager_step,
        shape=f"batch {batch} x ({image_side}x{image_side} image + {text_tokens} text tokens), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params",
        baseline="the same model on backend='eager' (vlfuse.reference ops), same weights",
        vlfuse_params=list(model.parameters()),
        eager_params=list(eager_model.parameters()),
        tol_scale=50.0,
        compile=False,
        note="train step: loss + backward (gradients of every parameter compared); the optimizer update, identical "
        "for both backends, is left out; torch.compile not run (the baseline is vlfuse's own eager backend)",
    )


def cases() -> list[Case]:
    out = []
    for name, dtype, mode in (
        ("1 image 448x448", torch.float32, FWD),
        ("4 images, mixed sizes", torch.float32, FWD),
        ("16 images, mixed sizes", torch.float32, FWD),
        ("video 16f 448x448", torch.float32, FWD),
        ("1 image 448x448", torch.float32, FWD_BWD),
        ("4 images, mixed sizes", torch.float32, FWD_BWD),
        ("1 image 448x448", torch.bfloat16, FWD),
        ("4 images, mixed sizes", torch.bfloat16, FWD),
        ("16 images, mixed sizes", torch.bfloat16, FWD),
        ("4 images, mixed sizes", torch.bfloat16, FWD_BWD),
    ):
        params = (("grid", WORKLOADS[name]),)
        out.append(Case("vision tower", name, dtype, mode, build_vision_tower, params, TOWER_TARGET.get(dtype)))
    for frames in (16, 128):  # 8x the frames: chunked memory stays flat, one piece grows with the video
        grid = ((frames // 2, 16, 16),)
        params = (("grid", grid), ("depth", 2), ("max_tokens", 2048))
        out.append(Case("vision tower, long video", f"video {frames}f 224x224", torch.float32, FWD,
                        build_long_video, params))
    train = (("batch", 4), ("image", 112), ("text", 48))
    for dtype in (torch.float32, torch.bfloat16):
        out.append(Case("train step (tiny)", "4 x (112x112 image + 48 tokens)", dtype, FWD_BWD, build_train_step, train))
    return out
