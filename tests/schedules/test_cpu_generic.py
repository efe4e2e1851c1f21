"""The default CPU schedule: it applies to every kernel kind we emit and keeps results exact."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.script import relax as R

from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cpu_generic import CPUGeneric, register_bytes
from int8mt.targets import get_preset

from ..conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)
REGISTER = register_bytes(TARGET)  # int8 lanes of a vector register; float32 lanes are a quarter


@tvm.script.ir_module
class RowReductions:
    @R.function
    def main(x: R.Tensor(("n", "t", 256), "float32"), g: R.Tensor((256,), "float32"), b: R.Tensor((256,), "float32")):
        with R.dataflow():
            y = R.nn.layer_norm(x, g, b, axes=[-1])
            R.output(y)
        return y


@tvm.script.ir_module
class CacheGrowth:
    @R.function
    def main(cache: R.Tensor(("n", 4, "s", 64), "int8"), row: R.Tensor(("n", 4, 1, 64), "int8")):
        with R.dataflow():
            grown = R.concat((cache, row), axis=2)
            R.output(grown)
        return grown


@tvm.script.ir_module
class Kernels:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), w: R.Tensor((64, 48), "float32"), b: R.Tensor((48,), "float32"),
             q: R.Tensor(("n", 4, 1, 16), "float32"), k: R.Tensor(("n", 4, 16, "s"), "float32")):
        with R.dataflow():
            y = R.nn.relu(R.add(R.matmul(x, w), b))
            scores = R.nn.softmax(R.matmul(q, k), axis=-1)
            R.output(y, scores)
        return y, scores


def _legalized() -> tvm.IRModule:
    with TARGET:
        return tvm.transform.Sequential(cpu.legalize_passes(TARGET))(Kernels)


def test_every_kernel_gets_a_schedule():
    mod = _legalized()
    kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels
    for func in kernels:
        sch = CPUGeneric().apply(func, TARGET, False)
        assert sch is not None
        assert "T.parallel" in sch.mod.script()


def test_skips_non_cpu_targets():
    func = next(f for f in _legalized().functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    assert CPUGeneric().apply(func, tvm.target.Target({"kind": "c"}), False) is None


@pytest.mark.parametrize("n,s", [(1, 1), (5, 7), (33, 20)])
def test_scheduled_kernels_match_numpy(n, s):
    vm = relax.VirtualMachine(tvm.compile(Kernels, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    rng = np.random.default_rng(n)
    x, w, b = (rng.standard_normal(shape).astype("float32") for shape in ((n, 64), (64, 48), (48,)))
    q, k = rng.standard_normal((n, 4, 1, 16)).astype("float32"), rng.standard_normal((n, 4, 16, s)).astype("float32")
    y, scores = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b, q, k)))
    np.testing.assert_allclose(y.numpy(), np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)
    logits = q @ k
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(scores.numpy(), expected / expected.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_dynamic_score_axis_stays_inside_the_reduction():
    """Q.K^T with a dynamic key length: the key axis becomes the innermost loop (contiguous in K^T) instead of
    being fused into the parallel loop, which would cost a division and a modulo per output element."""
    scores = next(f for gv, f in _legalized().functions.items() if gv.name_hint == "matmul1")  # q @ k
    sch = CPUGeneric().apply(scores, TARGET, False)
    block = sch.get_sblock("matmul_update")
    innermost = sch.get(sch.get_loops(block)[-1])
    assert not isinstance(innermost.extent, tvm.tirx.IntImm)  # the dynamic key length
    assert sch.get(sch.get_loops(block)[0]).kind == tvm.tirx.ForKind.PARALLEL


def test_row_reductions_keep_vector_partial_sums():
    """Layer norm's sums along the contiguous row: VECTOR_WIDTH partial sums per row (rfactor, vectorized)
    instead of a serial chain of dependent float adds; rows in parallel, never the row axis moved inside."""
    func = next(f for f in tvm.transform.Sequential(cpu.legalize_passes(TARGET))(RowReductions).functions.values()
                if isinstance(f, tvm.tirx.PrimFunc))
    script = CPUGeneric().apply(func, TARGET, False).mod.script()
    assert script.count("_rf_update") == 2 and script.count(f"T.vectorized(T.int64({REGISTER // 4}))") >= 4
    vm = relax.VirtualMachine(tvm.compile(RowReductions, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    rng = np.random.default_rng(0)
    g, b = rng.standard_normal(256).astype("float32"), rng.standard_normal(256).astype("float32")
    for shape in ((1, 1, 256), (3, 5, 256), (32, 17, 256)):
        x = (rng.standard_normal(shape) * 4 + 2).astype("float32")
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, g, b))).numpy()
        np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5) * g + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,lanes", [("x86-vnni", 16), ("x86-avx512", 16), ("x86-avx2", 8)])
def test_vector_width_follows_the_target(preset, lanes):
    """Scheduling (no execution) for each preset: float32 partial sums as wide as its vector registers."""
    target = tvm.target.Target(get_preset(preset).target)
    func = next(f for f in tvm.transform.Sequential(cpu.legalize_passes(target))(RowReductions).functions.values()
                if isinstance(f, tvm.tirx.PrimFunc))
    script = CPUGeneric().apply(func, target, False).mod.script()
    assert register_bytes(target) == 4 * lanes and f"T.vectorized(T.int64({lanes}))" in script
    assert not any(f"T.vectorized(T.int64({w}))" in script for w in (4, 8, 16, 32) if w != lanes)


def test_copies_move_whole_registers_and_decompose_indices_per_chunk():
    """A decoder cache's growth (concatenate of int8 rows of 64): one 64-lane vector per row, rows in serial
    chunks inside the parallel loop (a fused index per element cost int64 divisions on every 16 bytes)."""
    func = next(f for f in tvm.transform.Sequential(cpu.legalize_passes(TARGET))(CacheGrowth).functions.values()
                if isinstance(f, tvm.tirx.PrimFunc))
    sch = CPUGeneric().apply(func, TARGET, False)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("T_concat"))]
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL and loops[-1].kind == tvm.tirx.ForKind.VECTORIZED
    assert int(loops[-1].extent) == REGISTER and int(loops[1].extent) == 8  # ROW_CHUNK rows, serial
    vm = relax.VirtualMachine(tvm.compile(CacheGrowth, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    rng = np.random.default_rng(1)
    for n, s in ((1, 0), (2, 5), (3, 17)):
        cache = rng.integers(-128, 128, (n, 4, s, 64), dtype=np.int8)
        row = rng.integers(-128, 128, (n, 4, 1, 64), dtype=np.int8)
        got = vm["main"](tvm.runtime.tensor(cache), tvm.runtime.tensor(row)).numpy()
        np.testing.assert_array_equal(got, np.concatenate([cache, row], axis=2))
