"""PackDense: a linear layer with a constant int8 weight becomes a call of the packed dense kernel (rows
flattened, weight packed at compile time, tiles from ``tiles_for``), and with a float32 multiply-add family a
float32 linear layer the float kernel; other matmuls are left alone."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import PackDense
from int8mt.compiler.passes.kernel_calls import kernel_kind
from int8mt.schedules.int8_dense import default_tiles, dense_attrs

from ._modules import DOT, FLOAT_DOT, dense_kernel, float_weight, function, packed, tiles_for, weight

W = weight(32, 16)


def _x() -> relax.Var:
    b, t = (tvm.tirx.Var(v, "int64") for v in "bt")
    return relax.Var("x", relax.TensorType([b, t, 16], "int8"))


def test_linear_layer_becomes_the_packed_kernel():
    x = _x()
    before = function(relax.BlockBuilder(), [x], lambda bb, x: relax.op.matmul(
        x, bb.emit(relax.op.permute_dims(relax.const(W), [1, 0])), out_dtype="int32"))

    bb = relax.BlockBuilder()
    kernel = dense_kernel(bb, 32, 16, default_tiles(32, 16, DOT))
    x = _x()
    b, t, _ = x.ty.shape

    def body(bb, x):
        flat = bb.emit(relax.op.reshape(x, [b * t, 16]))
        out = bb.emit(relax.call_tir(kernel, [flat, *packed(W)], relax.TensorType([b * t, 32], "int32")))
        return relax.op.reshape(out, [b, t, 32])

    expected = function(bb, [x], body)
    after = PackDense(tiles_for(), DOT)(before)
    tvm.ir.assert_structural_equal(after, expected)
    n, k, tiles, family = dense_attrs(after[kernel.name_hint])  # what later passes and the report read
    assert (n, k, tiles, family) == (32, 16, default_tiles(32, 16, DOT), "vnni")


def test_a_kxn_weight_is_packed_transposed():
    x = relax.Var("x", relax.TensorType([5, 16], "int8"))
    before = function(relax.BlockBuilder(), [x], lambda bb, x: relax.op.matmul(
        x, relax.const(np.ascontiguousarray(W.T)), out_dtype="int32"))
    bb = relax.BlockBuilder()
    kernel = dense_kernel(bb, 32, 16, default_tiles(32, 16, DOT))
    x = relax.Var("x", relax.TensorType([5, 16], "int8"))
    expected = function(bb, [x], lambda bb, x: relax.call_tir(kernel, [x, *packed(W)], relax.TensorType([5, 32], "int32")))
    tvm.ir.assert_structural_equal(PackDense(tiles_for(), DOT)(before), expected)


def test_must_not_fire_on_activations_float_matmuls_or_int8_outputs():
    a = relax.Var("a", relax.TensorType([4, 16], "int8"))
    b = relax.Var("b", relax.TensorType([16, 8], "int8"))
    f = relax.Var("f", relax.TensorType([4, 16], "float32"))

    def body(bb, a, b, f):
        two_activations = bb.emit(relax.op.matmul(a, b, out_dtype="int32"))
        floats = bb.emit(relax.op.matmul(f, relax.const(W.T.astype(np.float32))))
        return relax.Tuple([two_activations, floats])

    before = function(relax.BlockBuilder(), [a, b, f], body)
    tvm.ir.assert_structural_equal(PackDense(tiles_for(), DOT)(before), before)


def test_float_linear_layer_becomes_the_float_kernel():
    wf = float_weight(32, 16)
    x = relax.Var("x", relax.TensorType([5, 16], "float32"))
    before = function(relax.BlockBuilder(), [x], lambda bb, x: relax.op.matmul(
        x, bb.emit(relax.op.permute_dims(relax.const(wf), [1, 0])), out_dtype="float32"))
    bb = relax.BlockBuilder()
    kernel = dense_kernel(bb, 32, 16, default_tiles(32, 16, FLOAT_DOT), FLOAT_DOT)
    x = relax.Var("x", relax.TensorType([5, 16], "float32"))
    expected = function(bb, [x], lambda bb, x: relax.call_tir(kernel, [x, *packed(wf, FLOAT_DOT)],
                                                               relax.TensorType([5, 32], "float32")))
    after = PackDense(tiles_for(FLOAT_DOT), FLOAT_DOT)(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert kernel_kind(after, after.get_global_var(kernel.name_hint)) == "float_dense"  # not an int8 kernel
    assert dense_attrs(after[kernel.name_hint])[3] == "fp32-avx2"


def test_float_packing_leaves_integer_and_activation_matmuls():
    a = relax.Var("a", relax.TensorType([4, 16], "int8"))
    f = relax.Var("f", relax.TensorType([4, 16], "float32"))
    g = relax.Var("g", relax.TensorType([16, 8], "float32"))

    def body(bb, a, f, g):
        integers = bb.emit(relax.op.matmul(a, relax.const(np.ascontiguousarray(W.T)), out_dtype="int32"))
        two_activations = bb.emit(relax.op.matmul(f, g))
        return relax.Tuple([integers, two_activations])

    before = function(relax.BlockBuilder(), [a, f, g], body)
    tvm.ir.assert_structural_equal(PackDense(tiles_for(FLOAT_DOT), FLOAT_DOT)(before), before)
