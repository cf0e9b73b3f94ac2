"""Public vlfuse operators. Each submodule holds one op family: the typed function users call (shapes
documented on it), its fake kernel for torch.compile, and its autograd registration."""

from .attention import sdpa_segment_attention, segment_attention
from .linear_act import linear_act
from .merge import merge2x2
from .patchify import CLIP_MEAN, CLIP_STD, embed_frames, patch_embed, patchify, smart_resize
from .pos_embed import interp_pos_embed
from .rope import rope, rope_, rope_cos_sin, rope_qkv, vision_positions, vision_rope_freqs

__all__ = [
    "rope_qkv",
    "rope",
    "rope_",
    "rope_cos_sin",
    "vision_rope_freqs",
    "vision_positions",
    "patch_embed",
    "patchify",
    "embed_frames",
    "smart_resize",
    "CLIP_MEAN",
    "CLIP_STD",
    "merge2x2",
    "interp_pos_embed",
    "linear_act",
    "segment_attention",
    "sdpa_segment_attention",
]
