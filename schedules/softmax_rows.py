"""Softmax over each row's last axis, and what the attention does with the probabilities next, as one kernel.

Legalized (TOPI's ``fast_softmax``) and fused with the ops after it (the static quantization of the attention
probabilities, or their product with the values' run-time scales), the softmax is three loop nests that our
default CPU schedule runs scalar over rows of dynamic length (the scores of a source sentence, or of the positions
decoded so far): the row's maximum, the sum of the exponentials, and the probabilities, which compute every
exponential a second time. In the encoder at batch 32 that was some 15 % of ``encode``. Here, for each row in
parallel, the maximum is taken over vector-wide partial maxima (exact in any order), the exponentials are
computed once in whole vectors and kept, their sum is added up in the order TOPI's loop adds them (the sums of
``GROUP`` rows side by side, each a chain of dependent additions), and the probabilities are divided, scaled and
quantized from the kept values: the same arithmetic (:func:`fast_exp` is TOPI's, operation for operation), so
the same values bit for bit.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .layer_norm_rows import RowQuantize, StaticQuantize
from .quantize_rows import OPAQUE, leading_rows, row_quantizer

LOWEST = -340282346638528859811704183484516925440.0  # float32's lowest value: TOPI's initial maximum
GROUP = 4  # rows whose sums are added side by side (one row's is a chain of dependent additions)


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """TOPI's ``fast_exp`` of float32 ``x``: range reduction to ``2^n * e^f`` and a polynomial of ``f``, written as
    its compute writes it (the same operations in the same order)."""
    clamped = T.max(T.min(x, T.float32(88.376266479492188)), T.float32(-88.376258850097656))
    n = T.floor(clamped * T.float32(1.4426950216293335) + T.float32(0.5))
    f = clamped - n * T.float32(0.69314718246459961)
    poly = T.float32(0.00019875691214110702)
    for coefficient in (0.0013981999363750219, 0.008333452045917511, 0.041665796190500259, 0.1666666567325592, 0.5):
        poly = poly * f + T.float32(coefficient)
    power = T.reinterpret("float32", T.shift_left(T.Cast("int32", n + T.float32(127.0)), 23))
    return T.max(power * (poly * f * f + f + T.float32(1.0)), x)


def softmax_rows_kernel(rank: int, lanes: int, result: StaticQuantize | RowQuantize | None,
                        scaled: bool = False) -> tirx.PrimFunc:
    """The softmax over the last axis of float32 ``x`` of ``rank`` (>= 2) dimensions of any size, ``lanes`` the
    float32 lanes of a vector register. ``result``: :class:`StaticQuantize` ``q = quantize(clip(y, lo, hi),
    scale)`` (int8, zero point 0), the kernel ``(x, q)``; None the probabilities ``y``, ``(x, y)``. ``scaled``: the
    probabilities times ``m`` of ``x``'s shape with 1 in place of its second-to-last size (each position's
    factor, shared by the queries of a row block: the values' run-time scales), ``(x, m, y)``, or with
    :class:`RowQuantize` the run-time quantization of each row of those, ``(x, m, q, s)`` (``s`` each row's
    scale)."""
    if isinstance(result, RowQuantize) and not scaled or isinstance(result, StaticQuantize) and scaled:
        raise ValueError("a softmax kernel quantizes statically its probabilities, or at run time scaled ones")
    lead, rows = leading_rows(rank)
    columns = tirx.Var("columns", "int64")
    shape, factor_shape, scale_shape = (*lead, columns), (*lead[:-1], 1, columns), (*lead, 1)
    queries = lead[-1]  # rows that share one row of factors
    chunks = columns // lanes

    @T.macro
    def exponentials(x, e, maxima, partial, i):
        """Row ``i``'s maximum into ``maxima[i]`` and its exponentials into ``e`` (flat buffers); ``partial`` a
        ``[rows, lanes]`` scratch buffer."""
        for lane in T.vectorized(T.int64(lanes)):
            partial[i, lane] = T.float32(LOWEST)
        for c in range(chunks):
            for lane in T.vectorized(T.int64(lanes)):
                partial[i, lane] = T.max(partial[i, lane], x[i * columns + c * lanes + lane])
        maxima[i] = T.float32(LOWEST)
        for lane in range(T.int64(lanes)):
            maxima[i] = T.max(maxima[i], partial[i, lane])
        for j in range(chunks * lanes, columns):
            maxima[i] = T.max(maxima[i], x[i * columns + j])
        for c in range(chunks):
            for lane in T.vectorized(T.int64(lanes)):
                e[i * columns + c * lanes + lane] = fast_exp(x[i * columns + c * lanes + lane] - maxima[i])
        for j in range(chunks * lanes, columns):
            e[i * columns + j] = fast_exp(x[i * columns + j] - maxima[i])

    @T.macro
    def store(out, e, m, total, i, j):
        """Element ``j`` of row ``i``: its probability (the exponential over the row's ``total``), times its factor
        in ``m`` (None: none), as ``result`` has it (a row quantization: the scaled probability, into ``out``)."""
        if isinstance(result, StaticQuantize):
            out[i * columns + j] = result.of(e[i * columns + j] / total)
        elif m is None:
            out[i * columns + j] = e[i * columns + j] / total
        else:
            out[i * columns + j] = e[i * columns + j] / total * m[i // queries * columns + j]

    quantize_row = row_quantizer(columns, 1, result.qmax, result.eps) if isinstance(result, RowQuantize) else None

    @T.macro
    def body(x, m, out, q, s, row_partial):
        """The kernel's body over flat views of its buffers (``m``, ``q``, ``s`` None where it lacks them; then also
        the row quantization's scratch ``row_partial``), in its root block."""
        e = T.sblock_alloc_buffer((rows * columns,), "float32")
        maxima = T.sblock_alloc_buffer((rows,), "float32")
        partial = T.sblock_alloc_buffer((rows, lanes), "float32")
        for group in T.parallel((rows + GROUP - 1) // GROUP):
            for g in range(T.int64(GROUP)):  # the last group repeats its last row where rows run out
                exponentials(x, e, maxima, partial, T.min(group * GROUP + g, rows - 1))
            sums = T.decl_buffer((GROUP,), "float32", scope="local")
            for g in T.unroll(T.int64(GROUP)):
                sums[g] = T.float32(0)
            for j in range(columns):  # each row's in TOPI's order; GROUP rows' sums side by side
                for g in T.unroll(T.int64(GROUP)):
                    sums[g] = sums[g] + e[T.min(group * GROUP + g, rows - 1) * columns + j]
            for g in range(T.int64(GROUP)):
                if group * GROUP + g < rows:
                    for c in range(chunks):
                        for lane in T.vectorized(T.int64(lanes)):
                            store(out, e, m, sums[g], group * GROUP + g, c * lanes + lane)
                    for j in range(chunks * lanes, columns):
                        store(out, e, m, sums[g], group * GROUP + g, j)
                    if q is not None:
                        quantize_row(out, q, s, row_partial, group * GROUP + g)

    attrs = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE}
    flat, factors = (rows * columns,), (rows // queries * columns,)
    if isinstance(result, RowQuantize):
        @T.prim_func(s_tir=True)
        def softmax_scale_quantize_rows(x: T.Buffer(shape, "float32"), m: T.Buffer(factor_shape, "float32"),
                                        q: T.Buffer(shape, "int8"), s: T.Buffer(scale_shape, "float32")):
            T.func_attr(attrs)
            with T.sblock("root"):
                scaled_rows = T.sblock_alloc_buffer(flat, "float32")
                row_partial = T.sblock_alloc_buffer((rows, 1), "float32")
                body(T.decl_buffer(flat, "float32", data=x.data), T.decl_buffer(factors, "float32", data=m.data),
                     scaled_rows, T.decl_buffer(flat, "int8", data=q.data),
                     T.decl_buffer((rows,), "float32", data=s.data), row_partial)

        return softmax_scale_quantize_rows

    if scaled:
        @T.prim_func(s_tir=True)
        def softmax_scale(x: T.Buffer(shape, "float32"), m: T.Buffer(factor_shape, "float32"),
                          y: T.Buffer(shape, "float32")):
            T.func_attr(attrs)
            with T.sblock("root"):
                body(T.decl_buffer(flat, "float32", data=x.data), T.decl_buffer(factors, "float32", data=m.data),
                     T.decl_buffer(flat, "float32", data=y.data), None, None, None)

        return softmax_scale

    out_dtype = "int8" if isinstance(result, StaticQuantize) else "float32"

    @T.prim_func(s_tir=True)
    def softmax(x: T.Buffer(shape, "float32"), y: T.Buffer(shape, out_dtype)):
        T.func_attr(attrs)
        with T.sblock("root"):
            body(T.decl_buffer(flat, "float32", data=x.data), None, T.decl_buffer(flat, out_dtype, data=y.data),
                 None, None, None)

    return softmax
