"""patch_embed against HF's ``PatchEmbed`` (view + Conv3d with kernel = stride), and against a plain GEMM of the
same size, the floor an embedding that is mathematically one GEMM can reach.

The patches come as the processor emits them, float32 rows of C*Tp*P*P; the weight's dtype is the case's dtype
(HF casts the patches to it before the Conv3d, vlfuse in the same pass as the GEMM). The fwd+bwd pass trains the
embedding: gradients reach the weight, not the pixels.
"""

from __future__ import annotations

import torch

from .core import FWD, FWD_BWD, GEMM, Case, Setup, Target
from .workloads import VISION, WORKLOADS, hf_qwen2_vl, tokens, vlfuse_op

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
    patches = torch.randn(count, VISION.patch_dim, device=device, dtype=torch.float32)

    def vlfuse_embed(patches):
        return patch_embed(patches, weight)

    def hf_patch_embed(patches):
        return hf_embed(patches)

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
        limit=plain_gemm,
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=2.0,
    )


def cases() -> list[Case]:
    out = []
    for name in ("1 image 448x448", "4 images 448x448", "16 images 448x448", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in (FWD, FWD_BWD):
                quick = name == "1 image 448x448" and mode == FWD
                params = (("grid", WORKLOADS[name]),)
                out.append(Case("patch_embed", name, dtype, mode, build_patch_embed, params, TARGET[dtype], quick))
    return out
