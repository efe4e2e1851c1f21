"""A default (untuned) CPU schedule for every kernel of the model, dynamic shapes included.

TVM's legalized kernels are plain serial loop nests, and dlight's CPU rules only cover GEMV and
reductions. This rule gives each loop nest multi-core parallelism and, for matmul-like blocks
(spatial loops followed by reductions), a vectorizable inner loop:

* reduction blocks ``S... R...`` (matmuls, softmax/layer-norm reductions): when the last spatial extent is
  static, a ROW_TILE x TILE_COLUMNS tile of outputs moves inside the reduction loops (vectorized, rows
  unrolled); when it is dynamic and an input that depends on the reduction is contiguous along it
  (attention scores), that loop moves inside the reductions as a serial loop; a reduction along the rows'
  contiguous last axis (layer norm's sums, a length that is a multiple of the vector width) keeps
  VECTOR_WIDTH partial results in a vector register (``rfactor``) and adds them up at the end; the remaining
  spatial loops are fused and run in parallel; the init is split off;
* other blocks (elementwise, copies such as concatenate and take): the last loop in whole vector registers
  (64 int8 or 16 float32 lanes with AVX-512, half that with AVX2) where its extent allows, else a serial inner loop; the loop before it cut
  into chunks of ROW_CHUNK rows; the outer loops and the chunks fused and run in parallel, so the fused
  index is decomposed (int64 divisions) once per chunk, not per element.

VECTOR_WIDTH, the float32 lanes of one vector register, comes from the target: 64-byte registers where
it has AVX-512, else 32 (AVX2), else 16 (SSE, NEON). The matmul tile's TILE_COLUMNS are one 64-byte cache
line of float32 outputs on every target: one AVX-512 register per row, two AVX2 registers, so that the
ROW_TILE rows give enough independent accumulators to hide the multiply-add latency (one AVX2 register
per row leaves too few). Apply it after LegalizeOps/FuseTIR with ``dlight.ApplyDefaultSchedule(CPUGeneric())``. Tuned kernels
(MetaSchedule) replace it where a tuning database has records.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target
from tvm.target.codegen import target_has_features

ROW_TILE = 4  # output rows that share each loaded weight vector
TILE_COLUMNS = 16  # float32 columns of the matmul tile: a 64-byte cache line
ROW_CHUNK = 8  # rows per iteration of an elementwise kernel's parallel loop
FLOAT_BYTES = 4


_REGISTER_BYTES: dict[str, int] = {}  # per target (asking LLVM for features costs a target machine)


def register_bytes(target: Target) -> int:
    """Bytes of one vector register of ``target``: 64 with AVX-512, 32 with AVX2, else 16."""
    key = str(target)
    if key not in _REGISTER_BYTES:
        features = (("avx512f", 64), ("avx2", 32)) if target.kind.name == "llvm" else ()
        _REGISTER_BYTES[key] = next((width for name, width in features if target_has_features(name, target)), 16)
    return _REGISTER_BYTES[key]


def _static(extent: object) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _reads_along(sch: s_tir.Schedule, block: s_tir.SBlockRV, info: dlight.SBlockInfo, kinds: str,
                 axis: str = "S") -> bool:
    """Whether some input of ``block`` that is also indexed by a reduction axis has the block's last ``axis``
    (spatial "S" or reduction "R") axis as its innermost index."""
    last = [it.var for it, k in zip(info.iters, kinds) if k == axis][-1]
    reduce = {it.var for it, k in zip(info.iters, kinds) if k == "R"}
    for region in sch.get(block).reads:
        if not region.region or not region.region[-1].min.same_as(last):
            continue
        if any(v in reduce for r in region.region for v in tirx.analysis.undefined_vars(r.min, [])):
            return True
    return False


def _register_lanes(sch: s_tir.Schedule, block: s_tir.SBlockRV, vector_bytes: int) -> int:
    """Elements of the block's output dtype in one vector register (64 int8 with AVX-512)."""
    return vector_bytes * 8 // tvm.DataType(sch.get(block).writes[0].source.dtype).bits


def _row_length(info: dlight.SBlockInfo, kinds: str) -> int:
    """The static extent of a block's one reduction axis (1 if dynamic)."""
    return next(_static(it.dom) or 1 for it, k in zip(info.iters, kinds) if k == "R")


class CPUGeneric(dlight.ScheduleRule):
    """Parallel + vectorized default schedule for any PrimFunc on an LLVM CPU target."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = dlight.normalize_prim_func(sch)
        if infos is None:
            return None
        infos = dlight.try_inline_contiguous_spatial(sch, infos)
        vector_bytes = register_bytes(target)
        for info in infos:
            kinds = info.dom_kind()
            if set(kinds) - {"S", "R"}:
                continue
            if "R" in kinds:
                self._reduction(sch, info, kinds, vector_bytes // FLOAT_BYTES)
            else:
                self._spatial(sch, info, vector_bytes)
        return sch

    @staticmethod
    def _spatial(sch: s_tir.Schedule, info: dlight.SBlockInfo, vector_bytes: int) -> None:
        block = info.block_rv
        loops = sch.get_loops(block)
        if not loops:
            return
        extent = _static(info.iters[-1].dom)
        lanes = (_register_lanes(sch, block, vector_bytes), vector_bytes // FLOAT_BYTES)
        width = next((w for w in lanes if extent and extent % w == 0), None)
        if width is not None:
            # the last loop in whole vector registers, its blocks a serial loop
            _, vector = sch.split(loops[-1], [None, width])
            sch.vectorize(vector)
        if len(loops) == 1:
            sch.parallel(sch.get_loops(block)[0])
            return
        # the outer loops fused and parallel over chunks of ROW_CHUNK rows; the rows of a chunk and the last loop
        # stay serial (a dynamic last loop too): fusing them as well would cost an int64 division and modulo per
        # row or element to recover the indices (a cache copy ran at ~1 GB/s that way)
        rows, _ = sch.split(loops[-2], [None, ROW_CHUNK])
        outer = loops[:-2] + [rows]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])

    @staticmethod
    def _reduction(sch: s_tir.Schedule, info: dlight.SBlockInfo, kinds: str, width: int) -> None:
        """``width``: float32 lanes of a vector register (VECTOR_WIDTH in the module docstring)."""
        block = info.block_rv
        loops = sch.get_loops(block)
        spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
        reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
        extents = [_static(it.dom) for it, k in zip(info.iters, kinds) if k == "S"]
        if not spatial:
            return
        last = extents[-1]
        inner = []  # spatial loops kept inside the reductions: a ROW_TILE x TILE_COLUMNS accumulator tile
        if last is not None and last % TILE_COLUMNS == 0 and last > TILE_COLUMNS:
            jo, ji = sch.split(spatial[-1], [None, TILE_COLUMNS])
            if len(spatial) > 1 and extents[-2] != 1:
                io, ii = sch.split(spatial[-2], [None, ROW_TILE])
                outer, inner = spatial[:-2] + [io, jo], [ii, ji]
            else:
                outer, inner = spatial[:-1] + [jo], [ji]
        elif last is not None and 1 < last <= 64:
            outer, inner = spatial[:-1], [spatial[-1]]
        elif last is None and len(spatial) > 1 and _reads_along(sch, block, info, kinds):
            # a dynamic last output axis that an input is contiguous along (attention scores Q.K^T): it
            # stays a serial inner loop inside the reductions, which LLVM vectorizes with a remainder
            outer, inner = spatial[:-1], [spatial[-1]]
            sch.reorder(*outer, *reduce, *inner)
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            sch.decompose_reduction(block, reduce[0])
            return
        elif len(reduce) == 1 and _row_length(info, kinds) % width == 0 and _reads_along(
                sch, block, info, kinds, "R"):
            CPUGeneric._row_reduction(sch, block, spatial, reduce[0], width)
            return
        else:
            outer = spatial
        sch.reorder(*outer, *reduce, *inner)
        if outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        if inner:
            sch.vectorize(inner[-1])
        if len(inner) == 2:
            sch.unroll(inner[0])
        sch.decompose_reduction(block, reduce[0])

    @staticmethod
    def _row_reduction(sch: s_tir.Schedule, block: s_tir.SBlockRV, spatial: list, reduce: s_tir.LoopRV,
                       width: int) -> None:
        """A reduction along the rows' contiguous last axis (layer norm's sums, a decoder step's one-query
        attention scores): VECTOR_WIDTH partial results per row, accumulated in a vector register
        (``rfactor``), then added up; rows in parallel in both. A serial float reduction is a chain of
        dependent adds, one add latency per element."""
        rows = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        _, lanes = sch.split(reduce, [None, width])
        partial = sch.rfactor(lanes, factor_axis=len(sch.get(block).writes[0].region))  # lanes innermost
        sch.parallel(rows)
        partial_rows, steps, lane = sch.get_loops(partial)
        sch.parallel(partial_rows)
        sch.vectorize(lane)
        init = sch.decompose_reduction(partial, steps)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.decompose_reduction(block, sch.get_loops(block)[-1])
