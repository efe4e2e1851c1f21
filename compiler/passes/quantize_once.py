"""QuantizeOnce: the static quantizations of one tensor -> one call computing them all (GPU targets).

With static ranges the embeddings (with their positions) are quantized for the first layer's queries, keys and
values, each with its own range (``quantize(clip(y, lo, hi), scale)``, see
:func:`.quantize_rows.match_static_quantize`). Each is a kernel of its own after fusion (the tensor has other
users, so none fuses with its producer) that reads the whole tensor. Here every such group of two or more (in one
dataflow block) becomes one call of :func:`~int8mt.schedules.cuda_rows.static_quantizations_function`: one kernel
on a GPU, reading the tensor once. The quantizations of a layer norm's result (the other layers' inputs, the
encoder's output for every decoder layer's keys and values) are the layer norm's kernel's
(:class:`.LayerNormRows`, which runs first).
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.cuda_rows import static_quantizations_function

from .kernel_calls import KernelTable, bindings_and_users, rewrite_functions
from .quantize_rows import static_quantizations


@expr_functor.mutator
class _Quantizer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels = KernelTable(self.builder_)
        self.groups: dict[relax.Var, tuple[relax.Var, list]] = {}  # each quantized var -> (its input, the group)
        self.results: dict[relax.Var, relax.Expr] = {}  # the group's input -> the call computing the group

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        bindings, users = bindings_and_users(func)
        block_of = {b.var: i for i, block in enumerate(func.body.blocks) for b in block.bindings}
        self.groups, self.results = {}, {}
        for y in list(users):
            if not (isinstance(y.ty, relax.TensorType) and str(y.ty.dtype) == "float32" and y.ty.shape is not None):
                continue
            group = list(static_quantizations(y, bindings, users))
            group = [(q, quantization) for q, quantization in group if block_of[q] == block_of[group[0][0]]]
            if len(group) > 1:
                for q, _ in group:
                    self.groups[q] = (y, group)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.groups:
            super().visit_var_binding_(binding)
            return
        y, group = self.groups[binding.var]
        if y not in self.results:
            self.results[y] = self._call(self.visit_expr(y), [quantization for _, quantization in group])
        index = [q for q, _ in group].index(binding.var)
        self.set_var_remap(binding.var, self.builder_.emit(relax.TupleGetItem(self.results[y], index),
                                                           binding.var.name))

    def _call(self, y: relax.Expr, quantizations: list) -> relax.Var:
        rank, last = y.ty.ndim, y.ty.shape[-1]
        columns = int(last) if isinstance(last, tvm.tirx.IntImm) else None
        kernel = self.kernels.get(("static_quantizations", rank, columns, tuple(quantizations)), "quantize",
                                  lambda: static_quantizations_function(rank, columns, quantizations))
        out = [relax.TensorType(y.ty.shape, "int8")] * len(quantizations)
        return self.builder_.emit(relax.call_tir(kernel, [y], out))


@tvm.transform.module_pass(opt_level=0, name="int8mt.QuantizeOnce")
class QuantizeOnce:
    """The static quantizations of one tensor -> one call computing them all (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        quantizer = _Quantizer(mod)
        return rewrite_functions(quantizer, mod, before=quantizer.find)
