"""UnitPermuteAsReshape: ``permute_dims(x, axes)`` that moves only axes of size 1 -> ``reshape(x, its shape)``.

A decoder step's attention output ``[batch, heads, 1, head_dim]`` goes to ``[batch, 1, heads, head_dim]`` before
the heads are merged: the elements keep their order, but legalized it is a copy kernel of its own (the views on
either side keep it out of fusion), six per step. As a reshape it is a view at run time.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import is_one, rewrite_functions


def moves_only_unit_axes(call: relax.Call) -> bool:
    """Whether ``call`` is a ``permute_dims`` whose axes of size other than 1 keep their order."""
    if not (isinstance(call, relax.Call) and call.op == ir.Op.get("relax.permute_dims")):
        return False
    shape = list(call.args[0].ty.shape)
    axes = range(len(shape))[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
    kept = [a for a in axes if not is_one(shape[a])]
    return kept == sorted(kept)


@expr_functor.mutator
class _UnitPermuteRewriter(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if moves_only_unit_axes(call):
            return relax.op.reshape(call.args[0], call.ty.shape)
        return call


@tvm.transform.module_pass(opt_level=0, name="int8mt.UnitPermuteAsReshape")
class UnitPermuteAsReshape:
    """Permutations that move only axes of size 1 -> reshapes (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_UnitPermuteRewriter(mod), mod, drop_dead=False)
