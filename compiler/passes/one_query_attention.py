"""OneQueryAttention: a decoder step's one-query attention products -> our kernels
(:mod:`int8mt.schedules.one_query_attention`), the self-attention's reading the cache's rows where they are stored.

After :class:`.ReadKeysAsStored`, QK^T is ``matmul(q [pairs, 1, head_dim], permute_dims(keys [pairs, positions,
head_dim]))`` and softmax·V ``matmul(p [pairs, 1, positions], values)``, ``pairs`` = hypotheses x heads. The
model's step (:meth:`int8mt.model.transformer.Transformer.decode_step`) builds the self-attention's keys and
values as ``reshape(where(past, take(rows, index, axis=0), new))``: a gather that writes every hypothesis's keys
at every step. A product over such a gather whose gather, ``where`` and views have no other use becomes one call
of the gathered scores or context kernel, which reads the rows through ``index``; any other one-query product
(the cross-attention's) one call of the direct kernel. TVM's own kernels for these products were 3-6x slower.
int8 operands sum in int32 (exact); float32 ones in another order than TVM's kernel (the same within float
rounding). CPU targets only.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.one_query_attention import (ACCUMULATOR, context_kernel, direct_context_kernel,
                                                  direct_scores_kernel, scores_kernel)
from int8mt.schedules.kernel_attrs import KERNEL_ATTR

from .kernel_calls import KernelTable, bindings_and_users, bound_op_call, is_one, rewrite_functions, use_counts


@expr_functor.mutator
class _OneQueryRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = KernelTable(self.builder_)
        self.analyzer = Analyzer()
        self.bindings: dict = {}
        self.uses: dict = {}

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, users = bindings_and_users(func)
        self.uses = use_counts(users)

    def _once(self, var: relax.Expr) -> bool:
        return isinstance(var, relax.DataflowVar) and self.uses.get(var) == 1

    def _gathered(self, view: relax.Expr) -> tuple | None:
        """``(index, past, rows, new)`` if ``view`` is ``reshape(where(past, take(rows, index), new))`` of the
        step's layout, each value used once."""
        reshape = bound_op_call(view, "relax.reshape", self.bindings) if self._once(view) else None
        where = bound_op_call(reshape.args[0], "relax.where", self.bindings) if reshape is not None else None
        if where is None or not self._once(reshape.args[0]):
            return None
        past, gathered, new = where.args
        take = bound_op_call(gathered, "relax.take", self.bindings) if self._once(gathered) else None
        if take is None or take.attrs.axis is None or int(take.attrs.axis) != 0:
            return None
        rows, index = take.args
        if not (index.ty.ndim == 3 and str(index.ty.dtype) == "int64" and rows.ty.ndim == 2
                and str(past.ty.dtype) == "bool" and past.ty.ndim == 4 and new.ty.ndim == 4):
            return None
        batch, heads, positions = index.ty.shape
        head_dim = rows.ty.shape[1]
        expected = {past: [batch, 1, positions, 1], new: [batch, heads, 1, head_dim],
                    view: [batch * heads, positions, head_dim]}
        if not (isinstance(heads, tvm.tirx.IntImm) and isinstance(head_dim, tvm.tirx.IntImm)
                and str(new.ty.dtype) == str(rows.ty.dtype) and str(rows.ty.dtype) in ACCUMULATOR
                and all(self._same(list(x.ty.shape), shape) for x, shape in expected.items())):
            return None
        return index, past, rows, new

    def _same(self, a: list, b: list) -> bool:
        return len(a) == len(b) and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not (isinstance(call.op, ir.Op) and call.op.name == "relax.matmul"):
            return super().visit_call_(call)
        left, right = call.args
        transposed = bound_op_call(right, "relax.permute_dims", self.bindings)
        scores = transposed is not None and [int(a) for a in (transposed.attrs.axes or [])] == [0, 2, 1]
        operand = transposed.args[0] if scores else right
        dtype = str(operand.ty.dtype)
        if not (dtype in ACCUMULATOR and str(left.ty.dtype) == dtype and str(call.ty.dtype) == ACCUMULATOR[dtype]
                and left.ty.ndim == 3 and operand.ty.ndim == 3 and is_one(left.ty.shape[1])
                and isinstance(operand.ty.shape[2], tvm.tirx.IntImm)):
            return super().visit_call_(call)
        head_dim = int(operand.ty.shape[2])
        gathered = self._gathered(operand) if (not scores or self._once(right)) else None
        if gathered is not None:
            index, past, rows, new = gathered
            heads = int(index.ty.shape[1])
            key = ("gathered", scores, heads, head_dim, dtype, self.lanes)
            make = (lambda: scores_kernel(heads, head_dim, dtype, self.lanes)) if scores else (
                lambda: context_kernel(heads, head_dim, dtype))
            args = (index, past, left, rows, new)
        else:
            key = ("direct", scores, head_dim, dtype, self.lanes)
            make = (lambda: direct_scores_kernel(head_dim, dtype, self.lanes)) if scores else (
                lambda: direct_context_kernel(head_dim, dtype))
            args = (left, operand)
        name = f"{key[0]}_{'scores' if scores else 'context'}"
        kernel = self.kernels.get(key, name, lambda: make().with_attr(KERNEL_ATTR, name))
        return relax.call_tir(kernel, [self.visit_expr(x) for x in args], call.ty)


@tvm.transform.module_pass(opt_level=0, name="int8mt.OneQueryAttention")
class OneQueryAttention:
    """The decoder step's one-query attention products -> our kernels, the self-attention's reading the cache's
    rows in place (see the module docstring); ``lanes``: the float32 lanes of the target's vector registers."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        reader = _OneQueryRewriter(mod, self.lanes)
        return relax.transform.DeadCodeElimination()(rewrite_functions(reader, mod, before=reader.find))
