"""int8mt translate: translate sentences from arguments, a file or stdin with a compiled bundle."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError, config_path
from ._decode_args import add_decode_arguments, make_translator


STREAM_LINES = 1024  # input lines translated (batched by length) and written out at a time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate text with a compiled bundle")
    p.add_argument("bundle", type=Path, help="bundle directory from `int8mt compile`")
    p.add_argument("text", nargs="*", help="sentences to translate (default: read --input or stdin, one per line)")
    p.add_argument("-i", "--input", type=Path, default=None, help="file with one sentence per line")
    add_decode_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data import read_lines, split_lines

    cfg = load_config(config_path(args))
    if args.text:
        sentences = list(args.text)
        for number, text in enumerate(sentences, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"sentence argument {number} is not valid UTF-8 text") from None
    elif args.input is not None:
        sentences = read_lines(args.input)
    elif sys.stdin is None or sys.stdin.closed:
        raise UserError("no text to translate: pass sentences as arguments, --input FILE, or text on stdin")
    else:
        try:  # the bytes, decoded strictly (the text layer may escape undecodable bytes instead of failing)
            sentences = split_lines(sys.stdin.buffer.read().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"standard input is not UTF-8 text (byte {err.start} of it)") from None
    translator = make_translator(args, cfg.decode)
    for start in range(0, len(sentences), STREAM_LINES):  # each block's lines are out before the next starts
        print("\n".join(translator.translate(sentences[start:start + STREAM_LINES])), flush=True)
    return 0
