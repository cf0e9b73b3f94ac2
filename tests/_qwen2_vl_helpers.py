"""Shared builders of the Qwen2-VL model tests: a tiny config, a random HF model with it, prompts with visuals."""

from __future__ import annotations

import torch

from vlfuse.models.qwen2_vl import Qwen2VLConfig

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 259, 260, 262, 263


def tiny_config(tie: bool = False) -> Qwen2VLConfig:
    """Sizes small enough for the shared CPU, but with GQA (4 q heads, 2 kv heads) and a 3-axis mrope_section."""
    return Qwen2VLConfig.preset("tiny").replace(
        vision={"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=tie,
    )


def hf_model(config: Qwen2VLConfig):
    """A transformers Qwen2VLForConditionalGeneration with config's sizes and random weights of a scale that makes
    the logits spread out (HF's init, std 0.02, gives near-uniform logits and so a weak test)."""
    import transformers

    hf_config = transformers.Qwen2VLConfig(**config.to_hf_dict())
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or ".norm" in name or "ln_q.weight" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def visual_tokens(grid: list[int], merge: int = 2) -> int:
    return grid[0] * grid[1] * grid[2] // (merge * merge)


def prompt(segments: list, vocab_text: int = 256) -> torch.Tensor:
    """[1, L] ids: ints are runs of that many random text tokens; ("image"|"video", grid) a visual span."""
    ids: list[int] = []
    for seg in segments:
        if isinstance(seg, int):
            ids += torch.randint(0, vocab_text, (seg,)).tolist()
        else:
            kind, grid = seg
            pad = IMAGE_PAD if kind == "image" else VIDEO_PAD
            ids += [VISION_START] + [pad] * visual_tokens(grid) + [VISION_END]
    return torch.tensor([ids])


def patches(grids: list[list[int]], config: Qwen2VLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(grids)
    return torch.randn(int(grid.prod(-1).sum()), config.vision.patch_dim), grid


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """transformers 5.x wants the modality of each token: 0 text, 1 image, 2 video."""
    return (input_ids == IMAGE_PAD).long() + 2 * (input_ids == VIDEO_PAD).long()
