"""Commands: ``train``, ``make-data``, ``import-vit`` and ``demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="run one Qwen2-VL training stage (1 align, 2 full, 3 instruction)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=None, help="overrides the config's `stage`")
    p.add_argument("--config", required=True, help="YAML or JSON config (see configs/tiny_stage1.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--output", default=None, help="overrides the config's `output` folder")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("make-data", help="write the synthetic corpus (train/val JSONL + images)")
    p.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl and the images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_data)

    p = subparsers.add_parser("import-vit", help="load a timm / open_clip ViT into the Qwen2-VL vision tower")
    p.add_argument("--from", dest="source", required=True, help="state dict file (.safetensors, .pt, .bin)")
    p.add_argument("--to", required=True, help="output folder (vision tower safetensors + vision config.json)")
    p.add_argument("--config", default=None, help="vision config JSON (HF vision_config fields); default: inferred")
    p.add_argument("--hidden-size", type=int, default=None, help="LLM width the merger projects to")
    p.set_defaults(func=_cmd_import_vit)

    p = subparsers.add_parser("demo", help="corpus + stages 1-3 on the tiny preset + held-out accuracy + op bench")
    p.add_argument("--json", default=None, help="write the figures (seconds, accuracy per task) to this file")
    p.add_argument("--out", default="runs/demo", help="working folder (corpus, checkpoints, metrics, plots)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bench", action="store_true", help="skip the op benchmark table")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a busy machine, else all)")
    p.set_defaults(func=_cmd_demo)


def _cmd_train(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .trainer import Trainer, TrainingDiverged

    cfg = config_mod.load(args.config)
    if args.output:
        cfg["output"] = args.output
    try:
        final = Trainer(cfg, stage=args.stage).train(resume=args.resume)
    except TrainingDiverged as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"vlfuse train: the model is in {final}")
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    from .synthetic import make_corpus

    for split, path in make_corpus(args.out, seed=args.seed).items():
        with open(path) as f:
            print(f"{split}: {sum(1 for _ in f)} samples in {path}")
    return 0


def _cmd_import_vit(args: argparse.Namespace) -> int:
    import json

    from vlfuse.models.qwen2_vl.import_vit import import_vit_file

    vision_config = None
    if args.config:
        with open(args.config) as f:
            vision_config = json.load(f)
    report = import_vit_file(args.source, args.to, vision_config, hidden_size=args.hidden_size)
    print(report.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, seed=args.seed, bench=not args.no_bench, json_path=args.json, threads=args.threads)
    return 0 if report.get("bench_exit_code") in (None, 0) else 1
