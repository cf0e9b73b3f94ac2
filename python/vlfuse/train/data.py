"""The training data format, its dataset, and the collate that packs samples into one batch.

One sample per JSONL line (the Qwen-VL / LLaVA style)::

    {"images": ["imgs/a.png", ...],                    # optional; paths relative to the JSONL file
     "videos": [["frames/0.png", "frames/1.png"], "frames_dir/", ...],   # optional; a frame list or a folder
     "conversations": [{"role": "user", "content": "<image>What is this?"},
                       {"role": "assistant", "content": "a red circle"}, ...]}

``<image>`` and ``<video>`` in a user turn mark where each image / video goes, in order (``from``/``value`` with
``human``/``gpt`` is accepted too). Each image keeps its own size up to ``smart_resize`` (multiples of 28 within the
pixel budget); a batch concatenates every sample's patches and stacks their ``grid_thw``, so images of different
sizes share one vision-tower call. The loss covers the assistant turns only (their text and closing ``<|im_end|>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

IGNORE_INDEX = -100

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def read_jsonl(path: str | Path, tasks: list[str] | None = None) -> list[dict]:
    """The samples of a JSONL file (optionally only the given ``task`` values), with paths made absolute."""
    path = Path(path)
    root = path.parent
    samples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if tasks is not None and sample.get("task") not in tasks:
                continue
            if "conversations" not in sample and "messages" not in sample:
                raise ValueError(f"{path}:{line_no}: a sample needs 'conversations' (user/assistant turns)")
            sample["images"] = [str(root / p) for p in sample.get("images", [])]
            sample["videos"] = [_video_frames(root, v) for v in sample.get("videos", [])]
            samples.append(sample)
    return samples


def _video_frames(root: Path, video) -> list[str]:
    if isinstance(video, str):  # a folder of frames, in name order
        folder = root / video
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not frames:
            raise ValueError(f"video folder {folder} holds no frames")
        return [str(p) for p in frames]
    return [str(root / p) for p in video]


def turns(sample: dict) -> list[tuple[str, str]]:
    out = []
    for turn in sample.get("conversations") or sample["messages"]:
        role = _ROLES[turn.get("role") or turn["from"]]
        out.append((role, turn.get("content", turn.get("value"))))
    return out


@dataclass
class Encoded:
    """One tokenized sample: token ids with visual pads expanded, labels, and its visual inputs."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: Tensor | None  # [patches, C * Tp * P * P]
    image_grid_thw: Tensor | None  # [images, 3]
    pixel_values_videos: Tensor | None
    video_grid_thw: Tensor | None


class SampleEncoder:
    """Turns a sample into token ids and patches with the model's processor (Qwen2-VL's chat template).

    ``processor`` is a :class:`vlfuse.models.qwen2_vl.Qwen2VLProcessor`; its ``min_pixels``/``max_pixels`` bound
    each image's area after ``smart_resize``.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = tok = processor.tokenizer
        self.im_start = tok.token_to_id("<|im_start|>")
        self.im_end = tok.token_to_id("<|im_end|>")
        self.vision_start = tok.token_to_id("<|vision_start|>")
        self.vision_end = tok.token_to_id("<|vision_end|>")
        self.image_pad = tok.token_to_id("<|image_pad|>")
        self.video_pad = tok.token_to_id("<|video_pad|>")
        self.newline = tok.encode("\n")
        self.merge_area = processor.config.vision.spatial_merge_size ** 2

    def _visual(self, sample: dict):
        images = videos = None
        if sample["images"]:
            patches, grids = zip(*(self.processor.process_image(_load(p)) for p in sample["images"]))
            images = torch.cat(patches), torch.cat(grids)
        if sample["videos"]:
            clips = [torch.stack([_load(p) for p in frames]) for frames in sample["videos"]]
            patches, grids = zip(*(self.processor.process_video(clip) for clip in clips))
            videos = torch.cat(patches), torch.cat(grids)
        return images, videos

    def prompt_ids(self, sample: dict, image_grid: Tensor | None, video_grid: Tensor | None) -> tuple:
        """(ids, labels) of the whole conversation, and the ids of the prompt before the first assistant answer."""
        image_counts = [] if image_grid is None else (image_grid.prod(-1) // self.merge_area).tolist()
        video_counts = [] if video_grid is None else (video_grid.prod(-1) // self.merge_area).tolist()
        ids: list[int] = []
        labels: list[int] = []
        first_prompt = None
        for role, content in turns(sample):
            header = [self.im_start, *self.tokenizer.encode(role), *self.newline]
            if role == "assistant":
                if first_prompt is None:
                    first_prompt = ids + header
                body = [*self.tokenizer.encode(content), self.im_end]
                ids += header + body + self.newline
                labels += [IGNORE_INDEX] * len(header) + body + [IGNORE_INDEX] * len(self.newline)
                continue
            body = self._with_visual(content, image_counts, video_counts)
            chunk = header + body + [self.im_end, *self.newline]
            ids += chunk
            labels += [IGNORE_INDEX] * len(chunk)
        if image_counts or video_counts:
            raise ValueError(f"sample {sample.get('id', '?')}: more images/videos than <image>/<video> markers")
        return ids, labels, first_prompt

    def _with_visual(self, text: str, image_counts: list[int], video_counts: list[int]) -> list[int]:
        out: list[int] = []
        while text:
            i, v = text.find("<image>"), text.find("<video>")
            cut = min(x for x in (i, v, len(text)) if x >= 0)
            out += self.tokenizer.encode(text[:cut])
            if cut == len(text):
                break
            counts, pad = (image_counts, self.image_pad) if cut == i else (video_counts, self.video_pad)
            if not counts:
                raise ValueError(f"more {'<image>' if cut == i else '<video>'} markers than inputs in {text!r}")
            out += [self.vision_start] + [pad] * counts.pop(0) + [self.vision_end]
            text = text[cut + len("<image>") :]
        return out

    def __call__(self, sample: dict) -> Encoded:
        images, videos = self._visual(sample)
        ids, labels, _ = self.prompt_ids(sample, None if images is None else images[1], None if videos is None else videos[1])
        return Encoded(
            ids,
            labels,
            None if images is None else images[0],
            None if images is None else images[1],
            None if videos is None else videos[0],
            None if videos is None else videos[1],
        )

    def prompt(self, sample: dict) -> tuple[list[int], str, dict]:
        """For evaluation: the ids up to the first answer, that answer's text, and the visual inputs."""
        images, videos = self._visual(sample)
        _, _, first_prompt = self.prompt_ids(
            sample, None if images is None else images[1], None if videos is None else videos[1]
        )
        answer = next(content for role, content in turns(sample) if role == "assistant")
        visual = {}
        if images is not None:
            visual.update(pixel_values=images[0], image_grid_thw=images[1])
        if videos is not None:
            visual.update(pixel_values_videos=videos[0], video_grid_thw=videos[1])
        return first_prompt, answer, visual


def pixel_statistics(samples: list[dict], limit: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (pixels in [0, 1]) over the images and video frames of up to ``limit``
    samples spread evenly over ``samples``: the ``image_mean``/``image_std`` of a model trained on this corpus."""
    if not samples:
        raise ValueError("pixel_statistics: no samples")
    picked = samples[:: max(1, -(-len(samples) // limit))]
    total = torch.zeros(3, dtype=torch.float64)
    square = torch.zeros(3, dtype=torch.float64)
    count = 0
    for sample in picked:
        for path in [*sample["images"], *(f for frames in sample["videos"] for f in frames)]:
            pixels = _load(path).reshape(3, -1).to(torch.float64) / 255.0
            total += pixels.sum(1)
            square += pixels.square().sum(1)
            count += pixels.shape[1]
    if count == 0:
        raise ValueError("pixel_statistics: the samples hold no images or video frames")
    mean = total / count
    std = (square / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def _load(path: str) -> Tensor:
    """[3, H, W] uint8."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


class JsonlDataset(torch.utils.data.Dataset):
    """Encoded samples of one or more JSONL files; encoding is cached, since tiny corpora are revisited each epoch."""

    def __init__(self, paths: str | list[str], encoder: SampleEncoder, tasks: list[str] | None = None, cache=True):
        paths = [paths] if isinstance(paths, (str, Path)) else paths
        self.samples = [s for p in paths for s in read_jsonl(p, tasks)]
        if not self.samples:
            raise ValueError(f"no samples in {paths} (tasks {tasks})")
        self.encoder = encoder
        self.cache: dict[int, Encoded] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        if self.cache is None:
            return self.encoder(self.samples[index])
        if index not in self.cache:
            self.cache[index] = self.encoder(self.samples[index])
        return self.cache[index]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pads token ids into [B, L]; concatenates all patches (images of any size) with their grid_thw."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        present = [e for e in batch if getattr(e, grid) is not None]
        if present:
            out[pixels] = torch.cat([getattr(e, pixels) for e in present])
            out[grid] = torch.cat([getattr(e, grid) for e in present])
    return out


class BatchStream:
    """A deterministic, resumable stream of global batches: epoch e visits a permutation drawn from (seed, e).

    The position is the number of samples consumed; ``batch(position, size)`` is a pure function of it, so a resumed
    run sees exactly the samples the uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._order = torch.randperm(self.size, generator=g).tolist()
            self._epoch = epoch
        return self._order

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.size)
            order = self._permutation(epoch)
            out += order[offset : offset + count - len(out)]
        return out
