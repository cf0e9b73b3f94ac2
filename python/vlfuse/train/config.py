"""The training run's configuration (a YAML or JSON file), with every field's default in one place."""

from __future__ import annotations

import copy
import json
from pathlib import Path

DEFAULTS: dict = {
    "stage": None,  # 1, 2 or 3; `vlfuse train --stage` overrides it
    "seed": 0,
    "model": {
        "preset": "tiny",  # a Qwen2VLConfig preset when `init` is not given
        "overrides": {},  # Qwen2VLConfig fields to change in the preset (`vision` may be a dict)
        "init": None,  # a model folder (save_pretrained / HF layout): the previous stage's `final`
        "backend": "vlfuse",
    },
    "data": {
        "train": None,  # JSONL path or list of paths
        "tasks": None,  # only samples whose `task` is listed (None: all)
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        # Patch normalisation, per RGB channel: null keeps the init model's (its preprocessor_config.json) or CLIP's;
        # "corpus" measures the training images' mean / std; or lists of 3 numbers.
        "image_mean": None,
        "image_std": None,
    },
    "optim": {
        "lr": {"vision": 1e-3, "merger": 1e-3, "llm": 1e-3},
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "grad_clip": 1.0,  # max global grad norm; 0 disables clipping
    },
    "schedule": {"steps": 100, "warmup": 10, "min_lr_ratio": 0.1},
    "batch": {"size": 16, "accumulation": 1},  # size: samples per optimizer step, over all ranks and micro-batches
    "precision": "fp32",  # fp32 | bf16 (autocast)
    "gradient_checkpointing": False,
    "distributed": {"strategy": "ddp"},  # ddp | fsdp (FSDP2 fully_shard)
    "output": "runs/train",
    "save_every": 0,  # steps between checkpoints (0: only at the end)
    "keep_checkpoints": 2,
    "log_every": 25,  # progress lines when stderr is not a terminal
    "progress": True,
}


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ValueError(f"vlfuse train: unknown config field {path + key!r}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in ("overrides",):
            out[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            out[key] = value
    return out


def resolve(config: dict | None = None, **overrides) -> dict:
    """DEFAULTS updated with ``config`` and then ``overrides``; unknown fields are errors, not silently ignored."""
    out = _merge(DEFAULTS, config or {})
    return _merge(out, overrides)


def load(path: str | Path) -> dict:
    """Reads a YAML (``.yaml``/``.yml``) or JSON config file and resolves it against the defaults."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"vlfuse train: {path} must hold a mapping of config fields")
    return resolve(raw)
