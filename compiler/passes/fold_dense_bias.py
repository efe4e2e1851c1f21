"""FoldDenseBias: a constant bias added to a dense kernel's output -> folded into its correction.

The dense kernel (:class:`.PackDense`) adds its per-column correction vector to every sum anyway, so
``add(dense(x, W, c), bias)`` (or through a reshape of the dense result) becomes ``dense(x, W, c + bias)``: for
int32 sums the same values (with the same wrap-around as the add), for float32 sums (FP32 layers, whose
correction is zero) the sum plus the bias rounded once as before; one pass over the output fewer.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.kernel_attrs import DENSE_KINDS

from .kernel_calls import bound_call, kernel_call, rewrite_functions


@expr_functor.mutator
class _BiasFolder(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != ir.Op.get("relax.add"):
            return call
        for out, bias in (call.args, call.args[::-1]):
            dense, reshaped = kernel_call(self, out, DENSE_KINDS), None
            if dense is None and (view := bound_call(self, out, "relax.reshape")) is not None:
                dense, reshaped = kernel_call(self, view.args[0], DENSE_KINDS), view
            if dense is None or not isinstance(bias, ir.expr.Constant) or str(bias.ty.dtype) != str(dense.ty.dtype):
                continue
            n = int(dense.ty.shape[-1])
            shape = [int(d) for d in bias.ty.shape]
            if shape[-1:] != [n] or any(d != 1 for d in shape[:-1]) or len(shape) > out.ty.ndim:
                continue
            x, packed, correction = dense.args[1].fields
            folded = correction.value.numpy().copy()
            folded[:n] += bias.value.numpy().reshape(n)  # int32: wrap-around, as the add it replaces
            fused = relax.call_tir(dense.args[0], [x, packed, relax.const(folded)], dense.ty)
            return fused if reshaped is None else relax.op.reshape(self.builder_.emit(fused), reshaped.args[1])
        return call


@tvm.transform.module_pass(opt_level=0, name="int8mt.FoldDenseBias")
class FoldDenseBias:
    """Constant biases after dense kernels -> the kernels' corrections (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_BiasFolder(mod), mod)
