"""The INT8 batched matmul of attention on AMX tiles (presets with ``amx_tiles``): ``C[b, i, j] = sum_r A[b, i, r]
. B[b, r, j]``, int8 x int8 -> int32 with ``tdpbssd`` (signed bytes on both sides: no shift, no correction).

Per batch entry (in parallel), the kernel stages ``A`` in 16 x 64-byte tiles ``[I/16, R/64, 16, 64]`` and packs
``B`` into the tile layout of the right operand, each row of a tile 16 int32 words of four consecutive ``r``
(``[J/16, R/64, 16, 16]`` words, built from four rows of ``B`` at a time in vectors), both zero-padded; then
for each 16 x 16 output tile it walks ``R`` one tile at a time and stores the tile's rows and columns that
exist. Any of the four sizes may be dynamic. Queries x transposed keys (64 deep) take one ``tdpbssd`` per 16 x
16 tile; 3.5-4x the VNNI kernel's speed at the encoder's shapes, 1.7-2.9x for softmax.V (``docs/kernels.md``).
The tile configuration is loaded per batch entry (the threads' own) and released after it.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .intrin.dot import AMX_TILE_BYTES
from .intrin.x86_amx import CONFIG_BYTES, TILE_ROWS, tile_call

WORD_ROWS = AMX_TILE_BYTES  # values of r per tile of A (bytes) and of B (16 rows of 4-byte words)


def extent(name: str, size: int | None) -> tirx.PrimExpr:
    """A static size, or a size variable where None."""
    return tirx.Var(name, "int64") if size is None else T.int64(size)


def amx_batch_matmul(batch: int | None, rows: int | None, cols: int | None, depth: int | None) -> tirx.PrimFunc:
    """The kernel for ``A[batch, rows, depth] . B[batch, depth, cols]`` (None = dynamic size), scheduled as the
    module docstring says."""
    BT, I, J, R = (extent(n, s) for n, s in (("b", batch), ("i", rows), ("j", cols), ("r", depth)))
    IT, JT, KT = (I + TILE_ROWS - 1) // TILE_ROWS, (J + TILE_ROWS - 1) // TILE_ROWS, (R + WORD_ROWS - 1) // WORD_ROWS

    def word(B, n, row, col):
        """The int32 word of ``B[n, row:row + 4, col]`` (byte k from row ``row + k``), rows past the last 0."""
        return (byte_at(B, n, row, col, 0) | byte_at(B, n, row + 1, col, 8) | byte_at(B, n, row + 2, col, 16)
                | byte_at(B, n, row + 3, col, 24))

    def byte_at(B, n, row, col, shift):
        return T.if_then_else(row < R, T.Cast("int32", T.reinterpret("uint8", B[n, T.min(row, R - 1), col])),
                              T.int32(0)) << T.int32(shift)

    def load(tile, first):
        """``tileloadd`` of tile register ``tile`` from a 1 KB tile of the staged or packed buffer."""
        return tile_call("tileloadd64", T.uint8(tile), T.address_of(first), T.int64(AMX_TILE_BYTES))

    @T.prim_func(s_tir=True)
    def batch_matmul(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "int8mt_amx_batch_matmul"})
        A = T.match_buffer(a, (BT, I, R), "int8")
        B = T.match_buffer(b, (BT, R, J), "int8")
        C = T.match_buffer(c, (BT, I, J), "int32")
        with T.sblock("root"):
            staged = T.sblock_alloc_buffer((BT, IT, KT, 16, 64), "int8")
            packed = T.sblock_alloc_buffer((BT, JT, KT, 16, 16), "int32")
            sums = T.sblock_alloc_buffer((BT, 16, 16), "int32")
            config = T.sblock_alloc_buffer((BT, CONFIG_BYTES), "uint8")
            for n in T.parallel(BT):
                for it, kt, r in T.grid(IT, KT, 16):
                    if it * 16 + r < I and (kt + 1) * 64 <= R:
                        for k in T.vectorized(T.int64(64)):
                            staged[n, it, kt, r, k] = A[n, it * 16 + r, kt * 64 + k]
                    elif it * 16 + r < I:
                        for k in range(R - kt * 64):
                            staged[n, it, kt, r, k] = A[n, it * 16 + r, kt * 64 + k]
                        for k in range(R - kt * 64, T.int64(64)):
                            staged[n, it, kt, r, k] = T.int8(0)
                    else:
                        for k in T.vectorized(T.int64(64)):
                            staged[n, it, kt, r, k] = T.int8(0)
                for jt, kt, r4 in T.grid(JT, KT, 16):
                    if (jt + 1) * 16 <= J:
                        for jl in T.vectorized(T.int64(16)):
                            packed[n, jt, kt, r4, jl] = word(B, n, kt * 64 + r4 * 4, jt * 16 + jl)
                    else:
                        for jl in range(T.int64(16)):
                            packed[n, jt, kt, r4, jl] = T.if_then_else(
                                jt * 16 + jl < J, word(B, n, kt * 64 + r4 * 4, T.min(jt * 16 + jl, J - 1)), T.int32(0))
                for q in range(T.int64(CONFIG_BYTES)):
                    config[n, q] = T.uint8(0)
                config[n, 0] = T.uint8(1)  # palette 1; three tiles of 16 rows of 64 bytes
                for t in range(T.int64(3)):
                    config[n, 16 + 2 * t] = T.uint8(AMX_TILE_BYTES)
                    config[n, 48 + t] = T.uint8(TILE_ROWS)
                T.evaluate(tile_call("ldtilecfg", T.address_of(config[n, 0])))
                for it, jt in T.grid(IT, JT):
                    T.evaluate(tile_call("tilezero", T.uint8(0)))
                    for kt in range(KT):
                        T.evaluate(load(1, staged[n, it, kt, 0, 0]))
                        T.evaluate(load(2, packed[n, jt, kt, 0, 0]))
                        T.evaluate(tile_call("tdpbssd", T.uint8(0), T.uint8(1), T.uint8(2)))
                    T.evaluate(tile_call("tilestored64", T.uint8(0), T.address_of(sums[n, 0, 0]), T.int64(64)))
                    if (it + 1) * 16 <= I and (jt + 1) * 16 <= J:
                        for r in range(T.int64(16)):
                            for j in T.vectorized(T.int64(16)):
                                C[n, it * 16 + r, jt * 16 + j] = sums[n, r, j]
                    else:
                        for r in range(T.min(T.int64(16), I - it * 16)):
                            for j in range(T.min(T.int64(16), J - jt * 16)):
                                C[n, it * 16 + r, jt * 16 + j] = sums[n, r, j]
                T.evaluate(tile_call("tilerelease"))

    return batch_matmul
