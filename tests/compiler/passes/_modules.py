"""Small Relax modules the kernel passes' tests share (built with the BlockBuilder where the Expected side holds
our scheduled kernels and packed constants)."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I, relax as R, tirx as T

from int8mt.schedules.int8_dense import DenseTiles, default_tiles, dense_kind, pack_weight, scheduled_int8_dense
from int8mt.schedules.intrin import Int8Dot, dense_dot, int8_dot

DOT = int8_dot("vnni")  # rewriting needs no VNNI CPU
FLOAT_DOT = dense_dot("fp32-avx2")  # the float32 multiply-adds of FP32 layers
RNG = np.random.default_rng(0)


def weight(n: int, k: int) -> np.ndarray:
    return RNG.integers(-127, 128, (n, k), dtype=np.int8)


def float_weight(n: int, k: int) -> np.ndarray:
    return RNG.standard_normal((n, k)).astype(np.float32)


def tiles_for(dot: Int8Dot = DOT):
    return lambda n, k, function: default_tiles(n, k, dot)


def dense_kernel(bb: relax.BlockBuilder, n: int, k: int, tiles: DenseTiles, dot: Int8Dot = DOT) -> tvm.ir.GlobalVar:
    """The dense kernel PackDense adds for an [n, k] weight, under the name it gives it."""
    name = f"{dense_kind(dot)}_n{n}_k{k}_r{tiles.rows}c{tiles.cols}d{tiles.depth}"
    return bb.add_func(scheduled_int8_dense(n, k, tiles, dot).without_attr("global_symbol"), name)


def packed(w: np.ndarray, dot: Int8Dot = DOT, bias: np.ndarray | None = None) -> tuple[relax.Expr, relax.Expr]:
    """The packed weight and correction constants (the bias folded into the correction)."""
    table, correction = pack_weight(w, dot)
    if bias is not None:
        correction = correction.copy()
        correction[:len(bias)] += bias
    return relax.const(table), relax.const(correction)


def function(bb: relax.BlockBuilder, params: list[relax.Var], body) -> tvm.IRModule:
    """``main(params)`` whose dataflow block ``body(bb, *params)`` fills; it returns the output value."""
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def self_attention_module(softmax_used_twice: bool = False) -> tvm.IRModule:
    """A static-range self-attention of a decoder step as the model's graph has it after phase 2's GPU passes: 2
    heads of 8, keys and values gathered from rows (the row of head h of position j: ``history[:, j] * 2 + h``,
    past where ``history[:, j] > 0``) and the step's own, scaled scores, softmax, quantized probabilities, the
    context requantized and merged into [b, 1, 16]."""
    @I.ir_module
    class Module:
        @R.function
        def main(q: R.Tensor(("b", 2, 1, 8), "int8"), rows_k: R.Tensor(("r", 8), "int8"),
                 rows_v: R.Tensor(("r", 8), "int8"), history: R.Tensor(("b", "t"), "int64"),
                 new_k: R.Tensor(("b", 2, 1, 8), "int8"), new_v: R.Tensor(("b", 2, 1, 8), "int8")):
            b, t = T.int64(), T.int64()
            with R.dataflow():
                index = R.add(R.multiply(R.expand_dims(history, axis=[1]), R.const(2, "int64")),
                              R.expand_dims(R.expand_dims(R.arange(0, 2, 1, dtype="int64"), axis=[0]), axis=[2]))
                past = R.expand_dims(R.expand_dims(R.greater(history, R.const(0, "int64")), axis=[1]), axis=[3])
                keys = R.where(past, R.take(rows_k, index, axis=0), new_k)
                values = R.where(past, R.take(rows_v, index, axis=0), new_v)
                q3 = R.reshape(q, R.shape([b * 2, 1, 8]))
                k3 = R.reshape(keys, R.shape([b * 2, t, 8]))
                s = R.matmul(q3, R.permute_dims(k3, [0, 2, 1]), out_dtype="int32")
                f = R.multiply(R.astype(s, "float32"), R.const(0.0001, "float32"))
                f4 = R.reshape(f, R.shape([b, 2, 1, t]))
                p = R.nn.softmax(f4, axis=-1)
                pq = R.quantize(R.clip(p, -1.0, 1.0), R.const(0.0078125, "float32"), R.const(0, "int8"),
                                out_dtype="int8", axis=-1)
                p3 = R.reshape(pq, R.shape([b * 2, 1, t]))
                v3 = R.reshape(values, R.shape([b * 2, t, 8]))
                c = R.matmul(p3, v3, out_dtype="int32")
                o = R.astype(R.clip(R.right_shift(R.multiply(R.astype(c, "int64"), R.const(1, "int64")),
                                                  R.const(7, "int64")), -127, 127), "int8")
                out = R.reshape(o, R.shape([b, 1, 16]))
                R.output(out, p)
            return (out, p) if softmax_used_twice else out

    return Module


def cross_attention_module() -> tvm.IRModule:
    """A cross-attention of a decoder step: keys and values as stored (no gather), the mask made from the source's
    padding (-1e9 where ``src`` is 0), broadcast over the heads and added to the scores before the softmax."""
    @I.ir_module
    class Module:
        @R.function
        def main(q: R.Tensor(("b", 2, 1, 8), "int8"), keys: R.Tensor(("b", 2, "s", 8), "int8"),
                 values: R.Tensor(("b", 2, "s", 8), "int8"), src: R.Tensor(("b", "s"), "int64")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                padding = R.astype(R.equal(src, R.const(0, "int64")), "float32")
                mask = R.multiply(R.expand_dims(R.expand_dims(padding, axis=[1]), axis=[2]),
                                  R.const(-1000000000.0, "float32"))
                q3 = R.reshape(q, R.shape([b * 2, 1, 8]))
                k3 = R.reshape(keys, R.shape([b * 2, s, 8]))
                scores = R.matmul(q3, R.permute_dims(k3, [0, 2, 1]), out_dtype="int32")
                heads_mask = R.broadcast_to(mask, R.shape([b, 2, 1, s]))
                flat_mask = R.reshape(heads_mask, R.shape([b * 2, 1, s]))
                f = R.add(R.multiply(R.astype(scores, "float32"), R.const(0.0001, "float32")), flat_mask)
                p = R.nn.softmax(R.reshape(f, R.shape([b, 2, 1, s])), axis=-1)
                pq = R.reshape(R.quantize(p, R.const(0.0078125, "float32"), R.const(0, "int8"), out_dtype="int8",
                                          axis=-1), R.shape([b * 2, 1, s]))
                c = R.matmul(pq, R.reshape(values, R.shape([b * 2, s, 8])), out_dtype="int32")
                o = R.astype(R.clip(R.right_shift(R.astype(c, "int64"), R.const(7, "int64")), -127, 127), "int8")
                out = R.reshape(o, R.shape([b, 1, 16]))
                R.output(out)
            return out

    return Module


def runtime_self_attention_module(query_read_elsewhere: bool = False) -> tvm.IRModule:
    """A self-attention of a decoder step with run-time ranges, as phase 2's GPU passes leave it: the query, the
    step's key and its value quantized per head by the row-quantizing function (the cache's appends quantize the
    key and value themselves: :class:`~int8mt.compiler.passes.AppendQuantizedRows`), the keys' and values' int8
    rows and scales gathered from the cache (the step's own where a position is not past), the probabilities scaled
    by the values' scales ([b, 2, t, 1], an axis of size 1 moved) and quantized per row by the row-quantizing
    function, the context dequantized by those rows' scales. With ``query_read_elsewhere`` the query's scales are
    also a result of the function."""
    from int8mt.schedules.cuda_rows import quantize_rows_function

    b, t, r = (tvm.tirx.Var(n, "int64") for n in "btr")
    bb = relax.BlockBuilder()
    quantize = bb.add_func(quantize_rows_function(4, None, 127.0, 1e-8).without_attr("global_symbol"), "quantize_rows")
    names = {"query": ([b, 2, 1, 8], "float32"), "key": ([b, 2, 1, 8], "float32"), "value": ([b, 2, 1, 8], "float32"),
             "rows_k": ([r, 8], "int8"), "rows_v": ([r, 8], "int8"), "scales_k": ([r, 1], "float32"),
             "scales_v": ([r, 1], "float32"), "index": ([b, 2, t], "int64"), "past": ([b, 1, t, 1], "bool")}
    params = {n: relax.Var(n, relax.TensorType(shape, dtype)) for n, (shape, dtype) in names.items()}
    p = params
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            def gathered(rows, new):
                return bb.emit(relax.op.where(p["past"], bb.emit(relax.op.take(rows, p["index"], axis=0)), new))

            def quantized(x):
                parts = bb.emit(relax.call_tir(quantize, [x], [relax.TensorType([b, 2, 1, 8], "int8"),
                                                                relax.TensorType([b, 2, 1, 1], "float32")]))
                return [bb.emit(relax.TupleGetItem(parts, i)) for i in range(2)]

            (q, q_scale), (new_k, new_scale_k), (new_v, new_scale_v) = (quantized(p[n]) for n in ("query", "key",
                                                                                                 "value"))
            keys, key_scales = gathered(p["rows_k"], new_k), gathered(p["scales_k"], new_scale_k)
            values, value_scales = gathered(p["rows_v"], new_v), gathered(p["scales_v"], new_scale_v)
            q3 = bb.emit(relax.op.reshape(q, [b * 2, 1, 8]))
            k3 = bb.emit(relax.op.reshape(keys, [b * 2, t, 8]))
            s = bb.emit(relax.op.matmul(q3, bb.emit(relax.op.permute_dims(k3, [0, 2, 1])), out_dtype="int32"))
            f = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(s, "float32")),
                                          bb.emit(relax.op.reshape(q_scale, [b * 2, 1, 1]))))
            f = bb.emit(relax.op.multiply(f, bb.emit(relax.op.reshape(key_scales, [b * 2, 1, t]))))
            probabilities = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.reshape(f, [b, 2, 1, t])), axis=-1))
            weighted = bb.emit(relax.op.multiply(bb.emit(relax.op.reshape(probabilities, [b, 2, t, 1])),
                                                 value_scales))
            rows = bb.emit(relax.call_tir(quantize, [bb.emit(relax.op.reshape(weighted, [b, 2, 1, t]))],
                                          [relax.TensorType([b, 2, 1, t], "int8"),
                                           relax.TensorType([b, 2, 1, 1], "float32")]))
            pq = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(rows, 0)), [b * 2, 1, t]))
            c = bb.emit(relax.op.matmul(pq, bb.emit(relax.op.reshape(values, [b * 2, t, 8])), out_dtype="int32"))
            row_scale = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(rows, 1)), [b * 2, 1, 1]))
            context = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(c, "float32")), row_scale))
            out = bb.emit(relax.op.reshape(context, [b, 1, 16]))
            out = bb.emit_output(relax.Tuple([out, q_scale]) if query_read_elsewhere else out)
        bb.emit_func_output(out)
    return bb.get()
