"""SoftmaxRows: a softmax over a last axis of dynamic length and the static quantization after it become one call
of our row kernel (structure); the kernel computes what TVM's legalized ops compute, bit for bit, over rows of many
lengths (masked positions included); a softmax with another use, or over a static length, stays as it is."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import SoftmaxRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cpu_generic import FLOAT_BYTES, register_bytes
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import StaticQuantize
from int8mt.schedules.softmax_rows import softmax_rows_kernel

from ...conftest import HOST_PRESET

HEADS, SCALE, BOUND = 4, 0.0084322309121489525, 1.070893325842917
RNG = np.random.default_rng(7)
LANES = register_bytes(tvm.target.Target(HOST_PRESET.target)) // FLOAT_BYTES


def _module(positions: int | None = None, shared: bool = False) -> tvm.IRModule:
    """``main(x [b, heads, t, positions])``: ``quantize(clip(softmax(x)))`` (``positions`` None: dynamic); with
    ``shared`` the probabilities are returned as well."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    p = tvm.tirx.Var("p", "int64") if positions is None else positions
    x = relax.Var("x", relax.TensorType([b, HEADS, t, p], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.softmax(x, axis=-1))
            clipped = bb.emit(relax.op.clip(y, -BOUND, BOUND))
            q = bb.emit(relax.op.quantize(clipped, relax.const(SCALE, "float32"), relax.const(0, "int8"), axis=-1,
                                          out_dtype="int8"))
            out = bb.emit_output(relax.Tuple([q, y]) if shared else q)
        bb.emit_func_output(out)
    return bb.get()


def test_structure_softmax_and_its_quantization_become_one_call():
    bb = relax.BlockBuilder()
    quantize = StaticQuantize(-BOUND, BOUND, float(np.float32(SCALE)))
    kernel = bb.add_func(softmax_rows_kernel(4, 16, quantize).with_attr(KERNEL_ATTR, "softmax_rows")
                         .without_attr("global_symbol"), "softmax_rows_quantize")
    b, t, p = (tvm.tirx.Var(name, "int64") for name in "btp")
    x = relax.Var("x", relax.TensorType([b, HEADS, t, p], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.call_tir(kernel, [x], relax.TensorType([b, HEADS, t, p], "int8")))
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(SoftmaxRows(16)(_module()), bb.get())


@pytest.mark.parametrize("before", [lambda: _module(shared=True), lambda: _module(positions=32)],
                         ids=["softmax used again", "static length"])
def test_stays(before):
    tvm.ir.assert_structural_equal(SoftmaxRows(16)(before()), before())


def test_kernel_equals_the_ops_bit_for_bit():
    target = tvm.target.Target(HOST_PRESET.target)
    fused = SoftmaxRows(LANES)(_module())
    assert "R.nn.softmax" not in fused["main"].script() and "R.quantize" not in fused["main"].script()
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (fused, _module())]
    # rows shorter and longer than a vector, a multiple of it and not, rows in groups of four and not
    for b, t, p in ((1, 1, 1), (1, 1, 7), (3, 1, 16), (2, 5, 35), (1, 3, 100)):
        x = (RNG.standard_normal((b, HEADS, t, p)) * RNG.uniform(0.1, 8, (b, HEADS, t, 1))).astype(np.float32)
        x[..., p // 2:] += np.float32(-1e9) * (RNG.random((b, 1, 1, p - p // 2)) < 0.3)  # masked positions
        got, expected = (vm["main"](tvm.runtime.tensor(x)).numpy() for vm in vms)
        np.testing.assert_array_equal(got, expected)
