"""TapIntMatmuls: every integer matmul's activation operands and int32 result become extra outputs (a weight
operand is not tapped); float matmuls are not tapped."""
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from int8mt.compiler.passes import TapIntMatmuls


def test_taps_operands_and_results_in_binding_order():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 4), "int8"), k: R.Tensor((4, 3), "int8"), f: R.Tensor((2, 2), "float32")):
            with R.dataflow():
                w = R.permute_dims(R.const([[1, 2, 3, 4]], "int8"), [1, 0])
                a = R.matmul(x, w, out_dtype="int32")
                b = R.matmul(x, k, out_dtype="int32")
                g = R.matmul(f, f)
                y = R.add(R.sum(a), R.sum(b))
                z = (y, g)
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 4), "int8"), k: R.Tensor((4, 3), "int8"), f: R.Tensor((2, 2), "float32")):
            with R.dataflow():
                w = R.permute_dims(R.const([[1, 2, 3, 4]], "int8"), [1, 0])
                a = R.matmul(x, w, out_dtype="int32")
                b = R.matmul(x, k, out_dtype="int32")
                g = R.matmul(f, f)
                sa = R.sum(a)
                sb = R.sum(b)
                y = R.add(sa, sb)
                z = (y, g)
                R.output(a, b, z)
            return (z, (x, a, x, k, b))

    tvm.ir.assert_structural_equal(TapIntMatmuls()(Before), Expected)
