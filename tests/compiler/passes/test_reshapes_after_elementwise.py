"""ReshapesAfterElementwise: the requantization after a linear layer's reshape into the heads' layout runs before
the reshape (its per-channel constants reshaped with it), so that it sits next to the matmul; of two reshaped
operands the one used only there carries the chain; an operand broadcast over part of a merged dimension, or one
that grows the result, keeps its op after the reshape; the values are the same (a whole model's graph: tests/test_cuda_target.py)."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import ReshapesAfterElementwise
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

HEADS, HEAD_DIM = 4, 16
D = HEADS * HEAD_DIM
RNG = np.random.default_rng(3)
MULT = RNG.integers(1 << 20, 1 << 21, (1, HEADS, 1, HEAD_DIM)).astype(np.int64)
SCALE = RNG.uniform(1e-4, 1e-3, (1, 1, D)).astype(np.float32)
SHIFT = 30


def _requantize(bb: relax.BlockBuilder, y: relax.Expr, multiplier: relax.Expr) -> relax.Expr:
    y = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(y, "int64")), multiplier))
    y = bb.emit(relax.op.right_shift(y, relax.const(SHIFT, "int64")))
    return bb.emit(relax.op.astype(bb.emit(relax.op.clip(y, -127, 127)), "int8"))


def _heads_module() -> tvm.IRModule:
    """x [b, 64] int32 -> reshape [b, 1, 64] -> [b, 4, 1, 16] (the heads) -> requantized per channel."""
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, D], "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            rows = bb.emit(relax.op.reshape(x, [b, 1, D]))
            heads = bb.emit(relax.op.reshape(rows, [b, HEADS, 1, HEAD_DIM]))
            out = bb.emit_output(_requantize(bb, heads, relax.const(MULT, "int64")))
        bb.emit_func_output(out)
    return bb.get()


def _heads_expected() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, D], "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = _requantize(bb, x, relax.const(MULT.reshape(1, D), "int64"))
            out = bb.emit_output(bb.emit(relax.op.reshape(y, [b, HEADS, 1, HEAD_DIM])))
        bb.emit_func_output(out)
    return bb.get()


def _residual_module() -> tvm.IRModule:
    """r [b, 64] float32 viewed as [b, 1, 64] (used twice) + the dequantized x [b, 64] viewed likewise."""
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, D], "int32"))
    r = relax.Var("r", relax.TensorType([b, D], "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            residual = bb.emit(relax.op.reshape(r, [b, 1, D]))
            scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(bb.emit(relax.op.reshape(x, [b, 1, D])),
                                                                          "float32")), relax.const(SCALE)))
            total = bb.emit(relax.op.add(residual, scaled))
            out = bb.emit_output(bb.emit(relax.op.subtract(total, residual)))
        bb.emit_func_output(out)
    return bb.get()


def _residual_expected() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, D], "int32"))
    r = relax.Var("r", relax.TensorType([b, D], "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(x, "float32")),
                                               relax.const(SCALE.reshape(1, D))))
            total = bb.emit(relax.op.add(r, scaled))
            out = bb.emit_output(bb.emit(relax.op.reshape(bb.emit(relax.op.subtract(total, r)), [b, 1, D])))
        bb.emit_func_output(out)
    return bb.get()


def _masked_scores_module() -> tvm.IRModule:
    """Attention scores [b * 4, 1, t] viewed as [b, 4, 1, t] plus a mask [b, 1, 1, t]: the mask is broadcast over
    the heads, part of the merged b * 4 dimension, so the add cannot run before the reshape."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    scores = relax.Var("scores", relax.TensorType([b * HEADS, 1, t], "float32"))
    mask = relax.Var("mask", relax.TensorType([b, 1, 1, t], "float32"))
    with bb.function("main", [scores, mask]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(bb.emit(relax.op.reshape(scores, [b, HEADS, 1, t])), mask))
        bb.emit_func_output(out)
    return bb.get()


def _growing_module() -> tvm.IRModule:
    """x [b, 64] viewed as [b, 1, 64] times y [b, 3, 64]: the result is larger than x."""
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, D], "float32"))
    y = relax.Var("y", relax.TensorType([b, 3, D], "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.multiply(bb.emit(relax.op.reshape(x, [b, 1, D])), y))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_a_requantization_into_the_heads_runs_before_the_reshapes():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_heads_module()), _heads_expected())


def test_structure_the_operand_used_once_carries_the_chain():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_residual_module()), _residual_expected())


@pytest.mark.parametrize("make", [_masked_scores_module, _growing_module], ids=["partial-broadcast", "growing"])
def test_ops_that_do_not_commute_with_the_reshape_stay(make):
    before = make()
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(before), before)


def _run(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    target = tvm.target.Target(HOST_PRESET.target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(x) for x in inputs)).numpy()


def test_values_are_the_same():
    x = RNG.integers(-1 << 20, 1 << 20, (5, D)).astype(np.int32)
    r = RNG.standard_normal((5, D)).astype(np.float32)
    heads = _run(ReshapesAfterElementwise()(_heads_module()), x)
    expected = np.clip((x.reshape(5, HEADS, 1, HEAD_DIM).astype(np.int64) * MULT) >> SHIFT, -127, 127).astype(np.int8)
    np.testing.assert_array_equal(heads, expected)
    np.testing.assert_array_equal(heads, _run(_heads_module(), x))
    # one fused multiply-add may round differently from a multiply and an add in two kernels
    np.testing.assert_allclose(_run(ReshapesAfterElementwise()(_residual_module()), x, r),
                               _run(_residual_module(), x, r), rtol=1e-6, atol=1e-6)

