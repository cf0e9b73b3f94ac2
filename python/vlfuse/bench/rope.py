"""rope_qkv against HF's own vision rotary path: from the qkv Linear's output to the q, k, v handed to attention.

HF (transformers 5.x, VisionAttention + Qwen2VLVisionRotaryEmbedding): cos/sin from the position ids, the
reshape/permute/unbind split of qkv, ``apply_rotary_pos_emb_vision`` (float32 math, cast back), and the
transposes to [1, H, S, D]. vlfuse: one ``rope_qkv`` call writing q, k as [H, S, D]; v is a view of qkv in both.
"""

from __future__ import annotations

import torch

from .core import BANDWIDTH, FWD, FWD_BWD, Case, Setup, Target
from .machine import copy_reference
from .workloads import VISION, WORKLOADS, grid_tensor, hf_qwen2_vl, hf_vision_config, tokens, vlfuse_op

TARGET = Target(speedup_eager=4.0, speedup_compile=1.5, pct_of_limit=60.0)


def _hf_rotary(model: str, device: torch.device):
    """HF's vision rotary module and its modeling module, for model "qwen2_vl" or "qwen3_vl"."""
    if model == "qwen3_vl":
        from .qwen3 import hf_qwen3_config, hf_qwen3_vl

        hf = hf_qwen3_vl()
        return hf, hf.Qwen3VLVisionRotaryEmbedding(hf_qwen3_config(depth=1)).to(device)
    hf = hf_qwen2_vl()
    return hf, hf.Qwen2VLVisionRotaryEmbedding(hf_vision_config()).to(device)


def build_rope_qkv(case: Case, device: torch.device) -> Setup:
    """Params: grid; model "qwen2_vl" (default: 16 heads of 80) or "qwen3_vl" (with heads and head_dim)."""
    model = case.param("model", "qwen2_vl")
    hf, rotary = _hf_rotary(model, device)
    rope_qkv = vlfuse_op("rope_qkv")
    from transformers.vision_utils import get_vision_position_ids

    import vlfuse.ops

    grid = grid_tensor(case.param("grid"), device)
    heads, head_dim = case.param("heads", VISION.num_heads), case.param("head_dim", VISION.head_dim)
    count = tokens(case.param("grid"))
    qkv = torch.randn(count, 3 * heads * head_dim, device=device, dtype=case.dtype)
    positions = vlfuse.ops.vision_positions(grid, VISION.spatial_merge_size)
    freqs = vlfuse.ops.vision_rope_freqs(head_dim, device=device)
    position_ids = get_vision_position_ids(grid, VISION.spatial_merge_size)

    def vlfuse_rope(qkv):
        return rope_qkv(qkv, positions, freqs, heads, "hsd")

    def hf_rope(qkv):
        seq = qkv.shape[0]
        cos, sin = rotary(qkv, position_ids)
        q, k, v = qkv.reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
        return q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)

    # must move: read the q and k blocks of qkv and the positions, write q and k (v is a view); the backward reads
    # dq, dk, dv and writes dqkv
    qkv_bytes = qkv.numel() * qkv.element_size()
    moved = 2 * (2 * qkv_bytes // 3) + positions.numel() * positions.element_size()
    if case.mode == FWD_BWD:
        moved += 2 * qkv_bytes
    return Setup(
        args=(qkv,),
        vlfuse=vlfuse_rope,
        eager=hf_rope,
        shape=f"[{count}, 3*{heads}*{head_dim}]",
        baseline=f"HF {model} rotary cos/sin + qkv split + apply_rotary_pos_emb_vision + transposes",
        grad_args=(0,),
        limit=copy_reference(moved, device),
        limit_kind=BANDWIDTH,
        work=moved,
    )


def cases() -> list[Case]:
    out = []
    for name in ("1 image 448x448", "4 images 448x448", "16 images 448x448", "video 16f 448x448"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in (FWD, FWD_BWD):
                quick = name == "1 image 448x448" and (mode == FWD or dtype == torch.bfloat16)
                out.append(
                    Case("rope_qkv", name, dtype, mode, build_rope_qkv, (("grid", WORKLOADS[name]),), TARGET, quick)
                )
    return out
