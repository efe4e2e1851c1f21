"""Dot products for aarch64 CPUs: the matrix multiply ``smmla`` (``arm-i8mm``), ``sdot`` (the dot-product
extension, ``arm-dotprod``) and the widening multiply ``smull`` + pairwise add ``sadalp`` of plain NEON
(``arm-neon``). All take signed int8 activations as they are (no +128 shift, no correction term) and are exact
for any int8 inputs.

- ``smmla``: a 2x2 int32 tile += 2x8 int8 activations (two rows) x 8x2 int8 weights: 32 multiply-adds in one
  instruction, twice ``sdot``'s. Weights packed ``[N/2, K/8, 2, 8]``; the dense kernel stages activations as
  ``[rows/2, K/8, 2, 8]`` and keeps its accumulators as 2x2 tiles. The batched attention matmuls, whose decoder
  steps have one query row, use ``sdot`` (every i8mm CPU has it).

- ``sdot``: 4 int32 lanes += 4 int8 (one activation group, broadcast) x 4x4 int8 weights: 16 multiply-adds in
  one instruction. Weights packed ``[N/4, K/4, 4, 4]``.
- ``smull`` + ``sadalp``: 8 int8 x int8 -> int16 products (exact: |a*b| <= 2^14), added pairwise into 4 int32
  lanes: 4 lanes += 2 int8 (broadcast) x 4x2 int8 weights, 8 multiply-adds in two instructions. Weights packed
  ``[N/4, K/2, 4, 2]``. (``smull`` is the instruction of the peak benchmark.)
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .dot import Int8Dot, dot_description

SDOT_DOT = Int8Dot(family="sdot", intrin="int8mt_sdot_4x4", lanes=4, reduce=4, activation="int8",
                   vector_registers=32, instruction="llvm.aarch64.neon.sdot.v4i32.v16i8", operand="int8x16",
                   accumulates=True)
SMMLA_DOT = Int8Dot(family="smmla", intrin="int8mt_smmla_2x2x8", lanes=2, reduce=8, activation="int8",
                    vector_registers=32, instruction="llvm.aarch64.neon.smmla.v4i32.v16i8", operand="int8x16",
                    accumulates=True, rows=2, batch_family="sdot")
NEON_DOT = Int8Dot(family="neon", intrin="int8mt_neon_smull_4x2", lanes=4, reduce=2, activation="int8",
                   vector_registers=32, instruction="llvm.aarch64.neon.smull.v8i16", operand="int8x8",
                   accumulates=False)
PAIRWISE_ADD = "llvm.aarch64.neon.saddlp.v4i32.v8i16"  # int16x8 -> int32x4; LLVM fuses it with the add into sadalp

_0, _2, _4, _8 = T.int64(0), T.int64(2), T.int64(4), T.int64(8)  # int64 indices, as Relax's shapes: no casts to block tensorization


@T.prim_func(s_tir=True)
def _sdot_4x4(
    A: T.Buffer((_4,), "int8", offset_factor=1),
    B: T.Buffer((_4, _4), "int8", offset_factor=1),
    C: T.Buffer((_4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_4], A[_0:_4], B[_0:_4, _0:_4])
        T.writes(C[_0:_4])
        a: T.let = T.reinterpret(T.broadcast(T.reinterpret(A.vload([_0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        C[T.ramp(_0, T.int64(1), 4)] = T.call_llvm_pure_intrin(
            "int32x4", SDOT_DOT.instruction, C.vload([_0], dtype="int32x4"), B.vload([_0, _0], dtype="int8x16"), a)


@T.prim_func(s_tir=True)
def _smmla_2x2x8(
    A: T.Buffer((_2, _8), "int8", offset_factor=1),
    B: T.Buffer((_2, _8), "int8", offset_factor=1),
    C: T.Buffer((_2, _2), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_2, _0:_2], A[_0:_2, _0:_8], B[_0:_2, _0:_8])
        T.writes(C[_0:_2, _0:_2])
        C[_0, T.ramp(_0, T.int64(1), 4)] = T.call_llvm_pure_intrin(
            "int32x4", SMMLA_DOT.instruction, C.vload([_0, _0], dtype="int32x4"), A.vload([_0, _0], dtype="int8x16"),
            B.vload([_0, _0], dtype="int8x16"))


@T.prim_func(s_tir=True)
def _smull_4x2(
    A: T.Buffer((_2,), "int8", offset_factor=1),
    B: T.Buffer((_4, _2), "int8", offset_factor=1),
    C: T.Buffer((_4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[_0:_4], A[_0:_2], B[_0:_4, _0:_2])
        T.writes(C[_0:_4])
        a: T.let = T.reinterpret(T.broadcast(T.reinterpret(A.vload([_0], "int8x2"), dtype="int16"), 4), dtype="int8x8")
        products: T.let = T.call_llvm_pure_intrin("int16x8", NEON_DOT.instruction, a, B.vload([_0, _0], dtype="int8x8"))
        C[T.ramp(_0, T.int64(1), 4)] = C.vload([_0], dtype="int32x4") + T.call_llvm_pure_intrin(
            "int32x4", PAIRWISE_ADD, products)


TensorIntrin.register(SDOT_DOT.intrin, dot_description(4, 4, "int8"), _sdot_4x4, override=True)
TensorIntrin.register(SMMLA_DOT.intrin, dot_description(2, 8, "int8", rows=2), _smmla_2x2x8, override=True)
TensorIntrin.register(NEON_DOT.intrin, dot_description(4, 2, "int8"), _smull_4x2, override=True)
