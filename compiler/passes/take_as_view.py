"""TakeAsView: a layer's slice of a stacked cache as a view of the cache's memory instead of a copy.

``decode_step`` receives its caches stacked into one tensor each (``[layers, 2, batch, heads, length,
head_dim]``) and picks a layer's keys and values with ``take(cache, i, axis=0)`` twice. Legalized, every
``take`` is a copy kernel, run for every layer at every step: the whole cache copied twice before
attention reads it. A ``take`` of a constant index along the first axis is a contiguous block of the
source, so this pass turns it into ``memory.view`` at that byte offset, followed by ``ensure_zero_offset``
(our kernels take tensors whose ``byte_offset`` is 0; the data pointer moves instead: no copy).

Only slices of function parameters (and slices of such slices) become views: a parameter's memory is
owned by the caller for the whole call, whereas the memory planner may reuse an intermediate tensor's
storage once it sees no more direct uses of it. A slice of a slice, and a reshape of a slice, are views of
the parameter itself (the offsets added up), not views of views: each view is a run-time call, and a
decoder step takes four slices per layer.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor


@expr_functor.mutator
class _Viewer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.params: set[relax.Var] = set()

    def run(self, gv: ir.GlobalVar, func: relax.Function) -> None:
        self.params = set(func.params)
        self.builder_.update_func(gv, self.visit_expr(func))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == ir.Op.get("relax.reshape"):  # of a view made here: that view in the new shape
            source = self._parameter_slice(call.args[0])
            if source is None or call.args[0] in self.params:
                return call
            return self._view(*source, list(call.ty.shape))
        if call.op != ir.Op.get("relax.take") or int(call.attrs.axis) != 0:
            return call
        source = self._parameter_slice(call.args[0])
        data, index = call.args
        if source is None or not isinstance(index, ir.expr.Constant) or index.ty.ndim != 0:
            return call
        i, shape = int(index.value.numpy()), list(data.ty.shape)
        if not isinstance(shape[0], tvm.tirx.IntImm) or not 0 <= i < int(shape[0]):
            return call
        block = tvm.DataType(str(data.ty.dtype)).bits // 8
        for dim in shape[1:]:
            block = block * dim
        parameter, offset = source
        return self._view(parameter, offset + block * i, shape[1:])

    def _view(self, parameter: relax.Var, offset: tvm.tirx.PrimExpr, shape: list) -> relax.Expr:
        view = self.builder_.emit(relax.op.memory.view(parameter, relax.ShapeExpr(shape),
                                                       relative_byte_offset=relax.prim_value(offset)))
        return relax.op.memory.ensure_zero_offset(view)

    def _parameter_slice(self, expr: relax.Expr) -> tuple[relax.Var, tvm.tirx.PrimExpr] | None:
        """``expr`` as (a parameter, the byte offset into it) if it is a parameter or a view made here of one."""
        if expr in self.params:
            return expr, tvm.tirx.IntImm("int64", 0)
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if isinstance(bound, relax.Call) and bound.op == ir.Op.get("relax.memory.ensure_zero_offset"):
            view = self.lookup_binding(bound.args[0])
            if isinstance(view, relax.Call) and view.args[0] in self.params:
                return view.args[0], view.args[3]
        return None


@tvm.transform.module_pass(opt_level=0, name="int8mt.TakeAsView")
class TakeAsView:
    """Constant-index takes along the first axis of parameters -> views (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        viewer = _Viewer(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                viewer.run(gv, func)
        return relax.transform.DeadCodeElimination()(viewer.builder_.get())
