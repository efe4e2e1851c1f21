"""TakeAsView: a decoder layer's slice of a stacked cache parameter is a view (no copy kernel), results equal."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import TakeAsView
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


def _cache_module() -> tvm.IRModule:
    """take(take(cache, 1), 0) of a [3, 2, n, 4, s, 8] parameter grown by a row, the same slice's next plane
    with its first two axes merged, and a take of an intermediate (the cache plus one), which must stay a copy."""
    bb = relax.BlockBuilder()
    n, s = (tvm.tirx.Var(v, "int64") for v in "ns")
    cache = relax.Var("cache", relax.TensorType([3, 2, n, 4, s, 8], "int8"))
    row = relax.Var("row", relax.TensorType([n, 4, 1, 8], "int8"))
    index = [relax.const(i, "int64") for i in range(2)]
    with bb.function("main", [cache, row]):
        with bb.dataflow():
            layer = bb.emit(relax.op.take(cache, index[1], axis=0))
            keys = bb.emit(relax.op.concat([bb.emit(relax.op.take(layer, index[0], axis=0)), row], axis=2))
            values = bb.emit(relax.op.reshape(bb.emit(relax.op.take(layer, index[1], axis=0)), [n * 4, s, 8]))
            plus = bb.emit(relax.op.add(cache, relax.const(1, "int8")))
            other = bb.emit(relax.op.take(plus, index[1], axis=0))
            out = bb.emit_output(relax.Tuple([keys, values, other]))
        bb.emit_func_output(out)
    return bb.get()


def test_slices_of_parameters_become_views_and_results_are_unchanged():
    mod = TakeAsView()(_cache_module())
    script = mod["main"].script()
    # two views of the parameter itself (none of the layer), the reshape one of them; the intermediate's take stays
    assert script.count("R.memory.view(cache") == 2 and script.count("R.take(") == 1
    assert "R.reshape(" not in script
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    rng = np.random.default_rng(0)
    for n, s in ((1, 0), (2, 3), (3, 9)):
        cache = rng.integers(-100, 100, (3, 2, n, 4, s, 8), dtype=np.int8)
        row = rng.integers(-100, 100, (n, 4, 1, 8), dtype=np.int8)
        keys, values, other = vm["main"](tvm.runtime.tensor(cache), tvm.runtime.tensor(row))
        np.testing.assert_array_equal(keys.numpy(), np.concatenate([cache[1, 0], row], axis=2))
        np.testing.assert_array_equal(values.numpy(), cache[1, 1].reshape(n * 4, s, 8))
        np.testing.assert_array_equal(other.numpy(), cache[1] + 1)


def test_structure_a_parameter_slice_is_a_view_an_intermediate_slice_a_take():
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Before:
        @R.function
        def main(cache: R.Tensor((3, 2, "n", 8), "int8")):
            with R.dataflow():
                layer = R.take(cache, R.const(1, "int64"), axis=0)
                plus = R.add(cache, R.const(1, "int8"))
                other = R.take(plus, R.const(1, "int64"), axis=0)
                gv = (layer, other)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(cache: R.Tensor((3, 2, "n", 8), "int8")):
            n = T.int64()
            with R.dataflow():
                dtype = R.null_value()
                view = R.memory.view(cache, R.shape([2, n, 8]), dtype, R.prim_value(2 * n * 8))  # layer 1 at 2n8 B
                layer = R.memory.ensure_zero_offset(view)
                plus = R.add(cache, R.const(1, "int8"))
                other = R.take(plus, R.const(1, "int64"), axis=0)
                gv = (layer, other)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(TakeAsView()(Before), Expected)


def test_structure_a_slice_of_a_slice_and_its_reshape_are_one_view_of_the_parameter():
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Before:
        @R.function
        def main(cache: R.Tensor((3, 2, "n", 8), "int8")):
            n = T.int64()
            with R.dataflow():
                layer = R.take(cache, R.const(1, "int64"), axis=0)
                values = R.take(layer, R.const(1, "int64"), axis=0)
                flat = R.reshape(values, R.shape([n * 8]))
                R.output(flat)
            return flat

    @I.ir_module
    class Expected:
        @R.function
        def main(cache: R.Tensor((3, 2, "n", 8), "int8")):
            n = T.int64()
            with R.dataflow():
                dtype = R.null_value()
                view = R.memory.view(cache, R.shape([n * 8]), dtype, R.prim_value(2 * n * 8 + n * 8))  # [1, 1]
                flat = R.memory.ensure_zero_offset(view)
                R.output(flat)
            return flat

    tvm.ir.assert_structural_equal(TakeAsView()(Before), Expected)
