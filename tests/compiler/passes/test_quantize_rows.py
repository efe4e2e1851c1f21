"""QuantizeRows: a run-time per-row quantization, as quant_import writes it, becomes one call of our kernel
(structure), computes the same int8 values and scales bit for bit as the ops it replaces (rows of any length, a
length known only at run time, dynamic sizes, all-zero rows, halves that round to even), and is left alone where an
intermediate value has another use; the same for a quantization of each column (the keys transposed), and the
reciprocal's quotient against NumPy's division where rounding is closest."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import QuantizeRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.quantize_rows import quantize_columns_kernel, quantize_rows_kernel, row_quantizer

from ...conftest import HOST_PRESET

QMAX, EPS = 127.0, 1e-8
RNG = np.random.default_rng(3)


def _quantize(bb: relax.BlockBuilder, x: relax.Expr, *, leak: bool = False,
              axis: int = -1) -> tuple[relax.Expr, relax.Expr, list]:
    """quant_import's ops for ``quantize_dynamic(x, 127, axis)``: (q, scale, [the magnitudes too if ``leak``])."""
    magnitude = bb.emit(relax.op.abs(x))
    amax = bb.emit(relax.op.max(magnitude, axis=[axis], keepdims=True))
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
    # any length: 8 partial maxima, the rest of a row (here its largest value) one by one; shorter rows all so;
    # the int8 values in vectors of 16 and the rest one by one
    for (b, t), width in zip(((1, 1), (3, 7), (2, 33), (2, 5), (2, 3)),
                             (19, 19, 16, 5, 11) if columns is None else [columns] * 5):
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


def _near_halves(rows: int, columns: int, qmax: float, rng: np.random.Generator) -> np.ndarray:
    """Rows whose quotients by their scales lie on and within a few ulps of every half-integer up to ``qmax``
    (where a quotient one ulp off would round the other way), each row's scale from its first value, set over
    magnitudes from 1e-30 to 1e30 (and below the scale's floor)."""
    magnitude = (10.0 ** rng.uniform(-30, 30, rows)).astype(np.float32)
    magnitude[:8] = np.float32(EPS) * rng.uniform(0.01, 1, 8).astype(np.float32)  # below the floor
    scale = np.maximum(magnitude, np.float32(EPS)) / np.float32(qmax)
    halves = rng.integers(-int(qmax), int(qmax), (rows, columns)).astype(np.float32) + np.float32(0.5)
    x = (halves * scale[:, None]).astype(np.float32)
    toward = np.where(rng.random(x.shape) < 0.5, np.float32(np.inf), np.float32(-np.inf))
    for _ in range(3):  # up to three ulps away: quotients just below and above the half
        x = np.where(rng.random(x.shape) < 0.3, np.nextafter(x, toward), x)
    x[:, 1::7] = rng.standard_normal((rows, len(range(1, columns, 7)))) * magnitude[:, None] / 2
    x[:, 0] = magnitude * rng.choice([-1, 1], rows)
    return np.clip(x, -magnitude[:, None], magnitude[:, None]).astype(np.float32)


@pytest.mark.parametrize("qmax", [127.0, 31.0])  # int8, int6
def test_reciprocal_quotient_rounds_as_the_division(qmax):
    """The kernel multiplies by the scale's reciprocal with a correction (no division): every value equals
    NumPy's ``clip(round(x / scale))`` on quotients at and next to half-integers, over 60 decades of scales."""
    rng = np.random.default_rng(int(qmax))
    kernel = quantize_rows_kernel(2, 1024, qmax, float(np.float32(EPS))).with_attr("global_symbol", "main")
    quantize = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(HOST_PRESET.target))["main"]
    for _ in range(3):
        x = _near_halves(2048, 1024, qmax, rng)
        q, s = tvm.runtime.tensor(np.zeros(x.shape, np.int8)), tvm.runtime.tensor(np.zeros((len(x), 1), np.float32))
        quantize(tvm.runtime.tensor(x), q, s)
        scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(EPS)) / np.float32(qmax)
        np.testing.assert_array_equal(s.numpy(), scale)
        expected = np.clip(np.round(x / scale), -qmax, qmax).astype(np.int8)
        np.testing.assert_array_equal(q.numpy(), expected)
        assert (np.abs(x / scale - np.trunc(x / scale)) == 0.5).mean() > 0.1  # ties hit, not only near misses


def test_row_quantizer_clips_to_whole_numbers():
    with pytest.raises(ValueError, match="whole numbers"):
        quantize_rows_kernel(2, 64, 127.5, EPS)


def _columns_module(rows: int) -> tvm.IRModule:
    """``main(x [b, h, rows, n])``: the quantization of each column of ``x`` (the keys transposed)."""
    bb = relax.BlockBuilder()
    b, n = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([b, 4, rows, n], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q, scale, _ = _quantize(bb, x, axis=-2)
            out = bb.emit_output(relax.Tuple([q, scale]))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_a_column_quantization_becomes_one_kernel_call():
    after = QuantizeRows()(_columns_module(64))
    bb = relax.BlockBuilder()
    kernel = quantize_columns_kernel(4, 64, QMAX, float(np.float32(EPS))).with_attr(KERNEL_ATTR, "quantize_columns")
    kernel = bb.add_func(kernel.without_attr("global_symbol"), "quantize_columns_r64")
    b, n = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([b, 4, 64, n], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            both = bb.emit(relax.call_tir(kernel, [x], [relax.TensorType([b, 4, 64, n], "int8"),
                                                       relax.TensorType([b, 4, 1, n], "float32")]))
            scale = bb.emit(relax.TupleGetItem(both, 1))
            q = bb.emit(relax.TupleGetItem(both, 0))
            out = bb.emit_output(relax.Tuple([q, scale]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_column_kernel_equals_the_ops_bit_for_bit():
    """Every column count the kernel splits differently: vectors of 16, 8 or 4 (the last overlapping the one
    before) and single columns."""
    target = tvm.target.Target(HOST_PRESET.target)
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (QuantizeRows()(_columns_module(64)), _columns_module(64))]
    for n in (1, 3, 4, 7, 8, 12, 16, 17, 35):
        x = (RNG.standard_normal((3, 4, 64, n)) * RNG.uniform(1e-3, 1e3, (3, 4, 1, n))).astype(np.float32)
        x[0, 0, :, 0] = 0.0  # an all-zero column: the scale's floor
        x[-1, -1, :4, -1] = [127.0, 0.5, -1.5, 2.5]  # a scale of exactly 1: halves round to even
        x[-1, -1, 4:, -1] = 0.25
        fused, unfused = ([o.numpy() for o in vm["main"](tvm.runtime.tensor(x))] for vm in vms)
        for got, expected in zip(fused, unfused):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(fused[0][-1, -1, :4, -1], [127, 0, -2, 2])
