"""DropIdentityBroadcast: a broadcast of a tensor to its own shape (provably, symbolic sizes included) is dropped and
its users read the tensor; real broadcasts and a function's outputs stay."""
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import DropIdentityBroadcast


def test_broadcast_to_the_own_shape_is_dropped():
    @I.ir_module
    class Before:
        @R.function
        def main(k: R.Tensor(("b", 4, "s", 16), "float32"), q: R.Tensor(("b", 4, 1, 16), "float32")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                kt = R.permute_dims(k, [0, 1, 3, 2])
                same = R.broadcast_to(kt, R.shape([b, 4, 16, s]))
                flat = R.reshape(same, [b * 4, 16, s])
                qf = R.reshape(R.broadcast_to(q, R.shape([b, 4, 1, 16])), [b * 4, 1, 16])
                y = R.matmul(qf, flat, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(k: R.Tensor(("b", 4, "s", 16), "float32"), q: R.Tensor(("b", 4, 1, 16), "float32")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                kt = R.permute_dims(k, [0, 1, 3, 2])
                flat = R.reshape(kt, [b * 4, 16, s])
                qf = R.reshape(q, [b * 4, 1, 16])
                y = R.matmul(qf, flat, out_dtype="float32")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(DropIdentityBroadcast()(Before), Expected)


def test_must_not_fire_on_real_broadcasts_or_outputs():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("b", 1, 16), "float32"), y: R.Tensor(("b", 16), "float32")):
            b = T.int64()
            with R.dataflow():
                wider = R.broadcast_to(x, R.shape([b, 4, 16]))  # a real broadcast
                same = R.broadcast_to(y, R.shape([b, 16]))  # an output of the dataflow block: kept
                R.output(wider, same)
            return (wider, same)

    tvm.ir.assert_structural_equal(DropIdentityBroadcast()(Before), Before)
