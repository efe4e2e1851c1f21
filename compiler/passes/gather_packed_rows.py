"""GatherPackedRows: an embedding lookup in an int8 (or, for FP32 layers, float32) table reads the rows from the
table's packed copy.

``take(W: const int8[N, K], ids, axis=0)`` (a table of the dot product's weight dtype) becomes a gather kernel
over ``W`` packed for the dense kernel (:func:`int8mt.schedules.int8_dense.packed_rows`). Where the same function already holds that packed copy
(the decoder's tied embedding and logits projection, after :class:`.PackDense`), the gather reads that
constant, so the table is stored once; the copies of the separately compiled entry points are equal, so
the ``.so`` keeps one.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.int8_dense import dense_kind, pack_weight, packed_rows
from int8mt.schedules.intrin import Int8Dot

from .kernel_calls import KernelTable, kernel_calls, rewrite_functions, shape_product, weight_table


@expr_functor.mutator
class _Gatherer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dot: Int8Dot) -> None:
        super().__init__(mod)
        self.dot, self.kernels = dot, KernelTable(self.builder_)
        self.packed_weights: list[ir.expr.Constant] = []  # the packed weights the function's dense calls read

    def start(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        dense = kernel_calls(func, self.builder_.get(), dense_kind(self.dot))
        self.packed_weights = [call.args[1].fields[1] for call in dense]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if (call.op != ir.Op.get("relax.take") or int(call.attrs.axis) != 0
                or weight_table(call.args[0], self.dot.weight) is None):
            return call
        table, ids = call.args
        n, k = (int(d) for d in table.ty.shape)
        dtype = str(ids.ty.dtype)
        shape = list(ids.ty.shape)
        rows = shape_product(shape) if shape else 1
        flat = self.builder_.emit(relax.op.reshape(ids, [rows])) if len(shape) != 1 else ids
        kernel = self.kernels.get(("rows", n, k, dtype), f"{self.dot.weight}_packed_rows_n{n}_k{k}_{dtype}",
                                  lambda: packed_rows(n, k, dtype, self.dot))
        out = relax.call_tir(kernel, [flat, self._packed(table)], relax.TensorType([rows, k], self.dot.weight))
        return out if len(shape) == 1 else relax.op.reshape(self.builder_.emit(out), [*shape, k])

    def _packed(self, table: ir.expr.Constant) -> ir.expr.Constant:
        """The packed copy of ``table``: the one a dense call of the function reads, or a new constant."""
        packed = pack_weight(table.value.numpy(), self.dot)[0]
        for existing in self.packed_weights:
            if tuple(int(d) for d in existing.ty.shape) == packed.shape and np.array_equal(existing.value.numpy(), packed):
                return existing
        constant = relax.const(packed)
        self.packed_weights.append(constant)
        return constant


@tvm.transform.module_pass(opt_level=0, name="int8mt.GatherPackedRows")
class GatherPackedRows:
    """Row lookups in tables of ``dot``'s weight dtype -> gathers from their tables packed for ``dot`` (see the
    module docstring)."""

    def __init__(self, dot: Int8Dot) -> None:
        self.dot = dot

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        gatherer = _Gatherer(mod, self.dot)
        return rewrite_functions(gatherer, mod, gatherer.start)
