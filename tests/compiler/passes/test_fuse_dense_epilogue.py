"""FuseDenseEpilogue (after PackDense and FoldDenseBias): the elementwise
chains after int8 linear layers (requantization into the heads' layout, ReLU + requantization,
dequantization + residual, dequantization by a run-time scale that is a product of two factors) become part of
the dense kernel, a result used twice is not fused, and the
compiled graph equals the unfused one bit for bit and NumPy's integer arithmetic, for dynamic sizes."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import FoldDenseBias, FuseDenseEpilogue, PackDense
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.int8_dense import default_tiles
from int8mt.schedules.intrin import int8_dot
from int8mt.targets import get_preset

from ...conftest import INT8_PRESETS

D, HEADS, NARROW = 64, 4, 32
RNG = np.random.default_rng(7)
W1 = RNG.integers(-128, 128, (D, D), dtype=np.int8)
W2 = RNG.integers(-128, 128, (NARROW, D), dtype=np.int8)
MULT = RNG.integers(1 << 20, 1 << 21, (1, HEADS, 1, D // HEADS)).astype(np.int64)
SCALE = RNG.uniform(1e-4, 1e-3, NARROW).astype(np.float32)
SHIFT = 30


def _module() -> tvm.IRModule:
    """Five linear layers on x [b, t, 64]: Q-like (requantized into [b, 4, t, 16]), K^T-like ([b, 4, 16, t]),
    FFN-like (ReLU, requantized), residual-like (dequantized + r [b, t, 32]), run-time-range-like (dequantized
    by each row's scale s [b, t, 1] times each column's); and a sixth whose int32 result has two consumers."""
    bb = relax.BlockBuilder()
    b, t = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
    x = relax.Var("x", relax.TensorType([b, t, D], "int8"))
    r = relax.Var("r", relax.TensorType([b, t, NARROW], "float32"))
    s = relax.Var("s", relax.TensorType([b, t, 1], "float32"))

    def linear(w: np.ndarray) -> relax.Expr:
        return bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(relax.const(w), [1, 0])), out_dtype="int32"))

    def requantize(y: relax.Expr, multiplier: relax.Expr) -> relax.Expr:
        y = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(y, "int64")), multiplier))
        y = bb.emit(relax.op.right_shift(bb.emit(relax.op.add(y, relax.const(1 << (SHIFT - 1), "int64"))),
                                         relax.const(SHIFT, "int64")))
        return bb.emit(relax.op.astype(bb.emit(relax.op.clip(y, -127, 127)), "int8"))

    with bb.function("main", [x, r, s]):
        with bb.dataflow():
            heads = bb.emit(relax.op.reshape(linear(W1), [b, t, HEADS, D // HEADS]))
            q = requantize(bb.emit(relax.op.permute_dims(heads, [0, 2, 1, 3])), relax.const(MULT, "int64"))
            k_heads = bb.emit(relax.op.reshape(linear(W1), [b, t, HEADS, D // HEADS]))
            kt = requantize(bb.emit(relax.op.permute_dims(k_heads, [0, 2, 3, 1])),
                            relax.const(np.ascontiguousarray(MULT.transpose(0, 1, 3, 2)), "int64"))
            ffn = requantize(bb.emit(relax.op.nn.relu(linear(W1))), relax.const(3 << 19, "int64"))
            scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(linear(W2), "float32")), relax.const(SCALE)))
            residual = bb.emit(relax.op.add(r, scaled))
            row_scaled = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(linear(W2), "float32")),
                                                   bb.emit(relax.op.multiply(s, relax.const(SCALE)))))
            shared = linear(W2)
            twice = bb.emit(relax.op.add(bb.emit(relax.op.astype(shared, "float32")),
                                         bb.emit(relax.op.astype(bb.emit(relax.op.nn.relu(shared)), "float32"))))
            out = bb.emit_output(relax.Tuple([q, kt, ffn, residual, row_scaled, twice]))
        bb.emit_func_output(out)
    return bb.get()


def _requantized(acc: np.ndarray, multiplier) -> np.ndarray:
    return np.clip((acc.astype(np.int64) * multiplier + (1 << (SHIFT - 1))) >> SHIFT, -127, 127).astype(np.int8)


def _expected(x: np.ndarray, r: np.ndarray, s: np.ndarray) -> list[np.ndarray]:
    b, t, _ = x.shape
    y1 = x.astype(np.int32) @ W1.T.astype(np.int32)
    y2 = x.astype(np.int32) @ W2.T.astype(np.int32)
    heads = y1.reshape(b, t, HEADS, D // HEADS)
    return [_requantized(heads.transpose(0, 2, 1, 3), MULT),
            _requantized(heads.transpose(0, 2, 3, 1), MULT.transpose(0, 1, 3, 2)),
            _requantized(np.maximum(y1, 0), 3 << 19),
            r + y2.astype(np.float32) * SCALE,
            y2.astype(np.float32) * (s * SCALE),
            y2.astype(np.float32) + np.maximum(y2, 0).astype(np.float32)]


def _packed(preset, fuse: bool) -> tvm.IRModule:
    dot = int8_dot(preset.int8_dot)
    packed = FoldDenseBias()(PackDense(lambda n, k, fn: default_tiles(n, k, dot), dot)(_module()))
    return FuseDenseEpilogue()(packed) if fuse else packed


def test_chains_become_epilogues_and_a_shared_result_does_not():
    text = _packed(get_preset("x86-vnni"), True)["main"].script()  # rewriting needs no VNNI CPU
    assert text.count("R.call_tir(int8_dense") == 6
    assert text.count("_to_int8") == 3 and text.count("_to_float32") == 2
    for op in ("R.right_shift", "R.clip", "R.permute_dims", "R.multiply"):
        assert op not in text, op
    assert text.count("R.nn.relu") == 1 and text.count("R.astype") == 2  # the shared result's consumers


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_fused_kernels_equal_the_unfused_graph_and_numpy(preset):
    target = tvm.target.Target(preset.target)
    vms = [relax.VirtualMachine(tvm.compile(_packed(preset, fuse), target=target,
                                            relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for fuse in (True, False)]
    for b, t in ((1, 1), (3, 7), (2, 20)):
        x = RNG.integers(-128, 128, (b, t, D), dtype=np.int8)
        r = RNG.standard_normal((b, t, NARROW)).astype(np.float32)
        s = RNG.uniform(1e-3, 1e-2, (b, t, 1)).astype(np.float32)
        fused, unfused = ([o.numpy() for o in vm["main"](*(tvm.runtime.tensor(a) for a in (x, r, s)))] for vm in vms)
        for got, same, expected in zip(fused, unfused, _expected(x, r, s)):
            np.testing.assert_array_equal(got, same)
            if got.dtype == np.int8:
                np.testing.assert_array_equal(got, expected)
            else:
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_structure_a_requantization_chain_becomes_one_kernel_call():
    """Before: the dense kernel, then astype/multiply/add/right_shift/clip/astype. Expected: one call of the
    kernel with that chain as its epilogue (the kernel's own code is checked against NumPy above)."""
    from ._modules import DOT, dense_kernel, function, packed, weight

    w = weight(32, 16)

    def before_body(bb, x):
        acc = bb.emit(relax.call_tir(kernel, [x, *packed(w)], relax.TensorType([5, 32], "int32")))
        wide = bb.emit(relax.op.astype(acc, "int64"))
        scaled = bb.emit(relax.op.multiply(wide, relax.const(3, "int64")))
        rounded = bb.emit(relax.op.add(scaled, relax.const(1 << 9, "int64")))
        shifted = bb.emit(relax.op.right_shift(rounded, relax.const(10, "int64")))
        return relax.op.astype(bb.emit(relax.op.clip(shifted, -127, 127)), "int8")

    bb = relax.BlockBuilder()
    kernel = dense_kernel(bb, 32, 16, default_tiles(32, 16, DOT))
    before = function(bb, [relax.Var("x", relax.TensorType([5, 16], "int8"))], before_body)
    after = FuseDenseEpilogue()(before)
    [fused] = [gv for gv in after.get_global_vars() if gv.name_hint.endswith("_to_int8_0")]
    assert {gv.name_hint for gv in after.get_global_vars()} == {"main", fused.name_hint}  # the unfused one is gone

    bb = relax.BlockBuilder()
    kernel_gv = bb.add_func(after[fused], fused.name_hint)
    expected = function(bb, [relax.Var("x", relax.TensorType([5, 16], "int8"))],
                        lambda bb, x: relax.call_tir(kernel_gv, [x, *packed(w)], relax.TensorType([5, 32], "int8")))
    tvm.ir.assert_structural_equal(after, expected)
