"""ReuseShapes: a function's repeated ``make_shape`` calls (same heap, same arguments) become the first one's shape;
shapes made in a branch stay in it; a whole pipeline makes each run-time shape once and computes the same."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from int8mt.compiler.passes import ReuseShapes
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


@I.ir_module
class Before:
    @R.function(pure=False)
    def main(heap: R.Tensor((4,), "int64"), flag: R.Tensor((), "bool")):
        a = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 0, 0, 8, ty_args=(R.Shape(ndim=2),))
        b = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 1, 0, 8, ty_args=(R.Shape(ndim=2),))
        c = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 0, 0, 8, ty_args=(R.Shape(ndim=2),))
        if flag:
            d = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 0, 0, 8, ty_args=(R.Shape(ndim=2),))
            e = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
            f = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
            g = R.call_packed("test.use", d, e, f, ty_args=(R.Object,))
            r = e
        else:
            r = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
        h = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
        out = R.call_packed("test.use", a, b, c, r, h, ty_args=(R.Object,))
        return out


@I.ir_module
class Expected:
    @R.function(pure=False)
    def main(heap: R.Tensor((4,), "int64"), flag: R.Tensor((), "bool")):
        a = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 0, 0, 8, ty_args=(R.Shape(ndim=2),))
        b = R.call_packed("vm.builtin.make_shape", heap, 2, 1, 1, 0, 8, ty_args=(R.Shape(ndim=2),))
        if flag:
            e = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
            g = R.call_packed("test.use", a, e, e, ty_args=(R.Object,))
            r = e
        else:
            r = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
        h = R.call_packed("vm.builtin.make_shape", heap, 1, 1, 2, ty_args=(R.Shape(ndim=1),))
        out = R.call_packed("test.use", a, b, a, r, h, ty_args=(R.Object,))
        return out


def test_repeated_shapes_are_made_once_per_scope():
    tvm.ir.assert_structural_equal(ReuseShapes()(Before)["main"], Expected["main"])


def _three() -> tvm.IRModule:
    """``main(x [n, 8])``: three results of ``x``'s run-time shape, all returned (each its own allocation)."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            e = bb.emit(relax.op.exp(x))
            s = bb.emit(relax.op.add(e, x))
            out = bb.emit_output(relax.Tuple([e, s, bb.emit(relax.op.multiply(s, x))]))
        bb.emit_func_output(out)
    return bb.get()


def test_a_pipeline_makes_each_run_time_shape_once_and_computes_the_same():
    lowered = relax_pipeline(TARGET)(_three())
    shapes = [line.split("make_shape", 1)[1] for line in lowered["main"].script().splitlines() if "make_shape" in line]
    assert shapes and len(shapes) == len(set(shapes))
    vm = relax.VirtualMachine(tvm.compile(_three(), TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    for rows in (1, 5):
        x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        e = np.exp(x)
        for got, expected in zip(vm["main"](tvm.runtime.tensor(x)), (e, e + x, (e + x) * x)):
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
