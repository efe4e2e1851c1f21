"""``int8mt compile``: a model directory -> a bundle for a target preset, quantized as asked."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from int8mt.config import CompileConfig
from int8mt.errors import UserError
from int8mt.quant.checkpoint import learned_dir
from int8mt.quant.config import QuantConfig, scheme_bits
from int8mt.targets import get_preset


@dataclass(frozen=True)
class QuantRequest:
    """The quantization a user asked for: a scheme (``fp32``, ``int8``, ``int6``) and the options that
    need a quantized scheme (None = the configured default)."""

    scheme: str
    ranges: str | None = None
    calibration: str | None = None
    keep_fp32: tuple[str, ...] = field(default=())
    integer_softmax: bool = False
    integer_layer_norm: bool = False
    calib_data: Path | None = None
    runtime_attention: str | None = None

    def config(self, defaults: CompileConfig, model_dir: Path) -> QuantConfig | None:
        """The :class:`QuantConfig` to build ``model_dir`` with (None for FP32); quantization options with
        ``fp32`` are an error rather than ignored. ``--calib-data`` means calibrated ranges. Without
        ``--ranges``, a model with no learned ranges of the scheme (no ``qat-int<bits>/``) gets run-time
        ranges, with a note saying so."""
        bits = scheme_bits(self.scheme)
        if bits is None:
            if (self.ranges or self.calibration or self.keep_fp32 or self.integer_softmax or self.integer_layer_norm
                    or self.calib_data or self.runtime_attention):
                raise UserError("--ranges, --calibration, --calib-data, --keep-fp32, --integer-softmax, "
                                 "--integer-layer-norm and --runtime-attention need --quant int8 or --quant int6")
            return None
        ranges = self.ranges or ("calibrate" if self.calib_data else defaults.ranges)
        if self.calib_data and ranges != "calibrate":
            raise UserError(f"--calib-data is for --ranges calibrate, not --ranges {ranges}")
        if self.ranges is None and ranges == "learned" and not learned_dir(model_dir, bits).is_dir():
            print(f"note: {model_dir} has no learned int{bits} ranges ({learned_dir(model_dir, bits).name}/, "
                  "from `int8mt qat`); using run-time ranges. For static ones: --calib-data FILE (sentences "
                  "in the source language) or `int8mt qat`", file=sys.stderr)
            ranges = "runtime"
        if self.runtime_attention and ranges != "runtime":
            raise UserError(f"--runtime-attention is for --ranges runtime; with --ranges {ranges} the attention "
                             "matmuls are int8 (leave one in FP32 with --keep-fp32 '*.qk')")
        return QuantConfig(bits=bits, ranges=ranges,
                           calibration=self.calibration or defaults.calibration, percentile=defaults.percentile,
                           keep_fp32=self.keep_fp32, integer_softmax=self.integer_softmax,
                           integer_layer_norm=self.integer_layer_norm,
                           runtime_attention=self.runtime_attention or defaults.runtime_attention)


def compile_bundle(model_dir: Path, target: str, out_dir: Path | None, quant: QuantRequest, defaults: CompileConfig,
                   build_dir: Path, data_dir: Path, calib_sentences: int | None = None,
                   database: Path | None = None, dump_dir: Path | None = None, cuda_graphs: bool = False) -> dict:
    """Compile ``model_dir`` for the preset ``target`` into ``out_dir`` (default ``build_dir/<preset>``), with
    ``cuda_graphs`` the decoder step's kernels replayed as CUDA graphs; returns the bundle's manifest."""
    preset = get_preset(target)  # a bad name fails before the slow imports
    if cuda_graphs and preset.device != "cuda":
        raise UserError(f"--cuda-graphs replays GPU kernels; {preset.name} runs on the CPU. Choose a cuda-* target "
                        "(`int8mt targets`) or leave the flag out")
    qcfg = quant.config(defaults, Path(model_dir))
    if qcfg is None and database is not None and preset.float_dot is None:
        raise UserError(f"--db holds tuned dense kernels; FP32 layers on {preset.name} do not run ours, so it needs "
                         "--quant int8 or --quant int6")
    out_dir = Path(out_dir or build_dir / preset.name)
    check_writable_dir(out_dir, "-o")
    if dump_dir is not None:
        check_writable_dir(Path(dump_dir), "--dump-ir")
    from int8mt.compiler.build import build_bundle

    return build_bundle(model_dir, preset, out_dir, dump_dir, qcfg, data_dir,
                        calib_sentences or defaults.calib_sentences, database, quant.calib_data, cuda_graphs)


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail before a long compile, not after it, when ``path`` cannot become a folder we write into."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; name a folder for the output")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not a folder this user can write into; choose another")
