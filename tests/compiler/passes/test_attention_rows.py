"""AttentionRows: a decoder step's one-query attention (the self-attention's keys and values gathered from the
cache's rows, the cross-attention's with a mask) -> one call of one function of the graph's own ops in the heads'
layout; chains it cannot take stay; the values are the same (the GPU schedule: tests/test_cuda_target.py; a whole
model's graph: ``test_the_kernel_phase_of_a_gpu_preset_computes_the_same_on_this_cpu``)."""
import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.script import ir as I, relax as R, tirx as T

from int8mt.compiler.legalize import legalize_map
from int8mt.compiler.passes import AttentionRows
from int8mt.compiler.pipeline import relax_pipeline
from int8mt.schedules.cuda_attention_rows import ATTENTION_ROWS
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.quantize_rows import OPAQUE

from ...conftest import HOST_PRESET
from ._modules import cross_attention_module, runtime_self_attention_module, self_attention_module


def _self_attention_expected() -> tvm.IRModule:
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def arange(heads: T.Buffer((T.int64(2),), "int64")):
            T.func_attr({"tirx.noalias": True})
            for h in range(T.int64(2)):
                with T.sblock("T_arange"):
                    v_h = T.axis.spatial(T.int64(2), h)
                    T.reads()
                    T.writes(heads[v_h])
                    heads[v_h] = T.Cast("int64", v_h)

        @R.function(private=True)
        def attention_rows(q: R.Tensor(("b", 2, 1, 8), "int8"), rows_k: R.Tensor(("r", 8), "int8"),
                           history: R.Tensor(("b", "t"), "int64"), new_k: R.Tensor(("b", 2, 1, 8), "int8"),
                           rows_v: R.Tensor(("r", 8), "int8"), new_v: R.Tensor(("b", 2, 1, 8), "int8")):
            R.func_attr({"Primitive": True})
            cls = Expected
            with R.dataflow():
                first = R.multiply(R.expand_dims(history, axis=[1]), R.const(2, "int64"))  # the rows of head 0
                heads = R.call_tir(cls.arange, R.tuple(), out_ty=R.Tensor((2,), "int64"))
                index = R.add(first, R.expand_dims(R.expand_dims(heads, axis=[0]), axis=[2]))
                rows = R.take(rows_k, index, axis=0)
                past = R.expand_dims(R.expand_dims(R.greater(history, R.const(0, "int64")), axis=[1]), axis=[3])
                keys = R.where(past, rows, new_k)
                s = R.matmul(q, R.permute_dims(keys, [0, 1, 3, 2]), out_dtype="int32")
                f = R.multiply(R.astype(s, "float32"), R.const(0.0001, "float32"))
                p = R.nn.softmax(f, axis=-1)
                pq = R.quantize(R.clip(p, -1.0, 1.0), R.const(0.0078125, "float32"), R.const(0, "int8"),
                                out_dtype="int8", axis=-1)
                values = R.where(past, R.take(rows_v, index, axis=0), new_v)
                c = R.matmul(pq, values, out_dtype="int32")
                o = R.astype(R.clip(R.right_shift(R.multiply(R.astype(c, "int64"), R.const(1, "int64")),
                                                  R.const(7, "int64")), -127, 127), "int8")
                R.output(o)
            return o

        @R.function
        def main(q: R.Tensor(("b", 2, 1, 8), "int8"), rows_k: R.Tensor(("r", 8), "int8"),
                 rows_v: R.Tensor(("r", 8), "int8"), history: R.Tensor(("b", "t"), "int64"),
                 new_k: R.Tensor(("b", 2, 1, 8), "int8"), new_v: R.Tensor(("b", 2, 1, 8), "int8")):
            cls = Expected
            with R.dataflow():
                o4 = cls.attention_rows(q, rows_k, history, new_k, rows_v, new_v)
                R.output(o4)
            return o4

    # the primitive function as the pipeline legalizes it, fused into the one PrimFunc the call takes, which writes
    # its result [b, 2, 1, 8] as the graph's reshape of it has it ([b, 1, 16]: the same bytes), the reshape gone
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(legalize_map()), relax.transform.FuseTIR()])(Expected)
    gv = mod.get_global_var("attention_rows")
    sch = s_tir.Schedule(mod[gv])
    sch.transform_layout(sch.get_sblock("compute4"), ("write", 0), lambda b, h, _, d: (b, T.int64(0), h * 8 + d))
    mod[gv] = sch.mod["main"].with_attrs({KERNEL_ATTR: ATTENTION_ROWS, "op_pattern": OPAQUE})
    main = mod["main"]
    (call,) = [binding.value for binding in main.body.blocks[0].bindings]
    bb = relax.BlockBuilder(tvm.IRModule({gv: mod[gv]}))
    with bb.function("main", main.params):
        with bb.dataflow():
            batch = main.params[0].ty.shape[0]
            written = bb.emit(relax.call_tir(gv, call.args[1], relax.TensorType([batch, 1, 16], "int8")))
            out = bb.emit_output(written, "out")
        bb.emit_func_output(out)
    return bb.get()


def test_a_self_attention_with_its_gathers_becomes_one_function_in_the_heads_layout():
    after = AttentionRows()(self_attention_module())
    tvm.ir.assert_structural_equal(after, _self_attention_expected())


def _attention_calls(mod: tvm.IRModule) -> list[relax.Call]:
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if (
        isinstance(e, relax.Call) and e.op == tvm.ir.Op.get("relax.call_tir")
        and mod[e.args[0]].attrs.get(KERNEL_ATTR) == ATTENTION_ROWS) else None)
    return calls


def test_a_cross_attention_reads_its_operands_as_stored_and_makes_the_mask_itself():
    """The keys and values as stored (no reshape, no gather), the mask computed in the function from the source's
    tokens (no kernel of its own, no broadcast over the heads); nothing else left in the graph, the result written
    as the graph's reshape of it has it ([b, 1, 16], no reshape)."""
    after = AttentionRows()(cross_attention_module())
    (call,) = _attention_calls(after)
    q, keys, values, src = after["main"].params
    assert list(call.args[1].fields) == [q, keys, src, values]
    ops = []
    relax.analysis.post_order_visit(after["main"], lambda e: ops.append(e.op.name) if (
        isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)) else None)
    assert ops == ["relax.call_tir"]


def test_an_attention_whose_probabilities_are_used_elsewhere_stays():
    before = self_attention_module(softmax_used_twice=True)
    tvm.ir.assert_structural_equal(AttentionRows()(before), before)


def _run(mod: tvm.IRModule, *inputs: np.ndarray) -> list[np.ndarray]:
    target = tvm.target.Target(HOST_PRESET.target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in inputs))
    return [x.numpy() for x in (out if isinstance(out, (list, tuple, tvm.ir.Array)) else [out])]


@pytest.mark.parametrize("batch,positions", [(3, 5), (2, 70)])
def test_the_function_computes_what_the_graph_computes(batch, positions):
    """Both attentions before and after the pass, compiled for this CPU: the same int8 context rows (positions
    past one chunk of the GPU kernel's threads too)."""
    rng = np.random.default_rng(positions)
    rows = 11
    history = rng.integers(0, rows, (batch, positions)) * (rng.random((batch, positions)) < 0.8)  # most past
    inputs = [rng.integers(-127, 128, (batch, 2, 1, 8)).astype("int8"),
              *(rng.integers(-127, 128, (rows * 2, 8)).astype("int8") for _ in range(2)), history,
              *(rng.integers(-127, 128, (batch, 2, 1, 8)).astype("int8") for _ in range(2))]
    np.testing.assert_array_equal(_run(AttentionRows()(self_attention_module()), *inputs),
                                  _run(self_attention_module(), *inputs))
    keys, values = (rng.integers(-127, 128, (batch, 2, positions, 8)).astype("int8") for _ in range(2))
    src = rng.integers(0, 5, (batch, positions))  # a fifth padding
    after = _run(AttentionRows()(cross_attention_module()), inputs[0], keys, values, src)
    np.testing.assert_array_equal(after, _run(cross_attention_module(), inputs[0], keys, values, src))
    assert np.abs(after[0]).max() > 0


def test_a_run_time_range_attention_takes_its_scales_gathers_and_row_quantizations():
    """Run-time ranges: the query's row quantization (read by the attention only), the keys' and values' scales
    gathered beside their rows, the probabilities scaled across a moved axis of size 1, their row quantization and
    the context's dequantization all go into the one function, which takes the float query, the cache's rows and
    scales, the index and the step's own; the same values on this CPU."""
    before = runtime_self_attention_module()
    after = AttentionRows()(before)
    (call,) = _attention_calls(after)
    params = {p.name: p for p in after["main"].params}
    assert set(call.args[1].fields) == set(params.values())
    ops = []
    relax.analysis.post_order_visit(after["main"], lambda e: ops.append(e) if isinstance(e, relax.Call) else None)
    assert [e for e in ops if not e.same_as(call)] == []  # its result written [b, 1, 16], as the graph reshapes it

    rng = np.random.default_rng(9)
    batch, positions, rows = 3, 70, 13
    shapes = {p.name: [int(d) if isinstance(d, tvm.tirx.IntImm) else {"b": batch, "t": positions, "r": rows}[
        str(d)] for d in p.ty.shape] for p in before["main"].params}
    inputs = []
    for p in before["main"].params:
        shape, dtype = shapes[p.name], str(p.ty.dtype)
        if p.name == "index":
            inputs.append(rng.integers(0, rows, shape))
        elif dtype == "bool":
            inputs.append(rng.random(shape) < 0.8)
        elif dtype == "int8":
            inputs.append(rng.integers(-127, 128, shape).astype("int8"))
        elif p.name in ("query", "key", "value"):
            inputs.append(rng.standard_normal(shape).astype("float32"))
        else:
            inputs.append(rng.uniform(0.001, 0.01, shape).astype("float32"))
    expected = _run(before, *inputs)
    np.testing.assert_allclose(_run(after, *inputs), expected, rtol=1e-6)
    assert np.abs(expected[0]).max() > 0


def test_a_query_quantization_read_elsewhere_stays_a_call_of_its_own():
    """A row quantization of the query whose scales something else also reads (as the cache reads the keys' and
    values') stays outside: the function takes its parts."""
    after = AttentionRows()(runtime_self_attention_module(query_read_elsewhere=True))
    (call,) = _attention_calls(after)
    calls = []
    relax.analysis.post_order_visit(after["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    (quantization,) = [c for c in calls if c.op == tvm.ir.Op.get("relax.call_tir") and not c.same_as(call)]
    assert quantization.args[0].name_hint == "quantize_rows"
    assert "query" not in {a.name for a in call.args[1].fields}
