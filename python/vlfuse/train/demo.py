"""``python -m vlfuse demo``: the synthetic corpus, Qwen2-VL's three training stages on the ``tiny`` preset, held-out
accuracy per task, and the op benchmark table, on a laptop-class CPU in a few minutes.

The stages are ``configs/tiny_stage{1,2,3}.yaml`` (what ``vlfuse train --config`` runs too), with the demo's folders
and seed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

SCORED_TASKS = ("shape_colour", "motion", "characters")
STAGES = (1, 2, 3)
# Seeds of one demo run: the corpus gets the demo's seed; each stage its config's seed plus this many times it.
STAGE_SEED_STRIDE = 100


def config_dir() -> Path:
    """The folder of the stage configs: ``configs/`` of a source checkout, or its copy installed in the package."""
    package = Path(__file__).resolve().parents[1]
    places = (package / "configs", package.parents[1] / "configs")
    for folder in places:
        if (folder / "tiny_stage1.yaml").is_file():
            return folder
    raise FileNotFoundError(f"vlfuse demo: no tiny_stage1.yaml in {' or '.join(map(str, places))}")


def stage_config(stage: int, data_dir: str | Path, run_dir: str | Path, seed: int = 0) -> dict:
    """``configs/tiny_stage<stage>.yaml`` resolved, reading ``<data_dir>/train.jsonl``, writing
    ``<run_dir>/stage<stage>`` and starting from the previous stage's ``final`` there; ``seed`` shifts its seed."""
    from .config import load

    if stage not in STAGES:
        raise ValueError(f"vlfuse demo: stage must be one of {STAGES}, got {stage}")
    cfg = load(config_dir() / f"tiny_stage{stage}.yaml")
    cfg["seed"] += STAGE_SEED_STRIDE * seed
    cfg["data"]["train"] = str(Path(data_dir) / "train.jsonl")
    if cfg["model"]["init"]:
        cfg["model"]["init"] = str(Path(run_dir) / f"stage{stage - 1}" / "final")
    cfg["output"] = str(Path(run_dir) / f"stage{stage}")
    return cfg


def run_bench() -> tuple[int | None, float]:
    """The op benchmark table (``vlfuse bench --quick``) when the bench package is installed; (exit code, seconds)."""
    t0 = time.perf_counter()
    try:
        from vlfuse.bench.cli import run_bench as bench
    except ModuleNotFoundError as exc:
        if exc.name != "vlfuse.bench":  # a real import error: show it
            raise
        print("vlfuse demo: the `bench` package is not part of this build; skipping the op benchmark table")
        return None, 0.0
    return bench(quick=True), time.perf_counter() - t0


def _runnable_others(samples: int = 5, interval: float = 0.1) -> int:
    """Other tasks runnable right now: the least of a few readings of /proc/loadavg's runnable count (which
    includes this process). Falls back to the 1-minute load average, which lags: just after a build it still
    reads ~2 on an idle machine."""
    try:
        counts = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        return max(0, min(counts))
    except (OSError, ValueError, IndexError):
        return int(os.getloadavg()[0] + 0.5)


def demo_threads() -> int:
    """The cores no other task is using, at least one: the demo's tensors are small, and intra-op threads that wait
    on descheduled peers cost far more than they save."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - _runnable_others())


def run_demo(
    out: str = "runs/demo", seed: int = 0, bench: bool = True, json_path: str | None = None, threads: int | None = None
) -> dict:
    from vlfuse.models.qwen2_vl import Qwen2VL

    from .data import SampleEncoder, read_jsonl
    from .evaluate import accuracy, character_accuracy
    from .synthetic import make_corpus
    from .trainer import Trainer, build_processor

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    threads = demo_threads() if threads is None else threads
    torch.set_num_threads(threads)
    print(f"vlfuse demo: {threads} torch thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    out_dir = Path(out)
    data_dir, run_dir = out_dir / "data", out_dir / "runs"
    print(f"vlfuse demo: writing the synthetic corpus to {data_dir}")
    make_corpus(data_dir, seed=seed)
    corpus_s = time.perf_counter() - t0
    stages = []
    for stage in STAGES:
        ts = time.perf_counter()
        cfg = stage_config(stage, data_dir, run_dir, seed)
        trainer = Trainer(cfg, stage=stage)
        final = trainer.train()
        stages.append({"stage": stage, "steps": trainer.step, "seconds": round(time.perf_counter() - ts, 1)})
        del trainer
    te = time.perf_counter()
    model = Qwen2VL.from_pretrained(final)
    cfg = stage_config(STAGES[-1], data_dir, run_dir, seed)
    cfg["model"]["init"] = str(final)
    encoder = SampleEncoder(build_processor(cfg, model))
    val = [s for s in read_jsonl(data_dir / "val.jsonl") if s["task"] in SCORED_TASKS]
    exact, results = accuracy(model, encoder, val)
    scores = dict(exact)
    scores["characters"] = character_accuracy([r for r in results if r["task"] == "characters"])
    eval_s = time.perf_counter() - te
    print("\nheld-out accuracy")
    for task in SCORED_TASKS:
        n = sum(r["task"] == task for r in results)
        what = "characters read correctly" if task == "characters" else "answers exactly right"
        print(f"  {task:<13} {scores[task] * 100:6.1f}%  {what} ({n} samples)")
    print(f"  (characters: {exact['characters'] * 100:.1f}% of the texts read entirely right)")
    train_s = sum(s["seconds"] for s in stages)
    report = {
        "seconds": None,
        "accuracy": {task: scores[task] for task in SCORED_TASKS},
        "characters_exact": exact["characters"],
        "stages": stages,
        "corpus_seconds": round(corpus_s, 1),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "torch_threads": threads,
        "load_average_at_start": round(load_start, 1),
    }
    with open(out_dir / "answers.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    if bench:
        print("\nop benchmarks (vlfuse bench --quick)", flush=True)
        code, bench_s = run_bench()
        report["bench_seconds"] = round(bench_s, 1)
        report["bench_exit_code"] = code
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\nvlfuse demo: done in {report['seconds']} s (corpus {report['corpus_seconds']} s, training "
          f"{report['train_seconds']} s, evaluation {report['eval_seconds']} s)")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report

