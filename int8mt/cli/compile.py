"""int8mt compile: a model directory (ours or Hugging Face Marian) -> bundle (.so, tokenizer, manifest)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..quant.config import CALIBRATION_METHODS, RANGE_METHODS, RUNTIME_ATTENTION, SCHEMES
from . import add_config_argument, config_path, database_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model directory into a bundle for a target")
    add_config_argument(p)
    p.add_argument("model", type=Path, nargs="?", default=None, help="model directory (default: paths.model)")
    p.add_argument("--target", default=None,
                   help="target preset, or auto for the best one this CPU runs (default: compile.target)")
    p.add_argument("-o", "--output", type=Path, default=None, help="bundle directory (default: paths.build/<target>)")
    p.add_argument("--dump-ir", type=Path, default=None, help="write the IR after every phase into this folder")
    p.add_argument("--quant", choices=tuple(SCHEMES), default=None,
                   help="weights and matmul inputs in FP32, INT8 or INT6 (default: compile.quant)")
    p.add_argument("--ranges", choices=RANGE_METHODS, default=None,
                   help="activation ranges: calibration on training sentences, learned by `int8mt qat`, or "
                        "computed per row at run time (default: compile.ranges)")
    p.add_argument("--calibration", choices=CALIBRATION_METHODS, default=None,
                   help="clip chosen by calibration (default: compile.calibration)")
    p.add_argument("--calib-data", type=Path, default=None, metavar="FILE",
                   help="calibrate on these source-language sentences (one per line; the model's own greedy "
                        "translations serve as targets); implies --ranges calibrate")
    p.add_argument("--calib-sentences", type=int, default=None,
                   help="sentences to calibrate on (default: compile.calib_sentences)")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="matmuls to leave in FP32 (module-name glob such as 'decoder_layers.*.qk'; repeatable)")
    p.add_argument("--runtime-attention", choices=RUNTIME_ATTENTION, default=None,
                   help="with run-time ranges, the attention matmuls (QK^T, softmax·V) in INT8, with int8 key/value "
                        "caches and a scale per position, or in FP32 with float32 caches (4x the bytes; faster at "
                        "batch 1 on small models) (default: compile.runtime_attention)")
    p.add_argument("--integer-softmax", action="store_true",
                   help="attention softmax in integers too (polynomial exp, integer normalisation; needs "
                        "--ranges calibrate or learned)")
    p.add_argument("--integer-layer-norm", action="store_true",
                   help="residual sums and layer norms in integers too (integer square root; needs --ranges "
                        "calibrate or learned)")
    p.add_argument("--db", type=Path, default=None,
                   help="tuning database for the dense kernels, int8 and FP32 layers' float32 ones (default: tune.database; 'shipped' = the one in "
                        "the package for the target)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA targets: replay the decoder step's kernels as CUDA graphs, one captured per row count, "
                        "instead of launching each (fewer launches per decoder step)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..interface.compile import QuantRequest, compile_bundle

    cfg = load_config(config_path(args))
    quant = QuantRequest(args.quant or cfg.compile.quant, args.ranges, args.calibration, tuple(args.keep_fp32),
                         args.integer_softmax, args.integer_layer_norm, args.calib_data, args.runtime_attention)
    compile_bundle(args.model or cfg.paths.model, args.target or cfg.compile.target, args.output, quant, cfg.compile,
                   cfg.paths.build, cfg.paths.data, args.calib_sentences, database_path(args.db, cfg.tune.database),
                   args.dump_ir, args.cuda_graphs)
    return 0
