"""The INT8 batched matmul of attention, ``C[b, i, j] = sum_r A[b, i, r] . B[b, r, j]`` (int8 x int8 -> int32),
tensorized with the same dot-product intrinsic as the dense kernel (:mod:`.int8_dense`).

Both operands are activations (QK^T: queries x transposed keys; softmax.V: probabilities x values), so
nothing can be packed at compile time: per batch entry the kernel packs ``B`` into the intrinsic's layout
``[J/lanes, R/reduce, lanes, reduce]`` (zero-padded) and stages ``A`` (shifted or widened, as the dense
kernel does): one pass over each operand against ``I`` (rows) passes of compute. For VNNI's unsigned
activations the correction ``-shift * sum_r B[b, r, j]`` is added when the results are written.

Any of the four sizes may be dynamic (batch x heads, query and key lengths): the packed/staged buffers
are padded to the intrinsic's blocks, and the rows of a register tile are split without predicates over a
staged buffer with ``ROW_PAD`` spare rows, whose garbage rows are never written out.

Schedule: batch entries in parallel, each packing its ``B`` and staging its ``A`` into buffers of its own
(L1-sized for attention); a ``rows x lanes`` accumulator tile per block of ``lanes`` columns over the whole
reduction; the correction and the output run as parallel loops of their own (the output needs the
correction, which TIR cannot place under the batch loop with it). Not tuned: these matmuls are small
(64-wide heads) and their sizes change every call, so one schedule with as many rows per tile as there are
queries (at most ``ROWS``) serves all.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.script import tirx as T

from .amx_batch_matmul import amx_batch_matmul, extent
from .intrin import Int8Dot
from .kernel_attrs import KERNEL_ATTR

ROWS = 4  # register-tile rows (accumulator chains: rows x one vector)
ROW_PAD = 8  # spare staged rows (>= ROWS - 1)


def int8_batch_matmul(batch: int | None, rows: int | None, cols: int | None, depth: int | None,
                      dot: Int8Dot) -> tirx.PrimFunc:
    """The unscheduled kernel for ``A[batch, rows, depth] . B[batch, depth, cols]``; None = dynamic size. ``dot``
    is a one-row dot product (for a preset, :func:`~.intrin.batch_dot`)."""
    if dot.rows != 1:
        raise ValueError(f"the batched matmul takes a one-row dot product, not {dot.family!r} (see batch_dot)")
    BT, I, J, R = (extent(n, s) for n, s in (("b", batch), ("i", rows), ("j", cols), ("r", depth)))
    L, RD = T.int64(dot.lanes), T.int64(dot.reduce)
    JB, RB = (J + L - 1) // L, (R + RD - 1) // RD  # blocks of the intrinsic
    PAD = T.int64(ROW_PAD)
    staged_dtype, shift = dot.activation, dot.shift

    @T.prim_func(s_tir=True)
    def batch_matmul(a: T.handle, b: T.handle, c: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "int8mt_int8_batch_matmul"})
        A = T.match_buffer(a, (BT, I, R), "int8")
        B = T.match_buffer(b, (BT, R, J), "int8")
        C = T.match_buffer(c, (BT, I, J), "int32")
        staged = T.sblock_alloc_buffer((BT, I + PAD, RB * RD), staged_dtype)
        packed = T.sblock_alloc_buffer((BT, JB, RB, L, RD), "int8")
        correction = T.sblock_alloc_buffer((BT, J), "int32")
        acc = T.sblock_alloc_buffer((BT, I + PAD, JB * L), "int32", scope="local")
        raw = T.sblock_alloc_buffer((BT, I, JB * L), "int32")
        for n, i, r in T.grid(BT, I, RB * RD):
            with T.sblock("stage"):
                vn, vi, vr = T.axis.remap("SSS", [n, i, r])
                if shift != 0:
                    staged[vn, vi, vr] = T.if_then_else(
                        vr < R, T.bitwise_xor(T.reinterpret("uint8", A[vn, vi, vr]), T.uint8(shift)), T.uint8(shift))
                else:
                    staged[vn, vi, vr] = T.if_then_else(vr < R, T.Cast(staged_dtype, A[vn, vi, vr]),
                                                        T.Cast(staged_dtype, 0))
        for n, jb, rb, jl, rl in T.grid(BT, JB, RB, L, RD):
            with T.sblock("pack"):
                vn, vjb, vrb, vjl, vrl = T.axis.remap("SSSSS", [n, jb, rb, jl, rl])
                packed[vn, vjb, vrb, vjl, vrl] = T.if_then_else(
                    vjb * L + vjl < J and vrb * RD + vrl < R, B[vn, vrb * RD + vrl, vjb * L + vjl], T.int8(0))
        for n, j, r in T.grid(BT, J, R):
            with T.sblock("correction"):
                vn, vj, vr = T.axis.remap("SSR", [n, j, r])
                with T.init():
                    correction[vn, vj] = 0
                correction[vn, vj] = correction[vn, vj] - T.int32(shift) * T.Cast("int32", B[vn, vr, vj])
        for n, i, j, r in T.grid(BT, I, JB * L, RB * RD):
            with T.sblock("matmul"):
                vn, vi, vj, vr = T.axis.remap("SSSR", [n, i, j, r])
                with T.init():
                    acc[vn, vi, vj] = 0
                acc[vn, vi, vj] = acc[vn, vi, vj] + T.Cast("int32", staged[vn, vi, vr]) * T.Cast(
                    "int32", packed[vn, vj // L, vr // RD, vj % L, vr % RD])
        for n, i, j in T.grid(BT, I, JB * L):
            with T.sblock("flush"):
                vn, vi, vj = T.axis.remap("SSS", [n, i, j])
                raw[vn, vi, vj] = acc[vn, vi, vj]
        for n, i, j in T.grid(BT, I, J):
            with T.sblock("out"):
                vn, vi, vj = T.axis.remap("SSS", [n, i, j])
                C[vn, vi, vj] = raw[vn, vi, vj] + correction[vn, vj]

    return batch_matmul


def scheduled_int8_batch_matmul(batch: int | None, rows: int | None, cols: int | None, depth: int | None,
                                dot: Int8Dot) -> tirx.PrimFunc:
    """The kernel for those sizes, scheduled (see the module docstring) and marked as scheduled; for a dot product
    on AMX tiles, the tile kernel of :mod:`.amx_batch_matmul`."""
    if dot.amx_tiles:
        return amx_batch_matmul(batch, rows, cols, depth).with_attrs({"tirx.is_scheduled": True,
                                                                       KERNEL_ATTR: "int8_batch_matmul"})
    sch = s_tir.Schedule(int8_batch_matmul(batch, rows, cols, depth, dot))
    tile_rows = min(ROWS, rows) if rows is not None else ROWS
    block = sch.get_sblock("matmul")
    n, i, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, [None, dot.lanes])
    ro, ri = sch.split(r, [None, dot.reduce])
    io, ii = sch.split(i, [None, tile_rows], disable_predication=True)
    sch.reorder(n, io, jo, ro, ii, ji, ri)
    sch.reverse_compute_at(sch.get_sblock("flush"), jo, preserve_unit_loops=True)
    for producer in ("pack", "stage"):
        sch.compute_at(sch.get_sblock(producer), n, preserve_unit_loops=True)
    sch.parallel(n)
    # the correction (a reduction over B) and the output (which needs it) run as loops of their own
    for name in ("correction", "out"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    init = sch.decompose_reduction(block, ro)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, dot.intrin)
    sch.unroll(ii)
    sch.vectorize(sch.get_loops(sch.get_sblock("flush"))[-1])
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: "int8_batch_matmul"})
