"""MarkCUDAGraphCapture: the decoder step states which parameters are inputs, its rows' bound and that a graph is
captured per row count; ``RewriteCUDAGraph`` then puts the kernels between the step's input-reading ones into
captured functions. On this CPU, with the graph builtins emulated as strictly as a graph replays
(tests/cuda_graph_emulation.py), such a library computes what it computes without graphs: a small step at changing
row counts, and the tiny model's translations."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.passes import LiftWeights, MarkCUDAGraphCapture
from int8mt.compiler.pipeline import compile_module

from ...conftest import HOST_PRESET
from ...cuda_graph_emulation import EmulatedCUDAGraphs

RNG = np.random.default_rng(0)
EMBEDDING = RNG.standard_normal((50, 32)).astype("float32")
LAYERS = [RNG.standard_normal((32, 32)).astype("float32") / 6 for _ in range(3)]


def test_structure_the_step_states_its_inputs_its_rows_bound_and_that_rows_vary_between_graphs():
    @I.ir_module
    class Before:
        @R.function
        def decode_step(tokens: R.Tensor(("rows", 1), "int64"), history: R.Tensor(("rows", "positions"), "int64"),
                        weight0: R.Tensor((8, 4), "float32")) -> R.Tensor(("rows", 4), "float32"):
            rows, positions = T.int64(), T.int64()
            R.func_attr({"int8mt.weight_params": 1, "tir_var_upper_bound": {"positions": 64}})
            with R.dataflow():
                gv = R.zeros(R.shape([rows, 4]), "float32")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def decode_step(tokens: R.Tensor(("rows", 1), "int64"), history: R.Tensor(("rows", "positions"), "int64"),
                        weight0: R.Tensor((8, 4), "float32")) -> R.Tensor(("rows", 4), "float32"):
            rows, positions = T.int64(), T.int64()
            R.func_attr({"int8mt.weight_params": 1, "num_input": 2,
                         "tir_var_upper_bound": {"positions": 64, "rows": 1024},
                         "relax.rewrite_cuda_graph.capture_symbolic_vars": ["rows"]})
            with R.dataflow():
                gv = R.zeros(R.shape([rows, 4]), "float32")
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(MarkCUDAGraphCapture(1024)(Before), Expected)


def test_a_step_of_fixed_rows_is_left_as_it_is():
    @I.ir_module
    class Fixed:
        @R.function
        def decode_step(tokens: R.Tensor((4, 1), "int64"),
                        weight0: R.Tensor((8, 4), "float32")) -> R.Tensor((4, 1), "int64"):
            R.func_attr({"int8mt.weight_params": 1})
            return tokens

    tvm.ir.assert_structural_equal(MarkCUDAGraphCapture(1024)(Fixed), Fixed)


def test_a_step_whose_weights_are_not_lifted_is_refused():
    @I.ir_module
    class Unlifted:
        @R.function
        def decode_step(tokens: R.Tensor(("rows", 1), "int64")) -> R.Tensor(("rows", 1), "int64"):
            return tokens

    with pytest.raises(ValueError, match="LiftWeights"):
        MarkCUDAGraphCapture(1024)(Unlifted)


def _step() -> tvm.IRModule:
    """``decode_step(tokens)``: the tokens' embeddings through three linear layers (ReLU between): the embedding
    reads the step's input and the last layer writes its output; the two between read only weights and buffers
    the step allocates."""
    bb = relax.BlockBuilder()
    tokens = relax.Var("tokens", relax.TensorType([tvm.tirx.Var("rows", "int64"), 1], "int64"))
    with bb.function("decode_step", [tokens]):
        with bb.dataflow():
            x = bb.emit(relax.op.reshape(relax.op.take(relax.const(EMBEDDING), tokens, axis=0),
                                         relax.ShapeExpr([tokens.ty.shape[0], 32])))
            for index, layer in enumerate(LAYERS):
                x = bb.emit(relax.op.matmul(x, relax.const(layer)))
                if index < len(LAYERS) - 1:
                    x = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(x)
        bb.emit_func_output(out)
    return bb.get()


def _expected(tokens: np.ndarray) -> np.ndarray:
    x = EMBEDDING[tokens[:, 0]]
    for index, layer in enumerate(LAYERS):
        x = x @ layer
        x = np.maximum(x, 0) if index < len(LAYERS) - 1 else x
    return x


def test_a_step_built_with_graphs_for_this_cpu_computes_its_values_at_changing_row_counts():
    weights = LiftWeights()
    executable = compile_module(_step(), HOST_PRESET, weights=weights, graphs=MarkCUDAGraphCapture(16))
    assert "@decode_step_cuda_graph_capture " in executable.as_text()  # the two layers between: one graph
    with EmulatedCUDAGraphs() as graphs:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        lifted = [tvm.runtime.tensor(w) for w in weights.weights]
        for rows in (3, 5, 3, 16, 5):
            tokens = RNG.integers(0, len(EMBEDDING), (rows, 1))
            out = vm["decode_step"](tvm.runtime.tensor(tokens), *lifted).numpy()
            np.testing.assert_allclose(out, _expected(tokens), rtol=1e-4, atol=1e-5, err_msg=f"{rows} rows")
    assert (graphs.captures, graphs.replays) == (3, 2)  # one graph per row count (3, 5, 16), replayed for 3 and 5
