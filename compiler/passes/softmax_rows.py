"""SoftmaxRows: a softmax over the last axis followed by its static quantization -> one call of our row kernel.

With static ranges the attention probabilities are quantized for the product with the values: ``q =
quantize(clip(softmax(x, axis=-1), lo, hi), scale)``. TVM fuses the three, but our default schedule runs the
legalized softmax's loops scalar over the rows and computes each exponential twice; here it becomes one call of
:func:`~int8mt.schedules.softmax_rows.softmax_rows_kernel` (the same values bit for bit). Only rows of dynamic
length are rewritten (attention over source or decoded positions): for a static length that is a multiple of the
vector width our schedule adds the exponentials in vector-wide partial sums, another order. The softmax and the
clip must have no other use. CPU targets only: the kernel carries a CPU schedule.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.softmax_rows import softmax_rows_kernel

from .kernel_calls import KernelTable, bindings_and_users, bound_op_call, rewrite_functions
from .quantize_rows import match_static_quantize


@expr_functor.mutator
class _SoftmaxRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = KernelTable(self.builder_)
        self.plans: dict[relax.Var, tuple] = {}  # q -> (x, its quantization)

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        bindings, users = bindings_and_users(func)
        self.plans = {}
        for y in bindings:
            softmax = bound_op_call(y, "relax.nn.softmax", bindings)
            if softmax is None or not self._fits(softmax) or len(users.get(y, [])) != 1:
                continue
            found = match_static_quantize(y, bindings, users)
            if found is not None:
                self.plans[found[0]] = (softmax.args[0], found[1])

    @staticmethod
    def _fits(call: relax.Call) -> bool:
        x = call.args[0]
        return (str(x.ty.dtype) == "float32" and x.ty.shape is not None and x.ty.ndim >= 1
                and int(call.attrs.axis) in (-1, x.ty.ndim - 1) and isinstance(x.ty.shape[-1], tvm.tirx.Var))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        x, quantize = plan
        rank = x.ty.ndim
        key = ("softmax_rows", rank, self.lanes, quantize)
        kernel = self.kernels.get(key, "softmax_rows_quantize", lambda: softmax_rows_kernel(
            rank, self.lanes, quantize).with_attr(KERNEL_ATTR, "softmax_rows"))
        call = relax.call_tir(kernel, [self.visit_expr(x)], relax.TensorType(binding.var.ty.shape, "int8"))
        self.set_var_remap(binding.var, self.builder_.emit(call, binding.var.name))


@tvm.transform.module_pass(opt_level=0, name="int8mt.SoftmaxRows")
class SoftmaxRows:
    """Every softmax over a last axis of dynamic length followed by its static quantization -> one call of our row
    kernel (see the module docstring); ``lanes``: the float32 lanes of the target's vector registers."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _SoftmaxRewriter(mod, self.lanes)
        return relax.transform.DeadCodeElimination()(rewrite_functions(rewriter, mod, before=rewriter.find))
