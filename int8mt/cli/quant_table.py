"""int8mt quant-table: BLEU and size of FP32, INT8 and INT6 bundles with every range method."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import add_config_argument, config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant-table", help="compile and evaluate FP32/INT8/INT6 x calibrate/learned/runtime")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None, help="target preset (default: compile.target)")
    p.add_argument("--build-dir", type=Path, default=None, help="where the bundles go (default: paths.build/quant)")
    p.add_argument("--beam", type=int, default=None, help="beam size of the evaluation (default: decode.beam_size)")
    p.add_argument("--json", type=Path, default=Path("bench/quant-table.json"),
                   help="rows as JSON, and the table next to it as .txt (default: bench/quant-table.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_parallel
    from ..targets import get_preset

    cfg = load_config(config_path(args))
    preset = get_preset(args.target or cfg.compile.target)
    beam = cfg.decode.search_options(beam_size=args.beam).beam_size  # (checked before anything is compiled)
    from ..interface.quant_table import quant_table, write_quant_table

    sources, refs = read_parallel(cfg.paths.data, "test_2016_flickr", cfg.train.src_lang, cfg.train.tgt_lang)
    rows = quant_table(args.model or cfg.paths.model, cfg.paths.data, preset.name,
                       args.build_dir or cfg.paths.build / "quant", sources, refs,
                       beam_size=beam)
    print(write_quant_table(rows, args.json))
    return 0
