"""DropUnusedTuples: a lowered function's tuples used nowhere go, used ones (in a binding, a branch, the result)
stay; a pipeline leaves only used tuples and computes the same."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from int8mt.compiler.passes import DropUnusedTuples, QuantizeRows
from int8mt.compiler.passes.kernel_calls import bindings_and_users
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET
from .test_quantize_rows import _module

TARGET = tvm.target.Target(HOST_PRESET.target)


@I.ir_module
class Before:
    @R.function(pure=False)
    def main(x: R.Tensor((4,), "float32"), y: R.Tensor((4,), "float32"), flag: R.Tensor((), "bool")):
        unused = (x, y)
        in_branch = (y, x)
        returned = (x, x)
        if flag:
            r = R.call_packed("test.use", in_branch, ty_args=(R.Object,))
        else:
            r = R.call_packed("test.use", x, ty_args=(R.Object,))
        return (returned, r)


@I.ir_module
class Expected:
    @R.function(pure=False)
    def main(x: R.Tensor((4,), "float32"), y: R.Tensor((4,), "float32"), flag: R.Tensor((), "bool")):
        in_branch = (y, x)
        returned = (x, x)
        if flag:
            r = R.call_packed("test.use", in_branch, ty_args=(R.Object,))
        else:
            r = R.call_packed("test.use", x, ty_args=(R.Object,))
        return (returned, r)


def test_unused_tuples_go_and_used_ones_stay():
    tvm.ir.assert_structural_equal(DropUnusedTuples()(Before)["main"], Expected["main"])


def test_a_pipeline_leaves_only_used_tuples_and_computes_the_same():
    """A per-row quantization kernel (two results, as ``QuantizeRows`` calls it) in a lowered function: the tuple
    of its results goes, the function's result stays; the values are those of the ops (bit for bit)."""
    module = QuantizeRows()(_module(256))
    lowered = relax_pipeline(TARGET)(module)["main"]
    tuples = [b.var for block in lowered.body.blocks for b in block.bindings if isinstance(b.value, relax.Tuple)]
    assert tuples and set(tuples) <= set(bindings_and_users(lowered)[1])
    vms = [relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
           for mod in (module, _module(256))]
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32))
    fused, ops = ([out.numpy() for out in vm["main"](x)] for vm in vms)
    for got, expected in zip(fused, ops):
        np.testing.assert_array_equal(got, expected)
