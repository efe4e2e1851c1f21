"""int8mt bench: translation speed and BLEU of a bundle against PyTorch on the same sentences;
``int8mt bench kernels``: GOPS of the int8 kernels against PyTorch and this CPU's peak."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import UserError, add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="sentences/s and BLEU: compiled bundle vs PyTorch, batch 1 and 32; "
                                     "`bench kernels`: int8 kernel GOPS")
    add_config_argument(p)
    p.add_argument("bundle", type=Path,
                   help="bundle directory from `int8mt compile`, or `kernels` for the int8 kernel benchmark")
    p.add_argument("--model", type=Path, default=None, help="PyTorch model directory (default: paths.model)")
    p.add_argument("--no-pytorch", action="store_true", help="benchmark the bundle only")
    p.add_argument("--sentences", type=int, default=1000, help="first N test sentences (default: 1000)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--target", default=None, help="bench kernels: target preset (default: compile.target)")
    p.add_argument("--db", type=Path, default=None,
                   help="bench kernels: tuning database (default: tune.database; 'shipped' = the package's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_parallel
    from ..interface.bench import bench_translation, format_table, rows_as_dicts

    cfg = load_config(config_path(args))
    if str(args.bundle) == "kernels":
        return _kernels(args, cfg)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if args.sentences < 1:
        raise UserError("--sentences must be at least 1")
    sources, refs = read_parallel(cfg.paths.data, "test_2016_flickr", cfg.train.src_lang, cfg.train.tgt_lang)
    sources, refs = sources[: args.sentences], refs[: args.sentences]
    model = None if args.no_pytorch else (args.model or cfg.paths.model)
    rows = bench_translation(args.bundle, model, sources, refs, batch_sizes, cfg.decode.beam_size)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows_as_dicts(rows), indent=2) + "\n")
    return 0


def _kernels(args: argparse.Namespace, cfg) -> int:
    from ..interface.bench_kernels import bench_kernels, format_kernel_table
    from ..schedules.database import database_or_shipped
    from ..targets import get_preset

    preset = get_preset(args.target or cfg.compile.target)
    result = bench_kernels(preset, database_or_shipped(preset.name, database_path(args.db, cfg.tune.database)))
    print(format_kernel_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
