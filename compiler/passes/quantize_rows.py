"""QuantizeRows: a run-time per-row quantization, as its Relax ops spell it, -> one call of our kernel.

:mod:`int8mt.compiler.quant_import` writes ``quantize_dynamic(x)`` along the last axis (every linear layer's input
with run-time ranges) as

    a = abs(x); m = max(a, axis=-1, keepdims); c = maximum(m, eps); s = divide(c, qmax)
    q = astype(clip(round(divide(x, s)), -qmax, qmax), int8)

which fuse into three kernels (the reduction, the scale, the quantization). Each is rewritten here into one call
of :func:`~int8mt.schedules.quantize_rows.quantize_rows_kernel` on ``x``, returning ``q`` and ``s``; the same
values bit for bit. The same along the axis before the last (the keys transposed for the encoder's attention, one
scale per key; a static size along it) -> :func:`~int8mt.schedules.quantize_rows.quantize_columns_kernel`.
The intermediate values must have no other use
(``s`` and ``q`` may have any). The kernels carry CPU schedules; for GPU targets (``graph_ops``) each row
quantization becomes one unscheduled function of the same ops instead
(:func:`~int8mt.schedules.cuda_rows.quantize_rows_function`, one kernel once scheduled).

Also here, for the passes whose kernels quantize their results as the graph does next: the matchers of a run-time
row quantization (:func:`match_row_quantize`, :func:`row_quantizations`) and of a static one
(:func:`match_static_quantize`).
"""
from __future__ import annotations

from collections.abc import Iterator

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.cuda_rows import QUANTIZE_ROWS, ROW_QUANTIZE_ATTR, quantize_rows_function
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.layer_norm_rows import RowQuantize, StaticQuantize
from int8mt.schedules.quantize_rows import quantize_columns_kernel, quantize_rows_kernel

from .kernel_calls import (KernelTable, bindings_and_users, bound_op_call, kernel_kind, rewrite_functions,
                           scalar_constant, use_counts)


def called_row_quantization(mod: tvm.IRModule, expr: relax.Expr | None) -> RowQuantize | None:
    """The quantization ``expr`` computes where it is a call of a row-quantizing function of the graph's ops (GPU
    targets: :func:`~int8mt.schedules.cuda_rows.quantize_rows_function`, its ``qmax`` and ``eps`` in its
    attributes), else None."""
    if not (isinstance(expr, relax.Call) and expr.op == ir.Op.get("relax.call_tir")
            and kernel_kind(mod, expr.args[0]) == QUANTIZE_ROWS):
        return None
    attrs = mod[expr.args[0]].attrs.get(ROW_QUANTIZE_ATTR)
    return None if attrs is None else RowQuantize(float(attrs["qmax"]), float(attrs["eps"]))


def quantized(bb: relax.BlockBuilder, x: relax.Expr, scale: relax.Expr, qmax: int) -> relax.Expr:
    """``q = astype(clip(round(divide(x, scale)), -qmax, qmax), int8)``: a quantization by a scale tensor as the
    graph spells it."""
    rounded = bb.emit(relax.op.round(relax.op.divide(x, scale)))
    return bb.emit(relax.op.astype(relax.op.clip(rounded, -qmax, qmax), "int8"))


def row_quantization(bb: relax.BlockBuilder, x: relax.Expr, qmax: int, eps: float, axis: int = -1) -> relax.Tuple:
    """``(q, s)``: the run-time quantization of ``x`` along ``axis`` as the graph spells it (the module docstring;
    what :func:`match_row_quantize` matches)."""
    magnitude = relax.op.max(relax.op.abs(x), axis=[axis], keepdims=True)
    scale = bb.emit(relax.op.divide(relax.op.maximum(magnitude, relax.const(eps, "float32")),
                                    relax.const(float(qmax), "float32")))
    return relax.Tuple([quantized(bb, x, scale, qmax), scale])


def match_row_quantize(q: relax.Var, bindings: dict[relax.Var, relax.Expr], uses: dict[relax.Var, int],
                       axis: int = -1) -> tuple[relax.Expr, relax.Var, float, float] | None:
    """``(x, s, qmax, eps)`` if ``q`` is bound to the per-row quantization of ``x`` with scale ``s`` (see the
    module docstring; ``axis`` -2: along the axis before the last, one scale per column), its intermediate values
    used once each."""
    cast = bound_op_call(q, "relax.astype", bindings)
    if cast is None or str(cast.attrs.dtype) != "int8":
        return None
    chain = [cast]
    for arg, op in ((0, "relax.clip"), (0, "relax.round"), (0, "relax.divide"), (1, "relax.divide"),
                    (0, "relax.maximum"), (0, "relax.max"), (0, "relax.abs")):  # each op's input in the last op
        chain.append(bound_op_call(chain[-1].args[arg], op, bindings))
        if chain[-1] is None:
            return None
    _, clip, rounded, divided, scale_call, floor, amax, magnitude = chain
    x, qmax, eps = divided.args[0], scalar_constant(scale_call.args[1]), scalar_constant(floor.args[1])
    bounds = [float(b.value) if isinstance(b, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None for b in clip.args[1:]]
    axes = amax.attrs.axis
    once = (cast.args[0], clip.args[0], rounded.args[0], scale_call.args[0], floor.args[0], amax.args[0])
    if (not magnitude.args[0].same_as(x) or qmax is None or eps is None or bounds != [-qmax, qmax]
            or axes is None or [int(a) for a in axes] not in ([axis], [x.ty.ndim + axis]) or not amax.attrs.keepdims
            or str(x.ty.dtype) != "float32"
            or any(uses.get(v, 0) != 1 for v in once)):
        return None
    return x, divided.args[1], float(qmax), float(eps)


def match_static_quantize(y: relax.Var, bindings: dict, users: dict) -> tuple[relax.Var, StaticQuantize] | None:
    """``(q, its quantization)`` if a user of ``y`` is ``clip(y, lo, hi)``, used only by ``q = quantize(.., scale)``
    to int8 with a constant scalar scale and zero point 0 (static ranges)."""
    return next(static_quantizations(y, bindings, users), None)


def static_quantizations(y: relax.Var, bindings: dict, users: dict) -> Iterator[tuple[relax.Var, StaticQuantize]]:
    """Each ``(q, its quantization)`` of ``y`` as :func:`match_static_quantize` finds one."""
    for clipped in users.get(y, []):
        clip = bound_op_call(clipped, "relax.clip", bindings)
        if not (clip is not None and clip.args[0].same_as(y) and len(users.get(clipped, [])) == 1):
            continue
        q = users[clipped][0]
        quantize = bound_op_call(q, "relax.quantize", bindings)
        if not (quantize is not None and isinstance(q, relax.DataflowVar)
                and str(quantize.attrs.out_dtype) == "int8"):
            continue
        scale, zero = (scalar_constant(a) for a in quantize.args[1:3])
        bounds = [float(b.value) if isinstance(b, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) else None
                  for b in clip.args[1:]]
        if scale is not None and zero == 0 and None not in bounds:
            yield q, StaticQuantize(bounds[0], bounds[1], float(scale))


def row_quantizations(bindings: dict, users: dict) -> dict[relax.Var, tuple[relax.Var, relax.Var, RowQuantize]]:
    """For each variable whose run-time per-row quantization follows (``q`` and ``s`` dataflow variables): ``(q, s,
    the quantization)``."""
    uses = use_counts(users)
    found = {}
    for q in bindings:
        match = isinstance(q, relax.DataflowVar) and match_row_quantize(q, bindings, uses)
        if match and isinstance(match[1], relax.DataflowVar):
            found[match[0]] = (q, match[1], RowQuantize(match[2], match[3]))
    return found


@expr_functor.mutator
class _RowQuantizer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, graph_ops: bool) -> None:
        super().__init__(mod)
        self.graph_ops = graph_ops
        self.kernels = KernelTable(self.builder_)
        self.fused: dict[relax.Var, tuple[relax.Expr, float, float, int]] = {}  # scale var -> (x, qmax, eps, axis)
        self.quantized: dict[relax.Var, relax.Var] = {}  # q var -> its scale var
        self.outputs: dict[relax.Var, relax.Expr] = {}  # scale var -> the fused call's result

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        bindings, users = bindings_and_users(func)
        uses = use_counts(users)
        self.fused, self.quantized, self.outputs = {}, {}, {}
        for var in bindings:
            for axis in (-1,) if self.graph_ops else (-1, -2):
                found = isinstance(var, relax.DataflowVar) and match_row_quantize(var, bindings, uses, axis)
                if found and isinstance(found[1], relax.DataflowVar) and (
                        axis == -1 or isinstance(found[0].ty.shape[-2], tvm.tirx.IntImm)):
                    x, scale, qmax, eps = found
                    self.fused[scale] = (x, qmax, eps, axis)
                    self.quantized[var] = scale

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.fused:
            x, qmax, eps, axis = self.fused[var]
            quantize = self._quantize if axis == -1 else self._quantize_columns
            self.outputs[var] = quantize(self.visit_expr(x), var.ty.shape, qmax, eps)
            self.set_var_remap(var, self.builder_.emit(relax.TupleGetItem(self.outputs[var], 1), var.name))
        elif var in self.quantized:
            result = self.outputs[self.quantized[var]]
            self.set_var_remap(var, self.builder_.emit(relax.TupleGetItem(result, 0), var.name))
        else:
            super().visit_var_binding_(binding)

    def _quantize(self, x: relax.Expr, scale_shape: relax.ShapeExpr, qmax: float, eps: float) -> relax.Var:
        rank, last = x.ty.ndim, x.ty.shape[-1]
        columns = int(last) if isinstance(last, tvm.tirx.IntImm) else None  # None: rows of any length
        if self.graph_ops:
            kernel = self.kernels.get(("quantize_rows_function", rank, columns, qmax, eps), "quantize_rows",
                                      lambda: quantize_rows_function(rank, columns, qmax, eps))
            return self._call(kernel, x, scale_shape)
        kernel = self.kernels.get(("quantize_rows", rank, columns, qmax, eps),
                                  f"quantize_rows_k{columns or 'n'}",
                                  lambda: quantize_rows_kernel(rank, columns, qmax, eps).with_attr(KERNEL_ATTR,
                                                                                                   "quantize_rows"))
        return self._call(kernel, x, scale_shape)

    def _quantize_columns(self, x: relax.Expr, scale_shape: relax.ShapeExpr, qmax: float, eps: float) -> relax.Var:
        rank, rows = x.ty.ndim, int(x.ty.shape[-2])
        kernel = self.kernels.get(("quantize_columns", rank, rows, qmax, eps), f"quantize_columns_r{rows}",
                                  lambda: quantize_columns_kernel(rank, rows, qmax, eps).with_attr(KERNEL_ATTR,
                                                                                                   "quantize_columns"))
        return self._call(kernel, x, scale_shape)

    def _call(self, kernel: ir.GlobalVar, x: relax.Expr, scale_shape: relax.ShapeExpr) -> relax.Var:
        return self.builder_.emit(relax.call_tir(kernel, [x], [relax.TensorType(x.ty.shape, "int8"),
                                                               relax.TensorType(scale_shape, "float32")]))


@tvm.transform.module_pass(opt_level=0, name="int8mt.QuantizeRows")
class QuantizeRows:
    """Every run-time per-row quantization -> one call of our row-quantizing kernel, or with ``graph_ops`` of one
    unscheduled function of its ops (see the module docstring)."""

    def __init__(self, graph_ops: bool = False) -> None:
        self.graph_ops = graph_ops

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        quantizer = _RowQuantizer(mod, self.graph_ops)
        return rewrite_functions(quantizer, mod, before=quantizer.find)
