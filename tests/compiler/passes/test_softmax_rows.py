"""SoftmaxRows: a softmax over a last axis of dynamic length becomes one call of our row kernel, with the static
quantization after it, or with the product by per-position factors and that product's run-time row quantization
(structure); the kernel computes what TVM's legalized ops compute, bit for bit, in every variant over rows of many
lengths (masked positions included); a softmax over a static length stays as it is."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import SoftmaxRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cpu_generic import FLOAT_BYTES, register_bytes
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import RowQuantize, StaticQuantize
from int8mt.schedules.softmax_rows import softmax_rows_kernel

from ...conftest import HOST_PRESET
from .test_quantize_rows import EPS, QMAX, _quantize

HEADS, SCALE, BOUND = 4, 0.0084322309121489525, 1.070893325842917
RNG = np.random.default_rng(7)
LANES = register_bytes(tvm.target.Target(HOST_PRESET.target)) // FLOAT_BYTES


def _module(tail: str = "static", positions: int | None = None) -> tvm.IRModule:
    """``main(x [b, heads, t, positions], m [b, heads, 1, positions])``: ``softmax(x)`` and, by ``tail``, its
    ``quantize(clip(..))`` (``static``), nothing more (``plain``), its product with ``m`` (``scaled``) or that
    product's run-time row quantization (``scaled rows``); ``positions`` None: dynamic."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    p = tvm.tirx.Var("p", "int64") if positions is None else positions
    x = relax.Var("x", relax.TensorType([b, HEADS, t, p], "float32"))
    m = relax.Var("m", relax.TensorType([b, HEADS, 1, p], "float32"))
    with bb.function("main", [x, m]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.softmax(x, axis=-1))
            if tail == "static":
                clipped = bb.emit(relax.op.clip(y, -BOUND, BOUND))
                outputs = [bb.emit(relax.op.quantize(clipped, relax.const(SCALE, "float32"), relax.const(0, "int8"),
                                                     axis=-1, out_dtype="int8"))]
            elif tail == "plain":
                outputs = [y]
            else:
                z = bb.emit(relax.op.multiply(y, m))
                outputs = list(_quantize(bb, z)[:2]) if tail == "scaled rows" else [z]
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_softmax_and_its_quantization_become_one_call():
    bb = relax.BlockBuilder()
    quantize = StaticQuantize(-BOUND, BOUND, float(np.float32(SCALE)))
    kernel = bb.add_func(softmax_rows_kernel(4, 16, quantize).with_attr(KERNEL_ATTR, "softmax_rows")
                         .without_attr("global_symbol"), "softmax_rows")
    b, t, p = (tvm.tirx.Var(name, "int64") for name in "btp")
    x = relax.Var("x", relax.TensorType([b, HEADS, t, p], "float32"))
    m = relax.Var("m", relax.TensorType([b, HEADS, 1, p], "float32"))
    with bb.function("main", [x, m]):
        with bb.dataflow():
            q = bb.emit(relax.call_tir(kernel, [x], relax.TensorType([b, HEADS, t, p], "int8")))
            out = bb.emit_output(relax.Tuple([q]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(SoftmaxRows(16)(_module()), bb.get())


def test_structure_scaled_probabilities_and_their_row_quantization_become_one_call():
    bb = relax.BlockBuilder()
    kernel = bb.add_func(softmax_rows_kernel(4, 16, RowQuantize(QMAX, float(np.float32(EPS))), scaled=True)
                         .with_attr(KERNEL_ATTR, "softmax_rows").without_attr("global_symbol"), "softmax_rows")
    b, t, p = (tvm.tirx.Var(name, "int64") for name in "btp")
    x = relax.Var("x", relax.TensorType([b, HEADS, t, p], "float32"))
    m = relax.Var("m", relax.TensorType([b, HEADS, 1, p], "float32"))
    with bb.function("main", [x, m]):
        with bb.dataflow():
            both = bb.emit(relax.call_tir(kernel, [x, m], [relax.TensorType([b, HEADS, t, p], "int8"),
                                                           relax.TensorType([b, HEADS, t, 1], "float32")]))
            s = bb.emit(relax.TupleGetItem(both, 1))
            q = bb.emit(relax.TupleGetItem(both, 0))
            out = bb.emit_output(relax.Tuple([q, s]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(SoftmaxRows(16)(_module("scaled rows")), bb.get())


def test_a_softmax_over_a_static_length_stays():
    before = _module(positions=32)
    tvm.ir.assert_structural_equal(SoftmaxRows(16)(before), before)


@pytest.mark.parametrize("tail", ["static", "plain", "scaled", "scaled rows"])
def test_kernel_equals_the_ops_bit_for_bit(tail):
    target = tvm.target.Target(HOST_PRESET.target)
    fused = SoftmaxRows(LANES)(_module(tail))
    assert "R.nn.softmax" not in fused["main"].script() and "R.multiply" not in fused["main"].script()
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (fused, _module(tail))]
    # rows shorter and longer than a vector, a multiple of it and not, rows in groups of four and not
    for b, t, p in ((1, 1, 1), (1, 1, 7), (3, 1, 16), (2, 5, 35), (1, 3, 100)):
        x = (RNG.standard_normal((b, HEADS, t, p)) * RNG.uniform(0.1, 8, (b, HEADS, t, 1))).astype(np.float32)
        x[..., p // 2:] += np.float32(-1e9) * (RNG.random((b, 1, 1, p - p // 2)) < 0.3)  # masked positions
        m = RNG.uniform(0.001, 0.05, (b, HEADS, 1, p)).astype(np.float32)
        got, expected = ([o.numpy() for o in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(m))] for vm in vms)
        for a, e in zip(got, expected):
            np.testing.assert_array_equal(a, e)
