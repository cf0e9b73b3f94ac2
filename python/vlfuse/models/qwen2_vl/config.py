"""Qwen2-VL configuration: a dataclass pair (vision tower, whole model) that reads and writes HF's ``config.json``.

Both HF layouts are read: the 4.x one (text fields at the top level, ``rope_scaling`` with ``mrope_section``) and the
5.x one (``text_config`` with ``rope_parameters``). ``to_hf_dict`` writes the 5.x layout, which transformers 5.x
reads natively and 4.5x reads through its ``text_config`` support.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

__all__ = ["Qwen2VLVisionConfig", "Qwen2VLConfig", "CHAR_VOCAB_SPECIALS"]

# The built-in character tokenizer's special tokens (ids right after the 256 byte values); the `tiny` preset uses
# these ids so that it runs offline with no tokenizer.json.
CHAR_VOCAB_SPECIALS = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|vision_start|>": 259,
    "<|vision_end|>": 260,
    "<|vision_pad|>": 261,
    "<|image_pad|>": 262,
    "<|video_pad|>": 263,
}


_PARAM_NAMES = ("qwen2", "qwen3", "qwen3_omni")


@dataclass
class Qwen2VLVisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536  # the LLM width: what the merger projects to
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    # What the later generations change (defaults: Qwen2-VL). Qwen2.5-VL: RMSNorm, a gated (SwiGLU) MLP of its own
    # width, attention within windows of window_size pixels except in the fullatt_block_indexes blocks.
    norm: str = "layernorm"
    intermediate_size: int | None = None
    gated_mlp: bool = False
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    # The Qwen3 generation (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen3-Omni, Qwen4): a Conv3d bias; a learned
    # square position table of num_position_embeddings rows, resampled bilinearly to every grid and added to the
    # patch embedding (0: none); deepstack mergers (LayerNorm over the whole merged row) fed by the blocks at
    # deepstack_visual_indexes (positions in that list pick the merger, as in HF; indexes >= depth never run).
    patch_bias: bool = False
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    # HF's parameter names: "qwen2" (mlp.fc1 / fc2, merger ln_q + mlp.0 / mlp.2), "qwen3" (mlp.linear_fc1 /
    # linear_fc2, merger norm + linear_fc1 / linear_fc2, deepstack_merger_list) or "qwen3_omni" (mlp.linear_fc1 /
    # linear_fc2, merger ln_q + mlp.0 / mlp.2, merger_list)
    param_names: str = "qwen2"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def window_units(self) -> int:
        """The attention window's side in merge units (0: every block attends over whole frames)."""
        return self.window_size // self.spatial_merge_size // self.patch_size if self.window_size else 0

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def position_side(self) -> int:
        """The side of the square learned position table (0: the tower has none)."""
        return math.isqrt(self.num_position_embeddings)

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D rotary over h and w)")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"vision norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.num_position_embeddings < 0 or self.position_side**2 != self.num_position_embeddings:
            raise ValueError(
                f"vision num_position_embeddings {self.num_position_embeddings} must be a square (S * S rows of a "
                "square position grid) or 0"
            )
        if any(i < 0 for i in self.deepstack_visual_indexes):
            raise ValueError(
                f"vision deepstack_visual_indexes must be block indexes, got {self.deepstack_visual_indexes}"
            )
        if self.param_names not in _PARAM_NAMES:
            raise ValueError(f"vision param_names must be one of {_PARAM_NAMES}, got {self.param_names!r}")
        if self.window_size and self.window_units < 1:
            raise ValueError(
                f"vision window_size {self.window_size} is smaller than one merge unit "
                f"({self.spatial_merge_size * self.patch_size} pixels)"
            )

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen2VLVisionConfig":
        """From an HF vision config dict: Qwen2-VL's; Qwen2.5-VL's (recognised by its ``out_hidden_size``: there
        ``hidden_size`` is the ViT width and the merger projects to ``out_hidden_size``); or the Qwen3 generation's
        (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen3-Omni's vision encoder, Qwen4: recognised by its
        ``num_position_embeddings``; Qwen3-Omni's parameter names by its ``model_type``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(d.get(key), (list, tuple)):
                if len(set(d[key])) != 1:
                    raise ValueError(f"vision {key} {list(d[key])}: only square patches are supported")
                d = {**d, key: d[key][0]}
        if "num_position_embeddings" in d:
            omni = str(d.get("model_type", "")).startswith("qwen3_omni")
            d = {
                **{k: v for k, v in d.items() if k not in ("hidden_size", "out_hidden_size")},
                "embed_dim": d["hidden_size"],
                "hidden_size": d["out_hidden_size"],
                "patch_bias": True,
                "deepstack_visual_indexes": tuple(d.get("deepstack_visual_indexes") or ()),
                "param_names": "qwen3_omni" if omni else "qwen3",
            }
        elif "out_hidden_size" in d:
            d = {
                **{k: v for k, v in d.items() if k not in ("hidden_size", "out_hidden_size")},
                "embed_dim": d["hidden_size"],
                "hidden_size": d["out_hidden_size"],
                "norm": "rmsnorm",
                "gated_mlp": True,
                "fullatt_block_indexes": tuple(d.get("fullatt_block_indexes") or ()),
            }
        if "in_chans" in d and "in_channels" not in d:
            d = {**d, "in_channels": d["in_chans"]}
        kwargs = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        if self.num_position_embeddings:
            return self._qwen3_hf_dict()
        d = dataclasses.asdict(self)
        defaults = type(self)()
        for name in ("norm", "intermediate_size", "gated_mlp", "window_size", "fullatt_block_indexes", "patch_bias",
                     "num_position_embeddings", "deepstack_visual_indexes", "param_names"):  # fmt: skip
            if d[name] == getattr(defaults, name):
                del d[name]
        theta = d.pop("rope_theta")
        if float(self.mlp_ratio).is_integer():
            d["mlp_ratio"] = int(self.mlp_ratio)  # HF types it int; published configs write 4
        d["rope_parameters"] = {"rope_type": "axial", "rope_theta": theta}
        d["model_type"] = "qwen2_vl_vision"
        return d

    def _qwen3_hf_dict(self) -> dict:
        """The Qwen3 generation's layout (``hidden_size`` the ViT width, ``out_hidden_size`` the merger's)."""
        return {
            "depth": self.depth,
            "hidden_size": self.embed_dim,
            "out_hidden_size": self.hidden_size,
            "hidden_act": self.hidden_act,
            "intermediate_size": self.mlp_dim,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
            "model_type": "qwen3_omni_moe_vision_encoder" if self.param_names == "qwen3_omni" else "qwen3_vl_vision",
        }


@dataclass
class Qwen2VLConfig:
    vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # std of the normal init of every Linear and Embedding weight (HF's field; its 0.02 suits widths of ~1000+).
    initializer_range: float = 0.02
    dtype: str | None = None  # the checkpoint's dtype as config.json records it ("bfloat16", ...)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "Qwen2VLConfig":
        self.vision.validate()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2} "
                "(one entry per frequency pair)"
            )
        if self.vision.hidden_size != self.hidden_size:
            raise ValueError(
                f"vision hidden_size {self.vision.hidden_size} (merger output) must equal the LLM hidden_size "
                f"{self.hidden_size}"
            )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")
        return self

    # ---- presets ------------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> "Qwen2VLConfig":
        """``tiny`` (trains on a CPU in minutes; char-tokenizer vocabulary), ``2b`` and ``7b`` (published shapes)."""
        if name == "tiny":
            specials = CHAR_VOCAB_SPECIALS
            return cls(
                vision=Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=128, num_heads=4),
                vocab_size=272,
                hidden_size=128,
                intermediate_size=352,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                mrope_section=[4, 6, 6],
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                # ~1/sqrt(width) for widths of 64-352: at HF's 0.02 the 2-layer LLM barely passed gradient to the
                # vision tower (motion-only run, 300 steps: 37% at 0.02, 100% with fan-in-scaled init).
                initializer_range=0.08,
                bos_token_id=specials["<|endoftext|>"],
                eos_token_id=specials["<|im_end|>"],
                pad_token_id=specials["<|endoftext|>"],
                image_token_id=specials["<|image_pad|>"],
                video_token_id=specials["<|video_pad|>"],
                vision_start_token_id=specials["<|vision_start|>"],
                vision_end_token_id=specials["<|vision_end|>"],
            ).validate()
        if name == "2b":
            return cls(vision=Qwen2VLVisionConfig(hidden_size=1536)).validate()
        if name == "7b":
            return cls(
                vision=Qwen2VLVisionConfig(hidden_size=3584),
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                tie_word_embeddings=False,
            ).validate()
        raise ValueError(f"unknown Qwen2-VL preset {name!r}; choose one of 'tiny', '2b', '7b'")

    def replace(self, **changes) -> "Qwen2VLConfig":
        """A copy with some fields changed (``vision=`` may be a dict of vision fields to change)."""
        new = copy.deepcopy(self)
        vision = changes.pop("vision", None)
        if isinstance(vision, dict):
            new.vision = dataclasses.replace(new.vision, **vision)
        elif vision is not None:
            new.vision = vision
        return dataclasses.replace(new, **changes).validate()

    # ---- HF config.json ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen2VLConfig":
        """Reads HF's Qwen2-VL config dict, 4.x (flat) or 5.x (``text_config``) layout."""
        text = dict(d)
        text.update(d.get("text_config") or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"vision", "mrope_section", "rope_theta", "dtype"}
        kwargs = {k: text[k] for k in names if text.get(k) is not None}
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if d.get(k) is not None:  # the outer values win: 5.x keeps them only at the top level
                kwargs[k] = d[k]
        if "tie_word_embeddings" in d:
            kwargs["tie_word_embeddings"] = bool(d["tie_word_embeddings"] or text.get("tie_word_embeddings", False))
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("mrope_section") is not None:
            kwargs["mrope_section"] = list(rope["mrope_section"])
        theta = rope.get("rope_theta", text.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        dtype = d.get("dtype") or d.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        vision = dict(d.get("vision_config") or {})
        vision.setdefault("hidden_size", kwargs.get("hidden_size", cls.hidden_size))
        return cls(vision=Qwen2VLVisionConfig.from_hf_dict(vision), dtype=dtype, **kwargs).validate()

    def to_hf_dict(self) -> dict:
        """HF 5.x layout (``text_config``, ``vision_config``, ``rope_parameters``)."""
        text = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": list(self.mrope_section),
                "rope_theta": self.rope_theta,
            },
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "model_type": "qwen2_vl_text",
        }
        d = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.dtype is not None:
            d["dtype"] = self.dtype
        return d

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Qwen2VLConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vlfuse: no config.json in {os.fspath(folder)!r}")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
