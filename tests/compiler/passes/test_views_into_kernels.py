"""ViewsIntoKernels: a kernel called with a view of a function parameter (a layer's plane of a stacked cache, as
TakeAsView makes them) or with a reshape of any tensor reads that tensor itself at the view's offset (structure:
the tensor in its own shape, the kernel's size of the view bound from the tensor's, its old buffer declared at the
offset; a view of anything but a parameter left alone), and the values are the same."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import ViewsIntoKernels
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def column_sums(x_handle: T.handle, y: T.Buffer((4,), "float32")):
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(4)), "float32")
        for j in range(T.int64(4)):
            y[j] = T.float32(0)
            for i in range(m):
                y[j] = y[j] + x[i, j]

    @R.function
    def main(cache: R.Tensor((3, "n", 4), "float32")):
        n = T.int64()
        cls = Before
        with R.dataflow():
            plane = R.memory.view(cache, R.shape([n, 4]), relative_byte_offset=R.prim_value(n * 16))
            rows = R.memory.ensure_zero_offset(plane)  # plane 1 of the cache
            gv = R.call_tir(cls.column_sums, (rows,), out_ty=R.Tensor((4,), "float32"))
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def column_sums1(x_handle: T.handle, y: T.Buffer((4,), "float32")):
        k = T.int64()
        x_source = T.match_buffer(x_handle, (T.int64(3), k, T.int64(4)), "float32")
        m: T.let[T.int64] = k
        x_flat = x_source.view(T.int64(3) * k * T.int64(4))
        x = T.decl_buffer((m, T.int64(4)), data=T.address_of(x_flat[k * T.int64(4)]))
        for j in range(T.int64(4)):
            y[j] = T.float32(0)
            for i in range(m):
                y[j] = y[j] + x[i, j]

    @R.function
    def main(cache: R.Tensor((3, "n", 4), "float32")):
        cls = Expected
        with R.dataflow():
            gv = R.call_tir(cls.column_sums1, (cache,), out_ty=R.Tensor((4,), "float32"))
            R.output(gv)
        return gv


def test_structure_kernels_read_the_parameter_behind_a_view():
    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Before), Expected)


@I.ir_module
class Merged:
    @T.prim_func(private=True, s_tir=True)
    def column_sums(x_handle: T.handle, y: T.Buffer((4,), "float32")):
        m = T.int64()
        x = T.match_buffer(x_handle, (m, T.int64(4)), "float32")
        for j in range(T.int64(4)):
            y[j] = T.float32(0)
            for i in range(m):
                y[j] = y[j] + x[i, j]

    @R.function
    def main(x: R.Tensor((2, "n", 4), "float32")):
        n = T.int64()
        cls = Merged
        with R.dataflow():
            rows = R.reshape(x, R.shape([2 * n, 4]))
            gv = R.call_tir(cls.column_sums, (rows,), out_ty=R.Tensor((4,), "float32"))
            R.output(gv)
        return gv


def test_structure_kernels_read_the_tensor_behind_a_reshape_that_merges_axes():
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def column_sums1(x_handle: T.handle, y: T.Buffer((4,), "float32")):
            k = T.int64()
            x_source = T.match_buffer(x_handle, (T.int64(2), k, T.int64(4)), "float32")
            m: T.let[T.int64] = k * T.int64(2)
            x = T.decl_buffer((m, T.int64(4)), data=x_source.data)
            for j in range(T.int64(4)):
                y[j] = T.float32(0)
                for i in range(m):
                    y[j] = y[j] + x[i, j]

        @R.function
        def main(x: R.Tensor((2, "n", 4), "float32")):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.column_sums1, (x,), out_ty=R.Tensor((4,), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Merged), Expected)


@I.ir_module
class Chained:
    @T.prim_func(private=True, s_tir=True)
    def write_rows(acc_handle: T.handle, x_handle: T.handle):
        m = T.int64()
        acc = T.match_buffer(acc_handle, (m, T.int64(4), T.int64(1), T.int64(2)), "float32")
        x = T.match_buffer(x_handle, (m, T.int64(4), T.int64(1), T.int64(2)), "float32")
        for i, h, w in T.grid(m, T.int64(4), T.int64(2)):
            with T.sblock("write"):
                vi, vh, vw = T.axis.remap("SSS", [i, h, w])
                acc[vi, vh, T.int64(0), vw] = x[vi, vh, T.int64(0), vw] * T.float32(2)

    @R.function
    def main(acc: R.Tensor(("n", 4, 1, 2), "float32"), x: R.Tensor(("n", 8), "float32")):
        n = T.int64()
        cls = Chained
        with R.dataflow():
            rows = R.reshape(x, R.shape([n, 1, 8]))
            heads = R.reshape(rows, R.shape([n, 1, 4, 2]))
            split = R.reshape(heads, R.shape([n, 4, 1, 2]))
            gv = R.call_tir_inplace(cls.write_rows, (acc, split), 0, out_ty=R.Tensor((n, 4, 1, 2), "float32"))
            R.output(gv)
        return gv


def test_structure_an_in_place_kernel_reads_the_tensor_at_the_start_of_a_chain_of_reshapes():
    """A linear layer's result ``[n, heads * width]`` reshaped into the heads' layout in steps, as a GPU preset's
    decoder step hands it to ``append_rows`` (an in-place kernel): the kernel takes the result itself."""
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def write_rows1(acc_handle: T.handle, x_handle: T.handle):
            m = T.int64()
            acc = T.match_buffer(acc_handle, (m, T.int64(4), T.int64(1), T.int64(2)), "float32")
            k = T.int64()
            x_source = T.match_buffer(x_handle, (k, T.int64(8)), "float32")
            x = T.decl_buffer((m, T.int64(4), T.int64(1), T.int64(2)), data=x_source.data)
            for i, h, w in T.grid(m, T.int64(4), T.int64(2)):
                with T.sblock("write"):
                    vi, vh, vw = T.axis.remap("SSS", [i, h, w])
                    acc[vi, vh, T.int64(0), vw] = x[vi, vh, T.int64(0), vw] * T.float32(2)

        @R.function
        def main(acc: R.Tensor(("n", 4, 1, 2), "float32"), x: R.Tensor(("n", 8), "float32")):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                gv = R.call_tir_inplace(cls.write_rows1, (acc, x), 0, out_ty=R.Tensor((n, 4, 1, 2), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Chained), Expected)


@I.ir_module
class Split:
    @T.prim_func(private=True, s_tir=True)
    def double_rows(x_handle: T.handle, y_handle: T.handle):
        c = T.int64()
        x = T.match_buffer(x_handle, (c, T.int64(4)), "float32")
        y = T.match_buffer(y_handle, (c, T.int64(4)), "float32")
        for i, k in T.grid(c, T.int64(4)):
            with T.sblock("double"):
                vi, vk = T.axis.remap("SS", [i, k])
                y[vi, vk] = x[vi, vk] * T.float32(2)

    @T.prim_func(private=True, s_tir=True)
    def double(x_handle: T.handle, y_handle: T.handle):
        a, b = T.int64(), T.int64()
        x = T.match_buffer(x_handle, (a, b, T.int64(4)), "float32")
        y = T.match_buffer(y_handle, (a, b, T.int64(4)), "float32")
        for i, j, k in T.grid(a, b, T.int64(4)):
            with T.sblock("double"):
                vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                y[vi, vj, vk] = x[vi, vj, vk] * T.float32(2)

    @R.function
    def main(x: R.Tensor(("m", "n", 4), "float32")):
        m, n = T.int64(), T.int64()
        cls = Split
        with R.dataflow():
            rows = R.call_tir(cls.double_rows, (R.reshape(x, R.shape([m * n, 4])),),
                              out_ty=R.Tensor((m * n, 4), "float32"))
            gv = R.call_tir(cls.double, (R.reshape(rows, R.shape([m, n, 4])),), out_ty=R.Tensor((m, n, 4), "float32"))
            R.output(gv)
        return gv


def test_structure_a_kernel_that_learns_the_sizes_from_its_result_reads_a_tensor_that_does_not_state_them():
    """A computed ``[m * n, 4]`` tensor reshaped to ``[m, n, 4]`` (the encoder's rows after a dense kernel): its size
    ``m * n`` states neither ``m`` nor ``n``, but the kernel learns them from its result's shape, so it takes the
    tensor (in a size of its own); the dense kernel's ``[m * n, 4]`` view of ``x`` likewise."""
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def double_rows1(x_handle: T.handle, y_handle: T.handle):
            k0, k1 = T.int64(), T.int64()
            x_source = T.match_buffer(x_handle, (k0, k1, T.int64(4)), "float32")
            c = T.int64()
            y = T.match_buffer(y_handle, (c, T.int64(4)), "float32")
            x = T.decl_buffer((c, T.int64(4)), data=x_source.data)
            for i, k in T.grid(c, T.int64(4)):
                with T.sblock("double"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    y[vi, vk] = x[vi, vk] * T.float32(2)

        @T.prim_func(private=True, s_tir=True)
        def double1(x_handle: T.handle, y_handle: T.handle):
            k0 = T.int64()
            x_source = T.match_buffer(x_handle, (k0, T.int64(4)), "float32")
            a, b = T.int64(), T.int64()
            y = T.match_buffer(y_handle, (a, b, T.int64(4)), "float32")
            x = T.decl_buffer((a, b, T.int64(4)), data=x_source.data)
            for i, j, k in T.grid(a, b, T.int64(4)):
                with T.sblock("double"):
                    vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                    y[vi, vj, vk] = x[vi, vj, vk] * T.float32(2)

        @R.function
        def main(x: R.Tensor(("m", "n", 4), "float32")):
            m, n = T.int64(), T.int64()
            cls = Expected
            with R.dataflow():
                rows = R.call_tir(cls.double_rows1, (x,), out_ty=R.Tensor((m * n, 4), "float32"))
                gv = R.call_tir(cls.double1, (rows,), out_ty=R.Tensor((m, n, 4), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Split), Expected)


def test_a_one_input_kernel_given_a_size_binding_keeps_its_root_block():
    """A scheduled one-input kernel (a row sum) whose tensor states a size its result does not give it: the binding
    goes inside its root block, which TVM's analyses of such kernels read (RewriteDataflowReshape's check of
    reshape-like kernels failed on a body that was not its root block), and it computes the same."""
    @I.ir_module
    class Sums:
        @T.prim_func(private=True, s_tir=True)
        def row_sums(x_handle: T.handle, y_handle: T.handle):
            a, b = T.int64(), T.int64()
            x = T.match_buffer(x_handle, (a, b, T.int64(4)), "float32")
            y = T.match_buffer(y_handle, (a, T.int64(1)), "float32")
            with T.sblock("root"):
                for i, j, k in T.grid(a, b, T.int64(4)):
                    with T.sblock("sum"):
                        vi, vj, vk = T.axis.remap("SRR", [i, j, k])
                        with T.init():
                            y[vi, T.int64(0)] = T.float32(0)
                        y[vi, T.int64(0)] = y[vi, T.int64(0)] + x[vi, vj, vk]

        @R.function
        def main(x: R.Tensor(("m", "n", 2, 2), "float32")):
            m, n = T.int64(), T.int64()
            cls = Sums
            with R.dataflow():
                gv = R.call_tir(cls.row_sums, (R.reshape(x, R.shape([m, n, 4])),), out_ty=R.Tensor((m, 1), "float32"))
                R.output(gv)
            return gv

    after = ViewsIntoKernels()(Sums)
    (call,) = [b.value for b in after["main"].body.blocks[0].bindings]
    assert list(call.args[1].fields) == list(after["main"].params)
    assert isinstance(after[call.args[0]].body, tvm.s_tir.SBlockRealize)
    target = tvm.target.Target(HOST_PRESET.target)
    vm = relax.VirtualMachine(tvm.compile(after, target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    x = np.random.default_rng(1).standard_normal((3, 5, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), x.sum((1, 2, 3))[:, None], rtol=1e-5)


def test_a_view_of_a_computed_tensor_stays():
    """The memory planner may reuse a computed tensor's storage once it sees no direct use of it: only the caller's
    parameters are read through their views."""
    @I.ir_module
    class Computed:
        @T.prim_func(private=True, s_tir=True)
        def column_sums(x_handle: T.handle, y: T.Buffer((4,), "float32")):
            m = T.int64()
            x = T.match_buffer(x_handle, (m, T.int64(4)), "float32")
            for j in range(T.int64(4)):
                y[j] = T.float32(0)
                for i in range(m):
                    y[j] = y[j] + x[i, j]

        @R.function
        def main(cache: R.Tensor((3, "n", 4), "float32")):
            n = T.int64()
            cls = Computed
            with R.dataflow():
                doubled = R.add(cache, cache)
                plane = R.memory.view(doubled, R.shape([n, 4]), relative_byte_offset=R.prim_value(n * 16))
                rows = R.memory.ensure_zero_offset(plane)
                gv = R.call_tir(cls.column_sums, (rows,), out_ty=R.Tensor((4,), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Computed), Computed)


def test_a_kernel_that_learns_the_views_size_only_in_an_expression_keeps_the_view():
    """A size of the view that another parameter mentions only in an expression (a concatenation's ``m + 1``) is
    defined by the view's own buffer, which binding it from the parameter would define twice: the view stays."""
    @I.ir_module
    class Grown:
        @T.prim_func(private=True, s_tir=True)
        def grow(x_handle: T.handle, y_handle: T.handle):
            m = T.int64()
            x = T.match_buffer(x_handle, (m, T.int64(4)), "float32")
            y = T.match_buffer(y_handle, (m + T.int64(1), T.int64(4)), "float32")
            for i, j in T.grid(m + T.int64(1), T.int64(4)):
                with T.sblock("grow"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = T.if_then_else(vi < m, x[vi, vj], T.float32(0))

        @R.function
        def main(cache: R.Tensor((3, "n", 4), "float32")):
            n = T.int64()
            cls = Grown
            with R.dataflow():
                plane = R.memory.view(cache, R.shape([n, 4]), relative_byte_offset=R.prim_value(n * 16))
                rows = R.memory.ensure_zero_offset(plane)
                gv = R.call_tir(cls.grow, (rows,), out_ty=R.Tensor((n + 1, 4), "float32"))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ViewsIntoKernels()(Grown), Grown)


def test_values_are_the_same():
    """The kernel reading the tensor (at the offset) sums the same rows as through the view or reshapes (TVM's own
    pipeline for the modules as they were, ours, which applies the pass, for them rewritten)."""
    target = tvm.target.Target(HOST_PRESET.target)
    rng = np.random.default_rng(0)
    for before, expected in ((Before, lambda c: c[1].sum(0)), (Merged, lambda x: x.reshape(-1, 4).sum(0))):
        for mod, pipeline in ((before, "default"), (ViewsIntoKernels()(before), relax_pipeline(target))):
            vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=pipeline), tvm.cpu())
            for n in (1, 5):
                x = rng.standard_normal((3 if before is Before else 2, n, 4)).astype(np.float32)
                np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected(x), rtol=1e-5)
    for mod, pipeline in ((Split, "default"), (ViewsIntoKernels()(Split), relax_pipeline(target))):
        vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=pipeline), tvm.cpu())
        for m, n in ((1, 1), (2, 3)):
            x = rng.standard_normal((m, n, 4)).astype(np.float32)
            np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), 4 * x)
    for mod, pipeline in ((Chained, "default"), (ViewsIntoKernels()(Chained), relax_pipeline(target))):
        vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=pipeline), tvm.cpu())
        for n in (1, 3):
            x = rng.standard_normal((n, 8)).astype(np.float32)
            out = vm["main"](tvm.runtime.tensor(np.zeros((n, 4, 1, 2), np.float32)), tvm.runtime.tensor(x))
            np.testing.assert_array_equal(out.numpy(), 2 * x.reshape(n, 4, 1, 2))
