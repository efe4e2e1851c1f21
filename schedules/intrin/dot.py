"""What the int8 dense kernel needs to know about a dot-product tensor intrinsic, and the description
(the computation it replaces) every such intrinsic shares."""
from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

AMX_TILE_BYTES = 64  # bytes per row of an AMX tile: an activation tile's K, four weight rows of 16 columns


@dataclass(frozen=True)
class Int8Dot:
    """An int8 dot product registered as a tensor intrinsic: ``lanes`` int32 accumulators each add
    ``reduce`` products of one broadcast activation group and a ``[lanes, reduce]`` block of weights; a matrix
    multiply instruction (``rows`` > 1) does so for ``rows`` activation rows at once, into ``rows x lanes``
    accumulators.

    ``activation`` is the dtype the kernel stages activations in for the instruction: ``uint8`` means it
    shifts int8 activations by +128 and folds ``-128 * row sums`` of the weights into a compile-time
    correction; ``int16`` sign-extends them.
    """

    family: str  # the ``int8_dot`` name of the target presets that use it
    intrin: str  # the registered TensorIntrin
    lanes: int
    reduce: int
    activation: str
    vector_registers: int  # of the instruction's width: bounds the accumulator tile
    instruction: str  # the LLVM intrinsic: (acc, a, b) -> acc if it accumulates, else (a, b) -> products
    operand: str  # its a/b vector dtype
    accumulates: bool
    rows: int = 1  # activation rows per instruction
    batch_family: str | None = None  # the family of the batched (attention) matmuls, where not this one
    weight: str = "int8"  # the dtype of weights and activations
    accumulator: str = "int32"  # the dtype of the sums
    amx_tiles: bool = False  # x86 AMX: kernels run rows in 16-row tiles on the tile unit (``.x86_amx``)

    @property
    def tensorized(self) -> bool:
        """Whether the kernel calls ``intrin``; else (float32 multiply-adds) it vectorizes the lanes."""
        return bool(self.intrin)

    @property
    def ops_per_instruction(self) -> int:
        """Integer ops (a multiply and an add per product) of one instruction."""
        return 2 * self.lanes * self.reduce

    @property
    def k_multiple(self) -> int:
        """What the packed weights' K is padded to: the reduction of one instruction, or of one AMX tile."""
        return AMX_TILE_BYTES if self.amx_tiles else self.reduce

    @property
    def shift(self) -> int:
        return 128 if self.activation == "uint8" else 0


def dot_description(lanes: int, reduce: int, activation: str, rows: int = 1) -> tirx.PrimFunc:
    """``C[i] += sum_k A[k] * B[i, k]`` for i < ``lanes``, k < ``reduce`` (with ``rows`` > 1:
    ``C[r, i] += sum_k A[r, k] * B[i, k]``): int32 accumulators in "local" scope (a register tile), int64 indices
    as Relax's shapes have (no casts to block tensorization)."""
    L, R, _0 = T.int64(lanes), T.int64(reduce), T.int64(0)
    if rows > 1:
        return _matrix_description(rows, lanes, reduce, activation)

    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((R,), activation, offset_factor=1),
        B: T.Buffer((L, R), "int8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[_0:L], A[_0:R], B[_0:L, _0:R])
            T.writes(C[_0:L])
            for i in T.serial(_0, L):
                for k in T.serial(_0, R):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return description


def _matrix_description(rows: int, lanes: int, reduce: int, activation: str) -> tirx.PrimFunc:
    M, L, R, _0 = T.int64(rows), T.int64(lanes), T.int64(reduce), T.int64(0)

    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((M, R), activation, offset_factor=1),
        B: T.Buffer((L, R), "int8", offset_factor=1),
        C: T.Buffer((M, L), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[_0:M, _0:L], A[_0:M, _0:R], B[_0:L, _0:R])
            T.writes(C[_0:M, _0:L])
            for r in T.serial(_0, M):
                for i in T.serial(_0, L):
                    for k in T.serial(_0, R):
                        with T.sblock("update"):
                            vr, vi, vk = T.axis.remap("SSR", [r, i, k])
                            C[vr, vi] = C[vr, vi] + T.cast(A[vr, vk], "int32") * T.cast(B[vi, vk], "int32")

    return description
