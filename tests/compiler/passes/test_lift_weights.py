"""LiftWeights: large constants become trailing parameters of the entry points (one value per distinct constant,
shared between functions), small ones stay; results are unchanged when the lifted values are passed back. The
lowered entry points check no weight; ``check_weights`` checks them all."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import LiftWeights
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)
RNG = np.random.default_rng(0)
W = RNG.standard_normal((32, 64)).astype("float32")  # 8 KB: lifted
B = RNG.standard_normal((64,)).astype("float32")  # 256 bytes: stays


def _module() -> tvm.IRModule:
    """``first(x) = x @ W + B`` and ``second(y) = y @ W``: the same constant W in both."""
    weight, bias = relax.const(W), relax.const(B)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("n", "int64"), 32], "float32"))
    with bb.function("first", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.matmul(x, weight), bias))
        bb.emit_func_output(out)
    y = relax.Var("y", relax.TensorType([2, 32], "float32"))
    with bb.function("second", [y]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(y, weight))
        bb.emit_func_output(out)
    return bb.get()


def test_large_constants_become_trailing_parameters_shared_by_the_functions():
    lift = LiftWeights()
    mod = lift(_module())
    assert len(lift.weights) == 1 and lift.uses == {"first": [0], "second": [0]}
    np.testing.assert_array_equal(lift.weights[0], W)

    @I.ir_module
    class Expected:
        @R.function
        def first(x: R.Tensor(("n", 32), "float32"), weight0: R.Tensor((32, 64), "float32")) -> R.Tensor(("n", 64), "float32"):
            n = T.int64()
            R.func_attr({"int8mt.weight_params": 1})
            with R.dataflow():
                lv = R.matmul(x, weight0)
                gv = R.add(lv, R.const(B))
                R.output(gv)
            return gv

        @R.function
        def second(y: R.Tensor((2, 32), "float32"), weight0: R.Tensor((32, 64), "float32")) -> R.Tensor((2, 64), "float32"):
            R.func_attr({"int8mt.weight_params": 1})
            with R.dataflow():
                gv = R.matmul(y, weight0)
                R.output(gv)
            return gv

        @R.function
        def check_weights(weight0: R.Tensor((32, 64), "float32")) -> R.Tuple:
            return R.tuple()

    tvm.ir.assert_structural_equal(mod, Expected)


def test_compiled_with_lifted_weights_the_results_are_unchanged():
    lift = LiftWeights()
    lifted = relax.VirtualMachine(tvm.compile(_module(), TARGET, relax_pipeline=relax_pipeline(TARGET, weights=lift)),
                                  tvm.cpu())
    x = RNG.standard_normal((3, 32)).astype("float32")
    weights = [tvm.runtime.tensor(w) for w in lift.weights]
    np.testing.assert_allclose(lifted["first"](tvm.runtime.tensor(x), *weights).numpy(), x @ W + B, rtol=1e-5)
    np.testing.assert_allclose(lifted["second"](tvm.runtime.tensor(x[:2]), *weights).numpy(), x[:2] @ W, rtol=1e-5)


def test_equal_values_are_lifted_once():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.matmul(x, relax.const(W)), relax.op.matmul(x, relax.const(W))))
        bb.emit_func_output(out)
    lift = LiftWeights()
    mod = lift(bb.get())
    assert len(lift.weights) == 1 and lift.uses == {"main": [0]} and len(mod["main"].params) == 2


def test_lowered_entry_points_check_no_weight_and_check_weights_checks_them():
    lift = LiftWeights()
    lowered = relax_pipeline(TARGET, weights=lift)(_module())

    def checked(name: str) -> list[str]:  # the parameters whose dtype and shape the function checks
        func = lowered[name]
        return [b.value.args[0].name for block in func.body.blocks for b in block.bindings
                if isinstance(b.value, relax.Call) and isinstance(b.value.op, relax.ExternFunc)
                and str(b.value.op.global_symbol) in ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")
                and b.value.args[0] in func.params]

    assert checked("first") == ["x", "x"] and checked("second") == ["y", "y"]
    assert checked("check_weights") == ["weight0", "weight0"]
    executable = tvm.compile(_module(), TARGET, relax_pipeline=relax_pipeline(TARGET, weights=LiftWeights()))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    vm["check_weights"](tvm.runtime.tensor(W))
    with pytest.raises(Exception, match="ErrorContext.*weight0"):
        vm["check_weights"](tvm.runtime.tensor(W[:, :32].copy()))
