"""SoftmaxRows: a softmax over the last axis -> one call of our row kernel, with what follows it where it can.

TVM fuses a softmax with the elementwise ops after it, but our default schedule runs the legalized softmax's loops
scalar over the rows and computes each exponential twice; here it becomes one call of
:func:`~int8mt.schedules.softmax_rows.softmax_rows_kernel` (the same values bit for bit), which also computes:

* with static ranges, the attention probabilities' quantization ``quantize(clip(y, lo, hi), scale)``;
* with run-time ranges, their product with the values' per-position scales (``y * m``, ``m`` of ``y``'s shape with
  1 for the queries), and that product's run-time quantization per row where it follows (the encoder's
  softmax·V operand; the decoder's kernels quantize their own).

Only rows of dynamic length are rewritten (attention over source or decoded positions): for a static length that
is a multiple of the vector width our schedule adds the exponentials in vector-wide partial sums, another order.
The softmax, and what the kernel computes after it, must have no other use. CPU targets only: the kernel carries
a CPU schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import RowQuantize, StaticQuantize
from int8mt.schedules.softmax_rows import softmax_rows_kernel

from .kernel_calls import KernelTable, bindings_and_users, bound_op_call, rewrite_functions, same_shape, use_counts
from .quantize_rows import match_static_quantize, row_quantizations


@expr_functor.mutator
class _SoftmaxRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = KernelTable(self.builder_)
        self.plans: dict[relax.Var, _Plan] = {}  # each variable a kernel call gives -> its plan
        self.calls: dict[_Plan, relax.Expr] = {}  # a plan -> its call, once emitted

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        bindings, users = bindings_and_users(func)
        self.plans, self.calls = {}, {}
        uses = use_counts(users)
        quantized = row_quantizations(bindings, users)
        for y in bindings:
            softmax = bound_op_call(y, "relax.nn.softmax", bindings)
            if softmax is None or not self._fits(softmax):
                continue
            x, found = softmax.args[0], users.get(y, [])
            static = match_static_quantize(y, bindings, users) if len(found) == 1 else None
            product = self._scaled(y, x, found[0], bindings) if len(found) == 1 else None
            if static is not None:
                self._plan(_Plan(x, None, static[1], [static[0]]))
            elif product is not None:
                z, m = product
                row = quantized.get(z)
                if row is not None and uses.get(z) == 2:  # (z used by the quantization only)
                    q, s, quantization = row
                    self._plan(_Plan(x, m, quantization, [q, s]))
                else:
                    self._plan(_Plan(x, m, None, [z]))
            else:
                self._plan(_Plan(x, None, None, [y]))

    def _plan(self, plan: _Plan) -> None:
        for var in plan.results:
            self.plans[var] = plan

    @staticmethod
    def _scaled(y: relax.Var, x: relax.Expr, user: relax.Var | None, bindings: dict) -> tuple | None:
        """``(z, m)`` if the only use of the probabilities ``y`` is ``z = y * m``, ``m`` of ``x``'s shape with 1 in
        place of its second-to-last size."""
        product = bound_op_call(user, "relax.multiply", bindings) if user is not None else None
        if product is None or sum(arg.same_as(y) for arg in product.args) != 1:
            return None
        m = next(arg for arg in product.args if not arg.same_as(y))
        wanted = [*list(x.ty.shape)[:-2], 1, x.ty.shape[-1]]
        if (not isinstance(m.ty, relax.TensorType) or str(m.ty.dtype) != "float32" or m.ty.shape is None
                or not same_shape(list(m.ty.shape), wanted) or not same_shape(list(user.ty.shape), list(x.ty.shape))):
            return None
        return user, m

    @staticmethod
    def _fits(call: relax.Call) -> bool:
        x = call.args[0]
        return (str(x.ty.dtype) == "float32" and x.ty.shape is not None and x.ty.ndim >= 2
                and int(call.attrs.axis) in (-1, x.ty.ndim - 1) and isinstance(x.ty.shape[-1], tvm.tirx.Var))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        if len(plan.results) == 1:
            self.set_var_remap(binding.var, self.builder_.emit(self._call(plan), binding.var.name))
            return
        if plan not in self.calls:  # (at the first of its results: the scale comes before the quantized rows)
            self.calls[plan] = self.builder_.emit(self._call(plan))
        item = relax.TupleGetItem(self.calls[plan], plan.results.index(binding.var))
        self.set_var_remap(binding.var, self.builder_.emit(item, binding.var.name))

    def _call(self, plan: _Plan) -> relax.Call:
        rank, scaled = plan.x.ty.ndim, plan.m is not None
        key = ("softmax_rows", rank, self.lanes, plan.result, scaled)
        kernel = self.kernels.get(key, "softmax_rows", lambda: softmax_rows_kernel(
            rank, self.lanes, plan.result, scaled).with_attr(KERNEL_ATTR, "softmax_rows"))
        outputs = [relax.TensorType(var.ty.shape, str(var.ty.dtype)) for var in plan.results]
        args = [self.visit_expr(plan.x)] + ([self.visit_expr(plan.m)] if scaled else [])
        return relax.call_tir(kernel, args, outputs if len(outputs) > 1 else outputs[0])


@dataclass(frozen=True, eq=False)  # (compared and hashed by identity: one plan, one call)
class _Plan:
    """A softmax of ``x`` as one kernel call: times ``m`` (or None), giving ``result`` (``StaticQuantize``,
    ``RowQuantize`` or None: probabilities) as the variables ``results`` (the quantization's ``q`` and ``s``)."""

    x: relax.Expr
    m: relax.Expr | None
    result: StaticQuantize | RowQuantize | None
    results: list[relax.Var]


@tvm.transform.module_pass(opt_level=0, name="int8mt.SoftmaxRows")
class SoftmaxRows:
    """Every softmax over a last axis of dynamic length -> one call of our row kernel, with the quantization or
    scaling after it (see the module docstring); ``lanes``: the float32 lanes of the target's vector registers."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _SoftmaxRewriter(mod, self.lanes)
        return rewrite_functions(rewriter, mod, before=rewriter.find)
