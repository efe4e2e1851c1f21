"""int8mt train: train the reference En->De model."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import add_config_argument, config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the reference Transformer on the parallel data")
    add_config_argument(p)
    p.add_argument("-o", "--output", type=Path, default=None, help="model directory to write (default: paths.model)")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoints and logs (default: paths.runs/train)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.trainer import train

    cfg = load_config(config_path(args))
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    train(cfg, args.output or cfg.paths.model, args.run_dir or cfg.paths.runs / "train")
    return 0
