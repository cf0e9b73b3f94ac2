"""patch_embed against HF's ``PatchEmbed`` (view + Conv3d with kernel = stride), and against a plain GEMM of the
same size, the floor an embedding that is mathematically one GEMM can reach; embed_frames (uint8 frames to
embeddings) against HF's image/video processor patchify (no resize: the frames are already 448 x 448) + PatchEmbed.

The patches come as the processor emits them, float32 rows of C*Tp*P*P in which an image repeats its frame Tp
times (so patch_embed folds the Conv3d's temporal taps: its GEMM is half the limit's) and a video's frames differ;
the weight's dtype is the case's dtype
(HF casts the patches to it before the Conv3d, vlfuse in the same pass as the GEMM). The fwd+bwd pass trains the
embedding: gradients reach the weight, not the pixels.
"""

from __future__ import annotations

import copy

import torch

from .core import FWD, FWD_BWD, GEMM, Case, Setup, Target, Unavailable
from .workloads import VISION, WORKLOADS, hf_qwen2_vl, pixel_rows, tokens, vlfuse_op

# issue 3: within 1.15x of the plain GEMM everywhere, >= 10x HF eager in bf16
TARGET = {torch.float32: Target(pct_of_limit=100 / 1.15), torch.bfloat16: Target(speedup_eager=10.0, pct_of_limit=100 / 1.15)}


def build_patch_embed(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen2_vl()
    patch_embed = vlfuse_op("patch_embed")
    count = tokens(case.param("grid"))
    hf_embed = hf.PatchEmbed(
        patch_size=VISION.patch_size,
        temporal_patch_size=VISION.temporal_patch_size,
        in_channels=VISION.in_channels,
        embed_dim=VISION.embed_dim,
    ).to(device=device, dtype=case.dtype)
    weight = hf_embed.proj.weight.detach().clone().requires_grad_(True)
    patches = pixel_rows(case.param("grid"), VISION.in_channels, VISION.temporal_patch_size, VISION.patch_size, device)

    def vlfuse_embed(patches):
        return patch_embed(patches, weight)

    def hf_patch_embed(patches):
        return hf_embed(patches)

    hf_embed64 = copy.deepcopy(hf_embed).double()

    # the floor: the same GEMM on operands already in the weight's dtype and layout
    gemm_patches = patches.to(case.dtype)
    gemm_weight = weight.detach().reshape(VISION.embed_dim, -1).t().contiguous()
    flops = 2.0 * count * VISION.patch_dim * VISION.embed_dim
    if case.mode == FWD:

        def plain_gemm():
            return torch.mm(gemm_patches, gemm_weight)

    else:
        grad = torch.randn(count, VISION.embed_dim, device=device, dtype=case.dtype)

        def plain_gemm():  # forward, then the weight gradient
            return torch.mm(gemm_patches, gemm_weight), torch.mm(grad.t(), gemm_patches)

        flops *= 2
    return Setup(
        args=(patches,),
        vlfuse=vlfuse_embed,
        eager=hf_patch_embed,
        shape=f"[{count}, {VISION.patch_dim}] x [{VISION.embed_dim}, {VISION.patch_dim}]",
        baseline="HF Qwen2-VL PatchEmbed (view + Conv3d, kernel = stride)",
        vlfuse_params=(weight,),
        eager_params=(hf_embed.proj.weight,),
        reference=hf_embed64,
        reference_params=(hf_embed64.proj.weight,),
        limit=plain_gemm,
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=2.0,
    )


def build_embed_frames(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen2_vl()
    embed_frames = vlfuse_op("embed_frames")
    try:
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    except ImportError as exc:
        raise Unavailable(f"HF's Qwen2-VL processors are not importable ({exc})") from exc
    grid = case.param("grid")
    generator = torch.Generator().manual_seed(1)
    frames = [
        torch.randint(0, 256, (2 * t if t > 1 else 1, VISION.in_channels, h * VISION.patch_size, w * VISION.patch_size),
                      dtype=torch.uint8, generator=generator).to(device)
        for t, h, w in grid
    ]  # fmt: skip
    hf_embed = hf.PatchEmbed(
        patch_size=VISION.patch_size,
        temporal_patch_size=VISION.temporal_patch_size,
        in_channels=VISION.in_channels,
        embed_dim=VISION.embed_dim,
    ).to(device=device, dtype=case.dtype)
    weight = hf_embed.proj.weight.detach().clone()
    if any(t > 1 for t, _, _ in grid):
        processor = Qwen2VLVideoProcessor(do_resize=False, cap_pixels_per_frame=False)

        def hf_patchify(frames):
            return processor(videos=frames, return_tensors="pt", device=str(device))["pixel_values_videos"]

    else:
        processor = Qwen2VLImageProcessor(do_resize=False)

        def hf_patchify(frames):
            return processor(images=[f[0] for f in frames], return_tensors="pt", device=str(device))["pixel_values"]

    def vlfuse_embed_frames(frames):
        return embed_frames(frames, weight)[0]

    def hf_processor_and_patch_embed(frames):
        return hf_embed(hf_patchify(frames).to(device))

    count = tokens(grid)
    gemm_patches = torch.randn(count, VISION.patch_dim, device=device, dtype=case.dtype)
    gemm_weight = weight.reshape(VISION.embed_dim, -1).t().contiguous()
    flops = 2.0 * count * VISION.patch_dim * VISION.embed_dim
    return Setup(
        args=(frames,),
        vlfuse=vlfuse_embed_frames,
        eager=hf_processor_and_patch_embed,
        shape=f"{len(frames)} x {list(frames[0].shape)} uint8 -> [{count}, {VISION.embed_dim}]",
        baseline="HF Qwen2VLImageProcessor/Qwen2VLVideoProcessor (do_resize=False) + PatchEmbed",
        limit=lambda: torch.mm(gemm_patches, gemm_weight),
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=2.0,
        compile=False,
        note="embed_frames: HF's processor runs on the host in Python/torchvision; torch.compile is not applied to it",
    )


def cases() -> list[Case]:
    out = []
    for name in ("1 image 448x448", "4 images 448x448", "16 images 448x448", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in (FWD, FWD_BWD):
                quick = name == "1 image 448x448" and mode == FWD
                params = (("grid", WORKLOADS[name]),)
                out.append(Case("patch_embed", name, dtype, mode, build_patch_embed, params, TARGET[dtype], quick))
    for name in ("1 image 448x448", "4 images 448x448", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            quick = name == "1 image 448x448" and dtype == torch.float32
            out.append(Case("embed_frames", name, dtype, FWD, build_embed_frames, (("grid", WORKLOADS[name]),), None, quick))
    return out
