"""TapIntMatmuls: make every integer matmul's activation operands and int32 result extra outputs.

A verification pass, not part of a bundle: it runs after :class:`ScalePropagation` (and before
:class:`PackInt8Matmul`, which then still packs and tiles the same matmuls), so that the compiled integer
graph can be compared matmul by matmul with the NumPy reference (:mod:`int8mt.quant.integer_model`).
Each function ``f(...) -> out`` becomes ``f(...) -> (out, taps)`` where ``taps`` holds, per integer matmul
in binding order, its left operand, its right operand unless that is a constant weight, and its result.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax

from .kernel_calls import is_int8_matmul


def _is_weight(expr: relax.Expr, bound: dict[relax.Var, relax.Expr]) -> bool:
    """True if ``expr`` is a constant or a transpose of one (a linear layer's weight)."""
    while isinstance(expr, relax.Var) and expr in bound:
        value = bound[expr]
        if not (isinstance(value, relax.Call) and value.op == ir.Op.get("relax.permute_dims")):
            return False
        expr = value.args[0]
    return isinstance(expr, ir.expr.Constant)


def matmul_taps(func: relax.Function) -> list[tuple[relax.Var, ...]]:
    """Per integer matmul of ``func`` (dataflow blocks removed), the variables to tap."""
    bound: dict[relax.Var, relax.Expr] = {}
    taps = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                bound[binding.var] = binding.value
                if is_int8_matmul(binding.value):
                    a, b = binding.value.args
                    operands = (a,) if _is_weight(b, bound) else (a, b)
                    taps.append((*operands, binding.var))
    return taps


def _tapped(func: relax.Function) -> relax.Function:
    taps = [v for group in matmul_taps(func) for v in group]
    body = relax.SeqExpr(func.body.blocks, relax.Tuple([func.body.body, relax.Tuple(taps)]))
    ret = relax.TupleType([func.body.body.ty, relax.TupleType([v.ty for v in taps])])
    return relax.Function(func.params, body, ret, attrs=func.attrs)


@tvm.transform.module_pass(opt_level=0, name="int8mt.TapIntMatmuls")
class TapIntMatmuls:
    """Return every integer matmul's operands and result beside each function's output."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        flat = relax.transform.ToNonDataflow()(mod)
        out = tvm.IRModule({gv: _tapped(f) if isinstance(f, relax.Function) else f
                            for gv, f in flat.functions_items()})
        return relax.transform.ConvertToDataflow()(relax.transform.Normalize()(out))
