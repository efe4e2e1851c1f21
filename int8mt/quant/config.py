"""What to quantize and how: bit width, where activation ranges come from, which matmuls stay FP32."""
from __future__ import annotations

from dataclasses import dataclass, field

from int8mt.errors import UserError

RANGE_METHODS = ("calibrate", "learned", "runtime")
CALIBRATION_METHODS = ("max", "percentile", "mse")
SCHEMES = {"fp32": None, "int8": 8, "int6": 6}  # `--quant` names -> bits (None: not quantized)
RUNTIME_ATTENTION = ("int8", "float32")  # the attention matmuls' precision with run-time ranges
ATTENTION_MATMULS = ("*.qk", "*.av")  # module-name globs of every attention's QK^T and softmax·V


def scheme_bits(scheme: str) -> int | None:
    """The bit width of the scheme ``scheme`` (a ``--quant`` value); None for FP32."""
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise UserError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}") from None


@dataclass(frozen=True)
class QuantConfig:
    """Symmetric linear quantization: weights per output channel, activations per tensor (``calibrate``,
    ``learned``) or per row at run time (``runtime``)."""

    bits: int = 8
    ranges: str = "learned"            # calibrate | learned (needs MODEL/qat-int<bits>/) | runtime
    calibration: str = "mse"           # max | percentile | mse (for ranges=calibrate)
    percentile: float = 99.99
    keep_fp32: tuple[str, ...] = field(default=())   # fnmatch patterns of matmul names left in FP32
    integer_softmax: bool = False     # attention softmax in integers too (static ranges only)
    integer_layer_norm: bool = False  # residual sums and layer norms in integers too (static ranges only)
    runtime_attention: str = "int8"  # int8 | float32: QK^T and softmax·V with run-time ranges (see fp32_patterns)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise UserError(f"bits must be between 2 and 8, not {self.bits}")
        if self.ranges not in RANGE_METHODS:
            raise UserError(f"unknown range method {self.ranges!r}; use one of {', '.join(RANGE_METHODS)}")
        if self.calibration not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method {self.calibration!r}; "
                             f"use one of {', '.join(CALIBRATION_METHODS)}")
        if (self.integer_softmax or self.integer_layer_norm) and self.ranges == "runtime":
            raise UserError("the integer softmax and layer norm need constant scales: use --ranges calibrate or "
                             "learned (run-time ranges give every row its own scale)")
        if self.runtime_attention not in RUNTIME_ATTENTION:
            raise UserError(f"unknown attention precision {self.runtime_attention!r} for run-time ranges; "
                             f"use one of {', '.join(RUNTIME_ATTENTION)}")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], not {self.percentile}")

    @property
    def qmax(self) -> int:
        """Largest integer magnitude: 127 for INT8, 31 for INT6 (symmetric, so -qmax..qmax)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def fp32_patterns(self) -> tuple[str, ...]:
        """Module-name globs of the matmuls left in FP32: ``keep_fp32``, and with run-time ranges and
        ``runtime_attention`` float32 the attention matmuls. Int8 attention (the default) quantizes each key and
        value once, per position, into int8 caches with a scale per position
        (:class:`~int8mt.quant.modules.QMatMul`): a quarter of the float caches' bytes at the same BLEU, as fast or
        faster with beams, slower at batch 1 on a small model (docs/benchmarks.md, "Run-time ranges")."""
        if self.ranges == "runtime" and self.runtime_attention == "float32":
            return self.keep_fp32 + tuple(p for p in ATTENTION_MATMULS if p not in self.keep_fp32)
        return self.keep_fp32

    @property
    def name(self) -> str:
        return f"int{self.bits}"
