"""Temporal patchify benchmarks (pytest-benchmark; reported, never asserted).

Qwen2-VL-2B vision shapes (E = 1280, C = 3, Tp = 2, P = 14): 1, 4 and 16 images of 448 x 448 (1024 patches each)
and a 16-frame 448 x 448 video (8192 patches), float32 and bfloat16, forward and forward+backward.

- patch_embed:   vlfuse.ops.patch_embed vs HF's PatchEmbed eager vs torch.compile of it vs a plain GEMM of the same
                 size (the floor). All get the same patches, already in the weight's dtype; backward is w.r.t. the
                 weight (the patches are pixels).
- embed_frames:  vlfuse.ops.embed_frames on uint8 frames vs HF's processor patchify (do_resize=False: the frames are
                 already 448 x 448) + HF's PatchEmbed.

The case definitions are plain functions so that other runners (``vlfuse bench``) can reuse them:
``cases()`` lists Case values, ``impl_names(case)`` the implementations compared on it (vlfuse's first) and
``implementations(case)`` gives {name: zero-argument callable}, each running one timed iteration (call it once
untimed first: it compiles hf_compile). ``flops(case)`` is the GEMM work of one iteration.
VLFUSE_BENCH_ROUNDS sets the timed rounds per implementation (default 5).

Run: PYTHONPATH=python python -m pytest benchmarks/bench_patchify.py --benchmark-only
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import vlfuse.ops as ops

EMBED_DIM = 1280
CHANNELS, TEMPORAL, PATCH, MERGE = 3, 2, 14, 2
PATCH_DIM = CHANNELS * TEMPORAL * PATCH * PATCH

# workload name -> items as (frames, height, width)
WORKLOADS = {
    "1img448": [(1, 448, 448)],
    "4img448": [(1, 448, 448)] * 4,
    "16img448": [(1, 448, 448)] * 16,
    "video16x448": [(16, 448, 448)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    op: str  # "patch_embed" or "embed_frames"
    workload: str  # key of WORKLOADS
    dtype: str  # key of DTYPES
    backward: bool

    @property
    def name(self) -> str:
        return f"{self.op}-{self.workload}-{self.dtype}-{'fwdbwd' if self.backward else 'fwd'}"

    @property
    def patches(self) -> int:
        return sum(-(-t // TEMPORAL) * (h // PATCH) * (w // PATCH) for t, h, w in WORKLOADS[self.workload])


def cases() -> list[Case]:
    return [
        Case(op, workload, dtype, backward)
        for op in ("patch_embed", "embed_frames")
        for workload in WORKLOADS
        for dtype in DTYPES
        for backward in (False, True)
    ]


def flops(case: Case) -> int:
    """GEMM floating-point operations of one iteration (the backward adds the weight-gradient GEMM)."""
    return 2 * case.patches * PATCH_DIM * EMBED_DIM * (2 if case.backward else 1)


def _weight(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(EMBED_DIM, CHANNELS, TEMPORAL, PATCH, PATCH, generator=g) / PATCH_DIM**0.5).to(dtype)


def _frames(case: Case) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (t, CHANNELS, h, w), dtype=torch.uint8, generator=g) for t, h, w in WORKLOADS[case.workload]]


def _hf_patch_embed(weight: torch.Tensor) -> torch.nn.Module:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    module = PatchEmbed(PATCH, TEMPORAL, CHANNELS, EMBED_DIM)
    with torch.no_grad():
        module.proj.weight.copy_(weight.float())
    return module.to(weight.dtype).requires_grad_(True)


def _step(forward: Callable[[], torch.Tensor], params: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One iteration: the forward, and for backward cases a backward of a unit gradient into params."""
    if not backward:

        def run() -> None:
            with torch.no_grad():
                forward()

        return run

    def run_backward() -> None:
        for p in params:
            p.grad = None
        out = forward()
        out.backward(torch.ones_like(out))

    return run_backward


def _patch_embed_impls(case: Case) -> dict[str, Callable[[], None]]:
    dtype = DTYPES[case.dtype]
    weight = _weight(dtype).requires_grad_(case.backward)
    patches = torch.randn(case.patches, PATCH_DIM, generator=torch.Generator().manual_seed(2)).to(dtype)
    hf = _hf_patch_embed(weight.detach())
    hf_compiled = torch.compile(hf)
    flat = weight.detach().reshape(EMBED_DIM, PATCH_DIM).clone().requires_grad_(case.backward)
    patches32 = patches.float()
    flat32 = flat.detach().float().requires_grad_(case.backward)
    hf_params = [hf.proj.weight]
    impls = {
        "vlfuse": _step(lambda: ops.patch_embed(patches, weight), [weight], case.backward),
        "hf_eager": _step(lambda: hf(patches), hf_params, case.backward),
        "hf_compile": _step(lambda: hf_compiled(patches), hf_params, case.backward),
        "gemm": _step(lambda: torch.mm(patches, flat.t()), [flat], case.backward),
    }
    if dtype != torch.float32:
        # The float32 GEMM of the same size: the floor on CPUs where ATen has no fast bf16 GEMM.
        impls["gemm_fp32"] = _step(lambda: torch.mm(patches32, flat32.t()), [flat32], case.backward)
    return impls


def _hf_processor_patchify(case: Case) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    video = any(t > 1 for t, _, _ in WORKLOADS[case.workload])
    if video:
        processor = Qwen2VLVideoProcessor(do_resize=False, cap_pixels_per_frame=False)
        return lambda frames: processor(videos=frames, return_tensors="pt")["pixel_values_videos"]
    processor = Qwen2VLImageProcessor(do_resize=False)
    return lambda frames: processor(images=[f[0] for f in frames], return_tensors="pt")["pixel_values"]


def _embed_frames_impls(case: Case) -> dict[str, Callable[[], None]]:
    dtype = DTYPES[case.dtype]
    weight = _weight(dtype).requires_grad_(case.backward)
    frames = _frames(case)
    hf = _hf_patch_embed(weight.detach())
    hf_patchify = _hf_processor_patchify(case)

    def hf_pipeline() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hf(hf_patchify(frames))

    return {
        "vlfuse": _step(lambda: ops.embed_frames(frames, weight)[0], [weight], case.backward),
        "hf": _step(hf_pipeline, [hf.proj.weight], case.backward),
    }


def implementations(case: Case) -> dict[str, Callable[[], None]]:
    """{name: one timed iteration} for a case; the first name is vlfuse's."""
    return _patch_embed_impls(case) if case.op == "patch_embed" else _embed_frames_impls(case)


def impl_names(case: Case) -> list[str]:
    if case.op == "embed_frames":
        return ["vlfuse", "hf"]
    return ["vlfuse", "hf_eager", "hf_compile", "gemm"] + (["gemm_fp32"] if case.dtype != "fp32" else [])


_PAIRS = [(c, name) for c in cases() for name in impl_names(c)]
ROUNDS = int(os.environ.get("VLFUSE_BENCH_ROUNDS", "5"))


@pytest.mark.parametrize("case, impl", _PAIRS, ids=[f"{c.name}-{n}" for c, n in _PAIRS])
def test_patchify(benchmark, case: Case, impl: str):
    fn = implementations(case)[impl]
    fn()  # warm-up (and compilation for hf_compile)
    benchmark.group = case.name
    benchmark.extra_info.update(
        {"patches": case.patches, "gflop": flops(case) / 1e9, "threads": torch.get_num_threads()}
    )
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
