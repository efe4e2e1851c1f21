"""Small Relax modules the kernel passes' tests share (built with the BlockBuilder, since the Expected side
holds our scheduled kernels and packed constants)."""
import numpy as np
import tvm
from tvm import relax

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
