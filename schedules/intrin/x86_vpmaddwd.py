"""Dot products for x86 CPUs without VNNI: ``lanes`` int32 += 2 int16 (broadcast) x ``[lanes, 2]`` int8,
with AVX-512 BW (16 lanes, ``x86-avx512``) or AVX2 (8 lanes, ``x86-avx2``).

The kernel stages its int8 activations as int16 (one pass, so each pair is a single broadcast load); the
weights' bytes are sign-extended to int16 (``vpmovsxbw``) and one ``vpmaddwd`` multiplies and adds pairs
into int32: exact for any int8 inputs. The ``vpmaddubsw`` + ``vpmaddwd`` pair, the other pre-VNNI recipe,
multiplies unsigned by signed bytes into *saturating* int16 sums: with activations shifted to uint8 (as
for VNNI) a pair reaches 2 x 255 x 127 > 32767 and is clipped, a silently wrong result; its exact variant
(|a| times sign-adjusted weights) needs as many instructions per multiply-add as this one. Weights are
packed ``[N/lanes, K/2, lanes, 2]``.
"""
from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .dot import Int8Dot, dot_description

AVX512BW_DOT = Int8Dot(family="avx512bw", intrin="int8mt_avx512bw_dot_16x2", lanes=16, reduce=2,
                       activation="int16", vector_registers=32, instruction="llvm.x86.avx512.pmaddw.d.512",
                       operand="int16x32", accumulates=False)
AVX2_DOT = Int8Dot(family="avx2", intrin="int8mt_avx2_dot_8x2", lanes=8, reduce=2, activation="int16",
                   vector_registers=16, instruction="llvm.x86.avx2.pmadd.wd", operand="int16x16",
                   accumulates=False)


def _vpmaddwd(dot: Int8Dot) -> tirx.PrimFunc:
    """The implementation of ``dot``: broadcast the int16 activation pair, widen the weights, one ``vpmaddwd``."""
    L, _0, _2 = T.int64(dot.lanes), T.int64(0), T.int64(2)
    acc, weights = f"int32x{dot.lanes}", f"int8x{2 * dot.lanes}"

    @T.prim_func(s_tir=True)
    def implementation(
        A: T.Buffer((_2,), "int16", offset_factor=1),
        B: T.Buffer((L, _2), "int8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[_0:L], A[_0:_2], B[_0:L, _0:_2])
            T.writes(C[_0:L])
            pair: T.let = T.reinterpret(A.vload([_0], "int16x2"), dtype="int32")
            C[T.ramp(_0, T.int64(1), dot.lanes)] = C.vload([_0], dtype=acc) + T.call_llvm_pure_intrin(
                acc, dot.instruction, T.reinterpret(T.broadcast(pair, dot.lanes), dtype=dot.operand),
                T.cast(B.vload([_0, _0], dtype=weights), dot.operand))

    return implementation


for _dot in (AVX512BW_DOT, AVX2_DOT):
    TensorIntrin.register(_dot.intrin, dot_description(_dot.lanes, _dot.reduce, _dot.activation), _vpmaddwd(_dot),
                          override=True)
