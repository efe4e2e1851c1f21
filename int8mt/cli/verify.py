"""int8mt verify: the compiled integer graph against the NumPy integer reference, matmul by matmul."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..quant.config import RANGE_METHODS, RUNTIME_ATTENTION, SCHEMES
from . import add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every integer matmul of the compiled model against the NumPy "
                                      "integer reference, on test sentences")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None, help="target preset this CPU runs (default: compile.target)")
    p.add_argument("--quant", choices=[s for s, bits in SCHEMES.items() if bits], default="int8",
                   help="bit width (default: int8)")
    p.add_argument("--ranges", choices=RANGE_METHODS, default=None,
                   help="activation ranges (default: compile.ranges)")
    p.add_argument("--runtime-attention", choices=RUNTIME_ATTENTION, default=None,
                   help="with run-time ranges, the attention matmuls in INT8 or FP32 (default: "
                        "compile.runtime_attention)")
    p.add_argument("--integer-softmax", action="store_true", help="attention softmax in integers too")
    p.add_argument("--integer-layer-norm", action="store_true", help="residual sums and layer norms in integers too")
    p.add_argument("--sentences", type=int, default=8, help="test sentences, one batch (default: 8)")
    p.add_argument("--steps", type=int, default=4, help="decoder steps after encoding (default: 4)")
    p.add_argument("--db", type=Path, default=None, help="tuning database (default: tune.database)")
    p.add_argument("--json", type=Path, default=None, help="write per-site rows and every matmul as JSON (+ .txt)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..interface.compile import QuantRequest
    from ..interface.verify import VerifyRequest, verify, write_rows

    cfg = load_config(config_path(args))
    quant = QuantRequest(args.quant, args.ranges, integer_softmax=args.integer_softmax,
                         integer_layer_norm=args.integer_layer_norm, runtime_attention=args.runtime_attention)
    model_dir = args.model or cfg.paths.model
    request = VerifyRequest(model_dir, args.target or cfg.compile.target,
                            quant.config(cfg.compile, Path(model_dir)), cfg.paths.data, args.sentences, args.steps,
                            database_path(args.db, cfg.tune.database), cfg.compile.calib_sentences,
                            cfg.train.src_lang, cfg.train.tgt_lang)
    result = verify(request)
    if result.mismatch is not None:
        print(f"int8mt verify: the compiled graph and the integer reference differ: {result.mismatch}", file=sys.stderr)
        return 1
    print(write_rows(result.rows, result.checks, result.meta, args.json))
    return 0 if all(ch.exact for ch in result.checks) else 1
