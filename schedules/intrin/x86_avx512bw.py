"""AVX-512 BW dot product for CPUs without VNNI: 16 int32 lanes += 2 int16 (broadcast) x 16x2 int8.

The kernel stages its int8 activations as int16 (one pass, so each pair is a single broadcast load); the
weights' bytes are sign-extended to int16 (``vpmovsxbw``) and one ``vpmaddwd`` multiplies and adds pairs
into int32: exact for any int8 inputs. The ``vpmaddubsw`` + ``vpmaddwd`` pair, the other
pre-VNNI recipe, multiplies unsigned by signed bytes into *saturating* int16 sums: with activations
shifted to uint8 (as for VNNI) a pair reaches 2 x 255 x 127 > 32767 and is clipped, a silently wrong
result; its exact variant (|a| times sign-adjusted weights) needs as many instructions per multiply-add
as this one. Weights are packed ``[N/16, K/2, 16, 2]``.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .dot import Int8Dot

AVX512BW_DOT = Int8Dot(family="avx512bw", intrin="int8mt_avx512bw_dot_16x2", lanes=16, reduce=2,
                       activation="int16", vector_registers=32, instruction="llvm.x86.avx512.pmaddw.d.512",
                       operand="int16x32", accumulates=False)

_0, _2, _16 = T.int64(0), T.int64(2), T.int64(16)


@T.prim_func(s_tir=True)
def dot_16x2_desc(
    A: T.Buffer((_2,), "int16", offset_factor=1),
    B: T.Buffer((_16, _2), "int8", offset_factor=1),
    C: T.Buffer((_16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_16], A[_0:_2], B[_0:_16, _0:_2])
        T.writes(C[_0:_16])
        for i in T.serial(_0, _16):
            for k in T.serial(_0, _2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def dot_16x2_avx512bw(
    A: T.Buffer((_2,), "int16", offset_factor=1),
    B: T.Buffer((_16, _2), "int8", offset_factor=1),
    C: T.Buffer((_16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_16], A[_0:_2], B[_0:_16, _0:_2])
        T.writes(C[_0:_16])
        pair = T.reinterpret(A.vload([_0], "int16x2"), dtype="int32")
        C[T.ramp(_0, T.int64(1), 16)] = C.vload([_0], dtype="int32x16") + T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.pmaddw.d.512",
            T.reinterpret(T.broadcast(pair, 16), dtype="int16x32"), T.cast(B.vload([_0, _0], dtype="int8x32"), "int16x32"))


TensorIntrin.register(AVX512BW_DOT.intrin, dot_16x2_desc, dot_16x2_avx512bw, override=True)
