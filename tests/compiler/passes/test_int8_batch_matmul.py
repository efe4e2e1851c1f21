"""Int8BatchMatmul: a matmul of two int8 activations with equal leading dimensions (attention over several
queries) becomes the batched kernel, leading dimensions flattened; one query row or broadcasting leading
dimensions are left alone."""
import tvm
from tvm import relax

from int8mt.compiler.passes import Int8BatchMatmul
from int8mt.schedules.int8_batch_matmul import scheduled_int8_batch_matmul

from ._modules import DOT, function


def _operands(queries=None, keys_batch=None) -> tuple[relax.Var, relax.Var]:
    b, t, s = (tvm.tirx.Var(v, "int64") for v in "bts")
    q = relax.Var("q", relax.TensorType([b, 4, queries or t, 16], "int8"))
    k = relax.Var("k", relax.TensorType([keys_batch or b, 4, 16, s], "int8"))
    return q, k


def _scores(queries=None, keys_batch=None) -> tvm.IRModule:
    return function(relax.BlockBuilder(), list(_operands(queries, keys_batch)),
                    lambda bb, q, k: relax.op.matmul(q, k, out_dtype="int32"))


def test_attention_scores_become_the_batched_kernel():
    bb = relax.BlockBuilder()
    name = "int8_batch_matmul_bn_in_jn_r16"  # batch, rows (queries) and columns (keys) dynamic; depth 16
    kernel = bb.add_func(scheduled_int8_batch_matmul(None, None, None, 16, DOT).without_attr("global_symbol"), name)
    q, k = _operands()
    b, _, t, _ = q.ty.shape
    s = k.ty.shape[-1]

    def body(bb, q, k):
        qf = bb.emit(relax.op.reshape(q, [b * 4, t, 16]))
        kf = bb.emit(relax.op.reshape(k, [b * 4, 16, s]))
        out = bb.emit(relax.call_tir(kernel, [qf, kf], relax.TensorType([b * 4, t, s], "int32")))
        return relax.op.reshape(out, [b, 4, t, s])

    tvm.ir.assert_structural_equal(Int8BatchMatmul(DOT)(_scores()), function(bb, [q, k], body))


def test_must_not_fire_on_one_query_or_broadcasting_batches():
    for before in (_scores(queries=1), _scores(keys_batch=1)):
        tvm.ir.assert_structural_equal(Int8BatchMatmul(DOT)(before), before)
