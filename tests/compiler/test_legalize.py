"""Phase 3's legalization: a gather along an index tensor fuses with its consumer (the decoder step's keys); a
gather in TVM's fast mode reads no memory outside its table."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from int8mt.compiler.legalize import legalize_passes
from int8mt.compiler.pipeline import relax_pipeline

from ..conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


def _keys() -> tvm.IRModule:
    """A layer's keys as the decoder step gathers them: rows of the cache through the hypotheses' histories, the
    step's own position from the new key."""
    b, t, n = (tvm.tirx.Var(v, "int64") for v in ("b", "t", "n"))
    rows = relax.Var("rows", R.Tensor((n, 8), "int8"))
    index = relax.Var("index", R.Tensor((b, 2, t), "int64"))
    is_past = relax.Var("is_past", R.Tensor((b, 1, t, 1), "bool"))
    new = relax.Var("new", R.Tensor((b, 2, 1, 8), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [rows, index, is_past, new]):
        with bb.dataflow():
            out = bb.emit_output(R.where(is_past, R.take(rows, index, axis=0), new))
        bb.emit_func_output(out)
    return bb.get()


def test_gather_and_where_are_one_kernel():
    with TARGET:
        mod = tvm.transform.Sequential(legalize_passes())(_keys())
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "take" in kernels[0] and "where" in kernels[0], kernels


def test_fused_gather_computes_the_keys():
    rng = np.random.default_rng(0)
    rows = rng.integers(-127, 128, (11, 8)).astype(np.int8)
    index = rng.integers(0, 11, (3, 2, 5))
    is_past = (np.arange(5) < 4)[None, None, :, None].repeat(3, axis=0)
    new = rng.integers(-127, 128, (3, 2, 1, 8)).astype(np.int8)
    exe = tvm.compile(_keys(), TARGET, relax_pipeline=relax_pipeline(TARGET))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in (rows, index, is_past, new)))
    np.testing.assert_array_equal(got.numpy(), np.where(is_past, rows[index], new))


def test_a_fast_gather_is_clipped_into_its_table_without_tvm_s_warning(capfd):
    """TVM's fast mode reads wherever an index points and warns at every legalization; ours clips: the same rows
    for indices in range, the first or last row for others."""
    table, ids = relax.Var("table", R.Tensor((5, 3), "float32")), relax.Var("ids", R.Tensor((4,), "int64"))
    bb = relax.BlockBuilder()
    with bb.function("main", [table, ids]):
        with bb.dataflow():
            out = bb.emit_output(R.take(table, ids, axis=0))
        bb.emit_func_output(out)
    mod = bb.get()
    assert str(mod["main"].body.blocks[0].bindings[0].value.attrs.mode) == "fast"
    exe = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET))
    assert "Fast mode" not in capfd.readouterr().err
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(rows), tvm.runtime.tensor(
        np.array([4, 0, 1 << 40, -3])))
    np.testing.assert_array_equal(got.numpy(), rows[[4, 0, 4, 0]])
