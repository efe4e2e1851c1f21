"""AppendQuantizedRows: a step's appends of its keys' and values' run-time quantizations (int8 rows, scales) ->
appends of the float rows that quantize them themselves; an append whose rows something else also reads stays;
the caches written are the same (the kernel on a GPU's schedule: tests/test_cuda_target.py)."""
import numpy as np
import tvm
from tvm import relax

from int8mt.compiler.passes import AppendQuantizedRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.append_rows import (APPEND_QUANTIZED_ROWS, APPEND_ROWS, append_quantized_rows_kernel,
                                           append_rows_kernel)
from int8mt.schedules.cuda_rows import QUANTIZE_ROWS, quantize_rows_function
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import RowQuantize

from ...conftest import HOST_PRESET

HEADS, WIDTH, QUANTIZE = 2, 8, RowQuantize(127.0, 1e-8)


def _step(quantized: bool, read_elsewhere: bool = False) -> tvm.IRModule:
    """One layer's new key and value ``[b, 2, 1, 8]`` appended to the caches of int8 rows and of their scales after
    their first ``used`` rows, as :func:`~int8mt.compiler.frontend.appending_step` does: each quantized per head
    and its parts returned by the dataflow block, then appended (``quantized``), or the float rows returned and
    appended by the kernels that quantize them. With ``read_elsewhere`` the key's scales the append of scales reads
    are also returned."""
    b, r, used = (tvm.tirx.Var(name, "int64") for name in ("b", "r", "used"))
    bb = relax.BlockBuilder()
    new = [relax.Var(name, relax.TensorType([b, HEADS, 1, WIDTH], "float32")) for name in ("key", "value")]
    caches = [relax.Var("cache_0", relax.TensorType([1, 2, r, HEADS, WIDTH], "int8")),
              relax.Var("cache_1", relax.TensorType([1, 2, r, HEADS, 1], "float32"))]
    rows_used = relax.Var("rows_used", relax.ShapeType([used]))
    if quantized:
        quantize = bb.add_func(quantize_rows_function(4, None, QUANTIZE.qmax, QUANTIZE.eps)
                               .without_attr("global_symbol"), "quantize_rows")
        appends = [bb.add_func(append_rows_kernel(2, HEADS, width, dtype).without_attr("global_symbol"),
                               "append_rows") for width, dtype in ((WIDTH, "int8"), (1, "float32"))]
    else:
        appends = [bb.add_func(append_quantized_rows_kernel(2, HEADS, WIDTH, QUANTIZE, part)
                               .without_attr("global_symbol"), "append_quantized_rows") for part in (0, 1)]
    with bb.function("main", [*new, *caches, rows_used]):
        with bb.dataflow():
            if quantized:
                parts = [bb.emit(relax.call_tir(quantize, [x], [relax.TensorType([b, HEADS, 1, WIDTH], "int8"),
                                                                 relax.TensorType([b, HEADS, 1, 1], "float32")]))
                         for x in new]
                fields = [bb.emit(relax.TupleGetItem(p, i)) for i in (0, 1) for p in parts]
            else:
                fields = [x for _ in (0, 1) for x in new]
            rows = bb.emit_output(relax.Tuple(fields))
        taken = [bb.emit(relax.TupleGetItem(rows, i)) for i in range(4)]
        written = [bb.emit(relax.op.call_tir_inplace(kernel, relax.Tuple([cache, *taken[2 * i:2 * i + 2],
                                                                          relax.prim_value(used)]), 0, cache.ty))
                   for i, (kernel, cache) in enumerate(zip(appends, caches))]
        out = relax.Tuple([*written, *taken[2:3]] if read_elsewhere else written)
        bb.emit_func_output(out)
    return bb.get()


def test_structure_the_appends_quantize_the_new_rows_themselves():
    tvm.ir.assert_structural_equal(AppendQuantizedRows()(_step(quantized=True)), _step(quantized=False))


def test_an_append_of_rows_something_else_also_reads_stays():
    """The scales' append stays (the quantization with it, for the scales returned); the rows' does not."""
    before = _step(quantized=True, read_elsewhere=True)
    after = AppendQuantizedRows()(before)
    kernels = {(str(f.attrs[KERNEL_ATTR]), str(f.params[0].ty.dtype) if "append" in str(f.attrs[KERNEL_ATTR])
                else None) for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels == {(QUANTIZE_ROWS, None), (APPEND_ROWS, "float32"), (APPEND_QUANTIZED_ROWS, "int8")}


def _run(mod: tvm.IRModule, inputs: list[np.ndarray], used: int) -> list[np.ndarray]:
    target = tvm.target.Target(HOST_PRESET.target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in inputs), tvm.runtime.ShapeTuple([used]))
    return [x.numpy() for x in out]


def test_the_caches_written_are_the_same():
    """On this CPU, the caches after the appends, with rows of zeros (the scale's floor) and of one outlier."""
    rng = np.random.default_rng(2)
    b, r, used = 3, 9, 4
    key, value = (rng.standard_normal((b, HEADS, 1, WIDTH)).astype("float32") for _ in range(2))
    key[1, 0] = 0.0
    value[2, 1, 0, 3] = 40.0
    caches = [rng.integers(-127, 128, (1, 2, r, HEADS, WIDTH)).astype("int8"),
              rng.uniform(0.01, 0.1, (1, 2, r, HEADS, 1)).astype("float32")]
    expected = _run(_step(quantized=True), [key, value, *(c.copy() for c in caches)], used)
    got = _run(AppendQuantizedRows()(_step(quantized=True)), [key, value, *(c.copy() for c in caches)], used)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    assert not np.array_equal(expected[0], caches[0])
    np.testing.assert_array_equal(expected[0][:, :, :used], caches[0][:, :, :used])  # (the rows before kept)
