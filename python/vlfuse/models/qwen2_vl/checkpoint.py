"""Safetensors checkpoints in HF's Qwen2-VL naming: reading (single file or sharded, 4.x or 5.x key layout) with
every tensor checked before anything is loaded, and writing (4.x layout, which every transformers version reads).

Key layouts (the model's own names are the left column):
  visual.*          <- ``visual.*`` (published checkpoints, 4.x)     or ``model.visual.*`` (5.x)
  language_model.*  <- ``model.*`` (4.x)                              or ``model.language_model.*`` (5.x)
  lm_head.*         <- ``lm_head.*``
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "read_state_dict", "write_state_dict", "to_model_key", "to_hf_key"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: missing, truncated, or not matching the model."""


def to_model_key(key: str) -> str:
    for prefix, target in (("model.visual.", "visual."), ("model.language_model.", "language_model.")):
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    if key.startswith("model."):
        return "language_model." + key[len("model.") :]
    return key


def to_hf_key(key: str) -> str:
    """The published (4.x) name of a model key."""
    if key.startswith("language_model."):
        return "model." + key[len("language_model.") :]
    return key


def _shard_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"vlfuse: checkpoint folder {folder!r} does not exist")
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(f"vlfuse: {INDEX_FILE} in {folder!r} lists shard(s) that are missing: {missing}")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"vlfuse: no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}")


def _check_file(path: str) -> None:
    """Reads the safetensors header and checks every tensor's byte range against the file, so that a truncated
    file is reported with the first tensor it cuts, before any data is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"vlfuse: {path} is truncated: {size} bytes, not even a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"vlfuse: {path} is truncated inside its header ({size} bytes)")
        header = json.loads(f.read(header_len))
    data = size - 8 - header_len
    entries = sorted(((v["data_offsets"], k, v) for k, v in header.items() if k != "__metadata__"))
    for (begin, end), name, info in entries:
        count = 1
        for d in info["shape"]:
            count *= d
        itemsize = _DTYPE_BYTES.get(info["dtype"])
        if end > data:
            raise CheckpointError(
                f"vlfuse: {path} is truncated: tensor {name!r} needs bytes {begin}..{end} of the data section but "
                f"only {data} are present"
            )
        if itemsize is not None and end - begin != count * itemsize:
            raise CheckpointError(f"vlfuse: {path}: tensor {name!r} has {end - begin} bytes for shape {info['shape']}")


def read_state_dict(folder: str, expected: dict[str, tuple[torch.Size, torch.dtype]], tied: bool) -> dict:
    """All tensors of the checkpoint in ``folder`` under the model's key names, checked against ``expected``
    (model key -> (shape, dtype)): every key present, none unknown, shapes equal. ``tied``: ``lm_head.weight``
    may be absent (it is the embedding). Raises CheckpointError naming the first bad tensor; loads nothing then."""
    files = _shard_files(folder)
    for path in files:
        _check_file(path)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for hf_key in f.keys():
                key = to_model_key(hf_key)
                if key in state:
                    raise CheckpointError(f"vlfuse: tensor {hf_key!r} appears twice (in {source[key]} and {path})")
                if key not in expected:
                    if tied and key == "lm_head.weight":
                        continue
                    raise CheckpointError(
                        f"vlfuse: {path}: tensor {hf_key!r} does not belong to this Qwen2-VL configuration"
                    )
                shape = tuple(f.get_slice(hf_key).get_shape())
                if shape != tuple(expected[key][0]):
                    raise CheckpointError(
                        f"vlfuse: {path}: tensor {hf_key!r} has shape {list(shape)}, the configuration expects "
                        f"{list(expected[key][0])}"
                    )
                state[key] = f.get_tensor(hf_key)
                source[key] = path
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(
            f"vlfuse: the checkpoint in {folder!r} lacks {len(missing)} tensor(s) the configuration needs, first "
            f"{to_hf_key(missing[0])!r}"
        )
    return state


def write_state_dict(folder: str, state: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> None:
    """Writes ``state`` (model key names) as HF safetensors, sharded with an index when larger than
    ``max_shard_bytes``."""
    os.makedirs(folder, exist_ok=True)
    tensors = {to_hf_key(k): v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(folder, SINGLE_FILE), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
