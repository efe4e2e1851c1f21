"""int8mt qat: learned quantization ranges by quantization-aware fine-tuning."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import add_config_argument, config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qat", help="fine-tune a model with learned INT8/INT6 clipping ranges")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="FP32 model directory (default: paths.model)")
    p.add_argument("--bits", type=int, default=8, help="8 for INT8, 6 for INT6 (default 8)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="matmuls to leave in FP32 (module-name glob, repeatable)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output (default: MODEL/qat-int<bits>)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..quant.config import QuantConfig

    cfg = load_config(config_path(args))
    qcfg = QuantConfig(bits=args.bits, ranges="learned", keep_fp32=tuple(args.keep_fp32))
    from ..quant.qat import QATConfig, fine_tune

    fine_tune(args.model or cfg.paths.model, qcfg, cfg.paths.data, QATConfig(epochs=args.epochs), args.output,
              cfg.train.src_lang, cfg.train.tgt_lang)
    return 0
