"""Command line: ``python -m vlfuse <command>`` (also installed as ``vlfuse``).

Each command family lives beside the code it drives; the module named here provides
``add_parser(subparsers)``, which registers its commands with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# module -> the commands it registers
COMMAND_MODULES = {
    "vlfuse.models.qwen2_vl.cli": ("generate",),
    "vlfuse.train.cli": ("train", "make-data", "import-vit", "demo"),
    "vlfuse.bench.cli": ("bench",),
    "vlfuse.gpucheck.cli": ("gpu-check",),
}


def _cmd_info(args: argparse.Namespace) -> int:
    import vlfuse

    info = vlfuse.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import vlfuse

    parser = argparse.ArgumentParser(prog="vlfuse", description="vlfuse: fused Qwen2-VL vision kernels and models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print how vlfuse was built (versions, CUDA archs, CPU ISA)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)
    for module in COMMAND_MODULES:
        try:
            family = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module + ".").startswith(exc.name + "."):  # a real import error: show it
                raise
            continue  # a family not part of this build
        except RuntimeError:
            if vlfuse.native is not None:
                raise
            continue  # a family that needs the native library, not built yet (gpu-check builds it)
        family.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
