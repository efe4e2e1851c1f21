"""DropIdentityBroadcast: ``broadcast_to(x, shape)`` where ``shape`` is provably ``x``'s own shape -> ``x``.

torch.export writes one before each operand of a batched matmul (``expand`` to the shape the operand already
has). Legalized, each is a copy kernel: in an FP32 decoder step, a copy of every layer's whole key cache (fused
with its transpose) and value cache per step, and it hides the keys' transpose from :class:`.ReadKeysAsStored`.
(Scale Propagation drops those of integer values itself.)
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import rewrite_functions, same_shape


@expr_functor.mutator
class _BroadcastDropper(PyExprMutator):
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(binding.var, relax.DataflowVar) and self._identity(value):
            self.set_var_remap(binding.var, self.visit_expr(value.args[0]))  # the users read the tensor itself
            return
        super().visit_var_binding_(binding)

    @staticmethod
    def _identity(value: relax.Expr) -> bool:
        return (isinstance(value, relax.Call) and value.op == ir.Op.get("relax.broadcast_to")
                and same_shape(list(value.args[0].ty.shape), list(value.ty.shape)))


@tvm.transform.module_pass(opt_level=0, name="int8mt.DropIdentityBroadcast")
class DropIdentityBroadcast:
    """Broadcasts of a tensor to its own shape -> the tensor (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_BroadcastDropper(mod), mod)
