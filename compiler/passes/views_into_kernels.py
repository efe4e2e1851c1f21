"""ViewsIntoKernels: a kernel reads the tensor a view or a reshape was taken of, at the view's offset.

:class:`~.TakeAsView` makes each layer's slice of a stacked cache a view of the entry point's parameter: no copy,
yet each view is a few VM calls at every step (the offset computed, a shape and a tensor built, the offset
checked, two frees): a decoder step has 12 such views (static ranges) or 24 (run-time ranges, whose caches carry
their scales), 60-120 VM calls of some 500-700 at batch 1 without this pass. A reshape that merges axes (the
encoder's ``[batch, length, width]`` rows to ``[batch * length, width]`` for a dense kernel: 34 per call of it)
is one too, and so is each reshape of a chain (on a GPU, each linear layer's ``[batch, heads * head_dim]`` result
reshaped in steps into the heads' layout for the per-head row quantization and for the cache's in-place
``append_rows``: 6-24 per decoder step); the kernel takes the tensor at the chain's start. Reshapes that only add
or drop axes of size 1 are :class:`~.UnitReshapeIntoKernels`' first.

A kernel can take the tensor itself: its parameter is declared in the tensor's shape, and the buffer its body
reads is declared over the same memory at the view's offset (the kernel's variables for the view's sizes bound
from the tensor's, before its root block, whose buffers may use them; sizes the kernel learns from its other
parameters, such as its result's ``[batch, length, width]``, need no binding, so a tensor whose sizes do not state
them, a dense kernel's ``[batch * length, width]`` result, can stand for the view). One kernel variant per way it
is called; the views and reshapes no longer used are removed. Only views of parameters (the memory planner may
reuse a computed tensor's storage once it sees no direct use of it, and a view hides the use); a reshape's source
is used directly, so any tensor. A size of the view that another parameter mentions only in an expression
(``s + 1``) keeps the view: binding it would define it twice. It runs after scheduling, on our kernels and the
default schedules alike; on a GPU the host computes the offset pointer and passes it to the kernel as its buffer.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from .kernel_calls import KernelTable, kernel_variant, rewrite_functions, shape_product, with_kernel_variant


def _source_buffer(shape: list[tirx.PrimExpr], dtype: str, name: str) -> tuple[tirx.Buffer, dict]:
    """A buffer in the Relax ``shape`` with a kernel variable per symbolic size, and the map from the Relax
    variables to the kernel's (a size that is an expression, ``batch * length``, gets a variable of its own, which
    states none of the Relax ones)."""
    names, dims = {}, []
    for axis, dim in enumerate(shape):
        if isinstance(dim, tirx.IntImm):
            dims.append(dim)
        elif isinstance(dim, tirx.Var):
            dims.append(names.setdefault(dim, tirx.Var(f"{name}_{axis}", dim.ty)))
        else:
            dims.append(tirx.Var(f"{name}_{axis}", dim.ty))
    return tirx.decl_buffer(dims, dtype, name, layout=None), names


def _free_vars(expr: tirx.PrimExpr) -> set[tirx.Var]:
    return set(tirx.analysis.undefined_vars(expr))


def _states(source: list[tirx.PrimExpr], used: list[tirx.PrimExpr]) -> bool:
    """Whether a tensor of the Relax shape ``source`` states the sizes ``used`` (each in its variables)."""
    variables = {dim for dim in source if isinstance(dim, tirx.Var)}
    return all(_free_vars(dim) <= variables for dim in used)


def _learned_elsewhere(func: tirx.PrimFunc, inputs: int) -> list[set[int]]:
    """For each of the kernel's first ``inputs`` parameters, the axes whose sizes the kernel learns from its other
    parameters after them (its results' shapes, its size arguments): those a tensor in their place need not
    state."""
    known = set()
    for param in func.params[inputs:]:
        known |= {dim for dim in param.shape if isinstance(dim, tirx.Var)} if isinstance(
            param.ty, tirx.BufferType) else {param}
    return [{axis for axis, dim in enumerate(param.shape) if dim in known} if isinstance(param.ty, tirx.BufferType)
            else set() for param in func.params[:inputs]]


def _kernel_reading_views(func: tirx.PrimFunc, views: dict[int, tuple[relax.Var, list, tirx.PrimExpr]]
                          ) -> tirx.PrimFunc | None:
    """``func`` with parameter ``i`` declared as the whole parameter ``views[i][0]`` and its old buffer (called with
    the shape ``views[i][1]``) declared over that memory ``views[i][2]`` bytes on; None where it cannot be."""
    params, bindings, statements = list(func.params), [], []
    others = [p for i, p in enumerate(params) if i not in views and isinstance(p.ty, tirx.BufferType)]
    defined = {dim for p in others for dim in p.shape if isinstance(dim, tirx.Var)}  # sizes other parameters define
    mentioned = {v for p in others for dim in p.shape for v in _free_vars(dim)}  # (``s + 1`` defines no ``s``)
    for index, (source, used, offset) in views.items():
        old = params[index]
        if not isinstance(old.ty, tirx.BufferType) or len(old.strides) or len(old.shape) != len(used):
            return None
        new, names = _source_buffer(list(source.ty.shape), str(old.dtype), f"{old.name}_source")
        if not _free_vars(offset) <= set(names):
            return None
        analyzer = Analyzer()  # the view's sizes and offset in the kernel's variables for the parameter's sizes
        for relax_var, kernel_var in names.items():
            analyzer.bind(relax_var, kernel_var)
        for dim, size in zip(old.shape, used):  # the kernel's sizes of the view, from the parameter's
            if isinstance(dim, tirx.Var) and dim in mentioned - defined:
                return None
            if isinstance(dim, tirx.Var) and dim not in defined:
                if not _free_vars(size) <= set(names):
                    return None
                bindings.append(tirx.Bind(dim, analyzer.simplify(size)))
                defined.add(dim)
        start = analyzer.simplify(tirx.floordiv(offset, tvm.DataType(str(old.dtype)).bits // 8))
        if isinstance(start, tirx.IntImm) and start.value == 0:  # a reshape
            statements.append(tirx.DeclBuffer(old, data=new.data))
        else:
            flat = tirx.decl_buffer([shape_product(list(new.shape))], old.dtype, f"{old.name}_flat", data=new.data,
                                    layout=None)
            statements += [tirx.DeclBuffer(flat, data=new.data),
                           tirx.DeclBuffer(old, data=tirx.address_of(tirx.BufferLoad(flat, [start])))]
        params[index] = new
    return kernel_variant(func, params, statements, bindings)


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels = KernelTable(self.builder_)
        self.params: set[relax.Var] = set()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        learned = {}  # each argument: the axes whose sizes the kernel learns elsewhere
        kernel_call = call.op in (ir.Op.get("relax.call_tir"), ir.Op.get("relax.call_tir_inplace"))
        func = self.builder_.get().functions.get(call.args[0]) if kernel_call else None
        if isinstance(func, tirx.PrimFunc) and isinstance(call.args[1], relax.Tuple):
            for arg, axes in zip(call.args[1].fields, _learned_elsewhere(func, len(call.args[1].fields))):
                learned[arg] = learned.get(arg, axes) & axes
        return with_kernel_variant(call, self.builder_.get(), self.kernels,
                                   lambda arg: None if (view := self._view(arg, learned.get(arg, set()))) is None
                                   else (view[0], view),
                                   _kernel_reading_views,
                                   lambda found: tuple((i, str(source.ty.shape), str(used), str(offset))
                                                       for i, (source, used, offset) in found.items()))

    def _view(self, expr: relax.Expr, learned: set[int]) -> tuple[relax.Var, list, tirx.PrimExpr] | None:
        """``(tensor, the view's shape, its byte offset)`` if ``expr`` is ``ensure_zero_offset`` of a view of a
        function parameter, or reshapes of a tensor (offset 0: the farthest tensor back along the chain that states
        the view's sizes, those on the axes ``learned``, which the kernel learns elsewhere, aside)."""
        reshape = self._bound(expr, "relax.reshape")
        if reshape is not None:
            used, found = list(expr.ty.shape), None
            stated = [dim for axis, dim in enumerate(used) if axis not in learned]
            while reshape is not None and isinstance(source := reshape.args[0], relax.Var) and isinstance(
                    source.ty, relax.TensorType) and source.ty.shape is not None:
                if _states(list(source.ty.shape), stated):
                    found = source
                reshape = self._bound(source, "relax.reshape")
            return None if found is None else (found, used, tirx.const(0, "int64"))
        zero = self._bound(expr, "relax.memory.ensure_zero_offset")
        view = None if zero is None else self._bound(zero.args[0], "relax.memory.view")
        if view is None or view.args[0] not in self.params or isinstance(view.args[3], relax.Var) or not isinstance(
                view.args[3].ty, tvm.ir.PrimType):  # an offset the kernel can compute, from the parameter's sizes
            return None
        return view.args[0], list(expr.ty.shape), view.args[3]

    def _bound(self, expr: relax.Expr, op: str) -> relax.Call | None:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return bound if isinstance(bound, relax.Call) and bound.op == ir.Op.get(op) else None


@tvm.transform.module_pass(opt_level=0, name="int8mt.ViewsIntoKernels")
class ViewsIntoKernels:
    """Kernels read the parameters that views were taken of (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        return rewrite_functions(rewriter, mod, before=lambda _gv, func: setattr(rewriter, "params", set(func.params)))
