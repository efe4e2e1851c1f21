"""ReuseTensors: an allocation of the same tensor as an earlier, dead one (same storage, offset, shape and dtype)
-> that tensor again.

After TVM's memory planning each intermediate tensor is a ``vm.alloc_tensor`` of a planned storage, and
``KillAfterLastUse`` drops it after its last use. Tensors of the same shape whose lives follow one another share
their storage, so the function makes the same tensor object (the same memory, shape and dtype) again and again:
77 tensors per call of the reference model's decoder step, 35 of them different. Here the later allocations
of one such chain take the first tensor, and the kills between them go (the last one's kill stays). The planner
never gives two live tensors the same storage and offset, so each earlier one is dead when the next is
allocated. Only the function body's own bindings are rewritten (not those in branches). Run after ``ReuseShapes``
(whose single shapes make the allocations' arguments the same).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import rewrite_functions

ALLOC_TENSOR = "relax.vm.alloc_tensor"
KILL_OBJECT = "relax.vm.kill_object"


def _op_name(value: relax.Expr) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def _tensor_key(value: relax.Expr) -> tuple | None:
    """What identifies the tensor ``vm.alloc_tensor(storage, offset, shape, dtype, device)`` makes: the storage
    variable, and the other arguments as values (a constant shape by its dimensions); None if it is not one."""
    if _op_name(value) != ALLOC_TENSOR:
        return None
    storage, offset, shape, dtype, *rest = value.args
    if not isinstance(storage, relax.Var) or not all(isinstance(arg, tvm.tirx.IntImm) for arg in (offset, *rest)):
        return None
    if isinstance(shape, relax.ShapeExpr) and all(isinstance(dim, tvm.tirx.IntImm) for dim in shape.values):
        shape = tuple(int(dim) for dim in shape.values)
    elif not isinstance(shape, relax.Var):
        return None
    return storage, int(offset), shape, str(dtype.value), tuple(int(arg) for arg in rest)


def _chains(body: relax.SeqExpr) -> dict[relax.Var, relax.Var]:
    """Each allocation variable of ``body``'s own bindings -> the first allocation of the same tensor."""
    first: dict[tuple, relax.Var] = {}
    chain: dict[relax.Var, relax.Var] = {}
    for block in body.blocks:
        for binding in block.bindings:
            key = _tensor_key(binding.value) if isinstance(binding, relax.VarBinding) else None
            if key is not None:
                chain[binding.var] = first.setdefault(key, binding.var)
    return chain


@expr_functor.mutator
class _TensorReuser(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.chain: dict[relax.Var, relax.Var] = {}  # allocation -> the first of its chain
        self.last: set[relax.Var] = set()  # the last allocation of each chain (its kill stays)

    def visit_function_(self, op: relax.Function) -> relax.Expr:
        body = op.body
        self.chain = _chains(body) if isinstance(body, relax.SeqExpr) else {}
        latest = {head: var for var, head in self.chain.items()}  # (bindings in order: the last one wins)
        self.last = set(latest.values())
        return super().visit_function_(op)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        head = self.chain.get(binding.var)
        if head is not None and not head.same_as(binding.var):
            self.set_var_remap(binding.var, head)  # the same tensor as before
            return
        if self._early_kill(binding.value):
            return
        super().visit_var_binding_(binding)

    def _early_kill(self, value: relax.Expr) -> bool:
        """``value`` kills a tensor that a later allocation of its chain makes again."""
        if _op_name(value) != KILL_OBJECT:
            return False
        killed = value.args[0]
        return killed in self.chain and killed not in self.last


@tvm.transform.module_pass(opt_level=0, name="int8mt.ReuseTensors")
class ReuseTensors:
    """Repeated allocations of a dead tensor -> that tensor (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_TensorReuser(mod), mod, drop_dead=False)
