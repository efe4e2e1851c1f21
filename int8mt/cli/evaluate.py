"""int8mt evaluate: sacreBLEU and speed of a bundle on a test set."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import config_path
from ._decode_args import add_decode_arguments, make_translator


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="BLEU and sentences/s of a bundle on a test set")
    p.add_argument("bundle", type=Path, help="bundle directory from `int8mt compile`")
    p.add_argument("--src", type=Path, default=None, help="source file (default: <paths.data>/test_2016_flickr.en)")
    p.add_argument("--ref", type=Path, default=None, help="reference file (default: <paths.data>/test_2016_flickr.de)")
    p.add_argument("--output", type=Path, default=None, help="write the translations here")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    add_decode_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_lines
    from ..interface.evaluate import evaluate

    cfg = load_config(config_path(args))
    src = args.src or cfg.paths.data / f"test_2016_flickr.{cfg.train.src_lang}"
    ref = args.ref or cfg.paths.data / f"test_2016_flickr.{cfg.train.tgt_lang}"
    sources, references = read_lines(src), read_lines(ref)
    result, hyps = evaluate(make_translator(args, cfg.decode), sources, references)
    if args.output:
        args.output.write_text("\n".join(hyps) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"{'bundle':<14}{result.bundle}\n{'sentences':<14}{result.sentences}\n{'beam / batch':<14}"
          f"{result.beam_size} / {result.batch_size}\n{'BLEU':<14}{result.bleu}  ({result.bleu_signature})\n"
          f"{'time':<14}{result.seconds} s\n{'speed':<14}{result.sentences_per_second} sentences/s")
    return 0
