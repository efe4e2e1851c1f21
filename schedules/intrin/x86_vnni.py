"""AVX-512 VNNI dot product: 16 int32 lanes += 4 uint8 (broadcast) x 16x4 int8, one ``vpdpbusd``.

TVM's own ``dot_16x4_vnni`` passes ``<16 x i32>`` operands, which the LLVM 22 verifier rejects (the
intrinsic takes ``<64 x i8>``); this one is typed as LLVM wants it. The description reads ``B`` as 16 rows
of 4 consecutive bytes, so the weights must be packed as ``[N/16, K/4, 16, 4]`` (see ``int8_dense``).
The accumulators are in "local" scope (a register tile), and registering
does not import ``tvm.s_tir.tensor_intrin`` (~40 s here).
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .dot import Int8Dot, dot_description

VNNI_DOT = Int8Dot(family="vnni", intrin="int8mt_vnni_dot_16x4", lanes=16, reduce=4, activation="uint8",
                   vector_registers=32, instruction="llvm.x86.avx512.vpdpbusd.512", operand="int8x64",
                   accumulates=True)


_0, _4, _16 = T.int64(0), T.int64(4), T.int64(16)  # int64 indices, as Relax's shapes: no casts to block


@T.prim_func(s_tir=True)
def dot_16x4_vnni(
    A: T.Buffer((_4,), "uint8", offset_factor=1),
    B: T.Buffer((_16, _4), "int8", offset_factor=1),
    C: T.Buffer((_16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_16], A[_0:_4], B[_0:_16, _0:_4])
        T.writes(C[_0:_16])
        a: T.let = T.reinterpret(T.broadcast(T.reinterpret(A.vload([_0], "uint8x4"), dtype="int32"), 16), dtype="int8x64")
        C[T.ramp(_0, T.int64(1), 16)] = T.call_llvm_pure_intrin(
            "int32x16", "llvm.x86.avx512.vpdpbusd.512",
            C.vload([_0], dtype="int32x16"), a, B.vload([_0, _0], dtype="int8x64"))


TensorIntrin.register(VNNI_DOT.intrin, dot_description(16, 4, "uint8"), dot_16x4_vnni, override=True)
