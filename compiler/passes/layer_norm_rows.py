"""LayerNormRows: each layer norm over the last axis -> one call of a row kernel, which also quantizes its result
for the next matmul where that is the result's quantization.

A post-LN Transformer's layer norm feeds both the residual and the next linear layer's quantization, so TVM cannot
fuse the quantization into the layer norm (its result has two users), and it legalizes the layer norm into five
parallel loops. Here ``y = layer_norm(x, gamma, beta)`` becomes one call returning ``y`` and, where the program
goes on with one of these, its quantization too:

* ``quantize(clip(y, lo, hi), scale)``, a constant scalar scale and zero point 0 (static ranges);
* the run-time per-row quantization of ``y`` (:mod:`.quantize_rows`), returning the scales as well.

The clip, and the quantization's intermediate values, must have no other use. For CPU targets the call is of
:func:`~int8mt.schedules.layer_norm_rows.layer_norm_rows_kernel`, which carries a CPU schedule with the partial sums
of ``lanes`` elements that our CPU schedule gives TVM's layer norm on the target (so its sums are added in the same
order): the values are the same bit for bit. For GPU targets (``lanes`` None) it is of
:func:`~int8mt.schedules.cuda_rows.layer_norm_rows_function`, the graph's own ops as one function (phase 4
schedules it as one kernel), with every static quantization of ``y`` (the queries', keys' and values' inputs
each have their own range), also where ``y``'s only use is a ``take`` along an axis of size 1 (the decoder step's
one position before the output projection) that is quantized: its quantizations are the call's, reshaped. Layer
norms with no quantization after them stay as they are.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.cuda_rows import layer_norm_rows_function
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import layer_norm_rows_kernel

from .kernel_calls import (KernelTable, bindings_and_users, bound_op_call, is_one, rewrite_functions, same_shape,
                           scalar_constant)
from .quantize_rows import match_static_quantize, row_quantizations, static_quantizations


@expr_functor.mutator
class _LayerNormRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int | None) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = KernelTable(self.builder_)
        self.plans: dict[relax.Var, tuple] = {}  # y -> (quantization(s), q vars, s var)
        self.results: dict[relax.Var, tuple[relax.Expr, int]] = {}  # q or s var -> (kernel call, output index)

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        bindings, users = bindings_and_users(func)
        self.plans, self.results = {}, {}
        quantized = row_quantizations(bindings, users)
        for y, value in bindings.items():
            if not (bound_op_call(y, "relax.nn.layer_norm", bindings) is not None and isinstance(y, relax.DataflowVar)
                    and self._fits(value)):
                continue
            quantized_value = y if self.lanes is not None else _unit_take(y, bindings, users)
            row = quantized.get(quantized_value)
            if row is not None:
                self.plans[y] = (row[2], [row[0]], row[1])
            elif self.lanes is None:
                static = list(static_quantizations(quantized_value, bindings, users))
                if static:
                    self.plans[y] = (tuple(quantization for _, quantization in static), [q for q, _ in static], None)
            else:
                static = match_static_quantize(y, bindings, users)
                self.plans[y] = (static[1], [static[0]], None) if static is not None else (None, [], None)

    def _fits(self, call: relax.Call) -> bool:
        x = call.args[0]
        attrs = call.attrs
        axes = [int(a) for a in attrs.axes]
        columns = x.ty.shape[-1] if x.ty.ndim >= 2 else None
        return (str(x.ty.dtype) == "float32" and isinstance(columns, tvm.tirx.IntImm)
                and (self.lanes is None or int(columns) % self.lanes == 0) and axes in ([-1], [x.ty.ndim - 1])
                and bool(attrs.center) and bool(attrs.scale) and all(a.ty.ndim == 1 for a in call.args[1:3]))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.plans:
            quantize, qs, s = self.plans[var]
            call = self._call(self.visit_expr(binding.value), var, quantize, qs, s)
            if quantize is None:
                self.set_var_remap(var, self.builder_.emit(call, var.name))
                return
            result = self.builder_.emit(call)
            self.set_var_remap(var, self.builder_.emit(relax.TupleGetItem(result, 0), var.name))
            for index, q in enumerate(qs, 1):
                self.results[q] = (result, index)
            if s is not None:
                self.results[s] = (result, 2)
        elif var in self.results:
            result, index = self.results[var]
            value = relax.TupleGetItem(result, index)
            shape = result.ty.fields[index].shape
            if not same_shape(list(shape), list(var.ty.shape)):  # through a take of an axis of size 1
                value = relax.op.reshape(self.builder_.emit(value), var.ty.shape)
            self.set_var_remap(var, self.builder_.emit(value, var.name))
        else:
            super().visit_var_binding_(binding)

    def _call(self, layer_norm: relax.Call, y: relax.Var, quantize, qs: list[relax.Var],
              s: relax.Var | None) -> relax.Call:
        x, gamma, beta = layer_norm.args
        rank, columns, eps = x.ty.ndim, int(x.ty.shape[-1]), float(layer_norm.attrs.epsilon)
        if self.lanes is None:
            kernel = self.kernels.get(("layer_norm_rows_function", rank, columns, eps, quantize), "layer_norm_rows",
                                      lambda: layer_norm_rows_function(rank, columns, eps, quantize))
        else:
            key = ("layer_norm_rows", rank, columns, eps, self.lanes, quantize)
            kernel = self.kernels.get(key, f"layer_norm_rows_k{columns}", lambda: layer_norm_rows_kernel(
                rank, columns, eps, self.lanes, quantize).with_attr(KERNEL_ATTR, "layer_norm_rows"))
        outputs = [relax.TensorType(y.ty.shape, "float32")] + [relax.TensorType(y.ty.shape, "int8") for _ in qs]
        if s is not None:
            outputs.append(relax.TensorType([*list(y.ty.shape)[:-1], 1], "float32"))
        return relax.call_tir(kernel, [x, gamma, beta], outputs if len(outputs) > 1 else outputs[0])


def _unit_take(y: relax.Var, bindings: dict, users: dict) -> relax.Var:
    """``y``'s only user where that is ``take(y, 0 or -1, axis)`` along an axis of size 1 (the same elements), else
    ``y``."""
    used = users.get(y, [])
    take = bound_op_call(used[0], "relax.take", bindings) if len(used) == 1 else None
    if take is None or not take.args[0].same_as(y) or scalar_constant(take.args[1]) not in (0, -1):
        return y
    axis = int(take.attrs.axis) if take.attrs.axis is not None else None
    return used[0] if axis is not None and is_one(y.ty.shape[axis]) else y


@tvm.transform.module_pass(opt_level=0, name="int8mt.LayerNormRows")
class LayerNormRows:
    """Every layer norm over the last axis -> one call of a row kernel, with the quantization that follows it
    (see the module docstring); ``lanes``: the float32 lanes of the CPU target's vector registers, None for a GPU
    target."""

    def __init__(self, lanes: int | None) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _LayerNormRewriter(mod, self.lanes)
        return rewrite_functions(rewriter, mod, before=rewriter.find)
