"""``python -m vlfuse generate --model FOLDER [--image PATH ...] --prompt TEXT``: prints the model's answer."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt about images with a Qwen2-VL checkpoint folder")
    p.add_argument("--model", required=True, help="folder with config.json and *.safetensors (HF Qwen2-VL layout)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the user's question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("vlfuse", "eager"), default="vlfuse")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280, help="upper bound of each image's area")
    p.set_defaults(func=_cmd_generate)


def _load_images(paths: list[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path!r} does not exist")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except UnidentifiedImageError as exc:
            raise ValueError(f"{path!r} is not an image file pillow can read") from exc
    return images


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .model import Qwen2VL
    from .processor import Qwen2VLProcessor

    try:
        images = _load_images(args.image)
        model = Qwen2VL.from_pretrained(args.model, backend=args.backend, dtype=args.dtype)
        processor = Qwen2VLProcessor.from_pretrained(args.model, config=model.config, max_pixels=args.max_pixels)
        prompt = processor.chat_prompt(args.prompt, num_images=len(images))
        inputs = processor(prompt, images=images)
        generator = torch.Generator().manual_seed(args.seed)
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"vlfuse generate: error: {exc}", file=sys.stderr)
        return 2
    print(processor.decode(out[0, inputs["input_ids"].shape[1] :]))
    return 0
