"""merge2x2 against HF's ``ln_q(x).view(-1, 4 * C)`` (the norm + window concatenation inside PatchMerger), and the
whole ``vlfuse.nn.PatchMerger`` against HF's ``PatchMerger`` with the same weights, for the 2B and 7B widths."""

from __future__ import annotations

import copy

import torch

from .core import BANDWIDTH, FWD, FWD_BWD, GEMM, Case, Setup, Target
from .machine import copy_reference
from .workloads import LLM_WIDTH, VISION, WORKLOADS, grid_tensor, hf_qwen2_vl, tokens, vlfuse_op

MERGE_TARGET = Target(speedup_eager=2.0, speedup_compile=1.2, pct_of_limit=60.0)  # issue 4


def _hidden(case: Case, device: torch.device, channels: int = VISION.embed_dim) -> torch.Tensor:
    return torch.randn(tokens(case.param("grid")), channels, device=device, dtype=case.dtype)


def build_merge2x2(case: Case, device: torch.device) -> Setup:
    """Params: grid; channels (default Qwen2-VL's 1280); postshuffle (Qwen3-VL's deepstack mergers: the norm over
    each merged row of 4C, HF's LayerNorm(x.view(-1, 4C)), instead of over each token)."""
    merge2x2 = vlfuse_op("merge2x2")
    channels = case.param("channels", VISION.embed_dim)
    postshuffle = case.param("postshuffle", False)
    width = channels * VISION.spatial_merge_size**2
    x = _hidden(case, device, channels)
    grid = grid_tensor(case.param("grid"), device)
    norm = torch.nn.LayerNorm(width if postshuffle else channels, eps=1e-6).to(device=device, dtype=case.dtype)
    with torch.no_grad():  # not the identity affine, so a kernel that skips it is caught
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    weight = norm.weight.detach().clone().requires_grad_(True)
    bias = norm.bias.detach().clone().requires_grad_(True)

    def vlfuse_merge(x):
        return merge2x2(x, grid, weight, bias, eps=1e-6, postshuffle_norm=postshuffle)

    def hf_merge(x):
        return norm(x.view(-1, width)) if postshuffle else norm(x).view(-1, width)

    norm64 = copy.deepcopy(norm).double()

    def hf_merge_float64(x):
        return norm64(x.view(-1, width)) if postshuffle else norm64(x).view(-1, width)

    # must move: read x, write the merged rows (as many bytes); backward reads dy and x, writes dx
    moved = 2 * x.numel() * x.element_size()
    if case.mode == FWD_BWD:
        moved = 5 * x.numel() * x.element_size()
    return Setup(
        args=(x,),
        vlfuse=vlfuse_merge,
        eager=hf_merge,
        shape=f"[{x.shape[0]}, {channels}] -> [{x.shape[0] // 4}, {width}]",
        baseline="HF Qwen3-VL deepstack merger's LayerNorm(x.view(-1, 4C)) (use_postshuffle_norm=True)"
        if postshuffle
        else "HF PatchMerger's ln_q(x).view(-1, 4C) (LayerNorm + window concat)",
        grad_args=(0,),
        vlfuse_params=(weight, bias),
        eager_params=(norm.weight, norm.bias),
        reference=hf_merge_float64,
        reference_params=(norm64.weight, norm64.bias),
        limit=copy_reference(moved, device),
        limit_kind=BANDWIDTH,
        work=moved,
    )


def build_patch_merger(case: Case, device: torch.device) -> Setup:
    hf = hf_qwen2_vl()
    merger_class = vlfuse_op("PatchMerger")
    llm_width = LLM_WIDTH[case.param("model")]
    merge = VISION.spatial_merge_size
    hf_merger = hf.PatchMerger(dim=llm_width, context_dim=VISION.embed_dim, spatial_merge_size=merge)
    hf_merger = hf_merger.to(device=device, dtype=case.dtype)
    merger = merger_class(llm_width, VISION.embed_dim, merge_size=merge).to(device=device, dtype=case.dtype)
    merger.load_state_dict(hf_merger.state_dict())
    x = _hidden(case, device)
    grid = grid_tensor(case.param("grid"), device)
    rows, hidden = x.shape[0] // 4, hf_merger.hidden_size

    def vlfuse_merger(x):
        return merger(x, grid)

    def hf_patch_merger(x):
        return hf_merger(x)

    hf_merger64 = copy.deepcopy(hf_merger).double()

    # the floor: the MLP's two GEMMs alone (and their four backward GEMMs)
    merged = torch.randn(rows, hidden, device=device, dtype=case.dtype)
    w1 = torch.randn(hidden, hidden, device=device, dtype=case.dtype)
    w2 = torch.randn(hidden, llm_width, device=device, dtype=case.dtype)
    flops = 2.0 * rows * hidden * (hidden + llm_width)
    if case.mode == FWD:

        def plain_gemms():
            return torch.mm(torch.mm(merged, w1), w2)

    else:
        grad = torch.randn(rows, llm_width, device=device, dtype=case.dtype)

        def plain_gemms():
            h = torch.mm(merged, w1)
            torch.mm(h, w2)
            dh = torch.mm(grad, w2.t())
            return torch.mm(h.t(), grad), torch.mm(dh, w1.t()), torch.mm(merged.t(), dh)

        flops *= 3
    names = [name for name, _ in hf_merger.named_parameters()]
    vlfuse_named = dict(merger.named_parameters())
    return Setup(
        args=(x,),
        vlfuse=vlfuse_merger,
        eager=hf_patch_merger,
        shape=f"[{x.shape[0]}, {VISION.embed_dim}] -> [{rows}, {llm_width}]",
        baseline=f"HF Qwen2-VL PatchMerger ({case.param('model')} width)",
        grad_args=(0,),
        vlfuse_params=[vlfuse_named[n] for n in names],
        eager_params=[p for _, p in hf_merger.named_parameters()],
        reference=hf_merger64,
        reference_params=[p for _, p in hf_merger64.named_parameters()],
        limit=plain_gemms,
        limit_kind=GEMM,
        work=flops,
        flops=flops,
        tol_scale=4.0,  # two GEMMs and a GELU after the norm
    )


def cases() -> list[Case]:
    out = []
    for name in ("1 image 448x448", "4 images 448x448", "16 images 448x448", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in (FWD, FWD_BWD):
                quick = name == "1 image 448x448" and mode == FWD and dtype == torch.bfloat16
                params = (("grid", WORKLOADS[name]),)
                out.append(Case("merge2x2", name, dtype, mode, build_merge2x2, params, MERGE_TARGET, quick))
    for model in ("2B", "7B"):
        for name, dtype, mode in (
            ("1 image 448x448", torch.float32, FWD),
            ("1 image 448x448", torch.float32, FWD_BWD),
            ("1 image 448x448", torch.bfloat16, FWD),
            ("1 image 448x448", torch.bfloat16, FWD_BWD),
            ("4 images 448x448", torch.bfloat16, FWD),
        ):
            params = (("grid", WORKLOADS[name]), ("model", model))
            out.append(Case(f"PatchMerger {model}", name, dtype, mode, build_patch_merger, params))
    return out
