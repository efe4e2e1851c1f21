"""PackInt8Matmul: integer matmuls with constant int8 weights -> the tuned VNNI dense kernel.

Runs after :class:`ScalePropagation` and before legalization, on targets whose preset has the VNNI dot
product. It rewrites

    matmul(x: int8[..., K], permute_dims(W: const int8[N, K]), out_dtype="int32")   (a linear layer)
    matmul(x: int8[..., K], W: const int8[K, N], out_dtype="int32")

into ``call_tir(int8_dense_NxK, [reshape(x, [M, K]), packed W, correction])``: the weight is packed at
compile time into the intrinsic's ``[N/16, K/4, 16, 4]`` layout with its ``-128 * row sums`` correction
(:mod:`int8mt.schedules.int8_dense`), so inference pays nothing for the layout. Each kernel is scheduled
with the tile sizes ``tiles_for(n, k, function_name)`` returns (the tuning database, or defaults) and
marked as scheduled, so the default schedule leaves it alone. Matmuls of two activations (attention) and
float matmuls are not touched.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.int8_dense import DenseTiles, pack_weight, scheduled_int8_dense

TilesFor = Callable[[int, int, str], DenseTiles]


def _int8_weight(mutator: PyExprMutator, expr: relax.Expr) -> np.ndarray | None:
    """The [N, K] int8 weight behind a matmul's right operand, if it is a constant (maybe transposed)."""
    transposed = False
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if isinstance(bound, relax.Call) and bound.op == ir.Op.get("relax.permute_dims"):
            axes = bound.attrs.axes
            if axes is not None and [int(a) for a in axes] != [1, 0]:
                return None
            expr, transposed = bound.args[0], True
        elif isinstance(bound, ir.expr.Constant):
            expr = bound
    if not isinstance(expr, ir.expr.Constant) or str(expr.ty.dtype) != "int8" or expr.ty.ndim != 2:
        return None
    value = expr.value.numpy()
    return value if transposed else np.ascontiguousarray(value.T)


@expr_functor.mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, tiles_for: TilesFor) -> None:
        super().__init__(mod)
        self.tiles_for = tiles_for
        self.kernels: dict[tuple[int, int, DenseTiles], ir.GlobalVar] = {}
        self.function = ""
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != ir.Op.get("relax.matmul") or str(call.attrs.out_dtype) != "int32":
            return call
        x, w = call.args
        if str(x.ty.dtype) != "int8" or x.ty.ndim < 2:
            return call
        weight = _int8_weight(self, w)
        if weight is None:
            return call
        n, k = weight.shape
        lead = list(x.ty.shape)[:-1]
        rows = lead[0]
        for d in lead[1:]:
            rows = rows * d
        flat = x if len(lead) == 1 else self.builder_.emit(relax.op.reshape(x, [rows, k]))
        packed, correction = pack_weight(weight)
        out = relax.call_tir(self._kernel(n, k), [flat, relax.const(packed), relax.const(correction)],
                             relax.TensorType([rows, n], "int32"))
        self.rewritten += 1
        return out if len(lead) == 1 else relax.op.reshape(self.builder_.emit(out), [*lead, n])

    def _kernel(self, n: int, k: int) -> ir.GlobalVar:
        tiles = self.tiles_for(n, k, self.function)
        key = (n, k, tiles)
        if key not in self.kernels:
            name = f"int8_dense_n{n}_k{k}_r{tiles.rows}c{tiles.cols}d{tiles.depth}"
            self.kernels[key] = self.builder_.add_func(scheduled_int8_dense(n, k, tiles), name)
        return self.kernels[key]


@tvm.transform.module_pass(opt_level=0, name="int8mt.PackInt8Matmul")
class PackInt8Matmul:
    """Replace int8 matmuls with constant weights by the packed VNNI kernel (see the module docstring).
    ``tiles_for(n, k, function_name)`` gives each kernel's tile sizes."""

    def __init__(self, tiles_for: TilesFor) -> None:
        self.tiles_for = tiles_for
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _Packer(mod, self.tiles_for)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.function = gv.name_hint
                packer.builder_.update_func(gv, packer.visit_expr(func))
        self.rewritten = packer.rewritten
        return relax.transform.DeadCodeElimination()(packer.builder_.get())
