"""ReshapesAfterElementwise: the requantization after a linear layer's reshape into the heads' layout runs before
the reshape (its per-channel constants reshaped with it), so that it sits next to the matmul; of two reshaped
operands the one used only there carries the chain; a tensor broadcast over part of a merged dimension (the
attention mask over the heads) is broadcast over it once for all its uses; an operand that grows the result keeps
its op after the reshape; the values are the same (a whole model's graph: tests/test_cuda_target.py)."""
from collections.abc import Callable

import numpy as np
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


B, T = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")


def _requantize(bb: relax.BlockBuilder, y: relax.Expr, multiplier: relax.Expr) -> relax.Expr:
    y = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(y, "int64")), multiplier))
    y = bb.emit(relax.op.right_shift(y, relax.const(SHIFT, "int64")))
    return bb.emit(relax.op.astype(bb.emit(relax.op.clip(y, -127, 127)), "int8"))


def _main(params: dict[str, tuple[list, str]], body: Callable[..., relax.Expr]) -> tvm.IRModule:
    """``main`` of the tensors ``params`` (name -> shape, dtype) returning what ``body(bb, *params)`` emits."""
    bb = relax.BlockBuilder()
    args = [relax.Var(name, relax.TensorType(shape, dtype)) for name, (shape, dtype) in params.items()]
    with bb.function("main", args):
        with bb.dataflow():
            result = body(bb, *args)
            out = bb.emit_output(result if isinstance(result, relax.Var) else bb.emit(result))
        bb.emit_func_output(out)
    return bb.get()


def _heads_module() -> tvm.IRModule:
    """x [b, 64] int32 -> reshape [b, 1, 64] -> [b, 4, 1, 16] (the heads) -> requantized per channel."""
    def body(bb, x):
        heads = bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(x, [B, 1, D])), [B, HEADS, 1, HEAD_DIM]))
        return _requantize(bb, heads, relax.const(MULT, "int64"))

    return _main({"x": ([B, D], "int32")}, body)


def _heads_expected() -> tvm.IRModule:
    return _main({"x": ([B, D], "int32")}, lambda bb, x: relax.op.reshape(
        _requantize(bb, x, relax.const(MULT.reshape(1, D), "int64")), [B, HEADS, 1, HEAD_DIM]))


def _residual_module() -> tvm.IRModule:
    """r [b, 64] float32 viewed as [b, 1, 64] (used twice) + the dequantized x [b, 64] viewed likewise."""
    def body(bb, x, r):
        residual = bb.emit(relax.op.reshape(r, [B, 1, D]))
        viewed = bb.emit(relax.op.reshape(x, [B, 1, D]))
        scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(viewed, "float32")), relax.const(SCALE)))
        return relax.op.subtract(bb.emit(relax.op.add(residual, scaled)), residual)

    return _main({"x": ([B, D], "int32"), "r": ([B, D], "float32")}, body)


def _residual_expected() -> tvm.IRModule:
    def body(bb, x, r):
        scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(x, "float32")), relax.const(SCALE.reshape(1, D))))
        return relax.op.reshape(bb.emit(relax.op.subtract(bb.emit(relax.op.add(r, scaled)), r)), [B, 1, D])

    return _main({"x": ([B, D], "int32"), "r": ([B, D], "float32")}, body)


def _masked_scores_module() -> tvm.IRModule:
    """Two layers' attention scores [b * 4, 1, t] viewed as [b, 4, 1, t] plus one mask [b, 1, 1, t] each: the mask
    is broadcast over the heads, part of the merged b * 4 dimension."""
    def body(bb, first, second, mask):
        return relax.Tuple([bb.emit(relax.op.add(bb.emit(relax.op.reshape(scores, [B, HEADS, 1, T])), mask))
                            for scores in (first, second)])

    return _main(_MASKED_PARAMS, body)


def _masked_scores_expected() -> tvm.IRModule:
    def body(bb, first, second, mask):
        heads = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(mask, [B, HEADS, 1, T])), [B * HEADS, 1, T]))
        return relax.Tuple([bb.emit(relax.op.reshape(bb.emit(relax.op.add(scores, heads)), [B, HEADS, 1, T]))
                            for scores in (first, second)])

    return _main(_MASKED_PARAMS, body)


_MASKED_PARAMS = {"first": ([B * HEADS, 1, T], "float32"), "second": ([B * HEADS, 1, T], "float32"),
                  "mask": ([B, 1, 1, T], "float32")}


def _swish_module() -> tvm.IRModule:
    """x [b, 64] (a linear layer's float result) viewed as [b, 1, 64] for its sigmoid, back to [b, 64] and times x:
    the FFN's swish as the model's graph has it."""
    def body(bb, x):
        gate = bb.emit(relax.op.sigmoid(bb.emit(relax.op.reshape(x, [B, 1, D]))))
        return relax.op.multiply(x, bb.emit(relax.op.reshape(gate, [B, D])))

    return _main({"x": ([B, D], "float32")}, body)


def _swish_expected() -> tvm.IRModule:
    return _main({"x": ([B, D], "float32")}, lambda bb, x: relax.op.multiply(x, bb.emit(relax.op.sigmoid(x))))


def _growing_module() -> tvm.IRModule:
    """x [b, 64] viewed as [b, 1, 64] times y [b, 3, 64]: the result is larger than x."""
    return _main({"x": ([B, D], "float32"), "y": ([B, 3, D], "float32")},
                 lambda bb, x, y: relax.op.multiply(bb.emit(relax.op.reshape(x, [B, 1, D])), y))


def test_structure_a_requantization_into_the_heads_runs_before_the_reshapes():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_heads_module()), _heads_expected())


def test_structure_the_operand_used_once_carries_the_chain():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_residual_module()), _residual_expected())


def test_structure_a_mask_over_part_of_a_merged_dimension_is_broadcast_once_for_every_add():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_masked_scores_module()), _masked_scores_expected())


def test_structure_an_activation_runs_before_the_reshapes_so_the_swish_joins_its_linear_layer():
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(_swish_module()), _swish_expected())


def test_an_operand_that_grows_the_result_keeps_its_op_after_the_reshape():
    before = _growing_module()
    tvm.ir.assert_structural_equal(ReshapesAfterElementwise()(before), before)


def _run(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray | list[np.ndarray]:
    target = tvm.target.Target(HOST_PRESET.target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    result = vm["main"](*(tvm.runtime.tensor(x) for x in inputs))
    return result.numpy() if isinstance(result, tvm.runtime.Tensor) else [x.numpy() for x in result]


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

    np.testing.assert_allclose(_run(ReshapesAfterElementwise()(_swish_module()), r), _run(_swish_module(), r),
                               rtol=1e-6, atol=1e-6)

    scores = [RNG.standard_normal((5 * HEADS, 1, 9)).astype(np.float32) for _ in range(2)]
    mask = (RNG.integers(0, 2, (5, 1, 1, 9)) * -1e9).astype(np.float32)
    masked = _run(ReshapesAfterElementwise()(_masked_scores_module()), *scores, mask)
    for got, x in zip(masked, scores):
        np.testing.assert_array_equal(got, x.reshape(5, HEADS, 1, 9) + mask)
