"""ReadKeysAsStored: a one-query QK^T (int8, or float32) over a transposed view of the key cache becomes a
transpose of the keys as stored (which FuseTransposeMatmul then reads in place); several queries and other layouts
are left alone."""
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import ReadKeysAsStored


def _scores(dtype: str, out: str, as_stored: bool) -> tvm.IRModule:
    """q [b, 4, 1, 16] . keys [b, 4, s, 16] transposed: through a transposed view of the keys as the importer
    writes it, or (``as_stored``) through a transpose of the keys as stored."""
    bb = relax.BlockBuilder()
    b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
    q = relax.Var("q", relax.TensorType([b, 4, 1, 16], dtype))
    k = relax.Var("k", relax.TensorType([b, 4, s, 16], dtype))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            if as_stored:
                qf = bb.emit(relax.op.reshape(q, [b * 4, 1, 16]))
                kt = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(k, [b * 4, s, 16])), [0, 2, 1]))
            else:
                kt = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2])), [b * 4, 16, s]))
                qf = bb.emit(relax.op.reshape(q, [b * 4, 1, 16]))
            y = bb.emit_output(relax.op.matmul(qf, kt, out_dtype=out))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype,out", [("int8", "int32"), ("float32", "float32")])
def test_one_query_scores_read_the_keys_as_stored(dtype, out):
    tvm.ir.assert_structural_equal(ReadKeysAsStored()(_scores(dtype, out, False)), _scores(dtype, out, True))


def test_must_not_fire_with_several_queries_or_without_the_transposed_view():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", 4, 2, 16), "int8"), k: R.Tensor(("b", 4, "s", 16), "int8"),
                 kt: R.Tensor(("b", 4, 16, "s"), "int8")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                swapped = R.permute_dims(k, [0, 1, 3, 2])
                flat = R.reshape(swapped, [b * 4, 16, s])
                qf = R.reshape(q, [b * 4, 2, 16])
                several = R.matmul(qf, flat, out_dtype="int32")
                q1 = R.strided_slice(q, axes=[2], begin=[0], end=[1])
                stored = R.matmul(q1, kt, out_dtype="int32")  # already [.., 16, s] as stored
                gv = (several, stored)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(ReadKeysAsStored()(Before), Before)
