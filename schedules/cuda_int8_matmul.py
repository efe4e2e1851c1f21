"""INT8 tensor-core matmul for CUDA targets: int8 x int8 -> int32 on ``wmma`` 16x16x16 s8 fragments, with the
fused epilogue (requantization, dequantization, bias, residual) applied while the tile is written out.

A dlight rule: it takes any PrimFunc whose reduction block is an int8 x int8 -> int32 matmul (linear layers,
batched attention products; rows may be dynamic), normalises it to ``C[b, i, j] += A[b, i, k] * B[b, j, k]``,
pads i/j/k to the tile and schedules:

* a thread block computes a :class:`MatmulTile` of outputs with ``warps_m x warps_n`` warps, each warp
  ``frags_m x frags_n`` 16x16 fragments; K advances ``k_frags`` fragments per shared-memory stage;
* A and B tiles are staged in shared memory, rows padded against bank conflicts: on sm_80 and newer with
  16-byte ``cp.async`` copies in a software pipeline of ``stages`` buffers (the next tiles load while the current
  ones are multiplied), in dynamic shared memory that the accumulator staging reuses and that may exceed 48 KB;
* the accumulators go through shared memory to the epilogue, which every thread applies to 4 outputs at once;
  barriers around each accumulator store guard the reused memory.

Rows padded to the tile read a real row (row ``i mod n``) instead of zeros (their outputs are never written), so
the copies carry no zero-fill branch. Operands that are not contiguous along K (a key cache stored K-major)
and K that must be padded (the attention context's keys) take :data:`PORTABLE_TILE`: 4-byte copies, no pipeline.
The fragments are our intrinsics (:mod:`.intrin.cuda_wmma`); TVM's stock int8 rule
(``dlight.gpu.MatmulInt8Tensorization``) fails to build in TVM 0.27.

Tiles: the architecture's :func:`default_tile`, or per linear-layer shape the table of a tile search measured on
a GPU (:mod:`.cuda_tiles`; ``schedules/tuned/cuda-sm90/cuda_tiles.json`` ships one). A static K shorter than the
tile (attention's head size) is not padded beyond whole fragments. Where the rows are dynamic and that tile is a
pipelined one of more than :data:`FEW_ROWS` rows, the function holds a second schedule on the table's few-rows tile
for the shape (else :data:`FEW_ROWS_TILE`) and the host launches that kernel up to ``FEW_ROWS`` rows (a decoder
step at a small batch, an encoder call on a short sentence), the other beyond.

The decoder step's attention products have one query row per head: dlight's matmul analysis finds no row axis
there, so this rule declines them and they run as dlight GEMV/reduction kernels in int32 arithmetic (exact) on
CUDA cores; tensor cores would pad that row to 16.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (auto_inline_consumer_chain, auto_inline_producers, get_in_out_dtypes,
                                         get_index_map, get_reduction_blocks)
from tvm.target import Target

from .intrin.cuda_wmma import wmma_s8_intrinsics

FRAG = 16  # wmma m16n16k16
WARP = 32
VECTOR = 4  # int32 outputs per epilogue store; int8 elements per copy to shared memory where K is padded
ASYNC_COPY_ARCH = 80  # cp.async (the pipelined copies) needs sm_80 or newer


@dataclass(frozen=True)
class MatmulTile:
    """A thread block's work: ``warps_m x warps_n`` warps of ``frags_m x frags_n`` 16x16 accumulator fragments
    each; ``k_frags`` fragments of K per shared-memory stage.

    ``vector``: bytes each thread copies to shared memory at once (4 or 16). ``stages``: shared-memory stages
    of the software pipeline (1: none, static shared memory; more: the next stages' tiles are fetched with
    ``cp.async`` while the current one is multiplied, sm_80 and newer, and the tiles and the accumulator staging
    share one dynamic shared-memory buffer, which may exceed 48 KB).
    """

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 2
    frags_n: int = 2
    k_frags: int = 8
    vector: int = 4
    stages: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """Rows, columns and reduction length of one block's tile."""
        return FRAG * self.warps_m * self.frags_m, FRAG * self.warps_n * self.frags_n, FRAG * self.k_frags

    @property
    def label(self) -> str:
        """E.g. ``128x128x64 w2x4 v16 s2``: the block tile, its warps, copy width and stages."""
        return f"{'x'.join(map(str, self.shape))} w{self.warps_m}x{self.warps_n} v{self.vector} s{self.stages}"


PORTABLE_TILE = MatmulTile()  # any int8 matmul, any architecture: strided or padded K, no pipeline
FEW_ROWS = 32  # rows up to which a layer of dynamic rows runs a kernel of few rows (decoder steps at small batches)
# that kernel's tile where no tile search chose one: 32 x 64 outputs, four warps side by side; a 128 x 128 tile
# spends most of its loads and products on padded rows there
FEW_ROWS_TILE = MatmulTile(warps_m=1, warps_n=4, frags_m=2, frags_n=1, k_frags=8, vector=16, stages=2)


def _async_copies(arch: str) -> bool:
    """The architecture (e.g. ``sm_90a``) has ``cp.async``, which the pipelined tiles need."""
    return int(arch.removeprefix("sm_").rstrip("a")) >= ASYNC_COPY_ARCH


def default_tile(arch: str) -> MatmulTile:
    """The tile of shapes a tuned table lacks: on sm_80 and newer 128 x 128 outputs, 128 of K per stage, two
    pipelined stages of 16-byte asynchronous copies (the fastest at 4096^3 on an H100, 550 TOPS against the
    portable tile's 340; at the reference model's small shapes every tile takes 6-8 µs); older GPUs get
    :data:`PORTABLE_TILE`."""
    if not _async_copies(arch):
        return PORTABLE_TILE
    return MatmulTile(frags_m=4, frags_n=4, k_frags=8, vector=16, stages=2)


def is_int8_matmul(func: tirx.PrimFunc) -> bool:
    """``func``'s reduction block multiplies int8 by int8 into int32."""
    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if not blocks or len(blocks) != 1:
        return False
    return get_in_out_dtypes(sch.get(blocks[0])) == ("int8", "int32")


def _contiguous_along_k(block: s_tir.stmt.SBlock) -> bool:
    """A reindex block (``A'[b, i, k] = A[...]``) reads its operand's innermost axis along K."""
    store = block.body
    return (isinstance(store, tirx.BufferStore) and isinstance(store.value, tvm.ir.TensorLoad)
            and store.value.indices[-1].same_as(store.indices[-1]))


def _read_real_rows(sch: s_tir.Schedule, block_rv: s_tir.schedule.SBlockRV) -> None:
    """Make a padding block read row ``i mod n`` of its operand where it would write zeros below its ``n`` rows.

    A padded row of A (or B) only feeds output rows (columns) that are never written, so any values do; reading a
    real row drops the zero-fill branch, which lets the copy to shared memory be one 16-byte ``cp.async`` per
    thread (TVM's CUDA code generator also cannot print a zero vector of 16 int8). Spreading the padded rows over
    all real rows matters: with every padded row reading the last one, all blocks' copies queue on the same few
    L2 lines: 20 rows of the 32000 x 512 logits took 89 µs on an H100, against 28 µs this way (128 rows: 18).
    Padding along K must stay zero.
    """
    block = sch.get(block_rv)
    store = block.body
    if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, tvm.ir.Call)
            and store.value.op.name == "prim.if_then_else" and isinstance(store.value.args[1], tvm.ir.TensorLoad)):
        return  # not a padding block
    condition, load, _zero = store.value.args
    row = store.indices[-2]
    conjuncts, pending = [], [condition]
    while pending:
        term = pending.pop()
        if isinstance(term, tirx.And):
            pending += [term.a, term.b]
        else:
            conjuncts.append(term)
    bounds = [term for term in conjuncts if isinstance(term, tirx.LT) and term.a.same_as(row)]
    if len(bounds) != 1 or not all(isinstance(index, tirx.Var) for index in load.indices):
        return
    # 32-bit remainder (rows < 2^31, both >= 0): a 64-bit one cost 2.5 % at 4096^3 on an H100, this one nothing
    real_row = tirx.Cast(str(row.ty.dtype), tirx.truncmod(tirx.Cast("int32", row), tirx.Cast("int32", bounds[0].b)))
    load = tirx.BufferLoad(load.source, [real_row if index.same_as(row) else index for index in load.indices])
    kept = [term for term in conjuncts if not term.same_as(bounds[0])]
    value = load if not kept else tirx.if_then_else(functools.reduce(tirx.And, kept), load, _zero)
    reads = [tirx.BufferRegion(region.source, [tvm.ir.Range.from_min_extent(real_row, 1) if r.min.same_as(row) else r
                                                 for r in region.region])
             if region.source.same_as(load.source) else region for region in block.reads]
    new_block = s_tir.stmt.SBlock(block.iter_vars, reads, block.writes, block.name_hint,
                                  tirx.BufferStore(store.buffer, value, store.indices), block.init,
                                  block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(block_rv), new_block, {block: new_block})


class CUDAInt8Matmul(GPUScheduleRule):
    """Tensor-core schedule of int8 x int8 -> int32 matmuls and their fused epilogues (see module doc).

    The tile: ``tile`` for every matmul if given; else ``tuned``'s for a linear layer's (K, N) (a tile search's
    table, :mod:`.cuda_tiles`); else the architecture's :func:`default_tile`. Up to ``FEW_ROWS`` rows (see the
    module doc): ``tuned_few_rows``' tile for the (K, N), else :data:`FEW_ROWS_TILE`.
    """

    def __init__(self, tile: MatmulTile | None = None, tuned: Mapping[tuple[int, int], MatmulTile] | None = None,
                 tuned_few_rows: Mapping[tuple[int, int], MatmulTile] | None = None) -> None:
        self.tile, self.tuned, self.tuned_few_rows = tile, dict(tuned or {}), dict(tuned_few_rows or {})

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or not is_int8_matmul(func):
            return None
        arch = str(target.arch)
        try:
            scheduled = self._schedule(func, arch)
            if scheduled is None:
                return None
            sch, rows, tile = scheduled
            if isinstance(rows, tirx.IntImm) or not self._has_few_rows_kernel(tile, arch):
                return sch
            few = self._schedule(func, arch, few_rows=True)
        except (RuntimeError, ValueError):  # a matmul the fragments cannot tile: left to the generic rules
            return None
        if few is None or few[2].vector == VECTOR:
            return sch
        return _dispatch_on_rows(rows <= FEW_ROWS, few[0], sch)

    def linear_tiles(self, k: int, n: int, arch: str) -> tuple[MatmulTile, MatmulTile | None]:
        """The tile of a K x N linear layer of dynamic rows (K contiguous, a multiple of the tile's) and, where it
        gets one, its few-rows kernel's."""
        tile = self._chosen_tile((k, n), arch)
        return tile, self._chosen_tile((k, n), arch, few_rows=True) if self._has_few_rows_kernel(tile, arch) else None

    def _chosen_tile(self, shape: tuple[int, int] | None, arch: str, few_rows: bool = False) -> MatmulTile:
        """The rule's tile; else the table's (the few-rows table's) for a static ``(K, N)``; else the default."""
        if self.tile is not None:
            return self.tile
        table, default = (self.tuned_few_rows, FEW_ROWS_TILE) if few_rows else (self.tuned, default_tile(arch))
        return table.get(shape, default) if shape is not None else default

    def _has_few_rows_kernel(self, tile: MatmulTile, arch: str) -> bool:
        """A matmul of dynamic rows on ``tile`` also gets a few-rows kernel: a pipelined tile of more than
        ``FEW_ROWS`` rows, not one the rule was given for every matmul."""
        return self.tile is None and tile.vector > VECTOR and tile.shape[0] > FEW_ROWS and _async_copies(arch)

    def _schedule(self, func: tirx.PrimFunc, arch: str, few_rows: bool = False
                  ) -> tuple[s_tir.Schedule, tirx.PrimExpr, MatmulTile] | None:
        """``func`` scheduled on its tile (the rule's, the tuned table's or the architecture's; with ``few_rows``
        the few-rows table's or :data:`FEW_ROWS_TILE`; replaced where the operands need it), its rows' extent and
        the tile it got."""
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
        rows = sch.get(sch.get_loops(main)[1]).extent
        columns = sch.get(sch.get_loops(main)[2]).extent
        reduction = sch.get(sch.get_loops(main)[-1]).extent
        static = isinstance(reduction, tirx.IntImm) and isinstance(columns, tirx.IntImm)
        tile = self._chosen_tile((reduction.value, columns.value) if static else None, arch, few_rows)
        streamed = isinstance(reduction, tirx.IntImm) and all(_contiguous_along_k(sch.get(block))
                                                               for block in (reindex_a, reindex_b))
        if not streamed or reduction.value % FRAG:  # 16-byte and asynchronous copies need whole rows of K
            tile = PORTABLE_TILE
        if isinstance(reduction, tirx.IntImm):  # a short static K (attention's head size) is not padded to the tile
            tile = replace(tile, k_frags=max(1, min(tile.k_frags, -(-reduction.value // FRAG))))
        if streamed and reduction.value % tile.shape[2]:
            tile = replace(PORTABLE_TILE, k_frags=tile.k_frags)
        sch.pad_einsum(main, [1, *tile.shape])
        if tile.vector > VECTOR:
            for block in sch.get_producers(main):
                _read_real_rows(sch, block)

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

        shared = "shared.dyn" if tile.stages > 1 else "shared"

        def stage_in_shared(index: int) -> s_tir.schedule.SBlockRV:
            block = sch.cache_read(outer, index, shared)
            sch.compute_at(block, k0)
            fused = sch.fuse(*sch.get_loops(block)[-2:])
            _, ty, tx, vec = sch.split(fused, [None, tile.warps_m * tile.warps_n, WARP, tile.vector])
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
        c_shared = sch.cache_write(outer, 0, shared)
        sch.storage_align(c_shared, 0, axis=-2, factor=16, offset=4)
        c_frag = sch.cache_write(outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(c_frag, warp)
        sch.reverse_compute_at(c_shared, warp)
        init = sch.decompose_reduction(outer, k0)

        intrin = wmma_s8_intrinsics(shared)
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
        if tile.stages > 1:
            sch.annotate(k0, "software_pipeline_stage", [0, 0, tile.stages - 1])
            sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
            sch.annotate(k0, "software_pipeline_async_stages", [0])
        return sch, rows, tile


def _dispatch_on_rows(few: tirx.PrimExpr, when_few: s_tir.Schedule, otherwise: s_tir.Schedule) -> s_tir.Schedule:
    """One function of two schedules of the same matmul: ``when_few`` where the condition ``few`` on the rows
    holds, else ``otherwise``. The condition is evaluated by the host, which launches one kernel or the other (it
    is marked thread-invariant, so that TVM inserts the kernels' barriers under it)."""
    first, second = when_few.mod["main"], otherwise.mod["main"]
    condition = tirx.call_intrin("bool", "tirx.tvm_thread_invariant", few)
    root = s_tir.stmt.SBlock([], [], [], "root", tirx.IfThenElse(condition, first.body, second.body))
    return s_tir.Schedule(first.with_body(s_tir.stmt.SBlockRealize([], True, root)))

