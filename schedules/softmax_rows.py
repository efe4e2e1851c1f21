"""Softmax over each row's last axis, and the static quantization after it, as one kernel.

Legalized (TOPI's ``fast_softmax``) and fused with the quantization of the attention probabilities after it, the
softmax is three loop nests that our default CPU schedule runs scalar over rows of dynamic length (the scores of
a source sentence, or of the positions decoded so far): the row's maximum, the sum of the exponentials, and the
probabilities, which compute every exponential a second time. In the encoder at batch 32 that was some 15 % of
``encode``. Here, for each row in parallel, the maximum is taken over vector-wide partial maxima (exact in any
order), the exponentials are computed once in whole vectors and kept, their sum is added up in the order TOPI's
loop adds them, and the probabilities are divided and quantized from the kept values: the same arithmetic
(:func:`fast_exp` is TOPI's, operation for operation), so the same values bit for bit.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .layer_norm_rows import StaticQuantize
from .quantize_rows import OPAQUE, leading_rows

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


def softmax_rows_kernel(rank: int, lanes: int, quantize: StaticQuantize) -> tirx.PrimFunc:
    """``q = quantize(clip(softmax(x, axis=-1), lo, hi), scale)`` (int8, zero point 0) for float32 ``x`` of
    ``rank`` dimensions of any size: the kernel ``(x, q)``, ``lanes`` the float32 lanes of a vector register."""
    lead, rows = leading_rows(rank)
    columns = tirx.Var("columns", "int64")
    shape = (*lead, columns)
    chunks = columns // lanes
    lo, hi, scale = T.float32(quantize.lo), T.float32(quantize.hi), T.float32(quantize.scale)

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
    def probability(q, e, total, at):
        """The quantized probability of the exponential ``e[at]`` of a row whose exponentials sum to ``total``."""
        q[at] = T.Cast("int8", T.max(T.min(T.round(T.max(T.min(e[at] / total, hi), lo) / scale), T.float32(127)),
                                     T.float32(-128)))

    @T.prim_func(s_tir=True)
    def softmax_quantize(x: T.handle, q: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        X = T.match_buffer(x, shape, "float32")
        Q = T.match_buffer(q, shape, "int8")
        with T.sblock("root"):
            flat_x = T.decl_buffer((rows * columns,), "float32", data=X.data)
            flat_q = T.decl_buffer((rows * columns,), "int8", data=Q.data)
            e = T.sblock_alloc_buffer((rows * columns,), "float32")
            maxima = T.sblock_alloc_buffer((rows,), "float32")
            partial = T.sblock_alloc_buffer((rows, lanes), "float32")
            for group in T.parallel((rows + GROUP - 1) // GROUP):
                for g in range(T.int64(GROUP)):  # the last group repeats its last row where rows run out
                    exponentials(flat_x, e, maxima, partial, T.min(group * GROUP + g, rows - 1))
                sums = T.decl_buffer((GROUP,), "float32", scope="local")
                for g in T.unroll(T.int64(GROUP)):
                    sums[g] = T.float32(0)
                for j in range(columns):  # each row's in TOPI's order; GROUP rows' sums side by side
                    for g in T.unroll(T.int64(GROUP)):
                        sums[g] = sums[g] + e[T.min(group * GROUP + g, rows - 1) * columns + j]
                for g in range(T.int64(GROUP)):
                    row: T.let = T.min(group * GROUP + g, rows - 1)
                    for c in range(chunks):
                        for lane in T.vectorized(T.int64(lanes)):
                            probability(flat_q, e, sums[g], row * columns + c * lanes + lane)
                    for j in range(chunks * lanes, columns):
                        probability(flat_q, e, sums[g], row * columns + j)

    return softmax_quantize
