"""Arguments shared by the commands that translate with a bundle."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import add_config_argument

if TYPE_CHECKING:
    from ..config import DecodeConfig
    from ..runtime.translator import Translator


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--beam", type=int, default=None, help="beam size, 1 = greedy (default: decode.beam_size)")
    p.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha (default: decode.length_penalty)")
    p.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default: decode.batch_size)")


def make_translator(args: argparse.Namespace, decode_cfg: "DecodeConfig") -> "Translator":
    from ..runtime.search import SearchOptions
    from ..runtime.translator import Translator

    opts = SearchOptions(
        beam_size=decode_cfg.beam_size if args.beam is None else args.beam,
        length_penalty=decode_cfg.length_penalty if args.length_penalty is None else args.length_penalty,
        max_length_a=decode_cfg.max_length_a, max_length_b=decode_cfg.max_length_b)
    return Translator(args.bundle, opts, decode_cfg.batch_size if args.batch_size is None else args.batch_size)
