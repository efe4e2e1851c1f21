"""Int8BatchMatmul: matmuls of two int8 activations (attention) -> the batched int8 kernel.

``matmul(A [..., I, R], B [..., R, J], out_dtype=int32)`` with int8 operands and equal leading dimensions
(attention's QK^T and softmax.V in the encoder and in the decoder's cross-attention over several queries)
becomes the kernel of :mod:`int8mt.schedules.int8_batch_matmul`, leading dimensions flattened into one;
it packs its second operand at run time. One kernel per combination of static sizes. A product with one
query row (a decoder step) is left alone: packing the keys or values would cost as much as the
matrix-vector product itself (``docs/kernels.md``); :class:`.ReadKeysAsStored` handles it. Broadcasting leading dimensions are left alone too.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.int8_batch_matmul import scheduled_int8_batch_matmul
from int8mt.schedules.intrin import Int8Dot

from .kernel_calls import KernelTable, is_int8_matmul, is_one, rewrite_functions, shape_product


@expr_functor.mutator
class _Batcher(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dot: Int8Dot) -> None:
        super().__init__(mod)
        self.dot, self.kernels, self.analyzer = dot, KernelTable(self.builder_), Analyzer()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not is_int8_matmul(call):
            return call
        a, b = call.args
        if str(b.ty.dtype) != "int8" or a.ty.ndim != b.ty.ndim or a.ty.ndim < 3:
            return call
        a_shape, b_shape = list(a.ty.shape), list(b.ty.shape)
        lead = a_shape[:-2]
        (i, r), j = a_shape[-2:], b_shape[-1]
        if is_one(i) or not all(self.analyzer.can_prove_equal(x, y) for x, y in zip(lead, b_shape[:-2])):
            return call
        batch = shape_product(lead)
        sizes = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in (batch, i, j, r))
        name = "int8_batch_matmul_" + "_".join(f"{axis}{'n' if size is None else size}"
                                               for axis, size in zip("bijr", sizes))
        kernel = self.kernels.get(("batch", *sizes), name, lambda: scheduled_int8_batch_matmul(*sizes, dot=self.dot))
        if len(lead) > 1:
            a = self.builder_.emit(relax.op.reshape(a, [batch, i, r]))
            b = self.builder_.emit(relax.op.reshape(b, [batch, r, j]))
        out = relax.call_tir(kernel, [a, b], relax.TensorType([batch, i, j], "int32"))
        return out if len(lead) == 1 else relax.op.reshape(self.builder_.emit(out), [*lead, i, j])


@tvm.transform.module_pass(opt_level=0, name="int8mt.Int8BatchMatmul")
class Int8BatchMatmul:
    """Matmuls of two int8 activations -> the batched kernel of ``dot`` (see the module docstring)."""

    def __init__(self, dot: Int8Dot) -> None:
        self.dot = dot

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_Batcher(mod, self.dot), mod)
