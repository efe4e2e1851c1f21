"""The INT8 dense kernel ``C[m, n] = A[m, k] . W[n, k]`` (int8 x int8 -> int32), tensorized with an int8
dot-product intrinsic of :mod:`.intrin` (AVX-512 VNNI ``vpdpbusd``; AVX-512 BW or AVX2 ``vpmaddwd``; aarch64
``smmla``, ``sdot``, or NEON's ``smull`` + ``sadalp``).

``W`` is packed at compile time into the layout the intrinsic reads, ``[N/lanes, K/reduce, lanes, reduce]``
(``pack_weight``), zero-padded when N or K is not a multiple of the block. ``vpdpbusd`` multiplies
*unsigned* by signed bytes, so for VNNI the kernel adds 128 to every activation (flipping the sign bit)
and adds the compile-time constant ``-128 * sum_k W[n, k]`` at the end: ``(A + 128) . W - 128 * rowsum(W)
= A . W`` exactly; the ``vpmaddwd`` families read activations sign-extended to int16 and their correction
is zero.

The number of rows ``m`` is dynamic (batch x tokens). The register tile's rows are split without
predicates (tensorize rejects predicated blocks), which is safe because the activations are first staged
(shifted for VNNI, widened for the others) into a buffer of ``m`` rounded up to ``ROW_PAD`` rows plus
``ROW_PAD`` more, enough for every row tile and row split; the rows beyond ``m`` compute garbage that is
never written out.

Schedule (``schedule_int8_dense``): the rows are cut into ``row_split`` parts and the columns into strips of
``lanes*cols`` outputs; (part, strip) pairs run in parallel, part-major. With one part each thread keeps
its strips of packed weights in L1 and walks all rows (best for few rows: every weight is read once); with
two, each thread works on the half of the activations it staged itself, which stay in its own L2 (best
for many rows). Inside, a ``rows x lanes*cols`` int32 accumulator tile lives in registers over the whole
reduction, unrolled by ``depth`` x ``reduce`` bytes, and is written out once with the correction added.
The four sizes are the tuning knobs; ``tiles=None`` samples them (MetaSchedule's design space).

A kernel with dynamic rows and a row tile of r >= 2 rows has a second block pair for ``m < r`` (a decoder
step of one sentence, or the last sentences of a batch): a one-row tile with half the vector registers of
columns, so that one row does not pay for r (the logits projection of a one-sentence step: 6x faster on AVX2).
The branch is chosen at run time; the tuned tiles apply to the other; kernels with static rows (the tuning
workloads) have no such branch.

A matrix-multiply intrinsic (``smmla``: 2 rows x 2 columns x 8 bytes per instruction) reads two rows of
activations at once: the kernel then stages them as ``[rows/2, K/8, 2, 8]`` (each instruction's operand is 16
contiguous bytes), keeps the accumulators as ``[rows/2, N/2, 2, 2]`` (one register per 2x2 tile) and its row
tiles are even (and its few-rows branch, for row tiles of 4 or more, has 2-row tiles).

The same kernel runs the float32 linear layers of FP32 layers with a multiply-add family of
:mod:`.intrin.float_fma` (``reduce`` 1, no intrinsic: each step of the reduction broadcasts one activation per
row and the lanes are vectorized into fused multiply-adds; float32 activations staged as they are, correction
zero); its calls are marked ``float_dense`` instead of ``int8_dense`` (:func:`dense_kind`).

A dot product with ``amx_tiles`` (x86-amx) computes ``AMX_MIN_ROWS`` rows and more on AMX tiles
(:mod:`.amx_dense`: an opaque block of blocks of one row tile up to ``AMX_ONE_TILE_ROWS`` rows, of the tiles'
:class:`~.amx_dense.AmxBlock` for up to ``AMX_SMALL_ROWS`` rows and of another above, each under its ``if``) and
fewer with VNNI as above; both read the same
packed weights, K padded to whole tiles (64 bytes).

An optional :class:`DenseEpilogue` replaces the final int32 store: the elementwise ops that follow the
layer (requantization, dequantization with the residual, a change of layout) are computed on each sum
before it is stored (``compiler/passes/fuse_dense_epilogue.py`` builds them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import s_tir, tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as Tb

from .amx_dense import MIN_ROWS as AMX_MIN_ROWS
from .amx_dense import ONE_TILE_ROWS as AMX_ONE_TILE_ROWS
from .amx_dense import SMALL_ROWS as AMX_SMALL_ROWS
from .amx_dense import AmxBlock, amx_product_and_store, default_block, one_tile_block, static_rows_block
from .intrin import Int8Dot
from .kernel_attrs import DENSE_ATTR, KERNEL_ATTR

ROW_TILES = (1, 2, 3, 4, 6, 8)  # register-tile rows the design space offers
ROW_SPLITS = (1, 2)  # parts the rows are cut into (parallel with the column strips)
ROW_PAD = 24  # staged rows: m rounded up to a multiple of this, plus this many (>= row_split x rows - 1)
MAX_COLS = 8  # at most 8 x lanes int32 columns per register tile
MAX_DEPTH = 64  # at most 64 x reduce bytes of reduction per unrolled step
FEW_ROWS_SUFFIX = "_few"  # the blocks of the few-rows branch of a kernel with dynamic rows
FEW_ROWS_FROM_TILE = 2  # kernels with dynamic rows and a row tile of 2 or more get a one-row branch for m < rows


@dataclass(frozen=True)
class DenseTiles:
    """Tile sizes of one kernel: ``rows`` x ``cols``*lanes accumulators, ``depth``*reduce bytes per inner block,
    rows cut into ``row_split`` parallel parts; for AMX tiles, the blocks of more than ``AMX_ONE_TILE_ROWS`` rows
    up to ``AMX_SMALL_ROWS`` (``amx_small``) and of more (``amx``) (None: :func:`~.amx_dense.default_block`)."""

    rows: int
    cols: int
    depth: int
    row_split: int = 1
    amx: AmxBlock | None = None
    amx_small: AmxBlock | None = None

    def to_dict(self) -> dict:
        tiles = {"rows": self.rows, "cols": self.cols, "depth": self.depth, "row_split": self.row_split}
        blocks = {name: block.to_dict() for name, block in (("amx", self.amx), ("amx_small", self.amx_small))
                  if block is not None}
        return {**tiles, **blocks}

    @classmethod
    def from_dict(cls, tiles: dict) -> DenseTiles:
        """From :meth:`to_dict`'s dict (or a kernel attribute's map of it)."""
        def block(name: str) -> AmxBlock | None:
            found = tiles.get(name)
            return None if found is None else AmxBlock(int(found["row_tiles"]), int(found["col_tiles"]),
                                                       bool(found["by_columns"]))

        return cls(*(int(tiles[f]) for f in ("rows", "cols", "depth", "row_split")), amx=block("amx"),
                   amx_small=block("amx_small"))


def padded(n: int, k: int, dot: Int8Dot) -> tuple[int, int]:
    """N and K rounded up to the intrinsic's ``lanes`` x ``reduce`` block (K to whole tiles for AMX)."""
    return -(-n // dot.lanes) * dot.lanes, -(-k // dot.k_multiple) * dot.k_multiple


def live_registers(rows: int, cols: int, dot: Int8Dot) -> int:
    """Vector registers a ``rows`` x ``cols`` register tile of ``dot`` keeps live in its inner loop: the
    accumulators; the weights (each register reused by every row group; a tile of one row group streams them,
    one at a time); the activations (one broadcast at a time; a matrix instruction's row groups one each); and,
    for an instruction that does not accumulate (``vpmaddwd``), one for its products."""
    groups = rows // dot.rows
    weights = cols if groups > 1 else 1
    activations = groups if dot.rows > 1 else 1
    return groups * cols + weights + activations + (0 if dot.accumulates else 1)


def fits_registers(tiles: DenseTiles, dot: Int8Dot) -> bool:
    """Whether the register tile of ``tiles`` fits ``dot``'s vector registers. One that does not spills
    accumulators to the stack in its inner loop (on AVX2's 16 registers 8 x 2 tiles ran at 0.76-0.83x the
    speed of 6 x 2 or 4 x 2 ones; on AVX-512's 32, 8 x 4 at 0.75x and 6 x 5 at 0.6x of 6 x 4 or 4 x 5)."""
    return live_registers(tiles.rows, tiles.cols, dot) <= dot.vector_registers


def row_tiles(dot: Int8Dot) -> tuple[int, ...]:
    """The register-tile rows the design space offers for ``dot``: multiples of its rows per instruction."""
    return tuple(r for r in ROW_TILES if r % dot.rows == 0)


def default_tiles(n: int, k: int, dot: Int8Dot) -> DenseTiles:
    """Tiles used where the tuning database has no record: 4 rows x a quarter of the vector registers'
    columns (4 x 64 int32 for AVX-512; 16 of aarch64's 32 NEON registers hold accumulators), 32-byte reduction
    blocks."""
    np_, kp = padded(n, k, dot)
    return DenseTiles(rows=4, cols=_largest_divisor(np_ // dot.lanes, dot.vector_registers // 8 * dot.rows),
                      depth=_largest_divisor(kp // dot.reduce, 32 // dot.reduce))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def pack_weight(w: np.ndarray, dot: Int8Dot) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] of ``dot.weight`` (int8; float32 for the multiply-add families) -> (packed [Np/lanes,
    Kp/reduce, lanes, reduce], correction [Np] of ``dot.accumulator`` = -shift * row sums)."""
    if w.dtype != np.dtype(dot.weight) or w.ndim != 2:
        raise ValueError(f"pack_weight takes a 2-D {dot.weight} weight, got {w.dtype} {w.shape}")
    n, k = w.shape
    np_, kp = padded(n, k, dot)
    full = np.zeros((np_, kp), w.dtype)
    full[:n, :k] = w
    packed = full.reshape(np_ // dot.lanes, dot.lanes, kp // dot.reduce, dot.reduce).transpose(0, 2, 1, 3)
    if dot.shift == 0:
        correction = np.zeros(np_, dot.accumulator)
    else:
        correction = (-dot.shift * full.astype(np.int64).sum(axis=1)).astype(np.int32)
    return np.ascontiguousarray(packed), correction


@dataclass(frozen=True)
class DenseEpilogue:
    """What the kernel stores instead of its int32 result ``C[m, n]`` (requantization, dequantization with a
    residual add, a change of layout: the elementwise ops that follow a linear layer, fused).

    ``store(c, i, j, inputs)`` returns the output indices and the value for the int32 sum ``c`` of row ``i``,
    column ``j``; ``inputs`` are the kernel's buffers for ``input_specs`` (shape, dtype), extra tensors it
    reads (per-column constants, the residual). ``shape_vars`` are the symbolic sizes those shapes (and the
    store) use that the kernel cannot learn from its buffers' shapes, passed as scalar arguments."""

    out_shape: tuple
    out_dtype: str
    input_specs: tuple[tuple[tuple, str], ...]
    shape_vars: tuple[tirx.Var, ...]
    store: Callable[[tirx.PrimExpr, tirx.Var, tirx.Var, list[tirx.Buffer]], tuple[list, tirx.PrimExpr]]


def int8_dense(n: int, k: int, rows: int | None, dot: Int8Dot, epilogue: DenseEpilogue | None = None,
               few_rows: int = 0, amx_blocks: tuple[AmxBlock | None, AmxBlock | None] = (None, None)
               ) -> tirx.PrimFunc:
    """The unscheduled kernel for an [N, K] weight; ``rows`` None makes the row count dynamic. Parameters:
    ``A [m, K]``, packed weight, correction, the epilogue's inputs and shape variables, the output
    (``C [m, N]`` int32 without an epilogue). With ``few_rows`` (dynamic rows only) the product is computed
    by a second block pair (``dense_few``, ``out_few``) when ``m <= few_rows``, scheduled one row at a time so
    that a one-sentence decoder step does not pay for a whole register tile of rows. ``amx_blocks``: the AMX
    tiles' blocks up to ``AMX_SMALL_ROWS`` rows and above (default :func:`~.amx_dense.default_block`). (Built with TVMScript's
    IR builder, which takes a varying number of parameters; without an epilogue the function is the tuning
    database's workload.)"""
    np_, kp = padded(n, k, dot)
    N, K, NP, KP = (Tb.int64(v) for v in (n, k, np_, kp))
    GN, GK = Tb.int64(np_ // dot.lanes), Tb.int64(kp // dot.reduce)
    L, R = Tb.int64(dot.lanes), Tb.int64(dot.reduce)
    PAD = Tb.int64(ROW_PAD)
    M = tirx.Var("m", "int64") if rows is None else Tb.int64(rows)
    staged_dtype, shift, rho = dot.activation, dot.shift, dot.rows

    def tiled(i: tirx.PrimExpr, j: tirx.PrimExpr, block: tirx.PrimExpr) -> list[tirx.PrimExpr]:
        """Index of row ``i``, column ``j`` in a buffer of ``rho`` x ``block`` tiles (2-D for one-row dots)."""
        return [i, j] if rho == 1 else [i // rho, j // block, i % rho, j % block]

    with IRBuilder() as builder:
        with Tb.prim_func(s_tir=True):
            Tb.func_name("dense")
            a = Tb.arg("a", Tb.handle())
            w = Tb.arg("w", Tb.Buffer((GN, GK, L, R), dot.weight))
            correction = Tb.arg("correction", Tb.Buffer((NP,), dot.accumulator))
            inputs = [Tb.arg(f"in{index}", Tb.Buffer(shape, dtype))
                      for index, (shape, dtype) in enumerate(epilogue.input_specs if epilogue else ())]
            for var in epilogue.shape_vars if epilogue else ():
                Tb.arg(var.name, var)
            c = Tb.arg("c", Tb.handle())
            Tb.func_attr({"tirx.noalias": True, "global_symbol": "int8mt_int8_dense"})
            A = Tb.match_buffer(a, (M, K), dot.weight)
            C = (Tb.match_buffer(c, (M, N), dot.accumulator) if epilogue is None
                 else Tb.match_buffer(c, epilogue.out_shape, epilogue.out_dtype))
            amx = dot.amx_tiles and (rows is None or rows >= AMX_MIN_ROWS)
            small_block, large_block = (block or default_block(np_) for block in amx_blocks)

            def amx_part(block: AmxBlock, name: str) -> None:
                def store(total: tirx.PrimExpr, i: tirx.PrimExpr, j: tirx.PrimExpr) -> None:
                    index, value = ([i, j], total) if epilogue is None else epilogue.store(total, i, j, inputs)
                    Tb.buffer_store(C, value, index)

                amx_product_and_store(A, w, correction, C, M, n, k, np_, kp, dot, store, block, name)

            # the dot-product branches of an AMX kernel stage fewer than AMX_MIN_ROWS rows
            staged_rows = ((Tb.min(M, Tb.int64(AMX_MIN_ROWS - 1)) if amx else M) + PAD - 1) // PAD * PAD + PAD
            shifted = None if amx and rows is not None else Tb.sblock_alloc_buffer(
                (staged_rows, KP) if rho == 1 else (staged_rows // rho, GK, rho, R), staged_dtype)
            computed = M if rho == 1 else (M + rho - 1) // rho * rho

            def stage() -> None:
                # a matrix-multiply dot computes rows in tiles of rho: every block covers m rounded up to them (equal
                # regions, which TIR cannot prove of a symbolic m and its quotient by rho); rows >= m are staged as
                # zeros and never stored
                with Tb.grid(computed, KP) as (i, j):
                    with Tb.sblock("shift"):
                        vi, vj = Tb.axis.remap("SS", [i, j])
                        present = vj < K if rho == 1 else Tb.And(vj < K, vi < M)
                        if shift != 0:
                            staged = Tb.if_then_else(present, Tb.bitwise_xor(Tb.reinterpret("uint8", A[vi, vj]),
                                                                           Tb.uint8(shift)), Tb.uint8(shift))
                        else:
                            staged = Tb.if_then_else(present, Tb.Cast(staged_dtype, A[vi, vj]),
                                                     Tb.Cast(staged_dtype, 0))
                        Tb.buffer_store(shifted, staged, tiled(vi, vj, R))

            def product_and_store(suffix: str) -> None:
                acc = Tb.sblock_alloc_buffer((staged_rows, NP) if rho == 1 else (staged_rows // rho, GN, rho, L),
                                             dot.accumulator, scope="local")
                with Tb.grid(computed, NP, KP) as (i, j, r):
                    with Tb.sblock("dense" + suffix):
                        vi, vj, vr = Tb.axis.remap("SSR", [i, j, r])
                        with Tb.init():
                            Tb.buffer_store(acc, tirx.const(0, dot.accumulator), tiled(vi, vj, L))
                        staged_a, weight = shifted[tuple(tiled(vi, vr, R))], w[vj // L, vr // R, vj % L, vr % R]
                        product = (staged_a * weight if dot.accumulator == dot.weight
                                   else Tb.Cast(dot.accumulator, staged_a) * Tb.Cast(dot.accumulator, weight))
                        Tb.buffer_store(acc, acc[tuple(tiled(vi, vj, L))] + product, tiled(vi, vj, L))
                with Tb.grid(computed, N) as (i, j):
                    with Tb.sblock("out" + suffix):
                        vi, vj = Tb.axis.remap("SS", [i, j])
                        total = acc[tuple(tiled(vi, vj, L))] + correction[vj]
                        if epilogue is None:
                            index, value = [vi, vj], total
                        else:
                            index, value = epilogue.store(total, vi, vj, inputs)
                        if rho == 1:
                            Tb.buffer_store(C, value, index)
                        else:
                            with Tb.If(vi < M):
                                with Tb.Then():
                                    Tb.buffer_store(C, value, index)

            def dot_product_branches() -> None:
                stage()
                if few_rows and rows is None:  # each branch a block of its own: there, its "out" is C's only writer
                    with Tb.If(M <= Tb.int64(few_rows)):
                        with Tb.Then():
                            with Tb.sblock("branch" + FEW_ROWS_SUFFIX):
                                product_and_store(FEW_ROWS_SUFFIX)
                        with Tb.Else():
                            with Tb.sblock("branch"):
                                product_and_store("")
                else:
                    product_and_store("")

            if amx and rows is not None:  # a static row count that tiles take: nothing else
                amx_part(static_rows_block(*amx_blocks, np_, rows), "amx")
            elif amx:  # each branch a block of its own, as the few-rows branches
                with Tb.If(M > Tb.int64(AMX_SMALL_ROWS)):
                    with Tb.Then():
                        amx_part(large_block, "amx")
                    with Tb.Else():
                        with Tb.If(M > Tb.int64(AMX_ONE_TILE_ROWS)):
                            with Tb.Then():
                                amx_part(small_block, "amx_small")
                            with Tb.Else():
                                with Tb.If(M >= Tb.int64(AMX_MIN_ROWS)):
                                    with Tb.Then():
                                        amx_part(one_tile_block(np_), "amx_one_tile")
                                    with Tb.Else():
                                        with Tb.sblock("branch_dot"):
                                            dot_product_branches()
            else:
                dot_product_branches()
    return builder.get()


def packed_rows(n: int, k: int, index_dtype: str, dot: Int8Dot) -> tirx.PrimFunc:
    """Rows ``ids`` of an [N, K] weight read from its packed layout (an embedding lookup on the packed
    table); left to the default schedule."""
    np_, kp = padded(n, k, dot)
    K, GN, GK = T.int64(k), T.int64(np_ // dot.lanes), T.int64(kp // dot.reduce)
    L, R = T.int64(dot.lanes), T.int64(dot.reduce)
    rows = tirx.Var("rows", "int64")

    @T.prim_func(s_tir=True)
    def gather(ids: T.handle, w: T.Buffer((GN, GK, L, R), dot.weight), out: T.handle):
        T.func_attr({"tirx.noalias": True})
        index = T.match_buffer(ids, (rows,), index_dtype)
        O = T.match_buffer(out, (rows, K), dot.weight)
        for i, j in T.grid(rows, K):
            with T.sblock("rows"):
                vi, vj = T.axis.remap("SS", [i, j])
                O[vi, vj] = w[T.Cast("int64", index[vi]) // L, vj // R, T.Cast("int64", index[vi]) % L, vj % R]

    return gather.with_attr(KERNEL_ATTR, "int8_packed_rows")


def schedule_int8_dense(sch: s_tir.Schedule, tiles: DenseTiles | None, dot: Int8Dot,
                        epilogue: bool = False, few_rows: bool = False) -> None:
    """Tile, tensorize with ``dot`` and parallelize the kernel of :func:`int8_dense` in ``sch``;
    ``tiles`` None samples the tile sizes (the tuning design space). With an ``epilogue`` the output loop
    is vectorized one register (``lanes`` columns) at a time, the steps unrolled, so that the stores of a
    changed layout (attention heads) stay contiguous within each register. ``few_rows``: the kernel has a
    few-rows branch, which gets a one-row tile (two for ``smmla``) with as many column registers as half the vector
    registers."""
    loops = _split_lanes(sch, "dense", dot)
    if tiles is None:
        choices = row_tiles(dot)
        rows = sch.sample_categorical(list(choices), [1 / len(choices)] * len(choices))
        cols = sch.sample_perfect_tile(loops[1], n=2, max_innermost_factor=MAX_COLS)[1]
        depth = sch.sample_perfect_tile(loops[3], n=2, max_innermost_factor=MAX_DEPTH)[1]
        row_split = sch.sample_categorical(list(ROW_SPLITS), [1 / len(ROW_SPLITS)] * len(ROW_SPLITS))
        _tile(sch, "", loops, (rows, cols, depth, row_split), dot, epilogue)
    else:
        _tile(sch, "", loops, (tiles.rows, tiles.cols, tiles.depth, tiles.row_split), dot, epilogue)
        if few_rows:
            few = _split_lanes(sch, "dense" + FEW_ROWS_SUFFIX, dot)
            groups = int(sch.get(few[1]).extent)  # padded N / lanes
            cols = _largest_divisor(groups, min(MAX_COLS, dot.vector_registers // 2))
            _tile(sch, FEW_ROWS_SUFFIX, few, (dot.rows, cols, tiles.depth, 1), dot, epilogue)
    si, sj = sch.get_loops(sch.get_sblock("shift"))
    sch.parallel(si)
    if dot.rows > 1:  # staged in [rows/rho, K/reduce, rho, reduce] tiles: contiguous by ``reduce`` bytes
        sj = sch.split(sj, [None, dot.reduce])[1]
    sch.vectorize(sj)


def _split_lanes(sch: s_tir.Schedule, name: str, dot: Int8Dot) -> tuple:
    """The loops of block ``name`` with columns split by ``lanes`` and the reduction by ``reduce``:
    ``(i, jo, ji, ro, ri)``."""
    i, j, r = sch.get_loops(sch.get_sblock(name))
    jo, ji = sch.split(j, [None, dot.lanes])
    ro, ri = sch.split(r, [None, dot.reduce])
    return i, jo, ji, ro, ri


def _tile(sch: s_tir.Schedule, suffix: str, loops: tuple, sizes: tuple, dot: Int8Dot, epilogue: bool) -> None:
    """Schedule the ``dense{suffix}`` / ``out{suffix}`` pair, whose loops :func:`_split_lanes` gave, with
    ``sizes`` = (rows, cols, depth, row_split): integers, or a tuning run's samples."""
    i, jo, ji, ro, ri = loops
    rows, cols, depth, row_split = sizes
    block = sch.get_sblock("dense" + suffix)
    io, ii = sch.split(i, [None, rows], disable_predication=True)
    ip, io = sch.split(io, [row_split, None], disable_predication=True)
    joo, joi = sch.split(jo, [None, cols])
    roo, roi = sch.split(ro, [None, depth])
    if not dot.tensorized:  # float multiply-adds: each step of the reduction broadcasts a value per row
        sch.reorder(ip, joo, io, roo, roi, ri, ii, joi, ji)
        sch.vectorize(ji)  # (a reduction block's loop: before its init is split off)
        tensorized = None
    elif dot.rows == 1:
        sch.reorder(ip, joo, io, roo, roi, ii, joi, ji, ri)
        tensorized = ji
    else:  # the instruction covers ``rows`` rows of the tile
        ii, tensorized = sch.split(ii, [None, dot.rows])
        sch.reorder(ip, joo, io, roo, roi, ii, joi, tensorized, ji, ri)
    # unit loops kept: the trace then has the same loops for every tile size (replay checks it)
    out = sch.get_sblock("out" + suffix)
    sch.reverse_compute_at(out, io, preserve_unit_loops=True)
    sch.parallel(sch.fuse(ip, joo))
    init = sch.decompose_reduction(block, roo)
    sch.vectorize(sch.get_loops(init)[-1])
    if tensorized is not None:
        sch.tensorize(tensorized, dot.intrin)
    sch.unroll(ii)
    sch.unroll(joi)
    out_columns = sch.get_loops(out)[-1]
    if epilogue or dot.rows > 1:  # (accumulator tiles are contiguous by ``lanes`` columns)
        registers, out_columns = sch.split(out_columns, [None, dot.lanes])
        sch.unroll(registers)
    sch.vectorize(out_columns)


def tiles_from_trace(trace: s_tir.Trace, dot: Int8Dot) -> DenseTiles:
    """The tile sizes a tuning record's trace chose (the decisions of ``schedule_int8_dense(sch, None, dot)``)."""
    decisions = [trace.decisions[inst] for inst in trace.insts if inst in trace.decisions]
    if len(decisions) != 4:
        raise ValueError(f"not an int8 dense tuning trace ({len(decisions)} decisions)")
    rows, cols, depth, row_split = decisions
    return DenseTiles(rows=row_tiles(dot)[int(rows)], cols=int(cols[1]), depth=int(depth[1]),
                      row_split=ROW_SPLITS[int(row_split)])


def scheduled_int8_dense(n: int, k: int, tiles: DenseTiles, dot: Int8Dot, rows: int | None = None,
                         epilogue: DenseEpilogue | None = None) -> tirx.PrimFunc:
    """The kernel for an [N, K] weight (with ``epilogue``), scheduled with ``tiles`` and marked as scheduled."""
    np_, kp = padded(n, k, dot)
    if (tiles.rows not in row_tiles(dot) or tiles.row_split not in ROW_SPLITS or (np_ // dot.lanes) % tiles.cols
            or (kp // dot.reduce) % tiles.depth):
        raise ValueError(f"tiles {tiles} do not fit a {n}x{k} weight: rows must be one of {row_tiles(dot)}, row_split "
                         f"one of {ROW_SPLITS}, cols must divide {np_ // dot.lanes} and depth {kp // dot.reduce}")
    few_rows = tiles.rows - 1 if rows is None and tiles.rows >= max(FEW_ROWS_FROM_TILE, 2 * dot.rows) else 0
    blocks = (tiles.amx_small, tiles.amx) if dot.amx_tiles else (None, None)
    sch = s_tir.Schedule(int8_dense(n, k, rows, dot, epilogue, few_rows, blocks))
    if not (dot.amx_tiles and rows is not None and rows >= AMX_MIN_ROWS):  # (AMX tiles only: loops written out)
        schedule_int8_dense(sch, tiles, dot, epilogue is not None, few_rows > 0)
    record = {"n": n, "k": k, "dot": dot.family, **tiles.to_dict()}
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: dense_kind(dot), DENSE_ATTR: record})


def dense_kind(dot: Int8Dot) -> str:
    """The kernel attribute of the dense kernels of ``dot``: ``int8_dense``, or ``float_dense`` (FP32 layers)."""
    return "int8_dense" if dot.tensorized else "float_dense"


def dense_attrs(func: tirx.PrimFunc) -> tuple[int, int, DenseTiles, str] | None:
    """``(n, k, tiles, dot family)`` of a kernel made by :func:`scheduled_int8_dense`, else None."""
    record = func.attrs.get(DENSE_ATTR) if func.attrs is not None else None
    if record is None:
        return None
    return int(record["n"]), int(record["k"]), DenseTiles.from_dict(record), str(record["dot"])
