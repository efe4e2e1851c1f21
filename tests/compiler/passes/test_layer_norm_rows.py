"""LayerNormRows: a layer norm becomes one call of our row kernel, which also returns the static or run-time
quantization that follows it (structure); the kernel computes what TVM's legalized ops compute, bit for bit,
for every variant and dynamic sizes; a quantization whose clip has another use stays a kernel of its own. For GPU
targets: one call of the graph's ops with every static quantization of the result (or its row quantization),
also through a take of an axis of size 1, their values the ops' own."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import LayerNormRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cpu_generic import FLOAT_BYTES, register_bytes
from int8mt.schedules.cuda_rows import layer_norm_rows_function
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import StaticQuantize, layer_norm_rows_kernel

from ...conftest import HOST_PRESET
from .test_quantize_rows import EPS, QMAX, _quantize

D = 64
RNG = np.random.default_rng(5)
GAMMA = RNG.uniform(0.5, 1.5, D).astype(np.float32)
BETA = RNG.uniform(-0.5, 0.5, D).astype(np.float32)
SCALE, BOUND = 0.03, 3.5
SECOND_SCALE, SECOND_BOUND = 0.0125, 1.5  # another linear layer's range (``two``)
LANES = register_bytes(tvm.target.Target(HOST_PRESET.target)) // FLOAT_BYTES


def _module(tail: str, residual: bool = True) -> tvm.IRModule:
    """``main(x [b, t, 64])``: ``y = layer_norm(x)``, ``y + 1`` (the residual's use; ``y`` itself if not
    ``residual``) and, by ``tail``, nothing more
    (``plain``), ``quantize(clip(y))`` (``static``; ``shared``: the clip used again; ``two``: and another with its
    own range), or ``y``'s run-time row quantization (``rows``)."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, D], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, relax.const(GAMMA), relax.const(BETA), axes=[-1]))
            outputs = [bb.emit(relax.op.add(y, relax.const(1.0, "float32"))) if residual else y]
            if tail in ("static", "shared", "two"):
                for bound, scale in ((BOUND, SCALE), (SECOND_BOUND, SECOND_SCALE))[:1 + (tail == "two")]:
                    clipped = bb.emit(relax.op.clip(y, -bound, bound))
                    outputs.append(bb.emit(relax.op.quantize(clipped, relax.const(scale, "float32"),
                                                             relax.const(0, "int8"), axis=-1, out_dtype="int8")))
                if tail == "shared":
                    outputs.append(clipped)
            elif tail == "rows":
                q, scale, _ = _quantize(bb, y)
                outputs += [q, scale]
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_layer_norm_and_its_quantization_become_one_call():
    after = LayerNormRows(16)(_module("static"))
    bb = relax.BlockBuilder()
    quantize = StaticQuantize(-BOUND, BOUND, float(np.float32(SCALE)))
    kernel = bb.add_func(layer_norm_rows_kernel(3, D, 1e-5, 16, quantize).with_attr(KERNEL_ATTR, "layer_norm_rows")
                         .without_attr("global_symbol"), f"layer_norm_rows_k{D}")
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, D], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            both = bb.emit(relax.call_tir(kernel, [x, relax.const(GAMMA), relax.const(BETA)], [
                relax.TensorType([b, t, D], "float32"), relax.TensorType([b, t, D], "int8")]))
            y = bb.emit(relax.TupleGetItem(both, 0))
            residual = bb.emit(relax.op.add(y, relax.const(1.0, "float32")))
            q = bb.emit(relax.TupleGetItem(both, 1))
            out = bb.emit_output(relax.Tuple([residual, q]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_a_clip_with_another_use_stays_a_kernel_of_its_own():
    text = LayerNormRows(16)(_module("shared")).script()
    assert "layer_norm_rows_k64" in text and "R.nn.layer_norm" not in text
    assert "R.quantize" in text and "R.clip" in text


@pytest.mark.parametrize("tail", ["plain", "static", "rows"])
def test_kernel_equals_the_ops_bit_for_bit(tail):
    target = tvm.target.Target(HOST_PRESET.target)
    fused = LayerNormRows(LANES)(_module(tail))
    assert "R.nn.layer_norm" not in fused["main"].script() and "R.quantize" not in fused["main"].script()
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (fused, _module(tail))]
    for b, t in ((1, 1), (3, 7), (2, 33)):
        x = (RNG.standard_normal((b, t, D)) * RNG.uniform(0.1, 10, (b, t, 1))).astype(np.float32)
        got, expected = ([o.numpy() for o in vm["main"](tvm.runtime.tensor(x))] for vm in vms)
        for a, e in zip(got, expected):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("scale", [0.03, 0.0137, 3.3e-7, 41.5])
def test_static_quantization_rounds_as_the_op_at_halves(scale):
    """``StaticQuantize`` divides by multiplying with the scale's reciprocal (corrected): its values equal TVM's
    own ``quantize(clip(..))`` on quotients at and next to every half-integer, and where the clip cuts."""
    from tvm.script import tirx as T

    rng = np.random.default_rng(11)
    bound = np.float32(120 * scale)
    quantize = StaticQuantize(-float(bound), float(bound), scale)
    halves = np.arange(-130, 130, dtype=np.float32) + np.float32(0.5)
    x = np.repeat(halves * np.float32(scale), 64)
    steps = rng.integers(-3, 4, x.shape)  # up to three ulps either side
    for _ in range(3):
        x = np.where(steps > 0, np.nextafter(x, np.float32(np.inf)), np.where(steps < 0, np.nextafter(
            x, np.float32(-np.inf)), x)).astype(np.float32)
        steps -= np.sign(steps)
    n = len(x)

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((n,), "float32"), q: T.Buffer((n,), "int8")):
        for i in range(n):
            with T.sblock("q"):
                v = T.axis.spatial(n, i)
                q[v] = quantize.of(a[v])

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([n], "float32"))
    with bb.function("main", [xv]):
        clipped = bb.emit(relax.op.clip(xv, -float(bound), float(bound)))
        bb.emit_func_output(bb.emit(relax.op.quantize(clipped, relax.const(scale, "float32"), relax.const(0, "int8"),
                                                      axis=-1, out_dtype="int8")))
    target = tvm.target.Target(HOST_PRESET.target)
    ops = relax.VirtualMachine(tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    ours = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)["main"]
    q = tvm.runtime.tensor(np.zeros(n, np.int8))
    ours(tvm.runtime.tensor(x), q)
    np.testing.assert_array_equal(q.numpy(), ops["main"](tvm.runtime.tensor(x)).numpy())
    assert len(np.unique(q.numpy())) > 200


def test_structure_for_a_gpu_every_static_quantization_joins_the_layer_norm():
    after = LayerNormRows(lanes=None)(_module("two"))
    bb = relax.BlockBuilder()
    quantizations = tuple(StaticQuantize(-bound, bound, float(np.float32(scale)))
                          for bound, scale in ((BOUND, SCALE), (SECOND_BOUND, SECOND_SCALE)))
    kernel = bb.add_func(layer_norm_rows_function(3, D, 1e-5, quantizations).without_attr("global_symbol"),
                         "layer_norm_rows")
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, D], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            call = bb.emit(relax.call_tir(kernel, [x, relax.const(GAMMA), relax.const(BETA)], [
                relax.TensorType([b, t, D], "float32"), relax.TensorType([b, t, D], "int8"),
                relax.TensorType([b, t, D], "int8")]))
            y = bb.emit(relax.TupleGetItem(call, 0))
            residual = bb.emit(relax.op.add(y, relax.const(1.0, "float32")))
            first = bb.emit(relax.TupleGetItem(call, 1))
            second = bb.emit(relax.TupleGetItem(call, 2))
            out = bb.emit_output(relax.Tuple([residual, first, second]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(relax.transform.DeadCodeElimination()(after), bb.get())


def test_for_a_gpu_a_layer_norm_without_a_quantization_stays():
    before = _module("plain")
    tvm.ir.assert_structural_equal(LayerNormRows(lanes=None)(before), before)


@pytest.mark.parametrize("tail", ["static", "two", "rows"])
def test_gpu_function_returns_the_layer_norm_and_its_quantizations(tail):
    """The function for GPUs, compiled for this CPU: ``y`` within a rounding of the ops' (the sums may be added in
    another order), and the quantizations exactly those of the ``y`` it returns."""
    target = tvm.target.Target(HOST_PRESET.target)
    fused = LayerNormRows(lanes=None)(_module(tail, residual=False))
    assert "R.nn.layer_norm" not in fused["main"].script() and "R.quantize" not in fused["main"].script()
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (fused, _module(tail, residual=False))]
    for b, t in ((1, 1), (3, 7)):
        x = (RNG.standard_normal((b, t, D)) * RNG.uniform(0.1, 10, (b, t, 1))).astype(np.float32)
        got, expected = ([o.numpy() for o in vm["main"](tvm.runtime.tensor(x))] for vm in vms)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
        y = got[0]
        if tail == "rows":
            scale = np.maximum(np.abs(y).max(-1, keepdims=True), np.float32(EPS)) / np.float32(QMAX)
            np.testing.assert_array_equal(got[2], scale)
            np.testing.assert_array_equal(got[1], np.clip(np.round(y / scale), -QMAX, QMAX).astype(np.int8))
            continue
        for q, (bound, scale) in zip(got[1:], ((BOUND, SCALE), (SECOND_BOUND, SECOND_SCALE))):
            expected_q = np.clip(np.round(np.clip(y, -bound, bound) / np.float32(scale)), -128, 127)
            np.testing.assert_array_equal(q, expected_q.astype(np.int8))


def _taken_module(tail: str) -> tvm.IRModule:
    """``main(x [b, 1, 64])``: ``z = take(layer_norm(x), 0, axis=1)`` (a decoder step's one position) and ``z``
    quantized: ``static`` or per row (``rows``)."""
    bb = relax.BlockBuilder()
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, 1, D], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, relax.const(GAMMA), relax.const(BETA), axes=[-1]))
            z = bb.emit(relax.op.take(y, relax.const(0, "int64"), axis=1))
            if tail == "static":
                outputs = [z, bb.emit(relax.op.quantize(bb.emit(relax.op.clip(z, -BOUND, BOUND)),
                                                        relax.const(SCALE, "float32"), relax.const(0, "int8"),
                                                        axis=-1, out_dtype="int8"))]
            else:
                q, scale, _ = _quantize(bb, z)
                outputs = [z, q, scale]
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_for_a_gpu_a_quantized_take_of_the_one_position_joins_the_layer_norm():
    after = relax.transform.DeadCodeElimination()(LayerNormRows(lanes=None)(_taken_module("static")))
    bb = relax.BlockBuilder()
    quantize = (StaticQuantize(-BOUND, BOUND, float(np.float32(SCALE))),)
    kernel = bb.add_func(layer_norm_rows_function(3, D, 1e-5, quantize).without_attr("global_symbol"),
                         "layer_norm_rows")
    b = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, 1, D], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            call = bb.emit(relax.call_tir(kernel, [x, relax.const(GAMMA), relax.const(BETA)], [
                relax.TensorType([b, 1, D], "float32"), relax.TensorType([b, 1, D], "int8")]))
            z = bb.emit(relax.op.take(bb.emit(relax.TupleGetItem(call, 0)), relax.const(0, "int64"), axis=1))
            q = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(call, 1)), [b, D]))
            out = bb.emit_output(relax.Tuple([z, q]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


@pytest.mark.parametrize("tail", ["static", "rows"])
def test_gpu_function_quantizes_through_the_take_as_the_ops(tail):
    target = tvm.target.Target(HOST_PRESET.target)
    fused = LayerNormRows(lanes=None)(_taken_module(tail))
    assert "R.nn.layer_norm" not in fused["main"].script()
    vm = relax.VirtualMachine(tvm.compile(fused, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    x = (RNG.standard_normal((3, 1, D)) * RNG.uniform(0.1, 10, (3, 1, 1))).astype(np.float32)
    z, *quantized = (o.numpy() for o in vm["main"](tvm.runtime.tensor(x)))
    if tail == "rows":
        scale = np.maximum(np.abs(z).max(-1, keepdims=True), np.float32(EPS)) / np.float32(QMAX)
        np.testing.assert_array_equal(quantized[1], scale)
        np.testing.assert_array_equal(quantized[0], np.clip(np.round(z / scale), -QMAX, QMAX).astype(np.int8))
    else:
        expected = np.clip(np.round(np.clip(z, -BOUND, BOUND) / np.float32(SCALE)), -128, 127).astype(np.int8)
        np.testing.assert_array_equal(quantized[0], expected)
