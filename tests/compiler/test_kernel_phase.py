"""The kernel phase of the pipeline (``kernel_passes``) on small Relax graphs: linear layers with constant int8 weights become the packed int8
kernel (of each dot-product family), matmuls of two int8 activations (attention) the batched kernel, the
compiled graphs equal the integer matmuls for dynamic sizes, and other matmuls stay; FP32 linear layers
become the float kernel with the bias, ReLU and residual in its epilogue."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.pipeline import kernel_passes, relax_pipeline
from int8mt.schedules.int8_dense import DenseTiles, default_tiles, padded
from int8mt.schedules.intrin import int8_dot

from ..conftest import FLOAT_PRESETS, INT8_PRESETS

VNNI = "vnni"  # rewriting needs no VNNI CPU


def _kernels(mod: tvm.IRModule, family: str, tiles_for=None) -> tvm.IRModule:
    """Phase 2 on ``mod`` for the dot product ``family`` (default tiles unless ``tiles_for``)."""
    dot = int8_dot(family)
    passes = kernel_passes(tiles_for or (lambda n, k, fn: default_tiles(n, k, dot)), family)
    return tvm.transform.Sequential(passes)(mod)


def _linear_module(w: np.ndarray, transposed: bool, rank: int = 2, layers: int = 1) -> tvm.IRModule:
    """``layers`` linear layers in a chain (int32 outputs cast back to int8 between them)."""
    n, k = w.shape
    bb = relax.BlockBuilder()
    lead = [tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")][:rank - 1]
    x = relax.Var("x", relax.TensorType([*lead, k], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = x
            for layer in range(layers):
                wl = w if layer == 0 else np.ascontiguousarray(w[: n // 2, :n] // 2)  # another shape
                weight = relax.const(wl) if transposed else relax.const(np.ascontiguousarray(wl.T))
                wt = bb.emit(relax.op.permute_dims(weight, [1, 0])) if transposed else weight
                y = bb.emit(relax.op.matmul(h, wt, out_dtype="int32"))
                if layer + 1 < layers:
                    h = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, relax.const(8, "int32")),
                                                              -128, 127), "int8"))
            z = bb.emit_output(relax.op.add(y, relax.const(np.arange(n if layers == 1 else n // 2, dtype=np.int32))))
        bb.emit_func_output(z)
    return bb.get()


def _attention_module(keys_batch: int | None = None, queries: int | None = None) -> tvm.IRModule:
    """``softmax``-free attention on int8 operands: (Q [b, 4, t, 16] . K^T [b, 4, 16, s]) -> int8 . V [b, 4, s, 8];
    ``keys_batch`` gives K^T a static batch of its own (a broadcasting matmul), ``queries`` a static t."""
    bb = relax.BlockBuilder()
    b, t, s = (tvm.tirx.Var(n, "int64") for n in "bts")
    t = queries or t
    q = relax.Var("q", relax.TensorType([b, 4, t, 16], "int8"))
    k = relax.Var("k", relax.TensorType([keys_batch or b, 4, 16, s], "int8"))
    v = relax.Var("v", relax.TensorType([b, 4, s, 8], "int8"))
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            scores = bb.emit(relax.op.matmul(q, k, out_dtype="int32"))
            p = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(scores, relax.const(6, "int32")),
                                                      -128, 127), "int8"))
            z = bb.emit_output(relax.op.matmul(p, v, out_dtype="int32"))
        bb.emit_func_output(z)
    return bb.get()


def _one_query_module() -> tvm.IRModule:
    """A decoder step's QK^T: q [b, 4, 1, 16] . (K [b, 4, s, 16] permuted to [b, 4, 16, s], heads flattened)."""
    bb = relax.BlockBuilder()
    b, s = (tvm.tirx.Var(n, "int64") for n in "bs")
    q = relax.Var("q", relax.TensorType([b, 4, 1, 16], "int8"))
    k = relax.Var("k", relax.TensorType([b, 4, s, 16], "int8"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            kt = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2])), [b * 4, 16, s]))
            z = bb.emit_output(relax.op.matmul(bb.emit(relax.op.reshape(q, [b * 4, 1, 16])), kt, out_dtype="int32"))
        bb.emit_func_output(z)
    return bb.get()


def _count_calls(mod: tvm.IRModule, kernel: str = "int8_dense") -> int:
    return mod.script().count(f"R.call_tir(cls.{kernel}")


def test_rewrites_linear_layers_only():
    w = np.random.default_rng(0).integers(-127, 128, (48, 20), dtype=np.int8)
    seen = []
    for transposed in (True, False):
        packed = _kernels(_linear_module(w, transposed), VNNI,
                          lambda n, k, fn: seen.append((n, k, fn)) or default_tiles(n, k, int8_dot(VNNI)))
        # the bias add is folded into the kernel's correction
        assert _count_calls(packed) == 1 and "R.matmul" not in packed.script() and "R.add" not in packed.script()
    assert seen == [(48, 20, "main")] * 2
    attention = _kernels(_attention_module(), VNNI)
    assert _count_calls(attention) == 0 and _count_calls(attention, "int8_batch_matmul") == 2
    assert "R.matmul" not in attention.script()
    broadcasting = _kernels(_attention_module(keys_batch=1), VNNI)
    assert _count_calls(broadcasting, "int8_batch_matmul") == 1 and "R.matmul" in broadcasting.script()
    one_query = _kernels(_attention_module(queries=1), VNNI)
    assert _count_calls(one_query, "int8_batch_matmul") == 0 and one_query.script().count("R.matmul") == 2


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_one_query_attention_reads_the_keys_as_stored(preset):
    """The transposed key cache is not copied: the matmul reads K [b*4, s, 16] as stored (one NT kernel)."""
    mod = relax.transform.FuseTransposeMatmul()(
        _kernels(_one_query_module(), preset.int8_dot))
    assert "R.permute_dims" not in mod["main"].script() and mod.script().count("R.call_tir(cls.NT_matmul") == 1
    vm = _vm(mod, preset)
    rng = np.random.default_rng(4)
    for b, s in ((1, 1), (3, 17)):
        q = rng.integers(-128, 128, (b, 4, 1, 16), dtype=np.int8)
        k = rng.integers(-128, 128, (b, 4, s, 16), dtype=np.int8)
        keys = k.astype(np.int32).reshape(b * 4, s, 16).transpose(0, 2, 1)
        expected = q.astype(np.int32).reshape(b * 4, 1, 16) @ keys
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k)).numpy(), expected)


def _vm(mod: tvm.IRModule, preset) -> relax.VirtualMachine:
    target = tvm.target.Target(preset.target)
    return relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())


@pytest.mark.parametrize("preset", INT8_PRESETS)
@pytest.mark.parametrize("shape,tiles,rank", [((64, 32), DenseTiles(4, 2, 4), 2), ((100, 30), None, 2),
                                              ((48, 64), DenseTiles(8, 3, 16), 3), ((16, 4), DenseTiles(1, 1, 1), 3)])
def test_compiled_kernel_equals_integer_matmul(shape, tiles, rank, preset):
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, shape, dtype=np.int8)
    dot = int8_dot(preset.int8_dot)
    mod = _kernels(_linear_module(w, True, rank), preset.int8_dot, lambda n, k, fn: tiles or default_tiles(n, k, dot))
    vm = _vm(mod, preset)
    bias = np.arange(shape[0], dtype=np.int32)
    for lead in ([1], [13], [40]) if rank == 2 else ([1, 1], [3, 7], [2, 20]):
        x = rng.integers(-128, 128, (*lead, shape[1]), dtype=np.int8)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, x.astype(np.int32) @ w.T.astype(np.int32) + bias)


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_several_kernels_in_one_module(preset):
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    dot = int8_dot(preset.int8_dot)
    mod = _kernels(_linear_module(w, True, 2, layers=2), preset.int8_dot)
    assert _count_calls(mod) == 2
    vm = _vm(mod, preset)
    x = rng.integers(-128, 128, (5, 64), dtype=np.int8)
    h = np.clip((x.astype(np.int32) @ w.T.astype(np.int32)) >> 8, -128, 127).astype(np.int32)
    expected = h @ (w[:32] // 2).T.astype(np.int32) + np.arange(32, dtype=np.int32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), expected)


def _embedding_module(table: np.ndarray) -> tvm.IRModule:
    """take(E, ids) then logits = matmul(h, permute_dims(E)): the tied embedding of a decoder."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType([tvm.tirx.Var("b", "int64"), 2], "int64"))
    with bb.function("main", [ids]):
        with bb.dataflow():
            e = relax.const(table)
            rows = bb.emit(relax.op.take(e, ids, axis=0))
            h = bb.emit(relax.op.reshape(rows, [-1, table.shape[1]]))
            z = bb.emit_output(relax.op.matmul(h, bb.emit(relax.op.permute_dims(e, [1, 0])), out_dtype="int32"))
        bb.emit_func_output(z)
    return bb.get()


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_tied_table_is_stored_once_and_gathered_from_its_packed_copy(preset):
    rng = np.random.default_rng(3)
    table = rng.integers(-128, 128, (40, 20), dtype=np.int8)  # padded to a multiple of the lanes when packed
    dot = int8_dot(preset.int8_dot)
    mod = _kernels(_embedding_module(table), preset.int8_dot)
    text = mod.script(show_meta=False)
    assert "R.take" not in text and "int8_packed_rows" in text
    int8_constants = [c for c in _constants(mod) if c.dtype == np.int8]
    np_, kp = padded(40, 20, dot)  # (K to 64 for AMX tiles)
    assert [c.shape for c in int8_constants] == [(np_ // dot.lanes, kp // dot.reduce, dot.lanes, dot.reduce)]
    vm = _vm(mod, preset)
    ids = rng.integers(0, 40, (3, 2)).astype(np.int64)
    h = table[ids.reshape(-1)].astype(np.int32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(ids)).numpy(), h @ table.T.astype(np.int32))


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    """The distinct tensor constants of ``main`` (one entry per constant object)."""
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, tvm.ir.expr.Constant)
                                    and hasattr(e.value, "numpy") else None)
    unique = []
    for c in found:
        if not any(c.same_as(u) for u in unique):
            unique.append(c)
    return [c.value.numpy() for c in unique]


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_compiled_attention_equals_integer_matmuls(preset):
    vm = _vm(_kernels(_attention_module(), preset.int8_dot),
             preset)
    rng = np.random.default_rng(3)
    for b, t, s in [(2, 7, 7), (1, 1, 19), (3, 20, 4)]:
        q, k, v = (rng.integers(-128, 128, shape, dtype=np.int8)
                   for shape in ((b, 4, t, 16), (b, 4, 16, s), (b, 4, s, 8)))
        p = np.clip((q.astype(np.int32) @ k.astype(np.int32)) >> 6, -128, 127).astype(np.int8)
        out = vm["main"](*(tvm.runtime.tensor(x) for x in (q, k, v))).numpy()
        np.testing.assert_array_equal(out, p.astype(np.int32) @ v.astype(np.int32))


def _float_block_module(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> tvm.IRModule:
    """An FP32 feed-forward block as the importer writes it: x [b, t, d] -> relu(x W1^T + b1) W2^T + b2 + x."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, w1.shape[1]], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = x
            for w, bias, last in ((w1, b1, False), (w2, b2, True)):
                y = bb.emit(relax.op.matmul(h, bb.emit(relax.op.permute_dims(relax.const(w), [1, 0])),
                                            out_dtype="float32"))
                y = bb.emit(relax.op.add(relax.const(bias), y))
                h = bb.emit(relax.op.add(y, x) if last else relax.op.nn.relu(y))
            out = bb.emit_output(h)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("preset", FLOAT_PRESETS)
def test_fp32_linear_layers_become_the_float_kernel_with_fused_epilogues(preset):
    rng = np.random.default_rng(5)
    d, f = 24, 40
    w1, b1 = rng.standard_normal((f, d)).astype(np.float32), rng.standard_normal(f).astype(np.float32)
    w2, b2 = rng.standard_normal((d, f)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    mod = tvm.transform.Sequential(kernel_passes(None, None, float_family=preset.float_dot))(_float_block_module(w1, b1, w2, b2))
    main = mod["main"].script()
    assert _count_calls(mod, "float_dense") == 2 and main.count("_to_float32") == 2  # both with an epilogue
    assert "R.matmul" not in main and "R.add" not in main and "relu" not in main
    vm = _vm(mod, preset)
    for lead in ((1, 1), (3, 7), (2, 20)):
        x = rng.standard_normal((*lead, d)).astype(np.float32)
        expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2 + x
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-4, atol=1e-4)
