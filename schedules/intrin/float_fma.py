"""Float32 multiply-adds for the dense kernel of FP32 linear layers: ``lanes`` float32 accumulators += one
broadcast activation x ``lanes`` weights, the vector width of the target (AVX-512 16, AVX2 8, NEON 4). No
tensor intrinsic: the kernel vectorizes the lanes and LLVM emits one fused multiply-add per register
(``vfmadd231ps`` with the broadcast folded in; ``fmla`` on aarch64). Weights are packed ``[N/lanes, K, lanes, 1]``.
"""
from __future__ import annotations

from .dot import Int8Dot

FLOAT_AVX512 = Int8Dot(family="fp32-avx512", intrin="", lanes=16, reduce=1, activation="float32",
                       vector_registers=32, instruction="fma", operand="float32x16", accumulates=True,
                       weight="float32", accumulator="float32")
FLOAT_AVX2 = Int8Dot(family="fp32-avx2", intrin="", lanes=8, reduce=1, activation="float32", vector_registers=16,
                     instruction="fma", operand="float32x8", accumulates=True, weight="float32",
                     accumulator="float32")
FLOAT_NEON = Int8Dot(family="fp32-neon", intrin="", lanes=4, reduce=1, activation="float32", vector_registers=32,
                     instruction="fma", operand="float32x4", accumulates=True, weight="float32",
                     accumulator="float32")
