"""A synthetic multimodal corpus, generated offline and deterministically from a seed.

Tasks (each sample is one JSONL line in the format of :mod:`vlfuse.train.data`):

- ``shape_colour``: one coloured shape (circle, square, triangle, diamond) in one merge window of an image of varied
  size; a caption or a question about its colour, its shape or both.
- ``characters``: rendered digits and capital letters, one per merge window of a row; the answer is the text.
- ``motion``: a short video (odd and even frame counts) of a shape moving left, right, up or down; a training split
  also holds each clip played backwards, the opposite direction.
- ``count``: two images with different numbers of shapes; which one has more (a multi-image dialogue turn).
- ``dialogue``: two-turn conversations about one image (colour, then shape).

Images are small (56 to 112 pixels a side, multiples of 28) so the tiny model trains on a CPU in minutes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIDES = (56, 84, 112)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Frame counts of the held-out and of the training clips. A clip's path stays inside its 56-px frame, so with 4 or 5
# frames where the shape starts gives the direction away (the start ranges of the two directions of an axis barely
# overlap); the genuine cue of the sign is the motion within the frame pairs that the Conv3d patchify reads together,
# the one place the tower sees time (it attends within a temporal token). The tiny model learned the shortcut and
# swapped up/down or left/right on 3-frame clips, whose path is too short for it (a linear probe on the tower's first
# temporal token after stage 2: 4- and 5-frame clips 100%, 3-frame 89%). Training clips of 2 frames (one pair, a path
# of 5-7 px) and every training clip played backwards (the opposite answer; for odd counts other frames share a pair)
# make the pair's cue the one that pays (the same probe: 3-frame 100%).
MOTION_FRAMES = {"held_out": (3, 4, 5), "train": (2, 3, 4, 5)}

# The held-out question of each scored task (the demo's accuracy is exact match of the answer).
EVAL_PROMPTS = {
    "shape_colour": "What is it?",
    "characters": "Read it.",
    "motion": "Which way?",
}


@dataclass(frozen=True)
class CorpusSpec:
    """How many samples of each task a split holds."""

    shape_colour: int = 0
    characters: int = 0
    motion: int = 0  # clips; a training split holds each twice (forwards and backwards)
    count: int = 0
    dialogue: int = 0


DEFAULT_SPLITS = {
    # Texts are the slowest task for the tiny model now that each shape sits in one merge window, so they get the
    # largest share (the demo with 4500 shapes and 3000 texts: shape/colour 100%, characters 98%).
    # 1500 motion clips are 3000 samples, each also played backwards (see MOTION_FRAMES). With 1000 clips (motion's
    # old share) the tower's pair cue was still weak after stage 1 on one seed and motion stayed at 56%.
    "train": CorpusSpec(shape_colour=3000, characters=4500, motion=1500, count=600, dialogue=800),
    "val": CorpusSpec(shape_colour=100, characters=100, motion=100, count=40, dialogue=0),
}


def _background(rng: random.Random) -> tuple[int, int, int]:
    grey = rng.randint(225, 255)
    return (grey, grey, rng.randint(225, 255))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_image(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """The shape centred in one 28 x 28 merge window (2 px of jitter), as the glyphs of ``text_image``. At free
    positions a shape straddles windows at every offset, the one scored input that no single merged token holds;
    the tiny model learned it last and least (a vision-only probe, tower + linear head, 300 steps of 16: radius
    9-13 px at free positions 56%, the same shapes centred in a window 100%; radius 12 to 0.4 of the side: 68%)."""
    width, height = rng.choice(SIDES), rng.choice(SIDES)
    image = Image.new("RGB", (width, height), _background(rng))
    r = rng.uniform(9, 13)
    cx = 28 * rng.randrange(width // 28) + 14 + rng.uniform(-2, 2)
    cy = 28 * rng.randrange(height // 28) + 14 + rng.uniform(-2, 2)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLOURS[colour])
    return image


def text_image(rng: random.Random, text: str) -> Image.Image:
    """Bold glyphs, one per 28 x 28 merge window of one row (a few pixels of jitter). Glyphs at free positions,
    straddling windows, were not learned by the tiny model within the demo's budget (300 character-only steps: 4%
    characters read; aligned: 94%)."""
    font = ImageFont.load_default(size=rng.randint(22, 26))
    width, height = max(56, 28 * len(text)), 56
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    row = rng.randint(0, height // 28 - 1)
    for i, ch in enumerate(text):
        left, top, right, bottom = font.getbbox(ch, stroke_width=1)
        x = 28 * i + (28 - (right - left)) / 2 - left + rng.uniform(-2, 2)
        y = 28 * row + (28 - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
        draw.text((x, y), ch, font=font, fill=ink, stroke_width=1, stroke_fill=ink)
    return image


def motion_frames(rng: random.Random, direction: str, frames: int) -> list[Image.Image]:
    side = 56
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    r = rng.uniform(6, 9)
    step = rng.uniform(5, 7)
    span = step * (frames - 1)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    # Choose a start so the whole path stays inside the frame.
    lo_x, hi_x = r + max(0, -dx) * span, side - r - max(0, dx) * span
    lo_y, hi_y = r + max(0, -dy) * span, side - r - max(0, dy) * span
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    background = _background(rng)
    out = []
    for i in range(frames):
        image = Image.new("RGB", (side, side), background)
        _draw_shape(ImageDraw.Draw(image), shape, x0 + dx * step * i, y0 + dy * step * i, r, COLOURS[colour])
        out.append(image)
    return out


def count_image(rng: random.Random, count: int) -> Image.Image:
    side = 84
    image = Image.new("RGB", (side, side), _background(rng))
    draw = ImageDraw.Draw(image)
    cells = rng.sample(range(9), count)  # a 3x3 grid of cells keeps shapes apart
    for cell in cells:
        cx = (cell % 3 + 0.5) * side / 3 + rng.uniform(-3, 3)
        cy = (cell // 3 + 0.5) * side / 3 + rng.uniform(-3, 3)
        _draw_shape(draw, rng.choice(SHAPES), cx, cy, rng.uniform(6, 10), COLOURS[rng.choice(list(COLOURS))])
    return image


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


class _Writer:
    def __init__(self, root: Path, split: str):
        self.root = root
        self.split = split
        self.index = 0

    def save(self, image: Image.Image, name: str) -> str:
        rel = f"{self.split}/{name}.png"
        image.save(self.root / rel, optimize=False, compress_level=1)
        return rel


def _shape_colour_sample(rng: random.Random, w: _Writer, sid: str, evaluate: bool) -> dict:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    path = w.save(shape_image(rng, shape, colour), sid)
    kind = "both" if evaluate else rng.choice(("both", "both", "colour", "shape", "caption"))
    question, answer = {
        "both": (EVAL_PROMPTS["shape_colour"], f"{colour} {shape}"),
        "colour": ("Colour?", colour),
        "shape": ("Shape?", shape),
        "caption": ("Describe.", f"a {colour} {shape}"),
    }[kind]
    return {
        "id": sid,
        "task": "shape_colour",
        "images": [path],
        "conversations": [_turn("user", f"<image>{question}"), _turn("assistant", answer)],
    }


def _characters_sample(rng: random.Random, w: _Writer, sid: str, evaluate: bool) -> dict:
    text = "".join(rng.choice(CHARACTERS) for _ in range(2))
    path = w.save(text_image(rng, text), sid)
    return {
        "id": sid,
        "task": "characters",
        "images": [path],
        "conversations": [_turn("user", f"<image>{EVAL_PROMPTS['characters']}"), _turn("assistant", text)],
    }


def _motion_sample(rng: random.Random, w: _Writer, sid: str, evaluate: bool) -> dict | list[dict]:
    direction = rng.choice(DIRECTIONS)
    frames = rng.choice(MOTION_FRAMES["held_out" if evaluate else "train"])
    paths = [w.save(frame, f"{sid}_f{i}") for i, frame in enumerate(motion_frames(rng, direction, frames))]

    def clip(cid: str, frame_paths: list[str], answer: str) -> dict:
        return {
            "id": cid,
            "task": "motion",
            "videos": [frame_paths],
            "conversations": [_turn("user", f"<video>{EVAL_PROMPTS['motion']}"), _turn("assistant", answer)],
        }

    if evaluate:
        return clip(sid, paths, direction)
    return [clip(sid, paths, direction), clip(f"{sid}r", paths[::-1], OPPOSITE[direction])]


def _count_sample(rng: random.Random, w: _Writer, sid: str, evaluate: bool) -> dict:
    a, b = rng.sample(range(1, 5), 2)
    paths = [w.save(count_image(rng, a), f"{sid}_a"), w.save(count_image(rng, b), f"{sid}_b")]
    return {
        "id": sid,
        "task": "count",
        "images": paths,
        "conversations": [
            _turn("user", "<image><image>Which has more?"),
            _turn("assistant", "first" if a > b else "second"),
        ],
    }


def _dialogue_sample(rng: random.Random, w: _Writer, sid: str, evaluate: bool) -> dict:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    path = w.save(shape_image(rng, shape, colour), sid)
    return {
        "id": sid,
        "task": "dialogue",
        "images": [path],
        "conversations": [
            _turn("user", "<image>Colour?"),
            _turn("assistant", colour),
            _turn("user", "And shape?"),
            _turn("assistant", shape),
        ],
    }


_MAKERS = {
    "shape_colour": _shape_colour_sample,
    "characters": _characters_sample,
    "motion": _motion_sample,
    "count": _count_sample,
    "dialogue": _dialogue_sample,
}


def make_corpus(out: str | Path, seed: int = 0, splits: dict[str, CorpusSpec] | None = None) -> dict[str, Path]:
    """Writes ``<out>/<split>.jsonl`` and the images under ``<out>/<split>/``; returns the JSONL path per split.

    Identical seeds give identical files. Each split uses its own random stream, so the validation split does not
    change when the training split grows.
    """
    root = Path(out)
    splits = DEFAULT_SPLITS if splits is None else splits
    paths = {}
    for split_index, (split, spec) in enumerate(splits.items()):
        (root / split).mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1000 + split_index)
        writer = _Writer(root, split)
        tasks = [task for task in _MAKERS for _ in range(getattr(spec, task))]
        rng.shuffle(tasks)
        samples = []
        for i, task in enumerate(tasks):
            made = _MAKERS[task](rng, writer, f"{split}{i:06d}", split != "train")
            samples.extend(made if isinstance(made, list) else [made])
        paths[split] = root / f"{split}.jsonl"
        with open(paths[split], "w") as f:
            for sample in samples:
                f.write(json.dumps(sample) + "\n")
    return paths
