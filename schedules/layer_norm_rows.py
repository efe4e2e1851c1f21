"""Layer norm over each row's last axis as one kernel: one parallel loop over the rows, each row's sums, its
normalized values and, optionally, those values quantized for the next matmul (so the quantization reads them
while still in cache and is not a kernel of its own).

TVM legalizes ``layer_norm`` into four loop nests (the sum, the sum of squared deviations, their partial sums
and the output), each scheduled as a parallel loop of its own: five parallel launches per call, which dominate
at the decoder's few rows. The arithmetic here is the legalized kernel's as our CPU schedule orders it
(:class:`~int8mt.schedules.cpu_generic.CPUGeneric`: ``lanes`` partial sums over the row's chunks, added up in
lane order; ``(x - sum / n) * rsqrt(squares / n + eps) * gamma + beta``), and the quantizations are the ones
their Relax ops legalize into, so every value is the same bit for bit:

* :class:`StaticQuantize`: ``quantize(clip(y, lo, hi), scale)`` with a constant scale (static ranges);
* :class:`RowQuantize`: the run-time quantization of each row (:mod:`.quantize_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm import tirx
from tvm.script import tirx as T

from .quantize_rows import MIN_SCALE, OPAQUE, leading_rows, quantized_value, row_quantizer


@dataclass(frozen=True)
class StaticQuantize:
    """``int8(clip(round(clip(y, lo, hi) / scale), -128, 127))``: TVM's ``quantize`` (zero point 0) after a clip."""

    lo: float
    hi: float
    scale: float

    def of(self, y: tirx.PrimExpr) -> tirx.PrimExpr:
        """The quantized value of the float32 ``y``, as TVM's ``clip`` and ``quantize`` legalize it: the quotient
        from the scale's reciprocal (:func:`~.quantize_rows.quantized_value`) where the scale and the clip allow
        it, else divided."""
        clipped = T.max(T.min(y, T.float32(self.hi)), T.float32(self.lo))
        scale = np.float32(self.scale)
        if scale >= MIN_SCALE and max(abs(self.lo), abs(self.hi)) / scale < 2.0 ** 30:
            inverse = np.float32(1) / scale  # (rounded to nearest, as quantized_value needs)
            return quantized_value(clipped, T.float32(float(scale)), T.float32(float(inverse)), -128, 127)
        return T.Cast("int8", T.max(T.min(T.round(clipped / T.float32(self.scale)), T.float32(127)), T.float32(-128)))


@dataclass(frozen=True)
class RowQuantize:
    """Each row's run-time quantization to ``-qmax..qmax`` with the scale ``max(max|y|, eps) / qmax``."""

    qmax: float
    eps: float


def layer_norm_rows_kernel(rank: int, columns: int, eps: float, lanes: int,
                           quantize: StaticQuantize | RowQuantize | None = None) -> tirx.PrimFunc:
    """The layer norm of float32 ``x`` of ``rank`` dimensions over its last (``columns``, a multiple of
    ``lanes``), with ``gamma`` and ``beta`` of ``columns`` elements: the kernel ``(x, gamma, beta, y)``, with
    ``quantize`` ``(x, gamma, beta, y, q)`` (``q`` int8 of ``x``'s shape) or, for :class:`RowQuantize`,
    ``(x, gamma, beta, y, q, s)`` (``s`` each row's scale, of ``x``'s shape with a last dimension of 1)."""
    lead, rows = leading_rows(rank)
    chunks, x_shape, s_shape = columns // lanes, (*lead, columns), (*lead, 1)
    n, epsilon = T.float32(columns), T.float32(eps)

    @T.macro
    def normalize(X, G, B, Y, statistics, partial, i):
        """Row ``i`` of ``X`` normalized into ``Y`` (flat views); returns nothing, ``statistics[i, :]`` holds
        the row's sum and sum of squared deviations."""
        for lane in T.vectorized(T.int64(lanes)):
            partial[i, lane] = T.float32(0)
        for c in range(T.int64(chunks)):
            for lane in T.vectorized(T.int64(lanes)):
                partial[i, lane] = partial[i, lane] + X[i * columns + c * lanes + lane]
        statistics[i, 0] = T.float32(0)
        for lane in range(T.int64(lanes)):
            statistics[i, 0] = statistics[i, 0] + partial[i, lane]
        for lane in T.vectorized(T.int64(lanes)):
            partial[i, lane] = T.float32(0)
        for c in range(T.int64(chunks)):
            for lane in T.vectorized(T.int64(lanes)):
                partial[i, lane] = partial[i, lane] + (X[i * columns + c * lanes + lane] - statistics[i, 0] / n) * (
                    X[i * columns + c * lanes + lane] - statistics[i, 0] / n)
        statistics[i, 1] = T.float32(0)
        for lane in range(T.int64(lanes)):
            statistics[i, 1] = statistics[i, 1] + partial[i, lane]
        for j in range(T.int64(columns)):
            Y[i * columns + j] = (X[i * columns + j] - statistics[i, 0] / n) * T.rsqrt(
                statistics[i, 1] / n + epsilon) * G[j] + B[j]

    if quantize is None:
        @T.prim_func(s_tir=True)
        def layer_norm_rows(x: T.handle, gamma: T.Buffer((columns,), "float32"),
                            beta: T.Buffer((columns,), "float32"), y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            X = T.match_buffer(x, x_shape, "float32")
            Y = T.match_buffer(y, x_shape, "float32")
            with T.sblock("root"):
                flat_x = T.decl_buffer((rows * columns,), "float32", data=X.data)
                flat_y = T.decl_buffer((rows * columns,), "float32", data=Y.data)
                statistics = T.sblock_alloc_buffer((rows, 2), "float32")
                partial = T.sblock_alloc_buffer((rows, lanes), "float32")  # one allocation per call
                for i in T.parallel(rows):
                    normalize(flat_x, gamma, beta, flat_y, statistics, partial, i)

        return layer_norm_rows

    if isinstance(quantize, StaticQuantize):
        @T.prim_func(s_tir=True)
        def layer_norm_quantize(x: T.handle, gamma: T.Buffer((columns,), "float32"),
                                beta: T.Buffer((columns,), "float32"), y: T.handle, q: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            X = T.match_buffer(x, x_shape, "float32")
            Y = T.match_buffer(y, x_shape, "float32")
            Q = T.match_buffer(q, x_shape, "int8")
            with T.sblock("root"):
                flat_x = T.decl_buffer((rows * columns,), "float32", data=X.data)
                flat_y = T.decl_buffer((rows * columns,), "float32", data=Y.data)
                flat_q = T.decl_buffer((rows * columns,), "int8", data=Q.data)
                statistics = T.sblock_alloc_buffer((rows, 2), "float32")
                partial = T.sblock_alloc_buffer((rows, lanes), "float32")
                for i in T.parallel(rows):
                    normalize(flat_x, gamma, beta, flat_y, statistics, partial, i)
                    for j in range(T.int64(columns)):
                        flat_q[i * columns + j] = quantize.of(flat_y[i * columns + j])

        return layer_norm_quantize

    quantize_row = row_quantizer(columns, lanes, quantize.qmax, quantize.eps)

    @T.prim_func(s_tir=True)
    def layer_norm_quantize_rows(x: T.handle, gamma: T.Buffer((columns,), "float32"),
                                 beta: T.Buffer((columns,), "float32"), y: T.handle, q: T.handle, s: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        X = T.match_buffer(x, x_shape, "float32")
        Y = T.match_buffer(y, x_shape, "float32")
        Q = T.match_buffer(q, x_shape, "int8")
        S = T.match_buffer(s, s_shape, "float32")
        with T.sblock("root"):
            flat_x = T.decl_buffer((rows * columns,), "float32", data=X.data)
            flat_y = T.decl_buffer((rows * columns,), "float32", data=Y.data)
            flat_q = T.decl_buffer((rows * columns,), "int8", data=Q.data)
            flat_s = T.decl_buffer((rows,), "float32", data=S.data)
            statistics = T.sblock_alloc_buffer((rows, 2), "float32")
            partial = T.sblock_alloc_buffer((rows, lanes), "float32")
            for i in T.parallel(rows):
                normalize(flat_x, gamma, beta, flat_y, statistics, partial, i)
                quantize_row(flat_y, flat_q, flat_s, partial, i)

    return layer_norm_quantize_rows
