"""Arguments shared by the commands that translate with a bundle."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import add_config_argument

if TYPE_CHECKING:
    from ..config import DecodeConfig
    from ..runtime.options import SearchOptions
    from ..runtime.translator import Translator


def add_decode_arguments(p: argparse.ArgumentParser, batch_flag: str = "--batch-size",
                         batch_help: str = "sentences per batch") -> None:
    add_config_argument(p)
    p.add_argument("--beam", type=int, default=None, help="beam size, 1 = greedy (default: decode.beam_size)")
    p.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha (default: decode.length_penalty)")
    p.add_argument(batch_flag, dest="batch_size", type=int, default=None,
                   help=f"{batch_help} (default: decode.batch_size)")
    p.add_argument("--target-lang", default=None, metavar="LANG",
                   help="target language of a multilingual model, as its >>LANG<< token names it (e.g. fra); "
                        "a sentence starting with its own >>xx<< token keeps it")


def decode_settings(args: argparse.Namespace, decode_cfg: "DecodeConfig") -> tuple["SearchOptions", int]:
    """The search options and batch size the flags ask for, ``decode_cfg``'s where they are not given."""
    options = decode_cfg.search_options(beam_size=args.beam, length_penalty=args.length_penalty)
    return options, decode_cfg.batch_size if args.batch_size is None else args.batch_size


def make_translator(args: argparse.Namespace, decode_cfg: "DecodeConfig", replicas: int | None = None,
                    threads: int | None = None) -> "Translator":
    """The translator the flags ask for: ``replicas`` models sharing the weights (default 1), ``threads`` each."""
    from ..runtime.translator import Translator

    return Translator(args.bundle, *decode_settings(args, decode_cfg), target_lang=args.target_lang,
                      replicas=1 if replicas is None else replicas, threads=threads)
