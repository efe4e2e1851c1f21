"""int8mt qat: learned quantization ranges by quantization-aware fine-tuning."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from . import add_config_argument, config_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qat", help="fine-tune a model with learned INT8/INT6 clipping ranges")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="FP32 model directory, ours or Hugging Face Marian (default: paths.model)")
    p.add_argument("--bits", type=int, choices=(8, 6), default=8, help="8 for INT8, 6 for INT6 (default 8)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training data (default 1)")
    p.add_argument("--train-src", type=Path, default=None, metavar="FILE",
                   help="source sentences to fine-tune on, one per line (default: the train split of paths.data)")
    p.add_argument("--train-tgt", type=Path, default=None, metavar="FILE", help="their translations, line by line")
    p.add_argument("--val-src", type=Path, default=None, metavar="FILE",
                   help="validation sources for the BLEU report (default: with --train-src, its last 5%%, at "
                        "most 500 pairs, held out; else the val split of paths.data)")
    p.add_argument("--val-tgt", type=Path, default=None, metavar="FILE", help="their references")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="matmuls to leave in FP32 (module-name glob, repeatable)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output (default: MODEL/qat-int<bits>)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..model.checkpoint import check_model_dir, is_marian_dir
    from ..quant.config import QuantConfig
    from ..quant.qat import ParallelText, QATConfig, fine_tune

    cfg = load_config(config_path(args))
    model_dir = args.model or cfg.paths.model
    check_model_dir(model_dir)
    qcfg = QuantConfig(bits=args.bits, ranges="learned", keep_fp32=tuple(args.keep_fp32))
    training = QATConfig(epochs=args.epochs)
    for a, b in (("train_src", "train_tgt"), ("val_src", "val_tgt")):
        if (getattr(args, a) is None) != (getattr(args, b) is None):
            raise UserError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} go together: give both or neither")
    if args.val_src is not None and args.train_src is None:
        raise UserError("--val-src needs --train-src: the validation text goes with your own training text")
    if args.train_src is not None:
        train, val = ParallelText.read(args.train_src, args.train_tgt), None
        if args.val_src is not None:
            val = ParallelText.read(args.val_src, args.val_tgt)
        else:
            train, val = train.split_off()
    elif is_marian_dir(model_dir):
        raise UserError("fine-tuning needs parallel text in the model's languages: pass --train-src FILE and "
                        "--train-tgt FILE (aligned, one sentence per line)")
    else:
        data, src, tgt = cfg.paths.data, cfg.train.src_lang, cfg.train.tgt_lang
        train = ParallelText.read(data / f"train.{src}", data / f"train.{tgt}")
        val = ParallelText.read(data / f"val.{src}", data / f"val.{tgt}")
    fine_tune(model_dir, qcfg, train, val, training, args.output)
    return 0
