"""AVX2 dot product: 8 int32 lanes += 2 int16 (broadcast) x 8x2 int8, for x86 CPUs without AVX-512.

As :mod:`.x86_avx512bw` at half the width: activations staged as int16, weights sign-extended to int16 and ``vpmaddwd`` (exact; see
there why not ``vpmaddubsw``). Weights are packed ``[N/8, K/2, 8, 2]``; AVX2 has 16 vector registers.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .dot import Int8Dot

AVX2_DOT = Int8Dot(family="avx2", intrin="int8mt_avx2_dot_8x2", lanes=8, reduce=2, activation="int16",
                   vector_registers=16, instruction="llvm.x86.avx2.pmadd.wd", operand="int16x16",
                   accumulates=False)

_0, _2, _8 = T.int64(0), T.int64(2), T.int64(8)


@T.prim_func(s_tir=True)
def dot_8x2_desc(
    A: T.Buffer((_2,), "int16", offset_factor=1),
    B: T.Buffer((_8, _2), "int8", offset_factor=1),
    C: T.Buffer((_8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_8], A[_0:_2], B[_0:_8, _0:_2])
        T.writes(C[_0:_8])
        for i in T.serial(_0, _8):
            for k in T.serial(_0, _2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def dot_8x2_avx2(
    A: T.Buffer((_2,), "int16", offset_factor=1),
    B: T.Buffer((_8, _2), "int8", offset_factor=1),
    C: T.Buffer((_8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_8], A[_0:_2], B[_0:_8, _0:_2])
        T.writes(C[_0:_8])
        pair = T.reinterpret(A.vload([_0], "int16x2"), dtype="int32")
        C[T.ramp(_0, T.int64(1), 8)] = C.vload([_0], dtype="int32x8") + T.call_llvm_pure_intrin(
            "int32x8", "llvm.x86.avx2.pmadd.wd",
            T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"), T.cast(B.vload([_0, _0], dtype="int8x16"), "int16x16"))


TensorIntrin.register(AVX2_DOT.intrin, dot_8x2_desc, dot_8x2_avx2, override=True)
