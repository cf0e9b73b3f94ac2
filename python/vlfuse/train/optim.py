"""Which parts train in which stage, AdamW with a learning rate per part, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

PARTS = ("vision", "merger", "llm")

# Qwen2-VL's three stages: 1 aligns the ViT and merger to a frozen LLM; 2 trains everything; 3 (instruction tuning)
# freezes the ViT and trains the merger and the LLM.
STAGE_TRAINABLE = {
    1: ("vision", "merger"),
    2: ("vision", "merger", "llm"),
    3: ("merger", "llm"),
}


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its name in ``Qwen2VL.named_parameters()``."""
    parts = name.split(".")
    if "visual" in parts:
        return "merger" if "merger" in parts[parts.index("visual") :] else "vision"
    return "llm"


def apply_freezing(model: nn.Module, stage: int) -> dict[str, int]:
    """Sets ``requires_grad`` for the stage; returns the number of trainable parameters per part."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"vlfuse train: stage must be 1, 2 or 3, got {stage}")
    trainable = STAGE_TRAINABLE[stage]
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(part in trainable)
        if part in trainable:
            counts[part] += p.numel()
    return counts


def build_optimizer(
    model: nn.Module,
    lr: dict[str, float],
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, one group per (part, decayed or not).

    Norm weights and biases (1-D tensors) get no weight decay. Frozen parameters are left out entirely, so the
    optimizer holds no state for them and cannot move them.
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((part_of(name), p.ndim >= 2), []).append(p)
    param_groups = [
        {"params": params, "lr": lr[part], "weight_decay": weight_decay if decay else 0.0, "part": part}
        for (part, decay), params in sorted(groups.items())
    ]
    if not param_groups:
        raise ValueError("vlfuse train: no trainable parameters")
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """The LR multiplier at a step: linear from 0 over ``warmup_steps``, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_ratio))
