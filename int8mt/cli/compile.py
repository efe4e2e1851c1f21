"""int8mt compile: PyTorch model directory -> bundle (.so, tokenizer, manifest)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import add_config_argument, config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model directory into a bundle for a target")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None,
                   help="target preset, or auto for the best one this CPU runs (default: compile.target)")
    p.add_argument("-o", "--output", type=Path, default=None, help="bundle directory (default: paths.build/<target>)")
    p.add_argument("--dump-ir", type=Path, default=None, help="write the IR after every phase into this folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..targets import get_preset

    cfg = load_config(config_path(args))
    preset = get_preset(args.target or cfg.compile.target)  # fails on a bad name before the slow imports
    from ..compiler.build import build_bundle

    build_bundle(args.model or cfg.paths.model, preset.name, args.output or cfg.paths.build / preset.name,
                 args.dump_ir)
    return 0
