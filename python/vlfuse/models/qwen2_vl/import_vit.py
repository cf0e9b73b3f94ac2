"""Start the Qwen2-VL vision tower from a standard ViT with learned position embeddings (as Qwen2-VL started from
DFN's ViT): ``import_vit(state_dict, vision_config) -> (vision_tower, report)``.

Sources: timm naming (``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``) and
open_clip naming (``visual.conv1``, ``visual.transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,
mlp.c_fc,mlp.c_proj}``, with or without the ``visual.`` prefix). The mapping:

- the 2-D patch kernel ``[E, C, P, P]`` becomes the 3-D kernel ``[E, C, Tp, P, P]`` with every temporal slice equal
  to the 2-D kernel / Tp: an image is its frame repeated Tp times, so it gets exactly the 2-D result. A patch bias
  (timm has one) is kept as ``patch_embed.proj.bias``;
- qkv (same [3, heads, head_dim] row layout), proj, MLP and LayerNorms are copied; the MLP activation follows the
  source (GELU for both naming schemes unless the vision config names one);
- learned position embeddings, the class token, pre/post norms and heads are dropped (RoPE-2D replaces the
  position embeddings); the merger has no counterpart and is freshly initialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import Qwen2VLVisionConfig
from .vision import VisionTransformer

__all__ = ["import_vit", "import_vit_file", "ImportReport"]


@dataclass
class ImportReport:
    """Target keys filled from the source, target keys left at their initialisation, and source keys not used."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"import-vit: {self.source_format} ViT -> Qwen2-VL vision tower",
            f"  loaded        {len(self.loaded)} tensors",
            f"  reinitialized {len(self.reinitialized)}: {', '.join(self.reinitialized) or '-'}",
            f"  unused        {len(self.unused)}: {', '.join(self.unused) or '-'}",
        ]
        return "\n".join(lines)


_TIMM_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def _source_format(state_dict: dict[str, Tensor]) -> tuple[str, str]:
    """('timm' | 'open_clip', key prefix)."""
    for key in state_dict:
        if key.endswith("patch_embed.proj.weight"):
            return "timm", key[: -len("patch_embed.proj.weight")]
        if key.endswith("conv1.weight") and "transformer" not in key:
            return "open_clip", key[: -len("conv1.weight")]
    raise ValueError(
        "import_vit: no patch embedding found; expected timm's 'patch_embed.proj.weight' or open_clip's "
        "'[visual.]conv1.weight'"
    )


def _mapping(state_dict: dict[str, Tensor]) -> tuple[str, dict[str, str], str]:
    """(format, {source key: tower key}, source key of the 2-D patch kernel)."""
    fmt, prefix = _source_format(state_dict)
    if fmt == "timm":
        block_re = re.compile(rf"^{re.escape(prefix)}blocks\.(\d+)\.(.+)$")
        table, patch = _TIMM_BLOCK, f"{prefix}patch_embed.proj.weight"
        extra = {f"{prefix}patch_embed.proj.bias": "patch_embed.proj.bias"}
    else:
        block_re = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.(.+)$")
        table, patch = _OPEN_CLIP_BLOCK, f"{prefix}conv1.weight"
        extra = {f"{prefix}conv1.bias": "patch_embed.proj.bias"}
    mapping = {k: v for k, v in extra.items() if k in state_dict}
    for key in state_dict:
        m = block_re.match(key)
        if m and m.group(2) in table:
            mapping[key] = f"blocks.{m.group(1)}.{table[m.group(2)]}"
    return fmt, mapping, patch


def _vision_config(vision_config, state_dict, fmt, patch_key) -> Qwen2VLVisionConfig:
    if isinstance(vision_config, Qwen2VLVisionConfig):
        return vision_config
    given = dict(vision_config or {})
    kernel = state_dict[patch_key]
    embed_dim, in_channels, patch_size = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    depth_re = re.compile(r"(?:blocks|resblocks)\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := depth_re.search(k))), default=-1)
    given.setdefault("embed_dim", embed_dim)
    given.setdefault("in_channels", in_channels)
    given.setdefault("patch_size", patch_size)
    given.setdefault("depth", depth)
    given.setdefault("num_heads", max(1, embed_dim // 64))  # the ViT convention; pass num_heads when it differs
    given.setdefault("hidden_act", "gelu")
    fc1 = next((v for k, v in state_dict.items() if k.endswith(("mlp.fc1.weight", "mlp.c_fc.weight"))), None)
    if fc1 is not None:
        given.setdefault("mlp_ratio", fc1.shape[0] / embed_dim)
    given.setdefault("hidden_size", embed_dim)
    return Qwen2VLVisionConfig.from_hf_dict(given)


def import_vit(
    state_dict: dict[str, Tensor], vision_config=None, backend: str = "vlfuse"
) -> tuple[VisionTransformer, ImportReport]:
    """Loads a timm / open_clip ViT state dict into a new Qwen2-VL vision tower.

    vision_config: a ``Qwen2VLVisionConfig``, or a dict of HF ``vision_config`` field names (missing fields are
    read from the weights: width, depth, patch size, MLP ratio; heads default to width / 64; activation to GELU),
    or None. Shapes that disagree with the config raise ValueError naming the key. Returns the tower (HF parameter
    names, e.g. ``blocks.0.attn.qkv.weight``) and the report of loaded / re-initialized / unused keys.
    """
    fmt, mapping, patch_key = _mapping(state_dict)
    config = _vision_config(vision_config, state_dict, fmt, patch_key)
    tower = VisionTransformer(config, backend=backend)
    kernel = state_dict[patch_key]
    if patch_key.replace("weight", "bias") in mapping and tower.patch_embed.proj.bias is None:
        tower.patch_embed.proj.bias = torch.nn.Parameter(torch.zeros(config.embed_dim))
    target = tower.state_dict()
    report = ImportReport(source_format=fmt)

    expected_kernel = target["patch_embed.proj.weight"].shape  # [E, C, Tp, P, P]
    if kernel.shape != (expected_kernel[0], expected_kernel[1], expected_kernel[3], expected_kernel[4]):
        raise ValueError(
            f"import_vit: {patch_key} has shape {tuple(kernel.shape)}, the vision config needs "
            f"{(expected_kernel[0], expected_kernel[1], expected_kernel[3], expected_kernel[4])}"
        )
    new_state = {"patch_embed.proj.weight": (kernel / config.temporal_patch_size).unsqueeze(2).expand(expected_kernel)}
    for source, name in mapping.items():
        if name not in target:
            raise ValueError(f"import_vit: {source} maps to {name}, which the tower (depth {config.depth}) lacks")
        if state_dict[source].shape != target[name].shape:
            raise ValueError(
                f"import_vit: {source} has shape {tuple(state_dict[source].shape)}, {name} needs {tuple(target[name].shape)}"
            )
        new_state[name] = state_dict[source]
    with torch.no_grad():
        for name, value in new_state.items():
            target[name].copy_(value.to(target[name].dtype))
    report.loaded = sorted(new_state, key=_natural)
    report.reinitialized = sorted((k for k in target if k not in new_state), key=_natural)
    used = set(mapping) | {patch_key}
    report.unused = sorted((k for k in state_dict if k not in used), key=_natural)
    return tower, report


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def import_vit_file(source: str, folder: str, vision_config=None, hidden_size: int | None = None) -> ImportReport:
    """``vlfuse import-vit``: reads a state dict file, imports it, and writes ``folder/vision_tower.safetensors``
    (keys ``visual.*``, HF's names), ``folder/vision_config.json`` (HF field names) and ``folder/import_report.json``.
    """
    from safetensors.torch import save_file

    if not os.path.isfile(source):
        raise FileNotFoundError(f"import-vit: no such file {source!r}")
    state_dict = _read_state_dict(source)
    if hidden_size is not None:
        vision_config = {**(vision_config or {}), "hidden_size": hidden_size}
    tower, report = import_vit(state_dict, vision_config)
    os.makedirs(folder, exist_ok=True)
    save_file(
        {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()},
        os.path.join(folder, "vision_tower.safetensors"),
    )
    with open(os.path.join(folder, "vision_config.json"), "w") as f:
        json.dump(tower.config.to_hf_dict(), f, indent=2)
    with open(os.path.join(folder, "import_report.json"), "w") as f:
        json.dump(dataclasses.asdict(report), f, indent=2)
    return report
