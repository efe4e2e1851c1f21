"""INT8 tensor-core matmul for CUDA targets: int8 x int8 -> int32 on ``wmma`` 16x16x16 s8 fragments, with the
fused epilogue (requantization, dequantization, bias, residual) applied while the tile is written out.

A dlight rule: it takes any PrimFunc whose reduction block is an int8 x int8 -> int32 matmul (linear layers,
batched attention products; rows may be dynamic), normalises it to ``C[b, i, j] += A[b, i, k] * B[b, j, k]``,
pads i/j/k to the tile and schedules:

* a thread block computes a :class:`MatmulTile` of outputs with ``warps_m x warps_n`` warps, each warp
  ``frags_m x frags_n`` 16x16 fragments; K advances ``k_frags`` fragments per shared-memory stage;
* A and B tiles are staged in shared memory with vectorized 4-byte loads, rows padded against bank conflicts;
* the accumulators go through shared memory to the epilogue, which every thread applies to 4 outputs at once.

The fragments are our intrinsics (:mod:`.intrin.cuda_wmma`). TVM's stock int8 rule
(``dlight.gpu.MatmulInt8Tensorization``) fails to build in TVM 0.27 (its software pipeline loses the wmma
fragment info); this schedule uses no software pipeline, so every kernel builds.
The default tile, 64 x 64 outputs and 128 of K per stage (4 warps of 2 x 2 fragments), was the fastest at 4096^3
on an H200 of the 8 tiles that fit (``scripts/cuda_gpu_check.py prepare --tiles``, ``bench/cuda-sm90-h200-tiles.json``;
at the model's 640 x 256 x 1024 all are within the noise of a 6 µs kernel); the accumulator staging limits
tiles to 48 KB of static shared memory, which 5 of the 13 tried exceed. A static K shorter than the tile (attention's head size) is
not padded beyond whole fragments.

The decoder step's attention products have one query row per head: dlight's matmul analysis finds no row axis
there, so this rule declines them and they run as dlight GEMV/reduction kernels in int32 arithmetic (exact) on
CUDA cores; tensor cores would pad that row to 16.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (auto_inline_consumer_chain, auto_inline_producers, get_in_out_dtypes,
                                         get_index_map, get_reduction_blocks)
from tvm.target import Target

from .intrin.cuda_wmma import wmma_s8_intrinsics

FRAG = 16  # wmma m16n16k16
WARP = 32
VECTOR = 4  # int8 elements per shared-memory load, int32 outputs per epilogue store


@dataclass(frozen=True)
class MatmulTile:
    """A thread block's work: ``warps_m x warps_n`` warps of ``frags_m x frags_n`` 16x16 accumulator fragments
    each; ``k_frags`` fragments of K per shared-memory stage."""

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 2
    frags_n: int = 2
    k_frags: int = 8

    @property
    def shape(self) -> tuple[int, int, int]:
        """Rows, columns and reduction length of one block's tile."""
        return FRAG * self.warps_m * self.frags_m, FRAG * self.warps_n * self.frags_n, FRAG * self.k_frags


def is_int8_matmul(func: tirx.PrimFunc) -> bool:
    """``func``'s reduction block multiplies int8 by int8 into int32."""
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if not blocks or len(blocks) != 1:
        return False
    return get_in_out_dtypes(sch.get(blocks[0])) == ("int8", "int32")


class CUDAInt8Matmul(GPUScheduleRule):
    """Tensor-core schedule of int8 x int8 -> int32 matmuls and their fused epilogues (see module doc)."""

    def __init__(self, tile: MatmulTile = MatmulTile()) -> None:
        self.tile = tile

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or not is_int8_matmul(func):
            return None
        try:
            return self._schedule(func)
        except (RuntimeError, ValueError):  # a matmul the fragments cannot tile: left to the generic rules
            return None

    def _schedule(self, func: tirx.PrimFunc) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        main = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]
        index_maps = get_index_map(sch.get(main))
        if index_maps is None:
            return None
        matmul_map, a_map, b_map, c_map = index_maps
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        tile = self.tile
        reduction = sch.get(sch.get_loops(main)[-1]).extent
        if isinstance(reduction, tirx.IntImm):  # a short static K (attention's head size) is not padded to the tile
            tile = replace(tile, k_frags=max(1, min(tile.k_frags, -(-reduction.value // FRAG))))
        sch.pad_einsum(main, [1, *tile.shape])

        batch, i, j, k = sch.get_loops(main)
        i, i_frag = sch.split(i, [None, FRAG])
        j, j_frag = sch.split(j, [None, FRAG])
        k, k_frag = sch.split(k, [None, FRAG])
        sch.reorder(i, j, k, i_frag, j_frag, k_frag)
        inner = main
        outer = sch.blockize(i_frag)
        i0, i1, i2 = sch.split(i, [None, tile.warps_m, tile.frags_m])
        j0, j1, j2 = sch.split(j, [None, tile.warps_n, tile.frags_n])
        k0, k1 = sch.split(k, [None, tile.k_frags])
        sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
        sch.bind(batch, "blockIdx.z")
        sch.bind(j0, "blockIdx.x")  # columns first: consecutive blocks share the A tile
        sch.bind(i0, "blockIdx.y")
        warp = sch.fuse(i1, j1)
        sch.bind(warp, "threadIdx.y")

        def stage_in_shared(index: int) -> s_tir.schedule.SBlockRV:
            block = sch.cache_read(outer, index, "shared")
            sch.compute_at(block, k0)
            fused = sch.fuse(*sch.get_loops(block)[-2:])
            _, ty, tx, vec = sch.split(fused, [None, tile.warps_m * tile.warps_n, WARP, VECTOR])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(vec)
            sch.storage_align(block, 0, axis=-2, factor=32, offset=16)
            return block

        a_shared, b_shared = stage_in_shared(0), stage_in_shared(1)
        auto_inline_producers(sch, a_shared)
        auto_inline_producers(sch, b_shared)
        a_frag = sch.cache_read(outer, 0, "wmma.matrix_a")
        b_frag = sch.cache_read(outer, 1, "wmma.matrix_b")
        sch.compute_at(a_frag, k1)
        sch.compute_at(b_frag, k1)
        c_shared = sch.cache_write(outer, 0, "shared")
        sch.storage_align(c_shared, 0, axis=-2, factor=16, offset=4)
        c_frag = sch.cache_write(outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(c_frag, warp)
        sch.reverse_compute_at(c_shared, warp)
        init = sch.decompose_reduction(outer, k0)

        intrin = wmma_s8_intrinsics()
        for block, name in ((a_frag, "load_a"), (b_frag, "load_b"), (c_frag, "store")):
            r, c = sch.get_loops(block)[-2:]
            r0, r1 = sch.split(r, [None, FRAG])
            c0, c1 = sch.split(c, [None, FRAG])
            sch.reorder(r0, c0, r1, c1)
            if name != "store":
                sch.unroll(r0)
                sch.unroll(c0)
            sch.tensorize(r1, intrin[name])
        sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrin["init"])
        sch.tensorize(sch.get_loops(inner)[-3], intrin["compute"])
        auto_inline_consumer_chain(sch, c_shared)
        fused = sch.fuse(*sch.get_loops(c_shared)[-2:])
        _, tx, vec = sch.split(fused, [None, WARP, VECTOR])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        return sch

