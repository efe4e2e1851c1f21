"""A decoder step's one-query attention products reading the self-attention cache's rows through the hypotheses'
histories, without gathering them into a tensor first.

The step's keys (and values) of hypothesis ``b``, head ``h`` are ``rows[index[b, h, t]]`` for its past positions
``t`` (``past[b, 0, t, 0]``) and its new key ``new[b, h, 0]`` for the last (:mod:`int8mt.runtime.cache`). As Relax
ops that is a gather and a ``where`` that write ``[batch, heads, positions, head_dim]`` at every step (a quarter of
a beam-4 decoder step's attention time in FP32), then the product reads it back. Here each product reads each
row where it is stored:

* :func:`scores_kernel`: ``out[bh, 0, t] = sum_d q[bh, 0, d] * key(b, h, t)[d]`` (QK^T);
* :func:`context_kernel`: ``out[bh, 0, d] = sum_t p[bh, 0, t] * value(b, h, t)[d]`` (softmax·V);

with ``bh = b * heads + h``, int8 operands summed in int32 (exact) or float32 ones in float32 (QK^T in ``lanes``
partial sums added up in halves, :func:`~.quantize_rows.lane_folder`; softmax·V over the positions in order). One
parallel loop over ``bh``.

With an ``epilogue`` (:class:`~int8mt.schedules.int8_dense.DenseEpilogue`, built by
:class:`~int8mt.compiler.passes.FuseAttentionEpilogue` from the elementwise ops after the product: the scores'
dequantization, the context's requantization) a kernel stores, instead of each sum ``out[bh, 0, x]``, the
epilogue's value of it at the epilogue's place (``store(sum, bh, x, inputs)``); only the direct scores' epilogue
reads another tensor (the cross-attention's mask).
"""
from __future__ import annotations

import operator

from tvm import tirx
from tvm.script import tirx as T

from .int8_dense import DenseEpilogue
from .intrin import int8_dot
from .quantize_rows import OPAQUE, lane_folder, row_lanes, row_quantizer

ACCUMULATOR = {"int8": "int32", "float32": "float32"}  # operand dtype -> sum dtype


def _row_dot(head_dim: int, acc: str, lanes: int, pair: str | None):
    """A TIR macro ``dot(partial, bh, q, source, start)``: the products of pair ``bh``'s query (``q`` flat, its
    ``head_dim`` values at ``bh * head_dim``) with one stored row (a flat ``source`` at ``start``) summed into the
    ``lanes`` partial sums ``partial[bh, :]`` (in ``acc``), for :func:`~.quantize_rows.lane_folder` to add up.
    With ``pair`` (a family of :func:`~.intrin.pair_dot`), int8 rows go ``2 * lanes`` values at a time through one
    multiply-add of int16 pairs into int32 (``vpmaddwd``: exact), instead of ``lanes`` widened to int32 and
    multiplied (``vpmulld``, two micro-operations on one port: the scores' bound)."""
    dot = int8_dot(pair) if pair is not None else None
    if dot is None or acc != "int32" or dot.lanes != lanes or head_dim % (2 * lanes):
        @T.macro
        def widened(partial, bh, q, source, start):
            for lane in T.vectorized(T.int64(lanes)):
                partial[bh, lane] = T.Cast(acc, 0)
            for c in range(T.int64(head_dim // lanes)):
                for lane in T.vectorized(T.int64(lanes)):
                    partial[bh, lane] = partial[bh, lane] + T.Cast(acc, q[bh * head_dim + c * lanes + lane]) * T.Cast(
                        acc, source[start + c * lanes + lane])

        return widened

    width, vector = 2 * lanes, f"int32x{lanes}"

    @T.macro
    def pairwise(partial, bh, q, source, start):
        for lane in T.vectorized(T.int64(lanes)):
            partial[bh, lane] = 0
        for c in range(T.int64(head_dim // width)):
            partial[bh, T.ramp(T.int64(0), T.int64(1), lanes)] = partial[
                bh, T.ramp(T.int64(0), T.int64(1), lanes)] + T.call_llvm_pure_intrin(
                vector, dot.instruction, T.Cast(dot.operand, q[T.ramp(bh * head_dim + c * width, T.int64(1), width)]),
                T.Cast(dot.operand, source[T.ramp(start + c * width, T.int64(1), width)]))

    return pairwise


def _products(head_dim: int, dtype: str, lanes: int, pair: str | None = None):
    """TIR macros of one pair's products with one stored row (a flat view ``source`` at ``start``):
    ``score(out, partial, q, bh, t, source, start)`` writes ``out[bh, 0, t]`` (``q`` flat; ``lanes`` partial sums,
    added up in halves; ``partial`` a ``[pairs, lanes]`` scratch buffer; ``pair`` as :func:`_row_dot`) and
    ``weigh(out, p, bh, t, source, start)`` adds ``p[bh, 0, t]`` times the row to ``out[bh, 0, :]``."""
    acc = ACCUMULATOR[dtype]
    lanes = lanes if head_dim % lanes == 0 else 1
    dot = _row_dot(head_dim, acc, lanes, pair)
    fold = lane_folder(lanes, operator.add)

    @T.macro
    def score(out, partial, q, bh, t, source, start):
        dot(partial, bh, q, source, start)
        fold(partial, bh)
        out[bh, 0, t] = partial[bh, 0]

    @T.macro
    def weigh(out, p, bh, t, source, start):
        for d in T.vectorized(T.int64(head_dim)):
            out[bh, 0, d] = out[bh, 0, d] + T.Cast(acc, p[bh, 0, t]) * T.Cast(acc, source[start + d])

    return score, weigh, lanes


def _epilogue_store(epilogue: DenseEpilogue):
    """A TIR macro ``finish(out, value, bh, x, inputs)``: ``epilogue``'s value of the sum ``value`` of pair ``bh``
    at ``x`` (a position or a column), stored at its place in ``out``; ``inputs``: the buffers it reads."""
    store = epilogue.store

    @T.macro
    def finish(out, value, bh, x, inputs):
        place, stored = T.meta_var(store(value, bh, x, inputs))
        T.buffer_store(out, stored, place)

    return finish


def _out_spec(epilogue: DenseEpilogue | None, pairs: tirx.PrimExpr, width, acc: str) -> tuple[tuple, str]:
    """The shape and dtype of a kernel's output: its sums ``[pairs, 1, width]``, or ``epilogue``'s output."""
    return ((pairs, 1, width), acc) if epilogue is None else (epilogue.out_shape, epilogue.out_dtype)


def scores_kernel(heads: int, head_dim: int, dtype: str, lanes: int, epilogue: DenseEpilogue | None = None,
                  pair: str | None = None) -> tirx.PrimFunc:
    """QK^T of one query per (hypothesis, head) against its keys read through ``index``: the kernel
    ``(index [batch, heads, positions] int64, past [batch, 1, positions, 1] bool, q [batch*heads, 1, head_dim],
    rows [stored, head_dim], new [batch, heads, 1, head_dim], out [batch*heads, 1, positions])``; with an
    ``epilogue``, ``out`` is its output. ``pair``: as :func:`_row_dot`."""
    batch, positions, stored = (tirx.Var(name, "int64") for name in ("batch", "positions", "stored"))
    pairs, acc = batch * heads, ACCUMULATOR[dtype]
    score, _, lanes = _products(head_dim, dtype, lanes, pair)
    out_shape, out_dtype = _out_spec(epilogue, pairs, positions, acc)
    finish = _epilogue_store(epilogue) if epilogue is not None else None

    @T.macro
    def scores(index, past, q, flat_rows, flat_new, target, partial, bh, t, at):
        """Pair ``bh``'s score of position ``t`` into ``target[bh, 0, at]``."""
        if past[bh // heads, 0, t, 0]:
            score(target, partial, q, bh, at, flat_rows, index[bh // heads, bh % heads, t] * head_dim)
        else:
            score(target, partial, q, bh, at, flat_new, bh * head_dim)

    @T.prim_func(s_tir=True)
    def gathered_scores(index: T.Buffer((batch, heads, positions), "int64"),
                        past: T.Buffer((batch, 1, positions, 1), "bool"),
                        q: T.Buffer((pairs, 1, head_dim), dtype), rows: T.Buffer((stored, head_dim), dtype),
                        new: T.Buffer((batch, heads, 1, head_dim), dtype), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            flat_q = T.decl_buffer((pairs * head_dim,), dtype, data=q.data)
            flat_rows = T.decl_buffer((stored * head_dim,), dtype, data=rows.data)
            flat_new = T.decl_buffer((pairs * head_dim,), dtype, data=new.data)
            partial = T.sblock_alloc_buffer((pairs, lanes), acc)  # one allocation per call
            if finish is None:  # (Python values: decided as the kernel is parsed)
                for bh in T.parallel(pairs):
                    for t in range(positions):
                        scores(index, past, flat_q, flat_rows, flat_new, out, partial, bh, t, t)
            else:
                total = T.sblock_alloc_buffer((pairs, 1, 1), acc)
                for bh in T.parallel(pairs):
                    for t in range(positions):
                        scores(index, past, flat_q, flat_rows, flat_new, total, partial, bh, t, 0)
                        finish(out, total[bh, 0, 0], bh, t, [])

    return gathered_scores


def context_kernel(heads: int, head_dim: int, dtype: str, epilogue: DenseEpilogue | None = None) -> tirx.PrimFunc:
    """softmax·V of one query per (hypothesis, head) over its values read through ``index``: the kernel
    ``(index [batch, heads, positions] int64, past [batch, 1, positions, 1] bool, p [batch*heads, 1, positions],
    rows [stored, head_dim], new [batch, heads, 1, head_dim], out [batch*heads, 1, head_dim])``; the values in
    order of position. With an ``epilogue``, ``out`` is its output."""
    batch, positions, stored = (tirx.Var(name, "int64") for name in ("batch", "positions", "stored"))
    pairs, acc = batch * heads, ACCUMULATOR[dtype]
    _, weigh, _ = _products(head_dim, dtype, 1)
    out_shape, out_dtype = _out_spec(epilogue, pairs, head_dim, acc)
    finish = _epilogue_store(epilogue) if epilogue is not None else None

    @T.macro
    def context(index, past, p, flat_rows, flat_new, total, bh):
        """Pair ``bh``'s context into ``total[bh, 0, :]``."""
        for d in T.vectorized(T.int64(head_dim)):
            total[bh, 0, d] = T.Cast(acc, 0)
        for t in range(positions):
            if past[bh // heads, 0, t, 0]:
                weigh(total, p, bh, t, flat_rows, index[bh // heads, bh % heads, t] * head_dim)
            else:
                weigh(total, p, bh, t, flat_new, bh * head_dim)

    @T.prim_func(s_tir=True)
    def gathered_context(index: T.Buffer((batch, heads, positions), "int64"),
                         past: T.Buffer((batch, 1, positions, 1), "bool"),
                         p: T.Buffer((pairs, 1, positions), dtype), rows: T.Buffer((stored, head_dim), dtype),
                         new: T.Buffer((batch, heads, 1, head_dim), dtype), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            flat_rows = T.decl_buffer((stored * head_dim,), dtype, data=rows.data)
            flat_new = T.decl_buffer((pairs * head_dim,), dtype, data=new.data)
            if finish is None:
                for bh in T.parallel(pairs):
                    context(index, past, p, flat_rows, flat_new, out, bh)
            else:
                total = T.sblock_alloc_buffer((pairs, 1, head_dim), acc)  # one allocation per call
                for bh in T.parallel(pairs):
                    context(index, past, p, flat_rows, flat_new, total, bh)
                    for d in T.vectorized(T.int64(head_dim)):
                        finish(out, total[bh, 0, d], bh, d, [])

    return gathered_context


def direct_scores_kernel(head_dim: int, dtype: str, lanes: int, epilogue: DenseEpilogue | None = None,
                         pair: str | None = None) -> tirx.PrimFunc:
    """QK^T of one query per (hypothesis, head) against keys stored per pair (the cross-attention's): the kernel
    ``(q [pairs, 1, head_dim], keys [pairs, positions, head_dim], out [pairs, 1, positions])``, summed as
    :func:`scores_kernel` sums. With an ``epilogue``, ``out`` is its output, after the one tensor it reads (the
    mask added to the scores): ``(q, keys, mask, out)``."""
    pairs, positions = tirx.Var("pairs", "int64"), tirx.Var("positions", "int64")
    acc = ACCUMULATOR[dtype]
    score, _, lanes = _products(head_dim, dtype, lanes, pair)

    if epilogue is None:
        @T.prim_func(s_tir=True)
        def direct_scores(q: T.Buffer((pairs, 1, head_dim), dtype),
                          keys: T.Buffer((pairs, positions, head_dim), dtype),
                          out: T.Buffer((pairs, 1, positions), acc)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            with T.sblock("root"):
                flat_q = T.decl_buffer((pairs * head_dim,), dtype, data=q.data)
                flat_keys = T.decl_buffer((pairs * positions * head_dim,), dtype, data=keys.data)
                partial = T.sblock_alloc_buffer((pairs, lanes), acc)
                for bh in T.parallel(pairs):
                    for t in range(positions):
                        score(out, partial, flat_q, bh, t, flat_keys, (bh * positions + t) * head_dim)

        return direct_scores

    (mask_shape, mask_dtype), = epilogue.input_specs  # (an extra parameter: a kernel of its own)
    finish = _epilogue_store(epilogue)

    @T.prim_func(s_tir=True)
    def direct_scores_epilogue(q: T.Buffer((pairs, 1, head_dim), dtype),
                               keys: T.Buffer((pairs, positions, head_dim), dtype),
                               mask: T.Buffer(mask_shape, mask_dtype),
                               out: T.Buffer(epilogue.out_shape, epilogue.out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            flat_q = T.decl_buffer((pairs * head_dim,), dtype, data=q.data)
            flat_keys = T.decl_buffer((pairs * positions * head_dim,), dtype, data=keys.data)
            partial = T.sblock_alloc_buffer((pairs, lanes), acc)
            total = T.sblock_alloc_buffer((pairs, 1, 1), acc)
            for bh in T.parallel(pairs):
                for t in range(positions):
                    score(total, partial, flat_q, bh, 0, flat_keys, (bh * positions + t) * head_dim)
                    finish(out, total[bh, 0, 0], bh, t, [mask])

    return direct_scores_epilogue


def direct_context_kernel(head_dim: int, dtype: str, epilogue: DenseEpilogue | None = None) -> tirx.PrimFunc:
    """softmax·V of one query per (hypothesis, head) over values stored per pair: the kernel
    ``(p [pairs, 1, positions], values [pairs, positions, head_dim], out [pairs, 1, head_dim])``; with an
    ``epilogue``, ``out`` is its output."""
    pairs, positions = tirx.Var("pairs", "int64"), tirx.Var("positions", "int64")
    acc = ACCUMULATOR[dtype]
    _, weigh, _ = _products(head_dim, dtype, 1)
    out_shape, out_dtype = _out_spec(epilogue, pairs, head_dim, acc)
    finish = _epilogue_store(epilogue) if epilogue is not None else None

    @T.macro
    def context(p, flat_values, total, bh):
        for d in T.vectorized(T.int64(head_dim)):
            total[bh, 0, d] = T.Cast(acc, 0)
        for t in range(positions):
            weigh(total, p, bh, t, flat_values, (bh * positions + t) * head_dim)

    @T.prim_func(s_tir=True)
    def direct_context(p: T.Buffer((pairs, 1, positions), dtype),
                       values: T.Buffer((pairs, positions, head_dim), dtype), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            flat_values = T.decl_buffer((pairs * positions * head_dim,), dtype, data=values.data)
            if finish is None:
                for bh in T.parallel(pairs):
                    context(p, flat_values, out, bh)
            else:
                total = T.sblock_alloc_buffer((pairs, 1, head_dim), acc)
                for bh in T.parallel(pairs):
                    context(p, flat_values, total, bh)
                    for d in T.vectorized(T.int64(head_dim)):
                        finish(out, total[bh, 0, d], bh, d, [])

    return direct_context


def quantized_scores_kernel(heads: int | None, head_dim: int, qmax: float, eps: float, lanes: int,
                            new_range: tuple[float, float] | None = None, pair: str | None = None) -> tirx.PrimFunc:
    """QK^T with run-time ranges, from the float queries to the float scores: each pair's query quantized per row
    (as :func:`~int8mt.schedules.quantize_rows.quantize_rows_kernel`), its int32 products with the int8 keys, and
    ``float(product) * query_scale * key_scale[t]`` (the dequantization's order). ``heads`` given: the
    self-attention's keys and their scales read through ``index`` (the kernel ``(index, past, x [batch, heads, 1,
    head_dim], rows, new, scale_rows [stored, 1], new_scale [batch, heads, 1, 1], out [batch, heads, 1,
    positions])``); None: keys stored per pair (``(x, keys [batch, heads, positions, head_dim], key_scale [batch,
    heads, 1, positions], out)``).

    ``new_range`` ``(qmax, eps)`` (self-attention only): the new keys come as floats and each pair quantizes its
    own per row first (as :func:`~int8mt.schedules.quantize_rows.quantize_rows_kernel`), giving them to the cache
    too: ``(index, past, x, rows, new_x [batch, heads, 1, head_dim] float32, scale_rows, out, new [.., head_dim]
    int8, new_scale [.., 1])``. ``pair``: as :func:`_row_dot`."""
    batch, positions, stored = (tirx.Var(name, "int64") for name in ("batch", "positions", "stored"))
    count = heads if heads is not None else tirx.Var("heads", "int64")
    pairs = batch * count
    quantize_row = row_quantizer(head_dim, row_lanes(head_dim), qmax, eps)
    lanes = lanes if head_dim % lanes == 0 else 1
    dot = _row_dot(head_dim, "int32", lanes, pair)
    fold = lane_folder(lanes, operator.add)
    q_shape, s_shape = (batch, count, 1, head_dim), (batch, count, 1, positions)

    @T.macro
    def score(out, partial, q, scale, key_scale, bh, t, source, start):  # key_scale: that of position t
        dot(partial, bh, q, source, start)
        fold(partial, bh)
        out[bh * positions + t] = T.Cast("float32", partial[bh, 0]) * scale[bh] * key_scale

    quantize_new = row_quantizer(head_dim, row_lanes(head_dim), *(new_range or (qmax, eps)))

    @T.macro
    def gathered_scores(index, past, x, rows, new_x, new, scale_rows, new_scale, out, quantizing_new):
        """The gathered kernel's body; ``quantizing_new`` (a Python bool): each pair first quantizes its new key
        from ``new_x`` into ``new`` and ``new_scale`` (else ``new_x`` is unused)."""
        with T.sblock("root"):
            flat_x = T.decl_buffer((pairs * head_dim,), "float32", data=x.data)
            flat_rows = T.decl_buffer((stored * head_dim,), "int8", data=rows.data)
            flat_new_x = T.decl_buffer((pairs * head_dim,), "float32", data=new_x.data)
            flat_new = T.decl_buffer((pairs * head_dim,), "int8", data=new.data)
            flat_new_scale = T.decl_buffer((pairs,), "float32", data=new_scale.data)
            flat_out = T.decl_buffer((pairs * positions,), "float32", data=out.data)
            q = T.sblock_alloc_buffer((pairs * head_dim,), "int8")
            scale = T.decl_buffer((pairs,), "float32")
            maxima = T.sblock_alloc_buffer((pairs, row_lanes(head_dim)), "float32")
            partial = T.sblock_alloc_buffer((pairs, lanes), "int32")
            for bh in T.parallel(pairs):
                if quantizing_new:
                    quantize_new(flat_new_x, flat_new, flat_new_scale, maxima, bh)
                quantize_row(flat_x, q, scale, maxima, bh)
                for t in range(positions):
                    if past[bh // heads, 0, t, 0]:
                        row: T.let = index[bh // heads, bh % heads, t]
                        score(flat_out, partial, q, scale, scale_rows[row, 0], bh, t, flat_rows, row * head_dim)
                    else:
                        score(flat_out, partial, q, scale, flat_new_scale[bh], bh, t, flat_new, bh * head_dim)

    if heads is not None and new_range is not None:
        @T.prim_func(s_tir=True)
        def quantized_gathered_scores_quantizing_new(
                index: T.Buffer((batch, heads, positions), "int64"), past: T.Buffer((batch, 1, positions, 1), "bool"),
                x: T.Buffer(q_shape, "float32"), rows: T.Buffer((stored, head_dim), "int8"),
                new_x: T.Buffer((batch, heads, 1, head_dim), "float32"), scale_rows: T.Buffer((stored, 1), "float32"),
                out: T.Buffer(s_shape, "float32"), new: T.Buffer((batch, heads, 1, head_dim), "int8"),
                new_scale: T.Buffer((batch, heads, 1, 1), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            gathered_scores(index, past, x, rows, new_x, new, scale_rows, new_scale, out, True)

        return quantized_gathered_scores_quantizing_new

    if heads is not None:
        @T.prim_func(s_tir=True)
        def quantized_gathered_scores(index: T.Buffer((batch, heads, positions), "int64"),
                                      past: T.Buffer((batch, 1, positions, 1), "bool"),
                                      x: T.Buffer(q_shape, "float32"), rows: T.Buffer((stored, head_dim), "int8"),
                                      new: T.Buffer((batch, heads, 1, head_dim), "int8"),
                                      scale_rows: T.Buffer((stored, 1), "float32"),
                                      new_scale: T.Buffer((batch, heads, 1, 1), "float32"),
                                      out: T.Buffer(s_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            gathered_scores(index, past, x, rows, x, new, scale_rows, new_scale, out, False)

        return quantized_gathered_scores

    @T.prim_func(s_tir=True)
    def quantized_direct_scores(x: T.Buffer(q_shape, "float32"),
                                keys: T.Buffer((batch, count, positions, head_dim), "int8"),
                                key_scale: T.Buffer(s_shape, "float32"), out: T.Buffer(s_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            flat_x = T.decl_buffer((pairs * head_dim,), "float32", data=x.data)
            flat_keys = T.decl_buffer((pairs * positions * head_dim,), "int8", data=keys.data)
            flat_scale = T.decl_buffer((pairs * positions,), "float32", data=key_scale.data)
            flat_out = T.decl_buffer((pairs * positions,), "float32", data=out.data)
            q = T.sblock_alloc_buffer((pairs * head_dim,), "int8")
            scale = T.decl_buffer((pairs,), "float32")
            maxima = T.sblock_alloc_buffer((pairs, row_lanes(head_dim)), "float32")
            partial = T.sblock_alloc_buffer((pairs, lanes), "int32")
            for bh in T.parallel(pairs):
                quantize_row(flat_x, q, scale, maxima, bh)
                for t in range(positions):
                    score(flat_out, partial, q, scale, flat_scale[bh * positions + t], bh, t, flat_keys,
                          (bh * positions + t) * head_dim)

    return quantized_direct_scores


def quantized_context_kernel(heads: int | None, head_dim: int, qmax: float, eps: float,
                             new_range: tuple[float, float] | None = None,
                             row_range: tuple[float, float] | None = None) -> tirx.PrimFunc:
    """softmax·V with run-time ranges, from the float probabilities (times the values' scales) to the float
    context: each pair's row of probabilities quantized per row, its int32 products with the int8 values
    summed over the positions in order, and ``float(sum) * row_scale``. ``heads`` given: the values and their
    scales read through ``index``, the probabilities before the scales are folded in (the kernel ``(index, past,
    p [batch, heads, 1, positions], rows, new, scale_rows [stored, 1], new_scale [batch, heads, 1, 1], out
    [batch, heads, 1, head_dim])``); None: stored per pair, the scales folded in (``(p, values [batch, heads,
    positions, head_dim], out)``).

    ``new_range`` ``(qmax, eps)`` (``heads`` given): the new values come as floats, each pair quantizing its own
    first, as :func:`quantized_scores_kernel` does the new keys (``(index, past, p, rows, new_x, scale_rows, out,
    new, new_scale)``).

    ``row_range`` ``(qmax, eps)`` (with ``new_range`` if ``heads`` is given): the context is not returned but
    quantized per row of the heads side by side (the output projection's run-time quantization, as
    :func:`~int8mt.schedules.quantize_rows.quantize_rows_kernel`): ``out`` becomes ``q [batch, 1, heads *
    head_dim]`` int8 and ``s [batch, 1, 1]``; the batch rows run in parallel, each its heads in turn."""
    batch, positions, stored = (tirx.Var(name, "int64") for name in ("batch", "positions", "stored"))
    count = heads if heads is not None else tirx.Var("heads", "int64")
    pairs = batch * count
    quantize_folded = row_quantizer(positions, 1, qmax, eps)  # one lane after the fold loop: 8 measured slower there
    quantize_row = row_quantizer(positions, row_lanes(None), qmax, eps)
    p_shape, out_shape = (batch, count, 1, positions), (batch, count, 1, head_dim)
    row_shape, row_scale_shape = (batch, 1, count * head_dim), (batch, 1, 1)

    @T.macro
    def weigh(total, p, bh, t, source, start):
        for d in T.vectorized(T.int64(head_dim)):
            total[bh, d] = total[bh, d] + T.Cast("int32", p[bh * positions + t]) * T.Cast("int32", source[start + d])

    @T.macro
    def fold(folded, p, scale_rows, new_scale, index, past, bh):  # p[t] * the scale of value t, as the graph's multiply
        for t in range(positions):
            if past[bh // heads, 0, t, 0]:
                folded[bh * positions + t] = p[bh * positions + t] * scale_rows[index[bh // heads, bh % heads, t], 0]
            else:
                folded[bh * positions + t] = p[bh * positions + t] * new_scale[bh]

    @T.macro
    def dequantize(out, total, scale, bh):
        for d in T.vectorized(T.int64(head_dim)):
            out[bh * head_dim + d] = T.Cast("float32", total[bh, d]) * scale[bh]

    @T.macro
    def gathered_context(index, past, flat_x, flat_rows, flat_new, scale_rows, flat_new_scale, flat_out, folded, p,
                         scale, maxima, total, bh):
        fold(folded, flat_x, scale_rows, flat_new_scale, index, past, bh)
        quantize_folded(folded, p, scale, maxima, bh)
        for d in T.vectorized(T.int64(head_dim)):
            total[bh, d] = 0
        for t in range(positions):
            if past[bh // heads, 0, t, 0]:
                weigh(total, p, bh, t, flat_rows, index[bh // heads, bh % heads, t] * head_dim)
            else:
                weigh(total, p, bh, t, flat_new, bh * head_dim)
        dequantize(flat_out, total, scale, bh)

    @T.macro
    def direct_context(flat_x, flat_values, flat_out, p, scale, maxima, total, bh):
        quantize_row(flat_x, p, scale, maxima, bh)
        for d in T.vectorized(T.int64(head_dim)):
            total[bh, d] = 0
        for t in range(positions):
            weigh(total, p, bh, t, flat_values, (bh * positions + t) * head_dim)
        dequantize(flat_out, total, scale, bh)

    if row_range is not None and heads is not None and new_range is None:
        raise ValueError("a gathered context quantized per row also quantizes the new values (new_range)")
    if new_range is not None and heads is None:
        raise ValueError("new values are quantized only by the gathered context (heads given)")
    quantize_out_row = row_quantizer(count * head_dim, row_lanes(head_dim), *(row_range or (qmax, eps)))
    quantize_new = row_quantizer(head_dim, row_lanes(head_dim), *(new_range or (qmax, eps)))

    @T.macro
    def quantize_heads_row(context, q, s, row_maxima, b):  # batch row b of the context, its heads side by side
        flat_q = T.decl_buffer((pairs * head_dim,), "int8", data=q.data)
        flat_s = T.decl_buffer((batch,), "float32", data=s.data)
        quantize_out_row(context, flat_q, flat_s, row_maxima, b)

    @T.macro
    def gathered_body(index, past, x, rows, new_x, new, scale_rows, new_scale, out, q, s, quantizing_new,
                      quantizing_rows):
        """The gathered kernel's body; ``quantizing_new`` and ``quantizing_rows`` (Python bools) as the kernel's
        ``new_range`` and ``row_range``; the buffers a variant lacks are None (``new_x``: unused without)."""
        with T.sblock("root"):
            flat_x = T.decl_buffer((pairs * positions,), "float32", data=x.data)
            flat_rows = T.decl_buffer((stored * head_dim,), "int8", data=rows.data)
            flat_new_x = T.decl_buffer((pairs * head_dim,), "float32", data=new_x.data)
            flat_new = T.decl_buffer((pairs * head_dim,), "int8", data=new.data)
            flat_new_scale = T.decl_buffer((pairs,), "float32", data=new_scale.data)
            folded = T.decl_buffer((pairs * positions,), "float32")
            p = T.decl_buffer((pairs * positions,), "int8")
            scale = T.decl_buffer((pairs,), "float32")
            maxima = T.sblock_alloc_buffer((pairs, 1), "float32")
            new_maxima = T.sblock_alloc_buffer((pairs, row_lanes(head_dim)), "float32")
            total = T.sblock_alloc_buffer((pairs, head_dim), "int32")
            if quantizing_rows:
                context = T.decl_buffer((pairs * head_dim,), "float32")
                row_maxima = T.sblock_alloc_buffer((batch, row_lanes(head_dim)), "float32")
                for b in T.parallel(batch):
                    for h in range(heads):
                        quantize_new(flat_new_x, flat_new, flat_new_scale, new_maxima, b * heads + h)
                        gathered_context(index, past, flat_x, flat_rows, flat_new, scale_rows, flat_new_scale,
                                         context, folded, p, scale, maxima, total, b * heads + h)
                    quantize_heads_row(context, q, s, row_maxima, b)
            else:
                flat_out = T.decl_buffer((pairs * head_dim,), "float32", data=out.data)
                for bh in T.parallel(pairs):
                    if quantizing_new:
                        quantize_new(flat_new_x, flat_new, flat_new_scale, new_maxima, bh)
                    gathered_context(index, past, flat_x, flat_rows, flat_new, scale_rows, flat_new_scale, flat_out,
                                     folded, p, scale, maxima, total, bh)

    @T.macro
    def direct_body(x, values, out, q, s, quantizing_rows):
        """The direct kernel's body; ``quantizing_rows`` (a Python bool) as the kernel's ``row_range``."""
        with T.sblock("root"):
            flat_x = T.decl_buffer((pairs * positions,), "float32", data=x.data)
            flat_values = T.decl_buffer((pairs * positions * head_dim,), "int8", data=values.data)
            p = T.decl_buffer((pairs * positions,), "int8")
            scale = T.decl_buffer((pairs,), "float32")
            maxima = T.sblock_alloc_buffer((pairs, row_lanes(None)), "float32")
            total = T.sblock_alloc_buffer((pairs, head_dim), "int32")
            if quantizing_rows:
                context = T.decl_buffer((pairs * head_dim,), "float32")
                row_maxima = T.sblock_alloc_buffer((batch, row_lanes(head_dim)), "float32")
                for b in T.parallel(batch):
                    for h in range(count):
                        direct_context(flat_x, flat_values, context, p, scale, maxima, total, b * count + h)
                    quantize_heads_row(context, q, s, row_maxima, b)
            else:
                flat_out = T.decl_buffer((pairs * head_dim,), "float32", data=out.data)
                for bh in T.parallel(pairs):
                    direct_context(flat_x, flat_values, flat_out, p, scale, maxima, total, bh)

    index_shape, past_shape, rows_shape, scale_rows_shape = ((batch, heads, positions), (batch, 1, positions, 1),
                                                             (stored, head_dim), (stored, 1))
    new_shape, new_scale_shape = (batch, count, 1, head_dim), (batch, count, 1, 1)
    if heads is not None and row_range is not None:
        @T.prim_func(s_tir=True)
        def quantized_gathered_context_quantizing_rows(
                index: T.Buffer(index_shape, "int64"), past: T.Buffer(past_shape, "bool"),
                x: T.Buffer(p_shape, "float32"), rows: T.Buffer(rows_shape, "int8"),
                new_x: T.Buffer(new_shape, "float32"), scale_rows: T.Buffer(scale_rows_shape, "float32"),
                q: T.Buffer(row_shape, "int8"), s: T.Buffer(row_scale_shape, "float32"),
                new: T.Buffer(new_shape, "int8"), new_scale: T.Buffer(new_scale_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            gathered_body(index, past, x, rows, new_x, new, scale_rows, new_scale, None, q, s, True, True)

        return quantized_gathered_context_quantizing_rows

    if heads is not None and new_range is not None:
        @T.prim_func(s_tir=True)
        def quantized_gathered_context_quantizing_new(
                index: T.Buffer(index_shape, "int64"), past: T.Buffer(past_shape, "bool"),
                x: T.Buffer(p_shape, "float32"), rows: T.Buffer(rows_shape, "int8"),
                new_x: T.Buffer(new_shape, "float32"), scale_rows: T.Buffer(scale_rows_shape, "float32"),
                out: T.Buffer(out_shape, "float32"), new: T.Buffer(new_shape, "int8"),
                new_scale: T.Buffer(new_scale_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            gathered_body(index, past, x, rows, new_x, new, scale_rows, new_scale, out, None, None, True, False)

        return quantized_gathered_context_quantizing_new

    if heads is not None:
        @T.prim_func(s_tir=True)
        def quantized_gathered_context(index: T.Buffer(index_shape, "int64"), past: T.Buffer(past_shape, "bool"),
                                       x: T.Buffer(p_shape, "float32"), rows: T.Buffer(rows_shape, "int8"),
                                       new: T.Buffer(new_shape, "int8"),
                                       scale_rows: T.Buffer(scale_rows_shape, "float32"),
                                       new_scale: T.Buffer(new_scale_shape, "float32"),
                                       out: T.Buffer(out_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            gathered_body(index, past, x, rows, out, new, scale_rows, new_scale, out, None, None, False, False)

        return quantized_gathered_context

    if row_range is not None:
        @T.prim_func(s_tir=True)
        def quantized_direct_context_quantizing_rows(x: T.Buffer(p_shape, "float32"),
                                                     values: T.Buffer((batch, count, positions, head_dim), "int8"),
                                                     q: T.Buffer(row_shape, "int8"),
                                                     s: T.Buffer(row_scale_shape, "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            direct_body(x, values, None, q, s, True)

        return quantized_direct_context_quantizing_rows

    @T.prim_func(s_tir=True)
    def quantized_direct_context(x: T.Buffer(p_shape, "float32"),
                                 values: T.Buffer((batch, count, positions, head_dim), "int8"),
                                 out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        direct_body(x, values, out, None, None, False)

    return quantized_direct_context
