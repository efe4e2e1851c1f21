"""UnitReshapeIntoKernels: a kernel reads the tensor a reshape that only adds or drops axes of size 1 was taken of.

The decoder step passes many tensors to its kernels through such reshapes: each quantized row block and its
scales ``[batch, 1, width]`` / ``[batch, 1, 1]`` to the dense kernel as ``[batch, width]`` / ``[batch, 1]``, each
cross-attention key and value scale ``[batch, heads, length, 1]`` as ``[batch, heads, 1, length]``. A reshape is
a view at run time, yet each one is a VM call that builds a shape and a tensor (two allocations, two frees):
at batch 1 some 40-60 per step, a few microseconds.

Such a reshape keeps the elements and their order, so the kernel can take the tensor itself: its parameter
is declared in the tensor's shape (the sizes of 1 inserted or dropped), and the buffer its body reads is
declared over the same memory. A kernel called with and without such reshapes gets one variant per way it
is called; the reshapes no longer used, and the kernels no longer called, are removed.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax, tirx
from tvm.relax import PyExprMutator, expr_functor

from .kernel_calls import KernelTable, is_one, kernel_variant, rewrite_functions, same_shape, with_kernel_variant


def _unit_pattern(shape: list[tirx.PrimExpr]) -> tuple[bool, ...]:
    return tuple(is_one(dim) for dim in shape)


def _reshaped_buffer(buffer: tirx.Buffer, used: list[tirx.PrimExpr], source: list[tirx.PrimExpr]
                     ) -> tirx.Buffer | None:
    """A buffer over ``buffer``'s memory in the ``source`` tensor's shape, given the shape ``used`` the kernel is
    called with (``buffer``'s sizes in the kernel's variables); None if it cannot be stated."""
    if len(buffer.strides) or len(buffer.shape) != len(used):
        return None
    kept = [dim for dim, call_dim in zip(buffer.shape, used) if not is_one(call_dim)]
    dropped = [dim for dim, call_dim in zip(buffer.shape, used) if is_one(call_dim)]
    if not all(is_one(dim) for dim in dropped):
        return None
    sizes = iter(kept)
    shape = [dim if is_one(dim) else next(sizes) for dim in source]
    return tirx.decl_buffer(shape, buffer.dtype, buffer.name, elem_offset=buffer.elem_offset,
                            data_alignment=buffer.data_alignment, offset_factor=buffer.offset_factor,
                            layout=buffer.layout)


def _kernel_reading(func: tirx.PrimFunc, sources: dict[int, tuple[list, list]]) -> tirx.PrimFunc | None:
    """``func`` with parameter ``i`` declared in the shape ``sources[i][1]`` instead of ``sources[i][0]`` (both the
    Relax shapes of the call), its old buffer declared over the new one's memory; None if one cannot be."""
    params, declarations = list(func.params), []
    for index, (used, source) in sources.items():
        old = params[index]
        new = _reshaped_buffer(old, used, source) if isinstance(old.ty, tirx.BufferType) else None
        if new is None:
            return None
        params[index] = new
        declarations.append(tirx.DeclBuffer(old, data=new.data))
    return kernel_variant(func, params, declarations)


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels = KernelTable(self.builder_)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        return with_kernel_variant(super().visit_call_(call), self.builder_.get(), self.kernels, self._argument,
                                   _kernel_reading, lambda found: tuple(
                                       (i, _unit_pattern(used), _unit_pattern(source))
                                       for i, (used, source) in found.items()))

    def _argument(self, arg: relax.Expr) -> tuple[relax.Var, tuple[list, list]] | None:
        """The tensor behind ``arg``'s unit-axis reshapes, and both shapes."""
        source = self._unit_source(arg)
        return None if source is None else (source, (list(arg.ty.shape), list(source.ty.shape)))

    def _unit_source(self, expr: relax.Expr) -> relax.Var | None:
        """The farthest tensor back along a chain of reshapes bound to ``expr`` whose sizes other than 1 are
        ``expr``'s in order, if there is one."""
        if not isinstance(expr, relax.Var) or not isinstance(expr.ty, relax.TensorType) or expr.ty.shape is None:
            return None
        wanted = [dim for dim in expr.ty.shape if not is_one(dim)]
        found, current = None, expr
        while True:
            bound = self.lookup_binding(current)
            if not (isinstance(bound, relax.Call) and bound.op == ir.Op.get("relax.reshape")
                    and isinstance(bound.args[0], relax.Var) and bound.args[0].ty.shape is not None):
                return found
            current = bound.args[0]
            if same_shape([dim for dim in current.ty.shape if not is_one(dim)], wanted):
                found = current


@tvm.transform.module_pass(opt_level=0, name="int8mt.UnitReshapeIntoKernels")
class UnitReshapeIntoKernels:
    """Kernels read the tensors that unit-axis reshapes were taken of (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_Rewriter(mod), mod)
