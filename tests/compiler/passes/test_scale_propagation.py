"""The Scale Propagation pass on small Relax graphs: what it rewrites, and that the integer graph it leaves
matches the NumPy integer reference bit for bit."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import ScalePropagation
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.compiler.quant_report import op_report
from int8mt.quant import reference as ref

from ...conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)
ZERO = relax.const(0, "int8")
RNG = np.random.default_rng(0)


def _f32(value) -> relax.Expr:
    return relax.const(np.asarray(value, np.float32), "float32")


def _q(bb, x, scale: float, qmax: int = 127):
    """What the importer emits for a static activation quantizer."""
    clipped = bb.emit(relax.op.clip(x, -qmax * scale, qmax * scale))
    return bb.emit(relax.op.quantize(clipped, _f32(scale), ZERO, axis=-1))


def _dq(bb, q, scale, axis=-1):
    return bb.emit(relax.op.dequantize(q, _f32(scale), ZERO, axis=axis))


def _linear(bb, x_q, x_scale, w_q, w_scale, bias):
    """dequantize -> linear as torch.export + our importer produce it (weight [N, K] per-row scales)."""
    w = _dq(bb, relax.const(w_q, "int8"), w_scale.reshape(-1), axis=0)
    y = bb.emit(relax.op.matmul(_dq(bb, x_q, x_scale), bb.emit(relax.op.permute_dims(w, [1, 0]))))
    return bb.emit(relax.op.add(relax.const(bias, "float32"), y))


def _weights(n: int, k: int):
    w_q = RNG.integers(-127, 128, (n, k)).astype(np.int8)
    return w_q, RNG.uniform(0.001, 0.01, (n, 1)).astype(np.float32), RNG.normal(0, 0.5, n).astype(np.float32)


def _function(build, inputs: dict[str, tuple]) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, dtype)) for name, (shape, dtype) in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def test_ffn_becomes_integer_and_matches_reference_bit_exactly():
    k, hidden, n = 64, 128, 48
    fc1, fc2 = _weights(hidden, k), _weights(n, hidden)
    x_scale, h_scale, out_scale = 0.02, 0.05, 0.04

    def build(bb, x_q):
        h = bb.emit(relax.op.nn.relu(_linear(bb, x_q, x_scale, *fc1)))
        y = _linear(bb, _q(bb, h, h_scale), h_scale, *fc2)
        return _q(bb, y, out_scale)

    mod = _function(build, {"x_q": ((6, k), "int8")})
    before, after = op_report(mod)["total"], op_report(ScalePropagation()(mod))["total"]
    assert before["matmul_float"] == 2 and "matmul_int" not in before
    assert after == {"matmul_int": 2, "requantize": 2}  # no quantize, dequantize or float op left
    assert op_report(ScalePropagation()(mod))["float_ops"] == {}

    x_q = RNG.integers(-127, 128, (6, k)).astype(np.int8)
    got = _run(ScalePropagation()(mod), x_q)
    acc, scale = ref.ffn(x_q, x_scale, fc1, h_scale, fc2, 127)
    np.testing.assert_array_equal(got, ref.requantize(acc, scale, out_scale, 127))
    # and within one step of the float graph it replaces
    np.testing.assert_allclose(got, _run(mod, x_q), atol=1)


def test_equal_scales_cancel_and_residual_adds_in_integers():
    def build(bb, a_q, b_q):
        a, b = _dq(bb, a_q, 0.1), _dq(bb, b_q, 0.025)
        same = _q(bb, a, 0.1)                    # dequantize -> quantize with the same scale
        total = bb.emit(relax.op.add(a, b))      # residual: both integer, scales aligned to 0.025
        return relax.Tuple([same, _q(bb, total, 0.05)])

    mod = ScalePropagation()(_function(build, {"a_q": ((4, 16), "int8"), "b_q": ((4, 16), "int8")}))
    report = op_report(mod)["total"]
    assert report.get("dequantize", 0) == 0 and report.get("quantize", 0) == 0
    a_q, b_q = (RNG.integers(-127, 128, (4, 16)).astype(np.int8) for _ in range(2))
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    same, total = (t.numpy() for t in vm["main"](tvm.runtime.tensor(a_q), tvm.runtime.tensor(b_q)))
    np.testing.assert_array_equal(same, a_q)
    acc = a_q.astype(np.int32) * 4 + b_q.astype(np.int32)  # scale 0.025
    np.testing.assert_array_equal(total, ref.requantize(acc, np.array(0.025), 0.05, 127))


@pytest.mark.parametrize("grown_by", ["concat", "gather"])
def test_cache_requantized_to_its_own_scale_needs_no_clip(grown_by):
    """A decoder step's keys: the int8 cache (an entry-point parameter, within +-127 by contract) and a quantized
    new row, joined by concatenation or, as the decoder step does, by a gather of the cache's rows that takes the
    last position from the new row (``where``). They are dequantized and fake-quantized again at the same scale
    before QK^T. The requantization is the identity: no clip of the whole cache, and the identity broadcast_to is
    dropped. An int8 tensor of unknown range (an int32 input cast down) keeps its clip."""
    def build(bb, cache, new_k, q_q, wide, rows, is_past):
        row = _q(bb, new_k, 0.05)                                                # [H, 1, Dh], clipped
        if grown_by == "concat":
            keys = bb.emit(relax.op.concat([cache, row], axis=1))               # [H, S + 1, Dh] int8
        else:
            keys = bb.emit(relax.op.where(is_past, bb.emit(relax.op.take(bb.emit(relax.op.reshape(cache, (20, 8))),
                                                                         rows, axis=0)), row))
        kt = bb.emit(relax.op.permute_dims(_dq(bb, keys, 0.05), [0, 2, 1]))
        kt = bb.emit(relax.op.broadcast_to(_dq(bb, _q(bb, kt, 0.05), 0.05), (4, 8, 6)))
        unknown = _dq(bb, bb.emit(relax.op.astype(wide, "int8")), 0.05)
        return relax.Tuple([bb.emit(relax.op.matmul(_dq(bb, q_q, 0.02), kt)), _q(bb, unknown, 0.05)])

    mod = _function(build, {"cache": ((4, 5, 8), "int8"), "new_k": ((4, 1, 8), "float32"),
                            "q_q": ((4, 1, 8), "int8"), "wide": ((3,), "int32"), "rows": ((4, 6), "int64"),
                            "is_past": ((1, 6, 1), "bool")})
    script = ScalePropagation()(mod)["main"].script()
    assert script.count("R.clip(") == 2  # the new row's quantization and the unknown-range requantization
    assert "R.broadcast_to" not in script
    cache = RNG.integers(-127, 128, (4, 5, 8)).astype(np.int8)
    new_k = RNG.normal(0, 3, (4, 1, 8)).astype(np.float32)
    q_q = RNG.integers(-127, 128, (4, 1, 8)).astype(np.int8)
    wide = np.array([-128, 127, 300], np.int32)
    rows = RNG.integers(0, 20, (4, 6))
    is_past = (np.arange(6) < 5)[None, :, None]
    vm = relax.VirtualMachine(tvm.compile(ScalePropagation()(mod), TARGET, relax_pipeline=relax_pipeline(TARGET)),
                              tvm.cpu())
    scores, clipped = (t.numpy() for t in vm["main"](*(tvm.runtime.tensor(a) for a in (cache, new_k, q_q, wide,
                                                                                        rows, is_past))))
    row = np.clip(np.floor(new_k / np.float32(0.05) + 0.5), -127, 127).astype(np.int8)
    keys = (np.concatenate([cache, row], axis=1) if grown_by == "concat"
            else np.where(is_past, cache.reshape(20, 8)[rows], row)).astype(np.int32)
    expected = (q_q.astype(np.int32) @ keys.transpose(0, 2, 1)).astype(np.float32) * np.float32(0.02 * 0.05)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_array_equal(clipped, [-127, 127, 44])  # 300 wraps to 44 as int8; -128 is clipped


def test_scales_follow_head_split_and_permute_into_attention_matmul():
    """Per-channel linear output -> reshape into heads -> permute -> quantize: one requantization with a
    per-channel multiplier, then QK^T in integers with the product of per-tensor scales."""
    d, heads = 32, 4
    wq = _weights(d, d)

    def build(bb, x_q, k_q):
        y = _linear(bb, x_q, 0.02, *wq)                                   # [T, D], scale per channel
        y = bb.emit(relax.op.reshape(y, (5, heads, d // heads)))
        y = bb.emit(relax.op.permute_dims(y, [1, 0, 2]))                  # [H, T, Dh]
        q = _dq(bb, _q(bb, y, 0.03), 0.03)
        k = _dq(bb, k_q, 0.05)                                            # [H, Dh, S]
        return bb.emit(relax.op.nn.softmax(bb.emit(relax.op.matmul(q, k))))

    mod = _function(build, {"x_q": ((5, d), "int8"), "k_q": ((heads, d // heads, 7), "int8")})
    after = op_report(ScalePropagation()(mod))
    assert after["total"]["matmul_int"] == 2 and "matmul_float" not in after["total"]
    assert after["total"]["dequantize"] == 1  # only in front of the softmax
    x_q = RNG.integers(-127, 128, (5, d)).astype(np.int8)
    k_q = RNG.integers(-127, 128, (heads, d // heads, 7)).astype(np.int8)
    acc, scale = ref.linear(x_q, 0.02, *wq)
    q = ref.requantize(acc, scale, 0.03, 127).reshape(5, heads, d // heads).transpose(1, 0, 2)
    scores = (q.astype(np.int32) @ k_q.astype(np.int32)).astype(np.float32) * np.float32(0.03 * 0.05)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(_run(ScalePropagation()(mod), x_q, k_q), expected, rtol=1e-5, atol=1e-6)


def test_run_time_scales_reach_the_integer_matmul():
    """Run-time (per-row) quantization as the importer spells it: the matmul still runs on int8."""
    def build(bb, x, w_q):
        scale = bb.emit(relax.op.divide(relax.op.max(relax.op.abs(x), axis=[-1], keepdims=True), _f32(127.0)))
        q = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(relax.op.divide(x, scale)), -127, 127), "int8"))
        xd = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(q, "float32")), scale))
        return bb.emit(relax.op.matmul(xd, _dq(bb, w_q, 0.01)))

    mod = _function(build, {"x": ((3, 4, 16), "float32"), "w_q": ((16, 8), "int8")})
    after = op_report(ScalePropagation()(mod))["total"]
    assert after["matmul_int"] == 1 and "matmul_float" not in after
    x = RNG.normal(size=(3, 4, 16)).astype(np.float32)
    w_q = RNG.integers(-127, 128, (16, 8)).astype(np.int8)
    s = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    x_q = ref.quantize(x, s, 127)
    expected = (x_q.astype(np.int32) @ w_q.astype(np.int32)).astype(np.float32) * (s * np.float32(0.01))
    np.testing.assert_allclose(_run(ScalePropagation()(mod), x, w_q), expected, rtol=1e-6)


@pytest.mark.parametrize("ratio", [1e-6, 0.37, 1.0, 3.5, 1234.5])
def test_fixed_point_multiplier_rounds_half_up(ratio):
    from int8mt.quant.fixed_point import apply_fixed_point, fixed_point

    mult, shift = fixed_point(np.array(ratio))
    assert 2 ** 30 <= mult < 2 ** 31
    x = np.arange(-3000, 3000, dtype=np.int64) * 997
    exact = x * ratio
    got = apply_fixed_point(x, mult, shift)
    assert np.all(np.abs(got - exact) <= 0.5 + 1e-6 * np.abs(exact) + 1e-9)


def test_quantizers_of_one_input_with_equal_scales_are_shared():
    """Q, K and V projections of one layer-norm output: one quantize when the scales are equal, two when not."""
    fc = [_weights(16, 32) for _ in range(3)]

    def build(bb, x, scales=(0.02, 0.02, 0.03)):
        return relax.Tuple([_linear(bb, _q(bb, x, s), s, *w) for s, w in zip(scales, fc)])

    mod = ScalePropagation()(_function(build, {"x": ((5, 32), "float32")}))
    assert op_report(mod)["total"]["quantize"] == 2 and op_report(mod)["total"]["matmul_int"] == 3
    x = RNG.normal(0, 0.5, (5, 32)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    for got, s, (w_q, w_scale, bias) in zip(vm["main"](tvm.runtime.tensor(x)), (0.02, 0.02, 0.03), fc):
        acc, scale = ref.linear(ref.quantize(x, s, 127), s, w_q, w_scale, bias)
        np.testing.assert_allclose(got.numpy(), acc * scale, rtol=1e-5, atol=1e-6)


def test_integer_softmax_of_masked_scores_matches_the_reference():
    """softmax(QK^T + mask) with the integer softmax: no float op on the scores, probabilities exactly
    int8mt.quant.int_softmax's, within the polynomial's error of the float softmax."""
    from int8mt.quant.int_softmax import PROB_BITS, IntSoftmax

    heads, t, s, dh = 2, 3, 7, 8

    def build(bb, q_q, k_q, mask):
        scores = bb.emit(relax.op.matmul(_dq(bb, q_q, 0.03), _dq(bb, k_q, 0.05)))
        probs = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.add(scores, mask)), axis=-1))
        return _q(bb, probs, 1 / 127)

    mod = _function(build, {"q_q": ((heads, t, dh), "int8"), "k_q": ((heads, dh, s), "int8"),
                            "mask": ((1, 1, s), "float32")})
    plain, integer = ScalePropagation()(mod), ScalePropagation(integer_softmax=True)(mod)
    assert "relax.nn.softmax" in op_report(plain)["float_ops"]
    report = op_report(integer)
    assert "relax.nn.softmax" not in report["float_ops"] and report["total"]["softmax_int"] == 1
    q_q = RNG.integers(-127, 128, (heads, t, dh)).astype(np.int8)
    k_q = RNG.integers(-127, 128, (heads, dh, s)).astype(np.int8)
    mask = np.zeros((1, 1, s), np.float32)
    mask[..., 5:] = -1e9
    got = _run(integer, q_q, k_q, mask)
    acc = q_q.astype(np.int32) @ k_q.astype(np.int32)
    probs = IntSoftmax.for_scale(0.03 * 0.05)(acc, mask)
    np.testing.assert_array_equal(got, ref.requantize(probs, np.array(2.0 ** -PROB_BITS), 1 / 127, 127))
    assert np.all(got[..., 5:] == 0)
    np.testing.assert_allclose(got / 127, _run(plain, q_q, k_q, mask) / 127, atol=2 / 127)


def test_integer_softmax_needs_static_ranges():
    from int8mt.quant.config import QuantConfig

    with pytest.raises(ValueError, match="--ranges calibrate or learned"):
        QuantConfig(ranges="runtime", integer_softmax=True)


def test_chained_requantizations_fold_into_one():
    """linear -> quantize(s1) -> dequantize -> quantize(s2): one requantization from the int32 accumulator,
    within both ranges (rounding once, so at most one step from rounding twice)."""
    k, n = 32, 16
    fc = _weights(n, k)

    def build(bb, x_q):
        y = _linear(bb, x_q, 0.02, *fc)
        return _q(bb, _dq(bb, _q(bb, y, 0.05), 0.05), 0.08)

    mod = ScalePropagation()(_function(build, {"x_q": ((6, k), "int8")}))
    assert op_report(mod)["total"] == {"matmul_int": 1, "requantize": 1}
    x_q = RNG.integers(-127, 128, (6, k)).astype(np.int8)
    acc, scale = ref.linear(x_q, 0.02, *fc)
    bound = int(127 * 0.05 / 0.08)
    once = np.clip(ref.requantize(acc, scale, 0.08, 127), -bound, bound)
    got = _run(mod, x_q)
    np.testing.assert_array_equal(got, once)
    twice = ref.requantize(ref.requantize(acc, scale, 0.05, 127), np.array(0.05), 0.08, 127)
    assert np.abs(got.astype(int) - twice).max() <= 1


def test_integer_layer_norm_of_a_residual_sum_matches_the_reference():
    """x (float) + linear(...) (int32, per-channel scale) -> layer norm -> quantize: the sum on the integer
    grid, the layer norm in integers (integer square root), exactly int8mt.quant.int_layer_norm's."""
    from int8mt.quant import int_layer_norm as iln
    from int8mt.quant.fixed_point import apply_fixed_point, fixed_point

    k, n = 32, 48
    fc = _weights(n, k)
    gamma, beta = RNG.normal(1, 0.2, n).astype(np.float32), RNG.normal(0, 0.1, n).astype(np.float32)

    def build(bb, x_q, x):
        y = bb.emit(relax.op.add(x, _linear(bb, x_q, 0.02, *fc)))
        normed = bb.emit(relax.op.nn.layer_norm(y, _f32(gamma), _f32(beta), axes=[-1], epsilon=1e-5))
        return _q(bb, normed, 0.03)

    mod = _function(build, {"x_q": ((2, 5, k), "int8"), "x": ((2, 5, n), "float32")})
    plain, integer = ScalePropagation()(mod), ScalePropagation(integer_layer_norm=True)(mod)
    assert "relax.nn.layer_norm" in op_report(plain)["float_ops"]
    report = op_report(integer)
    assert "relax.nn.layer_norm" not in report["float_ops"] and report["total"]["layer_norm_int"] == 1
    x_q = RNG.integers(-127, 128, (2, 5, k)).astype(np.int8)
    x = RNG.normal(0, 1, (2, 5, n)).astype(np.float32)
    acc, scale = ref.linear(x_q, 0.02, *fc)
    mult, shift = fixed_point(np.broadcast_to(scale, acc.shape) / iln.INPUT_SCALE)
    total = apply_fixed_point(acc, mult, shift) + np.round(x * np.float32(2 ** iln.INPUT_BITS)).astype(np.int64)
    normed = iln.IntLayerNorm.for_params(gamma, beta, 1e-5)(total)
    got = _run(integer, x_q, x)
    np.testing.assert_array_equal(got, ref.requantize(normed, np.array(iln.OUTPUT_SCALE), 0.03, 127))
    assert np.abs(got.astype(int) - _run(plain, x_q, x)).max() <= 1


def test_max_maximum_and_masking_keep_integers():
    """max over an axis, maximum with 0 and where(mask, x, 0) of an integer tensor: no dequantize, the same
    integers as computed on the dequantized values."""
    def build(bb, x_q, mask):
        x = _dq(bb, x_q, 0.05)
        top = bb.emit(relax.op.max(x, axis=[-1], keepdims=True))
        positive = bb.emit(relax.op.maximum(x, _f32(0.0)))
        masked = bb.emit(relax.op.where(mask, x, _f32(0.0)))
        return relax.Tuple([_q(bb, top, 0.05), _q(bb, positive, 0.05), _q(bb, masked, 0.05)])

    mod = ScalePropagation()(_function(build, {"x_q": ((4, 6), "int8"), "mask": ((1, 6), "bool")}))
    report = op_report(mod)["total"]
    assert report.get("dequantize", 0) == 0 and report.get("quantize", 0) == 0
    x_q = RNG.integers(-127, 128, (4, 6)).astype(np.int8)
    mask = np.array([[True, False, True, True, False, True]])
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())
    top, positive, masked = (t.numpy() for t in vm["main"](tvm.runtime.tensor(x_q), tvm.runtime.tensor(mask)))
    np.testing.assert_array_equal(top, x_q.max(-1, keepdims=True))
    np.testing.assert_array_equal(positive, np.maximum(x_q, 0))
    np.testing.assert_array_equal(masked, np.where(mask, x_q, 0))


# -- structure: Before/Expected per rule, what must not fire, and the contract ---------------------------------
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from int8mt.compiler.passes.scale_propagation import (REWRITES, REWRITES_ATTR, RULES,  # noqa: E402
                                                      UnsupportedQuantization)


def _counted(**made: int) -> dict:
    """The function attribute in which the pass counts what it made."""
    return {REWRITES_ATTR: {kind: made.get(kind, 0) for kind in REWRITES}}


def test_rule_requantizes_with_a_multiplier_and_shift():
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 8), "int8")) -> R.Tensor((4, 8), "int8"):
            with R.dataflow():
                f = R.dequantize(a, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1)
                q = R.quantize(f, R.const(0.25, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                R.output(q)
            return q

    @I.ir_module
    class Expected:
        @R.function
        def main(a: R.Tensor((4, 8), "int8")) -> R.Tensor((4, 8), "int8"):
            R.func_attr(_counted(requantize=1))
            with R.dataflow():
                wide = R.astype(a, "int64")
                scaled = R.multiply(wide, R.const(1 << 30, "int64"))  # ratio 2 = 2**30 / 2**29
                rounded = R.add(scaled, R.const(1 << 28, "int64"))
                shifted = R.right_shift(rounded, R.const(29, "int64"))
                clipped = R.clip(shifted, -128, 127)
                q = R.astype(clipped, "int8")
                R.output(q)
            return q

    tvm.ir.assert_structural_equal(ScalePropagation()(Before), Expected)


def test_rule_matmul_relu_clip_quantize_stay_integer():
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 8), "int8"), b: R.Tensor((8, 3), "int8")) -> R.Tensor((4, 3), "int8"):
            with R.dataflow():
                fa = R.dequantize(a, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1)
                fb = R.dequantize(b, R.const(0.25, "float32"), R.const(0, "int8"), axis=-1)
                y = R.matmul(fa, fb)
                r = R.nn.relu(y)
                c = R.clip(r, R.prim_value(-4.0), R.prim_value(4.0))
                q = R.quantize(c, R.const(0.0625, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                R.output(q)
            return q

    @I.ir_module
    class Expected:
        @R.function
        def main(a: R.Tensor((4, 8), "int8"), b: R.Tensor((8, 3), "int8")) -> R.Tensor((4, 3), "int8"):
            R.func_attr(_counted(matmul_int=1, requantize=1))
            with R.dataflow():
                acc = R.matmul(a, b, out_dtype="int32")  # scale 0.5 * 0.25
                r = R.nn.relu(acc)
                wide = R.astype(r, "int64")
                scaled = R.multiply(wide, R.const(1 << 30, "int64"))  # 0.125 / 0.0625 = 2
                rounded = R.add(scaled, R.const(1 << 28, "int64"))
                shifted = R.right_shift(rounded, R.const(29, "int64"))
                clipped = R.clip(shifted, -64, 64)  # the float clip 4.0 on the int8 grid of 0.0625
                q = R.astype(clipped, "int8")
                R.output(q)
            return q

    tvm.ir.assert_structural_equal(ScalePropagation()(Before), Expected)


def test_rule_take_slice_and_max_act_on_the_integers():
    """One rule for the ops that pick or reduce elements; the quantize at the same scale cancels, and no clip
    is needed since the values come from an int8 parameter."""
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 8), "int8"), rows: R.Tensor((2,), "int64")) -> R.Tensor((1, 6), "int8"):
            with R.dataflow():
                f = R.dequantize(a, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1)
                t = R.take(f, rows, axis=0)
                s = R.strided_slice(t, axes=[1], begin=[1], end=[7])
                m = R.max(s, axis=[0], keepdims=True)
                q = R.quantize(m, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                R.output(q)
            return q

    @I.ir_module
    class Expected:
        @R.function
        def main(a: R.Tensor((4, 8), "int8"), rows: R.Tensor((2,), "int64")) -> R.Tensor((1, 6), "int8"):
            R.func_attr(_counted())
            with R.dataflow():
                t = R.take(a, rows, axis=0, mode="fast")
                s = R.strided_slice(t, axes=[1], begin=[1], end=[7])
                m = R.max(s, axis=[0], keepdims=True)
                q = m  # the quantize at the same scale is the identity
                R.output(q)
            return q

    assert {RULES[op] for op in ("relax.take", "relax.strided_slice", "relax.max")} == {"_on_integers"}
    tvm.ir.assert_structural_equal(ScalePropagation()(Before), Expected)


def test_must_not_fire_when_a_scale_varies_along_the_reduction():
    """Per-column activation scales along K cannot be factored out of the sum: the matmul stays in float."""
    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((4, 2), "int8"), w: R.Tensor((2, 3), "int8")) -> R.Tensor((4, 3), "float32"):
            with R.dataflow():
                fa = R.dequantize(a, R.const([0.5, 0.25], "float32"), R.const(0, "int8"), axis=1)
                fw = R.dequantize(w, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1)
                y = R.matmul(fa, fw)
                R.output(y)
            return y

    after = ScalePropagation()(Before)
    assert dict(after["main"].attrs[REWRITES_ATTR]) == _counted()[REWRITES_ATTR]
    tvm.ir.assert_structural_equal(after["main"].without_attr(REWRITES_ATTR), Before["main"])


def _asymmetric(dtype: str, zero_point: int) -> tvm.IRModule:
    @I.ir_module
    class Module:
        @R.function
        def main(a: R.Tensor((4, 8), dtype)) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                f = R.dequantize(a, R.const(0.5, "float32"), R.const(zero_point, dtype), axis=-1)
                y = R.nn.relu(f)
                R.output(y)
            return y

    return Module


@pytest.mark.parametrize("dtype,zero_point,problem", [("int8", 3, "zero point that is not a constant 0"),
                                                      ("uint8", 0, "integer type uint8"),
                                                      ("int16", 0, "integer type int16")])
def test_contract_declines_or_raises_outside_symmetric_int8(dtype, zero_point, problem):
    before = _asymmetric(dtype, zero_point)
    after = ScalePropagation()(before)["main"]  # declined: the graph is left as it is
    tvm.ir.assert_structural_equal(after.without_attr(REWRITES_ATTR), before["main"])
    with pytest.raises(UnsupportedQuantization, match=problem):
        ScalePropagation(strict=True)(before)
