"""int8mt tune: tune the dense kernels (int8; float32 of FP32 layers) of a model or bundle for a target preset into a
tuning database."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="autotune the int8 kernels of a model or bundle (CPU presets: MetaSchedule, XGBoost; CUDA presets: a tile search on the GPU)")
    add_config_argument(p)
    p.add_argument("source", type=Path, nargs="?", default=None,
                   help="model directory or bundle whose kernels to tune (default: paths.model)")
    p.add_argument("--target", default=None, help="target preset (default: compile.target)")
    p.add_argument("--trials", type=int, default=None,
                   help="measured candidates per kernel, records already in the database included "
                        "(default: tune.trials)")
    p.add_argument("--budget-minutes", type=float, default=None, help="stop after this long (default: tune.budget_minutes)")
    p.add_argument("--db", type=Path, default=None,
                   help="database folder, created or resumed (default: tune.database; 'shipped' = the one in "
                        "the package for the target)")
    p.add_argument("--bench-shapes", action="store_true",
                   help="also tune every shape of `int8mt bench kernels` (reference and Transformer-base)")
    p.add_argument("--fp32", action="store_true",
                   help="a model directory's kernels as an FP32 bundle has them (float32; `compile --quant fp32`), "
                        "not its int8 ones (a bundle's own kernels are tuned, whichever they are)")
    p.add_argument("--untuned-only", action="store_true",
                   help="only the kernels the bundle was built with default tiles for (its compile warning lists them)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", default=None,
                   help="measure on a board (e.g. aarch64 for the arm-* presets) through a TVM RPC tracker at "
                        "HOST:PORT, on a server registered with KEY; candidates are cross-compiled here")
    p.add_argument("--json", type=Path, default=None, help="write the per-kernel rows as JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..interface.tune import TuneArgs, format_rows, tune
    from ..schedules.rpc import RPCTracker
    from ..targets import get_preset

    cfg = load_config(config_path(args))
    preset = get_preset(args.target or cfg.compile.target)
    rows = tune(TuneArgs(source=args.source or cfg.paths.model, preset=preset,
                         database=database_path(args.db, cfg.tune.database),
                         trials=cfg.tune.trials if args.trials is None else args.trials,
                         budget_minutes=(cfg.tune.budget_minutes if args.budget_minutes is None
                                         else args.budget_minutes),
                         bench_shapes=args.bench_shapes, untuned_only=args.untuned_only, fp32=args.fp32,
                         rpc=RPCTracker.parse(args.rpc) if args.rpc else None))
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
