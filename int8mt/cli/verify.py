"""int8mt verify: the compiled integer graph against the NumPy integer reference, matmul by matmul."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError, add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every integer matmul of the compiled model against the NumPy "
                                      "integer reference, on test sentences")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None, help="target preset this CPU runs (default: compile.target)")
    p.add_argument("--quant", choices=("int8", "int6"), default="int8", help="bit width (default: int8)")
    p.add_argument("--ranges", choices=("calibrate", "learned", "runtime"), default=None,
                   help="activation ranges (default: compile.ranges)")
    p.add_argument("--integer-softmax", action="store_true", help="attention softmax in integers too")
    p.add_argument("--integer-layer-norm", action="store_true", help="residual sums and layer norms in integers too")
    p.add_argument("--sentences", type=int, default=8, help="test sentences, one batch (default: 8)")
    p.add_argument("--steps", type=int, default=4, help="decoder steps after encoding (default: 4)")
    p.add_argument("--db", type=Path, default=None, help="tuning database (default: tune.database)")
    p.add_argument("--json", type=Path, default=None, help="write per-site rows and every matmul as JSON (+ .txt)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..targets import get_preset, missing_features

    cfg = load_config(config_path(args))
    preset = get_preset(args.target or cfg.compile.target)
    if missing_features(preset):
        raise UserError(f"this CPU cannot run {preset.name} code (it lacks {', '.join(missing_features(preset))}); "
                        "verify runs what it compiles: pick a preset with `int8mt targets`")
    if args.sentences < 1 or args.steps < 1:
        raise UserError("--sentences and --steps must be at least 1")
    from ..compiler.build import tile_chooser
    from ..compiler.integer_check import GraphMismatch, check_integer_graph, compile_tapped
    from ..data import read_parallel
    from ..interface.verify import inputs, summarize, write_rows
    from ..model.checkpoint import TOKENIZER_FILE, check_model_dir
    from ..quant.checkpoint import quantized_model
    from ..quant.config import QuantConfig
    from ..tokenizer import Tokenizer

    model_dir = args.model or cfg.paths.model
    check_model_dir(model_dir)
    qcfg = QuantConfig(bits=int(args.quant[3:]), ranges=args.ranges or cfg.compile.ranges,
                       calibration=cfg.compile.calibration, percentile=cfg.compile.percentile,
                       integer_softmax=args.integer_softmax, integer_layer_norm=args.integer_layer_norm)
    model = quantized_model(model_dir, qcfg, cfg.paths.data, calib_sentences=cfg.compile.calib_sentences)
    sources, targets = read_parallel(cfg.paths.data, "test_2016_flickr", cfg.train.src_lang, cfg.train.tgt_lang)
    c = model.cfg
    src, tokens = inputs(sources[:args.sentences], targets[:args.sentences], Tokenizer(Path(model_dir) / TOKENIZER_FILE),
                         c.decoder_start_id, c.pad_id, args.steps)
    tiles = tile_chooser(preset, database_path(args.db, cfg.tune.database))
    vm = compile_tapped(model, preset, tiles, qcfg)
    try:
        checks = check_integer_graph(model, vm, src, tokens, qcfg)
    except GraphMismatch as err:
        print(f"int8mt verify: the compiled graph and the integer reference differ: {err}", file=sys.stderr)
        return 1
    meta = {"model": str(model_dir), "target": preset.name, "scheme": qcfg.name, "ranges": qcfg.ranges,
            "integer_softmax": qcfg.integer_softmax, "integer_layer_norm": qcfg.integer_layer_norm,
            "sentences": len(src), "steps": args.steps}
    print(write_rows(summarize(checks), checks, meta, args.json))
    return 0 if all(ch.exact for ch in checks) else 1
