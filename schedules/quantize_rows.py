"""Run-time quantization of each row in one kernel: the row's largest magnitude, its scale and its int8 values.

With run-time ranges every linear layer's input is quantized per row (:func:`int8mt.quant.ops.quantize_dynamic`).
As Relax ops that is a reduction (``max(abs(x))``), the scale (``maximum(.., eps) / qmax``) and the quantization
(``astype(clip(round(x / scale)))``): three kernels after fusion, the row read twice from memory and the scale
written and read back. Here, for each row in parallel, one loop finds the magnitude (``VECTOR_LANES`` partial
maxima, combined at the end) and a second, while the row is still in cache, writes the int8 values
(:func:`quantized_value`), ``QUANTIZE_LANES`` at a time. The values are the ops' own bit for bit: the quotient is
the division's (correctly rounded, as Markstein's correction of the reciprocal's product gives it), rounded half
to even as ``round`` (``nearbyint``) does, and clipped to ``-qmax..qmax``.
"""
from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.script import tirx as T

OPAQUE = 8  # TVM's OpPatternKind kOpaque: the kernel is fused with nothing
VECTOR_LANES = 64  # float32 partial maxima: four AVX-512 registers, independent chains of max
ANY_ROW_LANES = 8  # partial maxima of a row of any length (a decoder step's positions: tens), the rest one by one
# values quantized per vector: one AVX-512 register (LLVM's own vectorization of the loop took 256-bit ones, half
# the speed: a 1024-value row 285 -> 132 ns, with the quantization below)
QUANTIZE_LANES = 16
MIN_SCALE = 2.0 ** -100  # below it the reciprocal's correction could underflow (see quantized_value)


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


def _fma(a: tirx.PrimExpr, b: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
    """``a * b + c`` rounded once (LLVM's ``fma``: TVM's ``T.fma`` is ``fmuladd``, which may round twice)."""
    return T.call_llvm_pure_intrin("float32", "llvm.fma", a, b, c)


def quantized_value(x: tirx.PrimExpr, scale: tirx.PrimExpr, inverse: tirx.PrimExpr, low: int,
                    high: int) -> tirx.PrimExpr:
    """``int8(clip(round(x / scale), low, high))`` for float32 ``x``, ``inverse`` being ``1 / scale`` rounded to
    nearest: the ops' value, in multiplications. ``p = x * inverse`` is within an ulp of the quotient, and
    Markstein's correction ``p + (x - p * scale) * inverse`` (two ``fma``, the residual exact) is the quotient
    correctly rounded, i.e. ``x / scale`` (Markstein's theorem on division with an FMA, in Muller et al.,
    *Handbook of Floating-Point Arithmetic*; it needs no underflow: scales of at least ``MIN_SCALE``). ``lrint``
    rounds that half to even as ``nearbyint`` does and converts it in one instruction (``vcvtps2dq``); the clip
    then runs on integers, so the quotient must stay within int32 (within the callers' clip of ``x``)."""
    product: T.let = x * inverse
    quotient: T.let = _fma(_fma(-product, scale, x), inverse, product)
    return T.Cast("int8", T.max(T.min(T.call_llvm_pure_intrin("int32", "llvm.lrint", quotient), T.int32(high)),
                                T.int32(low)))


def check_range(what: str, qmax: float, eps: float) -> None:
    """A run-time quantization :func:`quantized_value` can compute: ``qmax`` a whole number (the clip runs on
    integers), its smallest scale ``eps / qmax`` at least ``MIN_SCALE``."""
    if qmax != int(qmax) or eps / qmax < MIN_SCALE:
        raise ValueError(f"the {what} quantization clips to whole numbers and its scales are at least {MIN_SCALE}: "
                         f"got qmax={qmax}, eps={eps}")


def row_quantizer(columns: int | tirx.PrimExpr, lanes: int, qmax: float, eps: float):
    """A TIR macro ``(values, q, s, partial, i)``: row ``i`` of the flat float32 ``values`` (``columns`` per row)
    quantized into ``q`` with its scale in ``s[i]``; ``partial`` is a ``[rows, lanes]`` scratch buffer. ``lanes``
    (a power of two) partial maxima run over the row's whole chunks of ``lanes``, the rest of the row goes into the
    first; then they fold in halves (the maximum is the same in any order, and a chain of scalar steps as long as
    ``lanes`` took as long as the rest of a 256-element row)."""
    check_range("row", qmax, eps)
    high, floor = T.float32(qmax), T.float32(eps)
    chunks = T.int64(columns // lanes) if isinstance(columns, int) else columns // lanes
    vectors = T.int64(columns // QUANTIZE_LANES) if isinstance(columns, int) else columns // QUANTIZE_LANES
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
        inverse: T.let = T.float32(1) / row_scale
        for c in range(vectors):
            for lane in T.vectorized(T.int64(QUANTIZE_LANES)):
                q[i * columns + c * QUANTIZE_LANES + lane] = quantized_value(
                    values[i * columns + c * QUANTIZE_LANES + lane], row_scale, inverse, -int(qmax), int(qmax))
        for j in range(width - vectors * QUANTIZE_LANES):
            q[i * columns + vectors * QUANTIZE_LANES + j] = quantized_value(
                values[i * columns + vectors * QUANTIZE_LANES + j], row_scale, inverse, -int(qmax), int(qmax))

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


def quantize_columns_kernel(rank: int, rows: int, qmax: float, eps: float) -> tirx.PrimFunc:
    """The quantization of each column instead: ``q[..., r, c] = int8(clip(round(x[..., r, c] / s[..., 0, c]),
    -qmax, qmax))`` with ``s[..., 0, c] = max(max_r |x[..., r, c]|, eps) / qmax``, for float32 ``x`` of ``rank``
    dimensions, ``rows`` in the one before last, any number of columns in the last (a head's keys transposed for
    their product with the queries, one scale per key). Each matrix in parallel: the maxima of all its columns
    side by side (vectors across the contiguous columns), then the int8 values row by row."""
    check_range("column", qmax, eps)
    lead, matrices = leading_rows(rank - 1)
    columns = tirx.Var("columns", "int64")
    x_shape, s_shape = (*lead, rows, columns), (*lead, 1, columns)
    high, floor = T.float32(qmax), T.float32(eps)

    @T.macro
    def quantize_column(x, q, s, inverse, m, c):
        """Column ``c`` of matrix ``m`` (flat views), inside a vectorized loop or not."""
        s[m * columns + c] = T.min_value("float32")
        for r in range(T.int64(rows)):
            s[m * columns + c] = T.max(s[m * columns + c], T.fabs(x[(m * rows + r) * columns + c]))
        s[m * columns + c] = T.max(s[m * columns + c], floor) / high
        inverse[m * columns + c] = T.float32(1) / s[m * columns + c]
        for r in range(T.int64(rows)):
            q[(m * rows + r) * columns + c] = quantized_value(x[(m * rows + r) * columns + c], s[m * columns + c],
                                                             inverse[m * columns + c], -int(qmax), int(qmax))

    @T.macro
    def in_vectors(x, q, s, inverse, m, lanes):
        """All columns of matrix ``m``, ``lanes`` at a time (at least ``lanes``); the last vector overlaps the one
        before where they do not divide the columns, computing the same values again."""
        for v in range((columns + lanes - 1) // lanes):
            for lane in T.vectorized(T.int64(lanes)):
                quantize_column(x, q, s, inverse, m, T.min(v * lanes, columns - lanes) + lane)

    @T.prim_func(s_tir=True)
    def quantize_columns(x: T.handle, q: T.handle, s: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        X = T.match_buffer(x, x_shape, "float32")
        Q = T.match_buffer(q, x_shape, "int8")
        S = T.match_buffer(s, s_shape, "float32")
        with T.sblock("root"):
            flat_x = T.decl_buffer((matrices * rows * columns,), "float32", data=X.data)
            flat_q = T.decl_buffer((matrices * rows * columns,), "int8", data=Q.data)
            flat_s = T.decl_buffer((matrices * columns,), "float32", data=S.data)
            inverse = T.sblock_alloc_buffer((matrices * columns,), "float32")
            for m in T.parallel(matrices):
                if columns >= QUANTIZE_LANES:
                    in_vectors(flat_x, flat_q, flat_s, inverse, m, QUANTIZE_LANES)
                elif columns >= 8:
                    in_vectors(flat_x, flat_q, flat_s, inverse, m, 8)
                elif columns >= 4:
                    in_vectors(flat_x, flat_q, flat_s, inverse, m, 4)
                else:
                    for c in range(columns):
                        quantize_column(flat_x, flat_q, flat_s, inverse, m, c)

    return quantize_columns
