"""QuantizeOnce: two or more static quantizations of one tensor (each ``quantize(clip(y, lo, hi), scale)``) become
one call returning them all; a single one stays; the values are the same as the ops' own."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import QuantizeOnce
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cuda_rows import static_quantizations_function
from int8mt.schedules.layer_norm_rows import StaticQuantize

from ...conftest import HOST_PRESET

D = 64
# scales as float32 constants hold them (the pass reads them from the graph's constants)
RANGES = [StaticQuantize(lo, hi, float(np.float32(scale))) for lo, hi, scale in ((-4.5, 4.5, 0.035),
                                                                                  (-2.0, 2.0, 0.0157),
                                                                                  (-6.0, 6.0, 0.05))]


def _module(quantizations: list[StaticQuantize]) -> tvm.IRModule:
    """y [b, 1, 64] quantized with each of ``quantizations`` (the outputs as a tuple)."""
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    y = relax.Var("y", relax.TensorType([b, 1, D], "float32"))
    with bb.function("main", [y]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.quantize(bb.emit(relax.op.clip(y, q.lo, q.hi)), relax.const(q.scale, "float32"),
                                              relax.const(0, "int8"), axis=-1, out_dtype="int8"))
                    for q in quantizations]
            out = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        bb.emit_func_output(out)
    return bb.get()


def _expected() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    y = relax.Var("y", relax.TensorType([b, 1, D], "float32"))
    with bb.function("main", [y]):
        kernel = bb.add_func(static_quantizations_function(3, D, RANGES).without_attr("global_symbol"), "quantize")
        with bb.dataflow():
            call = bb.emit(relax.call_tir(kernel, [y], [relax.TensorType([b, 1, D], "int8")] * len(RANGES)))
            outs = [bb.emit(relax.TupleGetItem(call, i)) for i in range(len(RANGES))]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_the_quantizations_of_one_tensor_become_one_call():
    tvm.ir.assert_structural_equal(QuantizeOnce()(_module(RANGES)), _expected())


def test_a_single_quantization_stays():
    before = _module(RANGES[:1])
    tvm.ir.assert_structural_equal(QuantizeOnce()(before), before)


def test_values_are_the_ops_own():
    target = tvm.target.Target(HOST_PRESET.target)
    y = (np.random.default_rng(4).standard_normal((5, 1, D)) * 3).astype(np.float32)
    y[0, 0, :4] = [0.0175, -0.0175, 4.5, -7.0]  # halfway between two steps of the first scale, and clipped values
    results = []
    for mod in (_module(RANGES), QuantizeOnce()(_module(RANGES))):
        vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
        results.append([x.numpy() for x in vm["main"](tvm.runtime.tensor(y))])
    for before, after, q in zip(*results, RANGES):
        np.testing.assert_array_equal(after, before)
        expected = np.clip(np.round(np.clip(y, q.lo, q.hi) / np.float32(q.scale)), -128, 127).astype(np.int8)
        np.testing.assert_array_equal(after, expected)
