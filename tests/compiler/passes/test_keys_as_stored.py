"""ReadKeysAsStored: a one-query QK^T (int8, or float32) over a transposed view of the key cache becomes a
transpose of the keys as stored (which FuseTransposeMatmul then reads in place); several queries and other layouts
are left alone."""
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import ReadKeysAsStored


def test_one_query_scores_read_the_keys_as_stored():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", 4, 1, 16), "int8"), k: R.Tensor(("b", 4, "s", 16), "int8")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                kt = R.permute_dims(k, [0, 1, 3, 2])
                flat = R.reshape(kt, [b * 4, 16, s])
                qf = R.reshape(q, [b * 4, 1, 16])
                y = R.matmul(qf, flat, out_dtype="int32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor(("b", 4, 1, 16), "int8"), k: R.Tensor(("b", 4, "s", 16), "int8")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                qf = R.reshape(q, [b * 4, 1, 16])
                stored = R.reshape(k, [b * 4, s, 16])
                kt = R.permute_dims(stored, [0, 2, 1])
                y = R.matmul(qf, kt, out_dtype="int32")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(ReadKeysAsStored()(Before), Expected)


def test_float_one_query_scores_read_the_keys_as_stored():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", 4, 1, 16), "float32"), k: R.Tensor(("b", 4, "s", 16), "float32")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                kt = R.permute_dims(k, [0, 1, 3, 2])
                flat = R.reshape(kt, [b * 4, 16, s])
                qf = R.reshape(q, [b * 4, 1, 16])
                y = R.matmul(qf, flat, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(q: R.Tensor(("b", 4, 1, 16), "float32"), k: R.Tensor(("b", 4, "s", 16), "float32")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                qf = R.reshape(q, [b * 4, 1, 16])
                stored = R.reshape(k, [b * 4, s, 16])
                kt = R.permute_dims(stored, [0, 2, 1])
                y = R.matmul(qf, kt, out_dtype="float32")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(ReadKeysAsStored()(Before), Expected)


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
