"""FoldDenseBias: a constant bias added to a dense kernel's result (directly or through a reshape; int32 sums,
or float32 ones of the float kernel) is folded into the kernel's correction; other adds are left alone."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import FoldDenseBias
from int8mt.schedules.int8_dense import default_tiles

from ._modules import DOT, FLOAT_DOT, dense_kernel, float_weight, function, packed, weight

W = weight(32, 16)
BIAS = np.arange(32, dtype=np.int32) - 7


def _module(bias: relax.Expr | None, folded: np.ndarray | None = None, through_reshape: bool = False,
            dot=DOT, w: np.ndarray = W) -> tvm.IRModule:
    """x [3, 5, 16] -> the dense kernel (correction + ``folded``) [15, 32] -> reshape if asked -> + ``bias``."""
    bb = relax.BlockBuilder()
    kernel = dense_kernel(bb, 32, 16, default_tiles(32, 16, dot), dot)
    x = relax.Var("x", relax.TensorType([3, 5, 16], dot.weight))

    def body(bb, x):
        flat = bb.emit(relax.op.reshape(x, [15, 16]))
        out = relax.call_tir(kernel, [flat, *packed(w, dot, bias=folded)], relax.TensorType([15, 32], dot.accumulator))
        if through_reshape:
            out = relax.op.reshape(bb.emit(out), [3, 5, 32])
        return out if bias is None else relax.op.add(bb.emit(out), bias)

    return function(bb, [x], body)


def test_bias_is_folded_into_the_correction():
    before = _module(relax.const(BIAS))
    tvm.ir.assert_structural_equal(FoldDenseBias()(before), _module(None, folded=BIAS))


def test_bias_after_a_reshape_is_folded_too():
    before = _module(relax.const(BIAS.reshape(1, 1, 32)), through_reshape=True)
    tvm.ir.assert_structural_equal(FoldDenseBias()(before), _module(None, folded=BIAS, through_reshape=True))


def test_float_bias_is_folded_into_the_float_kernel():
    wf, bias = float_weight(32, 16), np.linspace(-1, 1, 32, dtype=np.float32)
    before = _module(relax.const(bias), dot=FLOAT_DOT, w=wf)
    tvm.ir.assert_structural_equal(FoldDenseBias()(before), _module(None, folded=bias, dot=FLOAT_DOT, w=wf))


def test_must_not_fire_on_other_addends():
    for addend in (relax.const(np.ones((15, 32), np.int32)),  # varies by row: not a bias
                   relax.const(np.ones((15, 1), np.int32))):  # per row, not per column
        before = _module(addend)
        tvm.ir.assert_structural_equal(FoldDenseBias()(before), before)
