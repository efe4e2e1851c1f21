"""UnitPermuteAsReshape: a permutation that moves only axes of size 1 becomes a reshape (structure), one that
reorders other axes does not, and the values are the same."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import UnitPermuteAsReshape
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET


def _module(axes: list[int]) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, 4, 1, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.permute_dims(x, axes))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_a_permutation_of_a_unit_axis_becomes_a_reshape():
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, 4, 1, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.reshape(x, [b, 1, 4, 8]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(UnitPermuteAsReshape()(_module([0, 2, 1, 3])), bb.get())


def test_a_permutation_of_other_axes_stays():
    before = _module([0, 3, 2, 1])
    tvm.ir.assert_structural_equal(UnitPermuteAsReshape()(before), before)


def test_values_are_the_same():
    target = tvm.target.Target(HOST_PRESET.target)
    x = np.random.default_rng(2).standard_normal((3, 4, 1, 8)).astype(np.float32)
    for mod in (UnitPermuteAsReshape()(_module([0, 2, 1, 3])), _module([0, 2, 1, 3])):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x.transpose(0, 2, 1, 3))
