"""PackInt8Matmul on small Relax graphs: linear layers with constant int8 weights become the packed VNNI
kernel, the compiled graph equals the integer matmul for dynamic row counts, and other matmuls stay."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import PackInt8Matmul
from int8mt.compiler.pipeline import int8mt_pipeline
from int8mt.schedules.int8_dense import DenseTiles, default_tiles

from ..conftest import VNNI, needs_vnni


def _linear_module(w: np.ndarray, transposed: bool, rank: int = 2) -> tvm.IRModule:
    n, k = w.shape
    bb = relax.BlockBuilder()
    lead = [tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")][:rank - 1]
    x = relax.Var("x", relax.TensorType([*lead, k], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            weight = relax.const(w) if transposed else relax.const(np.ascontiguousarray(w.T))
            wt = bb.emit(relax.op.permute_dims(weight, [1, 0])) if transposed else weight
            y = bb.emit(relax.op.matmul(x, wt, out_dtype="int32"))
            z = bb.emit_output(relax.op.add(y, relax.const(np.arange(n, dtype=np.int32))))
        bb.emit_func_output(z)
    return bb.get()


def _attention_module() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType([4, 5, 16], "int8"))
    k = relax.Var("k", relax.TensorType([4, 16, 5], "int8"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            z = bb.emit_output(relax.op.matmul(q, k, out_dtype="int32"))
        bb.emit_func_output(z)
    return bb.get()


def _count_calls(mod: tvm.IRModule) -> int:
    return mod.script().count("R.call_tir(cls.int8_dense")


def test_rewrites_linear_layers_only():
    w = np.random.default_rng(0).integers(-127, 128, (48, 20), dtype=np.int8)
    seen = []
    for transposed in (True, False):
        packed = PackInt8Matmul(lambda n, k, fn: seen.append((n, k, fn)) or default_tiles(n, k))(
            _linear_module(w, transposed))
        assert _count_calls(packed) == 1 and "R.matmul" not in packed.script()
    assert seen == [(48, 20, "main")] * 2
    attention = PackInt8Matmul(lambda n, k, fn: default_tiles(n, k))(_attention_module())
    assert _count_calls(attention) == 0 and "R.matmul" in attention.script()


@needs_vnni
@pytest.mark.parametrize("shape,tiles,rank", [((64, 32), DenseTiles(4, 2, 4), 2), ((100, 30), None, 2),
                                              ((48, 64), DenseTiles(8, 3, 16), 3), ((16, 4), DenseTiles(1, 1, 1), 3)])
def test_compiled_kernel_equals_integer_matmul(shape, tiles, rank):
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, shape, dtype=np.int8)
    mod = PackInt8Matmul(lambda n, k, fn: tiles or default_tiles(n, k))(_linear_module(w, True, rank))
    target = tvm.target.Target(VNNI.target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=int8mt_pipeline(target)), tvm.cpu())
    bias = np.arange(shape[0], dtype=np.int32)
    for lead in ([1], [13], [40]) if rank == 2 else ([1, 1], [3, 7], [2, 20]):
        x = rng.integers(-128, 128, (*lead, shape[1]), dtype=np.int8)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, x.astype(np.int32) @ w.T.astype(np.int32) + bias)
