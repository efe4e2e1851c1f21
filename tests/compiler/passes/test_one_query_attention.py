"""OneQueryAttention: a decoder step's one-query QK^T and softmax·V over ``where(past, take(rows, index), new)``
become calls of the kernels that read the rows through the index (structure); their results equal the ops' and
NumPy's (int8 exactly, float32 within rounding) for dynamic sizes; a gather with another use is left alone."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import OneQueryAttention
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.one_query_attention import context_kernel, scores_kernel
from int8mt.schedules.kernel_attrs import KERNEL_ATTR

from ...conftest import HOST_PRESET

H, D = 4, 16
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
    after = OneQueryAttention(16)(_module("int8"))
    bb = relax.BlockBuilder()
    scores_gv = bb.add_func(scores_kernel(H, D, "int8", 16).with_attr(KERNEL_ATTR, "gathered_scores")
                            .without_attr("global_symbol"), "gathered_scores")
    context_gv = bb.add_func(context_kernel(H, D, "int8").with_attr(KERNEL_ATTR, "gathered_context")
                             .without_attr("global_symbol"), "gathered_context")
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
@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_kernels_equal_the_ops_and_numpy(dtype, shared):
    target = tvm.target.Target(HOST_PRESET.target)
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (OneQueryAttention(16)(_module(dtype, shared)), _module(dtype, shared))]
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
