"""Run-time quantization of each row in one kernel: the row's largest magnitude, its scale and its int8 values.

With run-time ranges every linear layer's input is quantized per row (:func:`int8mt.quant.ops.quantize_dynamic`).
As Relax ops that is a reduction (``max(abs(x))``), the scale (``maximum(.., eps) / qmax``) and the quantization
(``astype(clip(round(x / scale)))``): three kernels after fusion, the row read twice from memory and the scale
written and read back. Here, for each row in parallel, one loop finds the magnitude (``VECTOR_LANES`` partial
maxima, combined at the end) and a second, while the row is still in cache, writes the int8 values. The
arithmetic is the ops' own (TOPI's ``clip`` is ``max(min(x, hi), lo)``, ``round`` is ``nearbyint``, half to
even), so the values are the same bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.script import tirx as T

OPAQUE = 8  # TVM's OpPatternKind kOpaque: the kernel is fused with nothing
VECTOR_LANES = 64  # float32 partial maxima: four AVX-512 registers, independent chains of max
ANY_ROW_LANES = 8  # partial maxima of a row of any length (a decoder step's positions: tens), the rest one by one


def leading_rows(rank: int) -> tuple[list[tirx.Var], tirx.PrimExpr]:
    """Size variables of the leading dimensions of a tensor of ``rank`` dimensions, and their product (its rows)."""
    lead = [tirx.Var(f"d{i}", "int64") for i in range(rank - 1)]
    rows = tirx.IntImm("int64", 1)
    for dim in lead:
        rows = rows * dim
    return lead, rows


def row_lanes(columns: int | None) -> int:
    """The partial maxima of a row of ``columns`` elements (None: any number): ``VECTOR_LANES``, or fewer for short
    rows or rows they do not divide; ``ANY_ROW_LANES`` for rows of any length."""
    if columns is None:
        return ANY_ROW_LANES
    return next((lanes for lanes in (VECTOR_LANES, 16, 8) if columns % lanes == 0 and columns >= 4 * lanes), 1)


def lane_folder(lanes: int, combine: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]):
    """A TIR macro ``fold(partial, i)``: the ``lanes`` partial results ``partial[i, :]`` (a power of two up to
    ``VECTOR_LANES``) combined in halves, vector by vector (lane ``j`` takes ``combine(lane j, lane j + half)``),
    into ``partial[i, 0]``: four vector steps for 16 lanes, where combining them one by one is a chain of 15
    dependent scalar ones."""
    if lanes & (lanes - 1) or lanes > VECTOR_LANES:
        raise ValueError(f"partial results fold in halves: a power of two up to {VECTOR_LANES} lanes, got {lanes}")

    @T.macro
    def fold_half(partial, i, half):
        if lanes > half:
            for lane in T.vectorized(T.int64(half)):
                partial[i, lane] = combine(partial[i, lane], partial[i, lane + half])

    @T.macro
    def fold(partial, i):
        fold_half(partial, i, 32)
        fold_half(partial, i, 16)
        fold_half(partial, i, 8)
        fold_half(partial, i, 4)
        fold_half(partial, i, 2)
        fold_half(partial, i, 1)

    return fold


def row_quantizer(columns: int | tirx.PrimExpr, lanes: int, qmax: float, eps: float):
    """A TIR macro ``(values, q, s, partial, i)``: row ``i`` of the flat float32 ``values`` (``columns`` per row)
    quantized into ``q`` with its scale in ``s[i]``; ``partial`` is a ``[rows, lanes]`` scratch buffer. ``lanes``
    (a power of two) partial maxima run over the row's whole chunks of ``lanes``, the rest of the row goes into the
    first; then they fold in halves (the maximum is the same in any order, and a chain of scalar steps as long as
    ``lanes`` took as long as the rest of a 256-element row)."""
    low, high, floor = T.float32(-qmax), T.float32(qmax), T.float32(eps)
    chunks = T.int64(columns // lanes) if isinstance(columns, int) else columns // lanes
    width = T.int64(columns) if isinstance(columns, int) else columns
    fold = lane_folder(lanes, T.max)

    @T.macro
    def quantize_row(values, q, s, partial, i):
        for lane in T.vectorized(T.int64(lanes)):
            partial[i, lane] = T.min_value("float32")
        for c in range(chunks):
            for lane in T.vectorized(T.int64(lanes)):
                partial[i, lane] = T.max(partial[i, lane], T.fabs(values[i * columns + c * lanes + lane]))
        for j in range(width - chunks * lanes):
            partial[i, 0] = T.max(partial[i, 0], T.fabs(values[i * columns + chunks * lanes + j]))
        fold(partial, i)
        s[i] = partial[i, 0]
        row_scale: T.let = T.max(s[i], floor) / high
        s[i] = row_scale
        for j in range(width):  # (LLVM vectorizes it: TVM keeps nearbyint scalar)
            q[i * columns + j] = T.Cast("int8", T.max(T.min(T.nearbyint(values[i * columns + j] / row_scale), high),
                                                       low))

    return quantize_row


def quantize_rows_kernel(rank: int, columns: int | None, qmax: float, eps: float) -> tirx.PrimFunc:
    """``q[..., :] = int8(clip(round(x[..., :] / s[...]), -qmax, qmax))`` with ``s[...] = max(max|x[..., :]|,
    eps) / qmax`` for float32 ``x`` of ``rank`` dimensions, the last of ``columns`` elements (None: any number)
    and the others of any size; the kernel ``(x, q, s)``, ``s`` of ``x``'s shape with a last dimension of 1. The
    rows are read as one flat array (``x``'s leading dimensions fused)."""
    lead, rows = leading_rows(rank)
    lanes = row_lanes(columns)
    columns = tirx.Var("columns", "int64") if columns is None else columns
    x_shape, s_shape = (*lead, columns), (*lead, 1)
    quantize_row = row_quantizer(columns, lanes, qmax, eps)

    @T.prim_func(s_tir=True)
    def quantize_rows(x: T.handle, q: T.handle, s: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        X = T.match_buffer(x, x_shape, "float32")
        Q = T.match_buffer(q, x_shape, "int8")
        S = T.match_buffer(s, s_shape, "float32")
        with T.sblock("root"):
            flat_x = T.decl_buffer((rows * columns,), "float32", data=X.data)
            flat_q = T.decl_buffer((rows * columns,), "int8", data=Q.data)
            flat_s = T.decl_buffer((rows,), "float32", data=S.data)
            partial = T.sblock_alloc_buffer((rows, lanes), "float32")  # one allocation per call, not per row
            for i in T.parallel(rows):
                quantize_row(flat_x, flat_q, flat_s, partial, i)

    return quantize_rows
