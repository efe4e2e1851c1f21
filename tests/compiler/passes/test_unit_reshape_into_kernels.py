"""UnitReshapeIntoKernels: a kernel called through a reshape that only adds or drops axes of size 1 reads the
tensor itself (structure: the parameter in the tensor's shape, the old buffer declared over it; a chain of
reshapes followed back; a merge of axes left alone), and the values are the same."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import UnitReshapeIntoKernels
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def double(x_handle: T.handle, y_handle: T.handle):
        m = T.int64()
        x = T.match_buffer(x_handle, (T.int64(2), m, T.int64(1)), "float32")
        y = T.match_buffer(y_handle, (T.int64(2), m), "float32")
        for i, j in T.grid(T.int64(2), m):
            with T.sblock("double"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj, T.int64(0)] * T.float32(2)

    @R.function
    def main(x: R.Tensor((1, 2, "n"), "float32"), z: R.Tensor((2, "n"), "float32")):
        n = T.int64()
        cls = Before
        with R.dataflow():
            flat = R.reshape(x, R.shape([2, n]))
            rows = R.reshape(flat, R.shape([2, n, 1]))  # followed back to x: sizes other than 1 (2, n) the same
            a = R.call_tir(cls.double, (rows,), out_ty=R.Tensor((2, n), "float32"))
            b = R.call_tir(cls.double, (R.reshape(z, R.shape([2, n, 1])),), out_ty=R.Tensor((2, n), "float32"))
            merged = R.reshape(x, R.shape([2 * n]))
            c = R.reshape(merged, R.shape([2, n, 1]))  # through a merge: x is its source, not merged
            d = R.call_tir(cls.double, (c,), out_ty=R.Tensor((2, n), "float32"))
            gv = (a, b, d)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def double1(x_handle: T.handle, y_handle: T.handle):
        m = T.int64()
        x = T.match_buffer(x_handle, (T.int64(1), T.int64(2), m), "float32")
        y = T.match_buffer(y_handle, (T.int64(2), m), "float32")
        with T.sblock("root"):
            x_1 = T.decl_buffer((T.int64(2), m, T.int64(1)), data=x.data)
            for i, j in T.grid(T.int64(2), m):
                with T.sblock("double"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x_1[vi, vj, T.int64(0)] * T.float32(2)

    @T.prim_func(private=True, s_tir=True)
    def double2(x_handle: T.handle, y_handle: T.handle):
        m = T.int64()
        x = T.match_buffer(x_handle, (T.int64(2), m), "float32")
        y = T.match_buffer(y_handle, (T.int64(2), m), "float32")
        with T.sblock("root"):
            x_1 = T.decl_buffer((T.int64(2), m, T.int64(1)), data=x.data)
            for i, j in T.grid(T.int64(2), m):
                with T.sblock("double"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x_1[vi, vj, T.int64(0)] * T.float32(2)

    @R.function
    def main(x: R.Tensor((1, 2, "n"), "float32"), z: R.Tensor((2, "n"), "float32")):
        n = T.int64()
        cls = Expected
        with R.dataflow():
            a = R.call_tir(cls.double1, (x,), out_ty=R.Tensor((2, n), "float32"))
            b = R.call_tir(cls.double2, (z,), out_ty=R.Tensor((2, n), "float32"))
            d = R.call_tir(cls.double1, (x,), out_ty=R.Tensor((2, n), "float32"))
            gv = (a, b, d)
            R.output(gv)
        return gv


def test_structure_kernels_read_the_tensors_behind_unit_reshapes():
    tvm.ir.assert_structural_equal(UnitReshapeIntoKernels()(Before), Expected)


def test_a_reshape_that_merges_axes_stays():
    @I.ir_module
    class Merging:
        @T.prim_func(private=True, s_tir=True)
        def double(x_handle: T.handle, y_handle: T.handle):
            k = T.int64()
            x = T.match_buffer(x_handle, (k,), "float32")
            y = T.match_buffer(y_handle, (k,), "float32")
            for i in range(k):
                y[i] = x[i] * T.float32(2)

        @R.function
        def main(x: R.Tensor((2, "n"), "float32")):
            n = T.int64()
            cls = Merging
            with R.dataflow():
                flat = R.reshape(x, R.shape([2 * n]))
                gv = R.call_tir(cls.double, (flat,), out_ty=R.Tensor((2 * n,), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(UnitReshapeIntoKernels()(Merging), Merging)


def test_values_are_the_same():
    target = tvm.target.Target(HOST_PRESET.target)
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((1, 2, n), np.float32), rng.standard_normal((2, n), np.float32)) for n in (1, 5)]
    for mod in (Before, UnitReshapeIntoKernels()(Before)):
        vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
        for x, z in inputs:
            a, b, d = (out.numpy() for out in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(z)))
            np.testing.assert_array_equal(a, 2 * x[0])
            np.testing.assert_array_equal(b, 2 * z)
            np.testing.assert_array_equal(d, 2 * x[0])
