"""Training checkpoints that an interrupted save can never damage.

A checkpoint is a folder ``<run>/checkpoints/step_<N>`` holding

- ``model.safetensors``: every parameter and buffer of the model (full tensors, also under FSDP);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``s;
- ``rng.pt``: the Python, NumPy and torch RNG states of every rank;
- ``state.json``: the step, the data position (samples consumed) and the run's config.

Each save is written into a hidden temporary folder beside it and renamed into place only when every file is on disk,
so a folder named ``step_<N>`` is always complete; leftovers of a killed save are removed on the next save or resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); copies make each entry its own tensor.
    out, seen = {}, {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.clone() if key in seen else t.contiguous()
        seen[key] = name
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_saves(run_dir: str | Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def write_files(folder: Path, model_state: dict, optimizer_state: dict, scheduler_state: dict, rng: list, state: dict):
    """The files of one checkpoint, in the order that puts the largest first (a kill mid-way is the common case)."""
    save_file(_contiguous_cpu(model_state), str(folder / "model.safetensors"))
    torch.save(optimizer_state, folder / "optimizer.pt")
    torch.save(scheduler_state, folder / "scheduler.pt")
    torch.save(rng, folder / "rng.pt")
    with open(folder / "state.json", "w") as f:
        json.dump(state, f, indent=2)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    scheduler_state: dict,
    rng: list,
    state: dict,
    keep: int = 2,
) -> Path:
    """Writes ``checkpoints/step_<step>`` atomically (temp folder + rename); keeps the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_saves(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    write_files(tmp, model_state, optimizer_state, scheduler_state, rng, state)
    for name in os.listdir(tmp):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # a re-save of the same step (after a resume): replace the old one atomically enough
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | Path) -> dict:
    """Everything a save wrote: ``model`` (tensors), ``optimizer``, ``scheduler``, ``rng`` (per rank), ``state``."""
    folder = Path(folder)
    with open(folder / "state.json") as f:
        state = json.load(f)
    return {
        "model": load_file(str(folder / "model.safetensors")),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=False),
        "rng": torch.load(folder / "rng.pt", weights_only=False),
        "state": state,
    }
