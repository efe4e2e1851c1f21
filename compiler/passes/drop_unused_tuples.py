"""DropUnusedTuples: a tuple bound in a lowered function and used nowhere in it -> gone.

The VM lowering of a kernel call with several results allocates each result, passes them to the kernel and binds
them as a tuple; the graph's passes read each result directly, so the tuple is often used by nothing, but the
VM's code still builds it at every call (``vm.builtin.make_tuple``): 9 tuples per decoder step of the reference
model, 23 with run-time ranges. Building a tuple has no other effect, so an unused one can go. Run after the VM
lowering (where TVM's dead-code elimination, which takes a lowered function's calls for pure, cannot run).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import bindings_and_users, rewrite_functions


@expr_functor.mutator
class _TupleDropper(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.used: set[relax.Var] = set()

    def visit_function_(self, op: relax.Function) -> relax.Expr:
        self.used = set(bindings_and_users(op)[1]) if isinstance(op.body, relax.SeqExpr) else set()
        return super().visit_function_(op)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if isinstance(binding.value, relax.Tuple) and binding.var not in self.used:
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="int8mt.DropUnusedTuples")
class DropUnusedTuples:
    """Unused tuples of a lowered function -> gone (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_TupleDropper(mod), mod, drop_dead=False)
