"""PackDense: linear layers with constant weights -> the tuned dense kernel of a dot product.

With an int8 dot product it runs after :class:`.ScalePropagation`, on targets whose preset names one, and
rewrites

    matmul(x: int8[..., K], permute_dims(W: const int8[N, K]), out_dtype="int32")   (a linear layer)
    matmul(x: int8[..., K], W: const int8[K, N], out_dtype="int32")

into ``call_tir(int8_dense_NxK, [reshape(x, [M, K]), packed W, correction])``: the weight is packed at
compile time into the intrinsic's layout (``[N/16, K/4, 16, 4]`` for VNNI) with its correction
(:mod:`int8mt.schedules.int8_dense`), so inference pays nothing for the layout. With a float32 multiply-add
family (a preset's ``float_dot``) it does the same for the float32 matmuls of FP32 layers (an FP32 model, or
the layers a quantized one keeps in float), into ``float_dense`` kernels with weights packed ``[N/lanes, K,
lanes, 1]`` and a zero correction. Each kernel is scheduled
with the tiles ``tiles_for(n, k, function_name)`` gives (the tuning database, or defaults) and marked as
scheduled (the default schedule leaves it alone) and with its shape and tiles (``int8mt.dense``), which
the passes after this one and the build report read. Other matmuls are left alone.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.int8_dense import DenseTiles, dense_kind, pack_weight, scheduled_int8_dense
from int8mt.schedules.intrin import Int8Dot

from .kernel_calls import (KernelTable, bound_call, is_float_matmul, is_int8_matmul, rewrite_functions,
                           shape_product, weight_table)

TilesFor = Callable[[int, int, str], DenseTiles]


@expr_functor.mutator
class _DensePacker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, tiles_for: TilesFor, dot: Int8Dot) -> None:
        super().__init__(mod)
        self.tiles_for, self.dot = tiles_for, dot
        self.kernels = KernelTable(self.builder_)
        self.function = ""
        self.packed: dict[ir.expr.Constant, tuple[relax.Expr, relax.Expr]] = {}

    def start(self, gv: ir.GlobalVar, _func: relax.Function) -> None:
        self.function, self.packed = gv.name_hint, {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        takes = is_int8_matmul(call) if self.dot.tensorized else is_float_matmul(call)
        if not (takes and call.args[0].ty.ndim >= 2):
            return call
        x, w = call.args
        transposed = bound_call(self, w, "relax.permute_dims")
        table = None
        if transposed is not None and (transposed.attrs.axes is None
                                       or [int(a) for a in transposed.attrs.axes] == [1, 0]):
            table = weight_table(transposed.args[0], self.dot.weight)
        if table is None:
            weight = weight_table(self.lookup_binding(w) if isinstance(w, relax.Var) else w, self.dot.weight)
            if weight is None:
                return call  # not a constant weight
            table = relax.const(np.ascontiguousarray(weight.value.numpy().T))  # a [K, N] weight, used once
        n, k = (int(d) for d in table.ty.shape)
        lead = list(x.ty.shape)[:-1]
        rows = shape_product(lead)
        flat = x if len(lead) == 1 else self.builder_.emit(relax.op.reshape(x, [rows, k]))
        packed, correction = self._pack(table)
        tiles = self.tiles_for(n, k, self.function)
        kernel = self.kernels.get(("dense", n, k, tiles),
                                  f"{dense_kind(self.dot)}_n{n}_k{k}_r{tiles.rows}c{tiles.cols}d{tiles.depth}",
                                  lambda: scheduled_int8_dense(n, k, tiles, self.dot))
        out = relax.call_tir(kernel, [flat, packed, correction], relax.TensorType([rows, n], self.dot.accumulator))
        return out if len(lead) == 1 else relax.op.reshape(self.builder_.emit(out), [*lead, n])

    def _pack(self, table: ir.expr.Constant) -> tuple[relax.Expr, relax.Expr]:
        """The packed weight and correction constants of ``table``, made once per table and function."""
        if table not in self.packed:
            packed, correction = pack_weight(table.value.numpy(), self.dot)
            self.packed[table] = (relax.const(packed), relax.const(correction))
        return self.packed[table]


@tvm.transform.module_pass(opt_level=0, name="int8mt.PackDense")
class PackDense:
    """Linear layers with constant weights of ``dot``'s dtype -> its packed dense kernel (see the module
    docstring); ``tiles_for(n, k, function_name)`` gives each kernel's tiles."""

    def __init__(self, tiles_for: TilesFor, dot: Int8Dot) -> None:
        self.tiles_for, self.dot = tiles_for, dot

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _DensePacker(mod, self.tiles_for, self.dot)
        return rewrite_functions(packer, mod, packer.start)
