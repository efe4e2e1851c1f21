"""QuantizeRows: a run-time per-row quantization, as quant_import writes it, becomes one call of our kernel
(structure), computes the same int8 values and scales bit for bit as the ops it replaces (rows of any length, a
length known only at run time, dynamic sizes, all-zero rows, halves that round to even), and is left alone where an
intermediate value has another use."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import QuantizeRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.quantize_rows import quantize_rows_kernel, row_quantizer

from ...conftest import HOST_PRESET

QMAX, EPS = 127.0, 1e-8
RNG = np.random.default_rng(3)


def _quantize(bb: relax.BlockBuilder, x: relax.Expr, *, leak: bool = False) -> tuple[relax.Expr, relax.Expr, list]:
    """quant_import's ops for ``quantize_dynamic(x, 127, -1)``: (q, scale, [the magnitudes too if ``leak``])."""
    magnitude = bb.emit(relax.op.abs(x))
    amax = bb.emit(relax.op.max(magnitude, axis=[-1], keepdims=True))
    scale = bb.emit(relax.op.divide(bb.emit(relax.op.maximum(amax, relax.const(EPS, "float32"))),
                                    relax.const(QMAX, "float32")))
    rounded = bb.emit(relax.op.round(bb.emit(relax.op.divide(x, scale))))
    q = bb.emit(relax.op.astype(bb.emit(relax.op.clip(rounded, -127, 127)), "int8"))
    return q, scale, [magnitude] if leak else []


def _module(columns: int | None, leak: bool = False) -> tvm.IRModule:
    """``main(x [b, t, columns])``: the per-row quantization of ``x``, and ``x + 1`` (another use of ``x``);
    ``columns`` None: rows of any length."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    width = tvm.tirx.Var("n", "int64") if columns is None else columns
    x = relax.Var("x", relax.TensorType([b, t, width], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q, scale, extra = _quantize(bb, x, leak=leak)
            other = bb.emit(relax.op.add(x, relax.const(1.0, "float32")))
            out = bb.emit_output(relax.Tuple([q, scale, other, *extra]))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_the_ops_become_one_kernel_call():
    after = QuantizeRows()(_module(256))
    bb = relax.BlockBuilder()
    kernel = bb.add_func(quantize_rows_kernel(3, 256, QMAX, float(np.float32(EPS))).with_attr(KERNEL_ATTR, "quantize_rows")
                         .without_attr("global_symbol"), "quantize_rows_k256")
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, 256], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            both = bb.emit(relax.call_tir(kernel, [x], [relax.TensorType([b, t, 256], "int8"),
                                                       relax.TensorType([b, t, 1], "float32")]))
            scale = bb.emit(relax.TupleGetItem(both, 1))
            q = bb.emit(relax.TupleGetItem(both, 0))
            other = bb.emit(relax.op.add(x, relax.const(1.0, "float32")))
            out = bb.emit_output(relax.Tuple([q, scale, other]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_an_intermediate_with_another_use_is_left_alone():
    before = _module(256, leak=True)
    tvm.ir.assert_structural_equal(QuantizeRows()(before), before)


@pytest.mark.parametrize("columns", [256, 64, 40, None])  # 64 lanes, 16, 8, any length
def test_kernel_equals_the_ops_bit_for_bit(columns):
    target = tvm.target.Target(HOST_PRESET.target)
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (QuantizeRows()(_module(columns)), _module(columns))]
    assert "quantize_rows" in QuantizeRows()(_module(columns)).script()
    # any length: 8 partial maxima, the rest of a row (here its largest value) one by one; shorter rows all so
    for (b, t), width in zip(((1, 1), (3, 7), (2, 33), (2, 5)), (19, 19, 16, 5) if columns is None else [columns] * 4):
        x = (RNG.standard_normal((b, t, width)) * RNG.uniform(1e-3, 1e3, (b, t, 1))).astype(np.float32)
        x[-1, 0, -1] = 1e4  # the largest magnitude of its row, in its last element
        x[0, 0] = 0.0  # an all-zero row: the scale's floor
        x[-1, -1, :4] = [127.0, 0.5, -1.5, 2.5]  # a scale of exactly 1: halves round to even
        x[-1, -1, 4:] = 0.25
        fused, unfused = ([o.numpy() for o in vm["main"](tvm.runtime.tensor(x))] for vm in vms)
        for got, expected in zip(fused, unfused):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(fused[0][-1, -1, :4], [127, 0, -2, 2])
        if b * t > 1:
            np.testing.assert_array_equal(fused[1][0, 0], [np.float32(EPS) / np.float32(QMAX)])


@pytest.mark.parametrize("lanes", [12, 128])
def test_row_quantizer_lanes_must_fold_in_halves(lanes):
    with pytest.raises(ValueError, match="power of two up to 64"):
        row_quantizer(256, lanes, QMAX, EPS)
