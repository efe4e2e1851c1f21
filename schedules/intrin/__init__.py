"""Tensor intrinsics of int8mt (description/implementation pairs registered under ``int8mt_`` names), one
per int8 dot-product family a target preset can name, and the float32 multiply-add families of the dense kernel
of FP32 layers; registering them imports nothing heavy."""
from __future__ import annotations

from .arm import NEON_DOT, SDOT_DOT, SMMLA_DOT
from tvm.target import Target
from tvm.target.codegen import target_has_features

from .dot import Int8Dot
from .float_fma import FLOAT_AVX2, FLOAT_AVX512, FLOAT_NEON
from .x86_amx import AMX_DOT
from .x86_vnni import VNNI_DOT
from .x86_vpmaddwd import AVX2_DOT, AVX512BW_DOT

DOTS: dict[str, Int8Dot] = {d.family: d for d in (AMX_DOT, VNNI_DOT, AVX512BW_DOT, AVX2_DOT, SMMLA_DOT, SDOT_DOT,
                                                  NEON_DOT)}
FLOAT_DOTS: dict[str, Int8Dot] = {d.family: d for d in (FLOAT_AVX512, FLOAT_AVX2, FLOAT_NEON)}


def int8_dot(family: str) -> Int8Dot:
    """The intrinsic of dot-product ``family`` (a preset's ``int8_dot``)."""
    try:
        return DOTS[family]
    except KeyError:
        raise ValueError(f"no int8 dot-product intrinsic {family!r}; known: {', '.join(DOTS)}") from None


def dense_dot(family: str) -> Int8Dot:
    """The dot product of a dense kernel's ``family``: an int8 one, or a float32 multiply-add (a preset's
    ``float_dot``)."""
    if family in FLOAT_DOTS:
        return FLOAT_DOTS[family]
    return int8_dot(family)


def batch_dot(family: str) -> Int8Dot:
    """The intrinsic of the batched (attention) matmuls of presets whose ``int8_dot`` is ``family``."""
    dot = int8_dot(family)
    return int8_dot(dot.batch_family) if dot.batch_family else dot


def pair_dot(target: Target) -> Int8Dot | None:
    """The multiply-add of int16 pairs into int32 (``vpmaddwd``) of ``target``'s widest vectors: AVX-512 BW's or
    AVX2's, for the one-query attention's int8 dot products; None on other CPUs."""
    if target.kind.name != "llvm":
        return None
    return next((dot for feature, dot in (("avx512bw", AVX512BW_DOT), ("avx2", AVX2_DOT))
                 if target_has_features(feature, target)), None)
