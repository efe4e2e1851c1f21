"""GatheredAttention: a decoder step's one-query attention products over the cache's gathered rows -> kernels that
read the rows through the histories (:mod:`int8mt.schedules.gathered_attention`), the gather never written.

The model's step (:meth:`int8mt.model.transformer.Transformer.decode_step`) builds each layer's keys and values as
``w = where(past, take(rows, index, axis=0), new)`` (``[batch, heads, positions, head_dim]``) and multiplies
``reshape(w, [batch*heads, positions, head_dim])``: after :class:`.ReadKeysAsStored`, QK^T is
``matmul(q, permute_dims(reshape(w)))`` and softmax·V ``matmul(p, reshape(w))``. Each such product whose gather,
``where`` and views have no other use becomes one call of the scores or context kernel, int8 (int32 sums, exact)
or float32 (sums in another order than TVM's kernel: the same within float rounding). CPU targets only.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.gathered_attention import ACCUMULATOR, context_kernel, scores_kernel
from int8mt.schedules.kernel_attrs import KERNEL_ATTR

from .kernel_calls import KernelTable, bindings_and_users, is_one, rewrite_functions


def _call(expr: relax.Expr, op: str, bindings: dict) -> relax.Call | None:
    value = bindings.get(expr) if isinstance(expr, relax.Var) else None
    return value if isinstance(value, relax.Call) and value.op == ir.Op.get(op) else None


@expr_functor.mutator
class _GatherReader(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = KernelTable(self.builder_)
        self.analyzer = Analyzer()
        self.bindings: dict = {}
        self.uses: dict = {}

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, users = bindings_and_users(func)
        self.uses = {var: len(found) for var, found in users.items()}

    def _once(self, var: relax.Expr) -> bool:
        return isinstance(var, relax.DataflowVar) and self.uses.get(var) == 1

    def _gathered(self, view: relax.Expr) -> tuple | None:
        """``(index, past, rows, new)`` if ``view`` is ``reshape(where(past, take(rows, index), new))`` of the
        step's layout, each value used once."""
        reshape = _call(view, "relax.reshape", self.bindings) if self._once(view) else None
        where = _call(reshape.args[0], "relax.where", self.bindings) if reshape is not None else None
        if where is None or not self._once(reshape.args[0]):
            return None
        past, gathered, new = where.args
        take = _call(gathered, "relax.take", self.bindings) if self._once(gathered) else None
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
        transposed = _call(right, "relax.permute_dims", self.bindings) if self._once(right) else None
        if transposed is not None and [int(a) for a in (transposed.attrs.axes or [])] == [0, 2, 1]:
            found, kind = self._gathered(transposed.args[0]), "scores"
        else:
            found, kind = self._gathered(right), "context"
        if found is None or left.ty.ndim != 3 or not is_one(left.ty.shape[1]):
            return super().visit_call_(call)
        index, past, rows, new = found
        dtype = str(rows.ty.dtype)
        if str(left.ty.dtype) != dtype or str(call.ty.dtype) != ACCUMULATOR[dtype]:
            return super().visit_call_(call)
        heads, head_dim = int(index.ty.shape[1]), int(rows.ty.shape[1])
        if kind == "scores":
            kernel = self.kernels.get(("scores", heads, head_dim, dtype, self.lanes), "gathered_scores",
                                      lambda: scores_kernel(heads, head_dim, dtype, self.lanes).with_attr(
                                          KERNEL_ATTR, "gathered_scores"))
        else:
            kernel = self.kernels.get(("context", heads, head_dim, dtype), "gathered_context",
                                      lambda: context_kernel(heads, head_dim, dtype).with_attr(
                                          KERNEL_ATTR, "gathered_context"))
        args = [self.visit_expr(x) for x in (index, past, left, rows, new)]
        return relax.call_tir(kernel, args, call.ty)


@tvm.transform.module_pass(opt_level=0, name="int8mt.GatheredAttention")
class GatheredAttention:
    """The decoder step's one-query attention products over gathered cache rows -> kernels reading the rows in
    place (see the module docstring); ``lanes``: the float32 lanes of the target's vector registers."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        reader = _GatherReader(mod, self.lanes)
        return relax.transform.DeadCodeElimination()(rewrite_functions(reader, mod, before=reader.find))
