"""ReuseShapes: a function's calls of ``vm.builtin.make_shape`` with the same arguments -> the first call's shape.

TVM's ``VMShapeLower`` writes one ``make_shape`` (a new shape object from the function's shape heap, at run time)
for each allocation whose size or shape is known only at run time: each storage's byte count and each tensor's
shape: 96 per call of the reference model's decoder step, 21 of them different (``encode``: 113 and 31). The
shape heap's slots are written once, when their size variables are first matched, and before any ``make_shape``
that reads them, so a later call with the same arguments makes the same shape. Calls inside a branch reuse the
shapes made before the branch, not those of another branch. Run after ``VMShapeLower``.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import rewrite_functions

MAKE_SHAPE = "vm.builtin.make_shape"


def _shape_key(value: relax.Expr) -> tuple | None:
    """``(heap, ints)`` of ``make_shape(heap, ints...)`` with integer arguments; None for any other expression."""
    if not (isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc)
            and value.op.global_symbol == MAKE_SHAPE and value.args and isinstance(value.args[0], relax.Var)):
        return None
    if not all(isinstance(arg, tvm.tirx.IntImm) for arg in value.args[1:]):
        return None
    return value.args[0], tuple(int(arg.value) for arg in value.args[1:])


@expr_functor.mutator
class _ShapeReuser(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.made: dict[tuple, relax.Var] = {}  # (heap, arguments) -> the variable of the first such shape in scope

    def visit_seq_expr_(self, op: relax.SeqExpr) -> relax.Expr:
        outer = dict(self.made)  # a branch's shapes stay in the branch
        try:
            return super().visit_seq_expr_(op)
        finally:
            self.made = outer

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        key = _shape_key(binding.value)
        if key is not None and key in self.made:
            self.set_var_remap(binding.var, self.made[key])
            return
        super().visit_var_binding_(binding)
        if key is not None:
            self.made[key] = binding.var  # (a make_shape binding is kept as it is)


@tvm.transform.module_pass(opt_level=0, name="int8mt.ReuseShapes")
class ReuseShapes:
    """Repeated run-time shapes made once per call (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_ShapeReuser(mod), mod, drop_dead=False)
