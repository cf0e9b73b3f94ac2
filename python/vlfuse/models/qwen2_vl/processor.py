"""Inputs as Qwen2-VL expects them: images/videos -> ``smart_resize`` -> ``patchify`` (normalized patches in merge
order + ``grid_thw``), text -> token ids with each image (video) placeholder expanded to one pad token per merged
visual token between ``<|vision_start|>`` and ``<|vision_end|>``."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import ops
from ...ops.patchify import CLIP_MEAN, CLIP_STD
from .config import Qwen2VLConfig
from .tokenizer import load_tokenizer

__all__ = ["Qwen2VLProcessor", "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER"]

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _to_frames(image) -> Tensor:
    """PIL image or [3, H, W] tensor -> [3, H, W] (uint8, or float in [0, 1])."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got shape {tuple(image.shape)}")
        return image
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise ImportError("vlfuse: images other than tensors need pillow") from exc
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image must be a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def _channel_triple(values, name: str) -> tuple[float, float, float]:
    out = tuple(float(x) for x in values)
    if len(out) != 3:
        raise ValueError(f"{name} must hold one value per RGB channel (3), got {list(values)}")
    return out


def read_preprocessor_config(folder: str | os.PathLike | None) -> dict:
    """``image_mean``, ``image_std``, ``min_pixels``, ``max_pixels`` of the folder's ``preprocessor_config.json``
    (those present); {} when the folder has none."""
    if folder is None:
        return {}
    path = os.path.join(folder, PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        fields = json.load(f)
    return {k: fields[k] for k in ("image_mean", "image_std", "min_pixels", "max_pixels") if k in fields}


class Qwen2VLProcessor:
    """Turns a prompt with images/videos into the model's inputs.

    ``min_pixels``/``max_pixels`` bound each image's area after ``smart_resize`` (HF's defaults: 56*56 and
    28*28*1280). ``image_mean``/``image_std`` (per RGB channel, pixels in [0, 1]) normalise the patches; HF's
    defaults are CLIP's, which a model trained from scratch on other images need not keep. Videos are
    [T, 3, H, W] tensors; an odd frame count is padded by repeating the last frame.
    """

    def __init__(
        self,
        tokenizer,
        config: Qwen2VLConfig,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = _channel_triple(image_mean, "image_mean")
        self.image_std = _channel_triple(image_std, "image_std")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive per channel, got {list(self.image_std)}")
        v = config.vision
        self.factor = v.patch_size * v.spatial_merge_size

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: Qwen2VLConfig | None = None, **kwargs):
        """The folder's tokenizer.json when present, else the built-in character tokenizer; the normalisation and
        pixel bounds of its ``preprocessor_config.json`` when present (``kwargs`` override them)."""
        config = Qwen2VLConfig.from_pretrained(folder) if config is None else config
        return cls(load_tokenizer(folder, config), config, **{**read_preprocessor_config(folder), **kwargs})

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes ``preprocessor_config.json`` with HF's Qwen2-VL image processor fields."""
        v = self.config.vision
        fields = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size,
        }
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, PREPROCESSOR_FILE), "w") as f:
            json.dump(fields, f, indent=2)

    # ---- pixels --------------------------------------------------------------------------------------------------

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """smart_resize's (height, width) for an image of this size; too small an image is an error."""
        if height < self.factor or width < self.factor:
            raise ValueError(
                f"the image is too small: {height}x{width} pixels; Qwen2-VL needs both sides of at least "
                f"{self.factor} pixels"
            )
        return ops.smart_resize(
            height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def _resize(self, frames: Tensor) -> Tensor:
        """[T, 3, H, W] -> [T, 3, H', W'] with H', W' from smart_resize (multiples of patch * merge)."""
        H, W = frames.shape[-2:]
        h, w = self.target_size(H, W)
        if (h, w) == (H, W):
            return frames
        is_uint8 = frames.dtype == torch.uint8
        resized = F.interpolate(frames.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        if is_uint8:
            return resized.round().clamp(0, 255).to(torch.uint8)
        return resized.clamp(0, 1)

    def _patchify(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        v = self.config.vision
        return ops.patchify(
            self._resize(frames),
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            merge_size=v.spatial_merge_size,
            mean=self.image_mean,
            std=self.image_std,
        )

    def process_image(self, image) -> tuple[Tensor, Tensor]:
        """One image -> patches [h * w, C * Tp * P * P] float32 and grid_thw [1, 3]. PIL images are resized by PIL
        (bicubic, as HF's Qwen2-VL image processor does), tensors by torch (bicubic, antialiased)."""
        if not isinstance(image, Tensor) and hasattr(image, "resize"):
            h, w = self.target_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                from PIL import Image

                image = image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        return self._patchify(_to_frames(image).unsqueeze(0))

    def process_video(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """[T, 3, H, W] frames -> patches [ceil(T / Tp) * h * w, C * Tp * P * P] float32 and grid_thw [1, 3]."""
        if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
            shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise ValueError(f"a video must be a [T, 3, H, W] tensor of frames, got {shape}")
        if frames.shape[0] == 0:
            raise ValueError("a video needs at least one frame")
        return self._patchify(frames)

    def visual_tokens(self, grid_thw: Tensor) -> int:
        """Number of LLM tokens one item with this grid takes (its pad tokens)."""
        m = self.config.vision.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw.reshape(-1)[:3])
        return t * h * w // (m * m)

    # ---- text ----------------------------------------------------------------------------------------------------

    def chat_prompt(self, text: str, num_images: int = 0, num_videos: int = 0, system: str | None = None) -> str:
        """Qwen2-VL's chat template for one user turn (images, then videos, then text) and the assistant's start."""
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        visuals = IMAGE_PLACEHOLDER * num_images + VIDEO_PLACEHOLDER * num_videos
        return f"{head}<|im_start|>user\n{visuals}{text}<|im_end|>\n<|im_start|>assistant\n"

    def _expand(self, text: str, pad: str, counts: list[int], name: str) -> str:
        parts = text.split(pad)
        if len(parts) - 1 != len(counts):
            raise ValueError(f"the text has {len(parts) - 1} {pad} placeholders but {len(counts)} {name}(s) were given")
        out = parts[0]
        for count, part in zip(counts, parts[1:]):
            out += pad * count + part
        return out

    def __call__(self, text: str | list[str], images=None, videos=None, return_tensors: str = "pt") -> dict:
        """text: one prompt or a batch (left-padded); each ``<|image_pad|>`` (``<|video_pad|>``) stands for one
        image (video), taken in order across the batch. Returns input_ids [B, L], attention_mask [B, L],
        pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw when given."""
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Tensor] = {}
        image_counts: list[int] = []
        video_counts: list[int] = []
        if images:
            patches, grids = zip(*(self.process_image(im) for im in images))
            out["pixel_values"] = torch.cat(patches)
            out["image_grid_thw"] = torch.cat(grids)
            image_counts = [self.visual_tokens(g) for g in grids]
        if videos:
            patches, grids = zip(*(self.process_video(v) for v in videos))
            out["pixel_values_videos"] = torch.cat(patches)
            out["video_grid_thw"] = torch.cat(grids)
            video_counts = [self.visual_tokens(g) for g in grids]
        joined = "\x00".join(texts)  # expand across the batch in order, then split back per prompt
        joined = self._expand(joined, "<|image_pad|>", image_counts, "image")
        joined = self._expand(joined, "<|video_pad|>", video_counts, "video")
        rows = [self.tokenizer.encode(t) for t in joined.split("\x00")]
        length = max(len(r) for r in rows)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for i, r in enumerate(rows):
            if r:
                input_ids[i, length - len(r) :] = torch.tensor(r)
                attention_mask[i, length - len(r) :] = 1
        out["input_ids"] = input_ids
        out["attention_mask"] = attention_mask
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
