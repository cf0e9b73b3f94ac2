"""What a user sees during training: a progress bar, metrics as JSONL, and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """``stage 2 [#####.....] 120/400 loss 1.234 tok/s 5.1k ETA 0:00:42``: redrawn in place on a terminal, printed
    every ``every`` steps otherwise (logs, CI)."""

    def __init__(self, label: str, total: int, start: int = 0, every: int = 25, stream=None, enabled: bool = True):
        self.label = label
        self.total = total
        self.start_step = start
        self.every = every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        filled = int(20 * step / max(1, self.total))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total} loss {loss:.4f} "
            f"tok/s {tokens_per_s / 1000:.1f}k ETA {_clock(eta)}"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``; on resume, drops lines past the resumed step."""

    def __init__(self, path: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """The loss curve of a run (raw and smoothed) from its metrics JSONL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    smooth, avg = [], None
    for loss in losses:
        avg = loss if avg is None else 0.9 * avg + 0.1 * loss
        smooth.append(avg)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label="smoothed (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
