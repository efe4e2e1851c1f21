"""``int8mt compile``: a model directory -> a bundle for a target preset, quantized as asked."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from int8mt.config import CompileConfig
from int8mt.errors import UserError
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

    def config(self, defaults: CompileConfig) -> QuantConfig | None:
        """The :class:`QuantConfig` to build with (None for FP32); quantization options with ``fp32`` are
        an error rather than ignored."""
        bits = scheme_bits(self.scheme)
        if bits is None:
            if self.ranges or self.calibration or self.keep_fp32 or self.integer_softmax or self.integer_layer_norm:
                raise UserError("--ranges, --calibration, --keep-fp32, --integer-softmax and --integer-layer-norm "
                                 "need --quant int8 or --quant int6")
            return None
        return QuantConfig(bits=bits, ranges=self.ranges or defaults.ranges,
                           calibration=self.calibration or defaults.calibration, percentile=defaults.percentile,
                           keep_fp32=self.keep_fp32, integer_softmax=self.integer_softmax,
                           integer_layer_norm=self.integer_layer_norm)


def compile_bundle(model_dir: Path, target: str, out_dir: Path | None, quant: QuantRequest, defaults: CompileConfig,
                   build_dir: Path, data_dir: Path, calib_sentences: int | None = None,
                   database: Path | None = None, dump_dir: Path | None = None) -> dict:
    """Compile ``model_dir`` for the preset ``target`` into ``out_dir`` (default ``build_dir/<preset>``);
    returns the bundle's manifest."""
    preset = get_preset(target)  # a bad name fails before the slow imports
    qcfg = quant.config(defaults)
    if qcfg is None and database is not None:
        raise UserError("--db holds tuned int8 kernels; it needs --quant int8 or --quant int6")
    out_dir = Path(out_dir or build_dir / preset.name)
    check_writable_dir(out_dir, "-o")
    if dump_dir is not None:
        check_writable_dir(Path(dump_dir), "--dump-ir")
    from int8mt.compiler.build import build_bundle

    return build_bundle(model_dir, preset, out_dir, dump_dir, qcfg, data_dir,
                        calib_sentences or defaults.calib_sentences, database)


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail before a long compile, not after it, when ``path`` cannot become a folder we write into."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; name a folder for the output")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not a folder this user can write into; choose another")
