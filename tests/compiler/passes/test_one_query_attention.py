"""OneQueryAttention: a decoder step's one-query QK^T and softmax·V over ``where(past, take(rows, index), new)``
become calls of the kernels that read the rows through the index (structure); their results equal the ops' and
NumPy's (int8 exactly, float32 within rounding) for dynamic sizes, int8 scores also through the x86 multiply-add of
int16 pairs; a gather with another use is left alone. With run-time ranges, each product with its operand's
quantization and its result's dequantization is one call, bit for bit the ops'."""
import re

import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import OneQueryAttention
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.quant.ops import EPS
from int8mt.schedules.intrin import pair_dot
from int8mt.schedules.one_query_attention import context_kernel, quantized_scores_kernel, scores_kernel
from int8mt.schedules.kernel_attrs import ATTENTION_ATTR, KERNEL_ATTR
from int8mt.targets import get_preset

from ...conftest import HOST_PRESET

H, D = 4, 64
HOST_PAIR = getattr(pair_dot(tvm.target.Target(HOST_PRESET.target)), "family", None)  # what the pipeline passes
ACC = {"int8": "int32", "float32": "float32"}
RNG = np.random.default_rng(11)


def _vars(dtype: str):
    b, t, n = (tvm.tirx.Var(name, "int64") for name in ("b", "t", "n"))
    return b, t, n, [relax.Var("rows", relax.TensorType([n, D], dtype)),
                     relax.Var("index", relax.TensorType([b, H, t], "int64")),
                     relax.Var("past", relax.TensorType([b, 1, t, 1], "bool")),
                     relax.Var("new", relax.TensorType([b, H, 1, D], dtype)),
                     relax.Var("q", relax.TensorType([b * H, 1, D], dtype)),
                     relax.Var("p", relax.TensorType([b * H, 1, t], dtype))]


def _module(dtype: str, shared: bool = False) -> tvm.IRModule:
    """``main(rows, index, past, new, q, p)``: the step's QK^T and softmax·V over the gathered keys (``shared``: the
    gathered rows are also returned)."""
    bb = relax.BlockBuilder()
    b, t, _, params = _vars(dtype)
    rows, index, past, new, q, p = params
    with bb.function("main", params):
        with bb.dataflow():
            gathered = bb.emit(relax.op.take(rows, index, axis=0))
            keys = bb.emit(relax.op.where(past, gathered, new))
            scores = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(
                bb.emit(relax.op.reshape(keys, [b * H, t, D])), [0, 2, 1])), out_dtype=ACC[dtype]))
            values = bb.emit(relax.op.where(past, bb.emit(relax.op.take(rows, index, axis=0)), new))
            context = bb.emit(relax.op.matmul(p, bb.emit(relax.op.reshape(values, [b * H, t, D])),
                                              out_dtype=ACC[dtype]))
            out = bb.emit_output(relax.Tuple([scores, context, *([gathered] if shared else [])]))
        bb.emit_func_output(out)
    return bb.get()


def test_structure_both_products_read_the_rows_through_the_index():
    after = OneQueryAttention(16, "avx512bw")(_module("int8"))
    bb = relax.BlockBuilder()
    attrs = {"heads": H, "head_dim": D, "dtype": "int8", "lanes": 16, "pair": "avx512bw"}
    scores_gv = bb.add_func(scores_kernel(H, D, "int8", 16, pair="avx512bw").with_attr(KERNEL_ATTR, "gathered_scores")
                            .with_attr(ATTENTION_ATTR, attrs).without_attr("global_symbol"), "gathered_scores")
    context_gv = bb.add_func(context_kernel(H, D, "int8").with_attr(KERNEL_ATTR, "gathered_context")
                             .with_attr(ATTENTION_ATTR, attrs).without_attr("global_symbol"), "gathered_context")
    b, t, _, params = _vars("int8")
    rows, index, past, new, q, p = params
    with bb.function("main", params):
        with bb.dataflow():
            scores = bb.emit(relax.call_tir(scores_gv, [index, past, q, rows, new],
                                            relax.TensorType([b * H, 1, t], "int32")))
            context = bb.emit(relax.call_tir(context_gv, [index, past, p, rows, new],
                                             relax.TensorType([b * H, 1, D], "int32")))
            out = bb.emit_output(relax.Tuple([scores, context]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_a_gather_with_another_use_is_written_and_read_by_the_direct_kernel():
    text = OneQueryAttention(16)(_module("int8", shared=True)).script()
    assert "gathered_scores" not in text and "direct_scores" in text and "R.take(rows, index" in text
    assert "gathered_context" in text  # the values' gather is their own


@pytest.mark.parametrize("shared", [False, True], ids=["gathered", "direct"])
@pytest.mark.parametrize("dtype, pair", [("int8", None), ("float32", None)] + [("int8", HOST_PAIR)] * bool(HOST_PAIR),
                         ids=lambda x: x or "widened")
def test_kernels_equal_the_ops_and_numpy(dtype, pair, shared):
    target = tvm.target.Target(HOST_PRESET.target)
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (OneQueryAttention(16, pair)(_module(dtype, shared)), _module(dtype, shared))]
    make = ((lambda *s: RNG.integers(-127, 128, s).astype(np.int8)) if dtype == "int8"
            else (lambda *s: RNG.standard_normal(s).astype(np.float32)))
    for b, t in ((1, 1), (3, 7), (5, 20)):
        stored = 1 + b * t
        hist = RNG.integers(1, stored, (b, t))
        hist[:, -1] = 0  # the step's own position: the new key
        index = (hist[:, None, :] * H + np.arange(H)[None, :, None]).astype(np.int64)
        past = (hist > 0)[:, None, :, None]
        inputs = [make(stored * H, D), index, past, make(b, H, 1, D), make(b * H, 1, D), make(b * H, 1, t)]
        got, expected = ([o.numpy() for o in vm["main"](*(tvm.runtime.tensor(x) for x in inputs))] for vm in vms)
        keys = np.where(past, inputs[0][index], inputs[3]).reshape(b * H, t, D).astype(np.float64)
        numpy = [np.einsum("xd,xtd->xt", inputs[4][:, 0].astype(np.float64), keys)[:, None],
                 np.einsum("xt,xtd->xd", inputs[5][:, 0].astype(np.float64), keys)[:, None]]
        for g, e, n in zip(got, expected, numpy):  # (with ``shared``, the gathered rows are compared last)
            if dtype == "int8":
                np.testing.assert_array_equal(g, e)
                np.testing.assert_array_equal(g, n)
            else:
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(g, n, rtol=1e-4, atol=1e-4)


def _row_quantized(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Var, relax.Var]:
    """``x``'s run-time quantization per row, one op per binding as the importer writes it."""
    amax = bb.emit(relax.op.max(bb.emit(relax.op.abs(x)), axis=[-1], keepdims=True))
    scale = bb.emit(relax.op.divide(bb.emit(relax.op.maximum(amax, relax.const(EPS, "float32"))),
                                    relax.const(127.0, "float32")))
    rounded = bb.emit(relax.op.round(bb.emit(relax.op.divide(x, scale))))
    return bb.emit(relax.op.astype(bb.emit(relax.op.clip(rounded, -127, 127)), "int8")), scale


def _runtime_module(gathered: bool, new_from_floats: bool = False, rows: bool = False) -> tvm.IRModule:
    """A step's QK^T and softmax·V with run-time ranges as Scale Propagation leaves them: the query and the
    probabilities (times the values' scales) quantized per row, int8 products, their dequantization; the keys and
    values gathered from the cache's rows with their per-position scales (``gathered``) or stored per pair.
    ``new_from_floats`` (gathered): the new key and value come as floats, are quantized per row (per head) in the
    step as the model's are, and are returned with their scales (for the cache) after the two results. ``rows``:
    the context's heads are merged into rows and quantized per row (the output projection's input), the rows and
    their scales returned instead of the context."""
    b, t, n = (tvm.tirx.Var(name, "int64") for name in ("b", "t", "n"))
    query = relax.Var("query", relax.TensorType([b, H, 1, D], "float32"))
    probs = relax.Var("probs", relax.TensorType([b, H, 1, t], "float32"))
    if gathered and new_from_floats:
        params = [relax.Var("rows", relax.TensorType([n, D], "int8")),
                  relax.Var("scale_rows", relax.TensorType([n, 1], "float32")),
                  relax.Var("index", relax.TensorType([b, H, t], "int64")),
                  relax.Var("past", relax.TensorType([b, 1, t, 1], "bool")),
                  relax.Var("new_key", relax.TensorType([b, H, 1, D], "float32")),
                  relax.Var("new_value", relax.TensorType([b, H, 1, D], "float32")), query, probs]
    elif gathered:
        params = [relax.Var("rows", relax.TensorType([n, D], "int8")),
                  relax.Var("scale_rows", relax.TensorType([n, 1], "float32")),
                  relax.Var("index", relax.TensorType([b, H, t], "int64")),
                  relax.Var("past", relax.TensorType([b, 1, t, 1], "bool")),
                  relax.Var("new", relax.TensorType([b, H, 1, D], "int8")),
                  relax.Var("new_scale", relax.TensorType([b, H, 1, 1], "float32")), query, probs]
    else:
        params = [relax.Var("keys", relax.TensorType([b, H, t, D], "int8")),
                  relax.Var("scales", relax.TensorType([b, H, t, 1], "float32")), query, probs]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            new = {"key": params[4:6], "value": params[4:6]}  # each one's new int8 row and scale, if gathered
            if new_from_floats:
                new = {"key": _row_quantized(bb, params[4]), "value": _row_quantized(bb, params[5])}

            def stored(data: bool, of: str = "key") -> relax.Var:  # keys or values [b, H, t, D], or their scales
                if not gathered:
                    return params[0] if data else params[1]
                rows, scale_rows, index, past = params[:4]
                source, own = (rows, new[of][0]) if data else (scale_rows, new[of][1])
                return bb.emit(relax.op.where(past, bb.emit(relax.op.take(source, index, axis=0)), own))

            def pairs(x: relax.Expr, last, middle=1) -> relax.Var:
                return bb.emit(relax.op.reshape(x, [b * H, middle, last]))

            def heads(x: relax.Expr, last) -> relax.Var:
                return bb.emit(relax.op.reshape(x, [b, H, 1, last]))

            q, q_scale = _row_quantized(bb, query)
            keys = bb.emit(relax.op.permute_dims(pairs(stored(True), D, t), [0, 2, 1]))
            key_scale = pairs(bb.emit(relax.op.permute_dims(stored(False), [0, 1, 3, 2])), t)
            product = bb.emit(relax.op.matmul(pairs(q, D), keys, out_dtype="int32"))
            dequantized = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(heads(product, t), "float32")),
                                                    heads(pairs(q_scale, 1), 1)))
            scores = bb.emit(relax.op.multiply(dequantized, heads(key_scale, t)))
            folded = bb.emit(relax.op.multiply(probs, bb.emit(relax.op.permute_dims(stored(False, "value"),
                                                                                     [0, 1, 3, 2]))))
            p, p_scale = _row_quantized(bb, folded)
            product = bb.emit(relax.op.matmul(pairs(p, t), pairs(stored(True, "value"), D, t), out_dtype="int32"))
            permuted = bb.emit(relax.op.permute_dims(heads(product, D), [0, 2, 1, 3]))
            context = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(permuted, "float32")), bb.emit(
                relax.op.permute_dims(heads(pairs(p_scale, 1), 1), [0, 2, 1, 3]))))
            cache = [*new["key"], *new["value"]] if new_from_floats else []
            merged = _row_quantized(bb, bb.emit(relax.op.reshape(context, [b, 1, H * D]))) if rows else [context]
            out = bb.emit_output(relax.Tuple([scores, *merged, *cache]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("gathered, new_from_floats, rows",
                         [(True, False, False), (True, True, False), (True, True, True), (False, False, False),
                          (False, False, True)],
                         ids=["gathered", "gathered-quantizing-new", "gathered-quantizing-rows", "direct",
                              "direct-quantizing-rows"])
def test_run_time_ranges_each_product_with_its_quantization_is_one_call(gathered, new_from_floats, rows):
    """Each product, its left operand's row quantization and its result's dequantization (and for the gathered
    values, the folding of their scales) become one call; a new key or value quantized in the step is quantized
    by its product's call, which also returns it and its scale for the cache; a context quantized per row of
    merged heads is quantized by its call; the results are the ops' bit for bit."""
    before = _runtime_module(gathered, new_from_floats, rows)
    after = OneQueryAttention(16, HOST_PAIR)(before)
    kind = "gathered" if gathered else "direct"
    new_suffix = "_quantizing_new" if new_from_floats else ""
    calls = [c.args[0].name_hint for c in _calls(after["main"]) if isinstance(c.op, tvm.ir.Op)
             and c.op.name == "relax.call_tir"]
    assert calls == [f"quantized_{kind}_scores{new_suffix}",
                     f"quantized_{kind}_context{'_quantizing_rows' if rows else new_suffix}"]
    left = {c.op.name for c in _calls(after["main"]) if isinstance(c.op, tvm.ir.Op)}
    assert not left & {"relax.abs", "relax.max", "relax.divide", "relax.round", "relax.astype", "relax.where"}
    target = tvm.target.Target(HOST_PRESET.target)
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (after, before)]
    for b, t in ((1, 1), (3, 7), (5, 20)):
        if gathered:
            stored = 1 + b * t
            hist = RNG.integers(1, stored, (b, t))
            hist[:, -1] = 0
            index = (hist[:, None, :] * H + np.arange(H)[None, :, None]).astype(np.int64)
            inputs = [RNG.integers(-127, 128, (stored * H, D)).astype(np.int8),
                      RNG.uniform(0.01, 0.1, (stored * H, 1)).astype(np.float32), index, (hist > 0)[:, None, :, None],
                      *([RNG.standard_normal((b, H, 1, D)).astype(np.float32) for _ in "kv"] if new_from_floats else
                        [RNG.integers(-127, 128, (b, H, 1, D)).astype(np.int8),
                         RNG.uniform(0.01, 0.1, (b, H, 1, 1)).astype(np.float32)])]
        else:
            inputs = [RNG.integers(-127, 128, (b, H, t, D)).astype(np.int8),
                      RNG.uniform(0.01, 0.1, (b, H, t, 1)).astype(np.float32)]
        probs = RNG.uniform(0, 1, (b, H, 1, t)).astype(np.float32)
        inputs += [RNG.standard_normal((b, H, 1, D)).astype(np.float32), probs / probs.sum(-1, keepdims=True)]
        got, expected = ([o.numpy() for o in vm["main"](*(tvm.runtime.tensor(x) for x in inputs))] for vm in vms)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)


def _calls(func: relax.Function) -> list[relax.Call]:
    return [b.value for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]


@pytest.mark.parametrize("preset, register", [("x86-avx512", "zmm"), ("x86-avx2", "ymm")])
def test_int8_scores_multiply_add_int16_pairs_on_x86(preset, register):
    """On x86 the int8 scores' products are one ``vpmaddwd`` per 2 x lanes values (the preset's widest vectors),
    not values widened to int32 and multiplied (``vpmulld``); machine code only, so any x86 machine checks it."""
    target = tvm.target.Target(get_preset(preset).target)
    pair = pair_dot(target)
    lanes = 16 if register == "zmm" else 8
    for kernel in (scores_kernel(H, D, "int8", lanes, pair=pair.family),
                   quantized_scores_kernel(None, D, 127.0, EPS, lanes, pair=pair.family)):
        code = tvm.compile(tvm.IRModule({"main": kernel}), target=target).mod.inspect_source("asm")
        assert re.search(rf"vpmaddwd\s+[^\n]*%{register}", code) and "vpmulld" not in code
