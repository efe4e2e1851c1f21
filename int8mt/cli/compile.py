"""int8mt compile: PyTorch model directory -> bundle (.so, tokenizer, manifest)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import UserError, add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model directory into a bundle for a target")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None,
                   help="target preset, or auto for the best one this CPU runs (default: compile.target)")
    p.add_argument("-o", "--output", type=Path, default=None, help="bundle directory (default: paths.build/<target>)")
    p.add_argument("--dump-ir", type=Path, default=None, help="write the IR after every phase into this folder")
    p.add_argument("--quant", choices=("fp32", "int8", "int6"), default=None,
                   help="weights and matmul inputs in FP32, INT8 or INT6 (default: compile.quant)")
    p.add_argument("--ranges", choices=("calibrate", "learned", "runtime"), default=None,
                   help="activation ranges: calibration on training sentences, learned by `int8mt qat`, or "
                        "computed per row at run time (default: compile.ranges)")
    p.add_argument("--calibration", choices=("max", "percentile", "mse"), default=None,
                   help="clip chosen by calibration (default: compile.calibration)")
    p.add_argument("--calib-sentences", type=int, default=None, help="training sentences to calibrate on")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="matmuls to leave in FP32 (module-name glob such as 'decoder_layers.*.qk'; repeatable)")
    p.add_argument("--integer-softmax", action="store_true",
                   help="attention softmax in integers too (polynomial exp, integer normalisation; needs "
                        "--ranges calibrate or learned)")
    p.add_argument("--integer-layer-norm", action="store_true",
                   help="residual sums and layer norms in integers too (integer square root; needs --ranges "
                        "calibrate or learned)")
    p.add_argument("--db", type=Path, default=None,
                   help="tuning database for the int8 kernels (default: tune.database; 'shipped' = the one in "
                        "the package for the target)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..targets import get_preset

    cfg = load_config(config_path(args))
    preset = get_preset(args.target or cfg.compile.target)  # fails on a bad name before the slow imports
    cc = cfg.compile
    quant = args.quant or cc.quant
    qcfg = None
    if quant != "fp32":
        from ..quant.config import QuantConfig

        qcfg = QuantConfig(bits=int(quant[3:]), ranges=args.ranges or cc.ranges,
                           calibration=args.calibration or cc.calibration, percentile=cc.percentile,
                           keep_fp32=tuple(args.keep_fp32), integer_softmax=args.integer_softmax,
                           integer_layer_norm=args.integer_layer_norm)
    elif args.ranges or args.calibration or args.keep_fp32 or args.integer_softmax or args.integer_layer_norm:
        raise UserError("--ranges, --calibration, --keep-fp32, --integer-softmax and --integer-layer-norm need "
                        "--quant int8 or --quant int6")
    elif args.db:
        raise UserError("--db holds tuned int8 kernels; it needs --quant int8 or --quant int6")
    from ..compiler.build import build_bundle

    database = database_path(args.db, cfg.tune.database)
    build_bundle(args.model or cfg.paths.model, preset.name, args.output or cfg.paths.build / preset.name,
                 args.dump_ir, qcfg, cfg.paths.data, args.calib_sentences or cc.calib_sentences, database)
    return 0
