"""ReuseTensors: a later allocation of the same tensor as a dead one (same storage, offset, shape, dtype) takes that
tensor, the kills between them go and the last one's stays; other allocations and branches are left alone; a
whole pipeline allocates each tensor once and computes the same."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from int8mt.compiler.passes import ReuseTensors
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


@I.ir_module
class Before:
    @R.function(pure=False)
    def main(x: R.Tensor((2, 4), "float32"), flag: R.Tensor((), "bool")):
        storage = R.vm.alloc_storage(R.shape([32]), 0, R.dtype("uint8"), R.str("global"))
        a = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
        u = R.call_packed("test.fill", x, a, ty_args=(R.Object,))
        R.vm.kill_object(a)
        b = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
        v = R.call_packed("test.fill", x, b, ty_args=(R.Object,))
        R.vm.kill_object(b)
        c = R.vm.alloc_tensor(storage, 0, R.shape([8]), R.dtype("float32"), 0)
        w = R.call_packed("test.fill", x, c, ty_args=(R.Object,))
        R.vm.kill_object(c)
        if flag:
            d = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
            r = R.call_packed("test.fill", x, d, ty_args=(R.Object,))
        else:
            r = R.call_packed("test.fill", x, x, ty_args=(R.Object,))
        e = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
        out = R.call_packed("test.fill", r, e, ty_args=(R.Object,))
        R.vm.kill_object(e)
        return out


@I.ir_module
class Expected:
    @R.function(pure=False)
    def main(x: R.Tensor((2, 4), "float32"), flag: R.Tensor((), "bool")):
        storage = R.vm.alloc_storage(R.shape([32]), 0, R.dtype("uint8"), R.str("global"))
        a = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
        u = R.call_packed("test.fill", x, a, ty_args=(R.Object,))
        v = R.call_packed("test.fill", x, a, ty_args=(R.Object,))
        c = R.vm.alloc_tensor(storage, 0, R.shape([8]), R.dtype("float32"), 0)
        w = R.call_packed("test.fill", x, c, ty_args=(R.Object,))
        R.vm.kill_object(c)
        if flag:
            d = R.vm.alloc_tensor(storage, 0, R.shape([2, 4]), R.dtype("float32"), 0)
            r = R.call_packed("test.fill", x, d, ty_args=(R.Object,))
        else:
            r = R.call_packed("test.fill", x, x, ty_args=(R.Object,))
        out = R.call_packed("test.fill", r, a, ty_args=(R.Object,))
        R.vm.kill_object(a)
        return out


def test_a_dead_tensor_allocated_again_is_reused():
    tvm.ir.assert_structural_equal(ReuseTensors()(Before)["main"], Expected["main"])


WEIGHT = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 3


def _chain() -> tvm.IRModule:
    """``main(x [n, 8])``: four products with an 8 x 8 matrix in a row (separate kernels, the first and third
    results in the same storage), the last one returned."""
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for _ in range(3):
                y = bb.emit(relax.op.matmul(y, relax.const(WEIGHT)))
            out = bb.emit_output(relax.op.matmul(y, relax.const(WEIGHT)))
        bb.emit_func_output(out)
    return bb.get()


def test_a_pipeline_allocates_each_tensor_once_and_computes_the_same():
    lowered = relax_pipeline(TARGET)(_chain())["main"].script().splitlines()
    allocations = [line.split("alloc_tensor", 1)[1] for line in lowered if "alloc_tensor(" in line]
    assert len(allocations) == 3 and len(set(allocations)) == 3  # (the first and third product's tensor, once)
    vm = relax.VirtualMachine(tvm.compile(_chain(), TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    for rows in (1, 5):
        x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
        expected = x @ WEIGHT @ WEIGHT @ WEIGHT @ WEIGHT
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-6)
