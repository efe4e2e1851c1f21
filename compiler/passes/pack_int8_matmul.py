"""PackInt8Matmul: integer matmuls with constant int8 weights -> the tuned int8 dense kernel.

Runs after :class:`ScalePropagation` and before legalization, on targets whose preset names an int8 dot
product (VNNI, AVX-512 BW, AVX2). It rewrites

    matmul(x: int8[..., K], permute_dims(W: const int8[N, K]), out_dtype="int32")   (a linear layer)
    matmul(x: int8[..., K], W: const int8[K, N], out_dtype="int32")

into ``call_tir(int8_dense_NxK, [reshape(x, [M, K]), packed W, correction])``: the weight is packed at
compile time into the intrinsic's layout (``[N/16, K/4, 16, 4]`` for VNNI) with its correction
(:mod:`int8mt.schedules.int8_dense`), so inference pays nothing for the layout. Each kernel is scheduled
with the tile sizes ``tiles_for(n, k, function_name)`` returns (the tuning database, or defaults) and
marked as scheduled, so the default schedule leaves it alone. A constant int32 bias added to a kernel's output
is folded into its correction (the kernel adds that vector anyway), which saves a pass over the int32
output, and the elementwise ops that follow a kernel become its epilogue (:mod:`.fuse_dense_epilogue`;
``fuse_epilogues=False`` keeps them apart). A ``take`` of rows from an int8 table (the
int8 embedding) gathers from the packed copy: the decoder's tied embedding and logits projection then share
one table, and the copies of the separately compiled entry points are equal, so the ``.so`` keeps one.

Integer matmuls of two int8 activations (attention: QK^T and softmax.V, ``[..., I, R] x [..., R, J]`` with
the same leading dimensions) become the batched kernel of :mod:`int8mt.schedules.int8_batch_matmul`, which
packs its second operand at run time; one kernel per combination of static sizes. A decoder step's
(one query row) stays on the default schedule: packing the keys or values would cost as much as the
matrix-vector product itself (measured: 4x slower than the default schedule there, 2.4x faster in the
encoder). Float matmuls are not touched.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.int8_batch_matmul import scheduled_int8_batch_matmul
from int8mt.schedules.int8_dense import DenseTiles, pack_weight, packed_rows, scheduled_int8_dense
from int8mt.schedules.intrin import Int8Dot
from int8mt.schedules.intrin.x86_vnni import VNNI_DOT

from .fuse_dense_epilogue import fuse_dense_epilogues, shape_product

TilesFor = Callable[[int, int, str], DenseTiles]


def _int8_table(expr: relax.Expr) -> ir.expr.Constant | None:
    """``expr`` if it is a 2-D int8 constant."""
    if isinstance(expr, ir.expr.Constant) and str(expr.ty.dtype) == "int8" and expr.ty.ndim == 2:
        return expr
    return None


def _transposed_table(bound: relax.Expr | None) -> ir.expr.Constant | None:
    """The [N, K] int8 constant behind ``permute_dims(W)``, if ``bound`` is that."""
    if isinstance(bound, relax.Call) and bound.op == ir.Op.get("relax.permute_dims"):
        axes = bound.attrs.axes
        if axes is None or [int(a) for a in axes] == [1, 0]:
            return _int8_table(bound.args[0])
    return None


def _is_int_matmul(call: relax.Expr) -> bool:
    return (isinstance(call, relax.Call) and call.op == ir.Op.get("relax.matmul")
            and str(call.attrs.out_dtype) == "int32" and str(call.args[0].ty.dtype) == "int8")


@expr_functor.mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, tiles_for: TilesFor, dot: Int8Dot) -> None:
        super().__init__(mod)
        self.tiles_for, self.dot = tiles_for, dot
        self.kernels: dict[tuple, ir.GlobalVar] = {}
        self.dense_kernels: dict[ir.GlobalVar, tuple[int, int, DenseTiles]] = {}
        self.analyzer = Analyzer()
        self.packed: dict[ir.expr.Constant, tuple[relax.Expr, relax.Expr]] = {}
        self.function = ""

    def run(self, gv: ir.GlobalVar, func: relax.Function) -> None:
        self.function, self.packed = gv.name_hint, {}
        self.builder_.update_func(gv, self.visit_expr(func))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if _is_int_matmul(call) and call.args[0].ty.ndim >= 2:
            return self._dense(call)
        if call.op == ir.Op.get("relax.add"):
            return self._fold_bias(call)
        if call.op == ir.Op.get("relax.take") and int(call.attrs.axis) == 0 and _int8_table(call.args[0]) is not None:
            return self._gather(call)
        return call

    def _dense(self, call: relax.Call) -> relax.Expr:
        x, w = call.args
        table = _transposed_table(self.lookup_binding(w)) if isinstance(w, relax.Var) else None
        if table is None:
            weight = _int8_table(self.lookup_binding(w) if isinstance(w, relax.Var) else w)
            if weight is None:
                return self._batched(call)
            table = relax.const(np.ascontiguousarray(weight.value.numpy().T))  # a [K, N] weight, used once
        n, k = (int(d) for d in table.ty.shape)
        lead = list(x.ty.shape)[:-1]
        rows = shape_product(lead)
        flat = x if len(lead) == 1 else self.builder_.emit(relax.op.reshape(x, [rows, k]))
        packed, correction = self._pack(table)
        tiles = self.tiles_for(n, k, self.function)
        kernel = self._kernel(("dense", n, k, tiles), f"int8_dense_n{n}_k{k}_r{tiles.rows}c{tiles.cols}d{tiles.depth}",
                              lambda: scheduled_int8_dense(n, k, tiles, dot=self.dot))
        self.dense_kernels[kernel] = (n, k, tiles)
        out = relax.call_tir(kernel, [flat, packed, correction], relax.TensorType([rows, n], "int32"))
        return out if len(lead) == 1 else relax.op.reshape(self.builder_.emit(out), [*lead, n])

    def _fold_bias(self, call: relax.Call) -> relax.Expr:
        """``add(dense, bias)`` (or ``add(reshape(dense), bias)``) with a constant int32 bias over the output
        columns -> the dense kernel with ``correction + bias``: the same int32 sums, one pass fewer."""
        for out, bias in (call.args, call.args[::-1]):
            dense, reshaped = self._dense_call(out), None
            if dense is None and (view := self._bound_call(out, "relax.reshape")) is not None:
                dense, reshaped = self._dense_call(view.args[0]), view
            if dense is None or not isinstance(bias, ir.expr.Constant) or str(bias.ty.dtype) != "int32":
                continue
            n = int(dense.ty.shape[-1])
            shape = [int(d) for d in bias.ty.shape]
            if shape[-1:] != [n] or any(d != 1 for d in shape[:-1]) or len(shape) > out.ty.ndim:
                continue
            x, packed, correction = dense.args[1].fields
            folded = correction.value.numpy().copy()
            folded[:n] += bias.value.numpy().reshape(n)  # int32 wrap-around, as the add it replaces
            fused = relax.call_tir(dense.args[0], [x, packed, relax.const(folded)], dense.ty)
            return fused if reshaped is None else relax.op.reshape(self.builder_.emit(fused), reshaped.args[1])
        return call

    def _dense_call(self, expr: relax.Expr) -> relax.Call | None:
        """The int8 dense kernel call bound to ``expr``, if it is one."""
        bound = self._bound_call(expr, "relax.call_tir")
        return bound if bound is not None and bound.args[0] in self.dense_kernels else None

    def _bound_call(self, expr: relax.Expr, op: str) -> relax.Call | None:
        """The call of ``op`` bound to the variable ``expr``, if it is one."""
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return bound if isinstance(bound, relax.Call) and bound.op == ir.Op.get(op) else None

    def _batched(self, call: relax.Call) -> relax.Expr:
        """``matmul(A [..., I, R], B [..., R, J])`` of two int8 activations with equal leading dimensions ->
        the batched kernel (leading dimensions flattened into one)."""
        a, b = call.args
        if str(b.ty.dtype) != "int8" or a.ty.ndim != b.ty.ndim or a.ty.ndim < 3:
            return call
        a_shape, b_shape = list(a.ty.shape), list(b.ty.shape)
        lead = a_shape[:-2]
        if not all(self.analyzer.can_prove_equal(x, y) for x, y in zip(lead, b_shape[:-2])):
            return call  # broadcasting batch dimensions: left to the default schedule
        (i, r), j = a_shape[-2:], b_shape[-1]
        if isinstance(i, tvm.tirx.IntImm) and int(i) == 1:
            return self._keys_as_stored(call)  # a matrix-vector product (decoder step): see the module docstring
        batch = shape_product(lead)
        sizes = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in (batch, i, j, r))
        name = "int8_batch_matmul_" + "_".join(f"{axis}{'n' if size is None else size}"
                                               for axis, size in zip("bijr", sizes))
        kernel = self._kernel(("batch", *sizes), name,
                              lambda: scheduled_int8_batch_matmul(*sizes, dot=self.dot))
        if len(lead) > 1:
            a = self.builder_.emit(relax.op.reshape(a, [batch, i, r]))
            b = self.builder_.emit(relax.op.reshape(b, [batch, r, j]))
        out = relax.call_tir(kernel, [a, b], relax.TensorType([batch, i, j], "int32"))
        return out if len(lead) == 1 else relax.op.reshape(self.builder_.emit(out), [*lead, i, j])

    def _keys_as_stored(self, call: relax.Call) -> relax.Expr:
        """``matmul(q, reshape(permute_dims(K, last two swapped)))`` -> ``matmul(q, permute_dims(reshape(K)))``:
        FuseTransposeMatmul then makes it one kernel that reads the keys as stored, instead of a transposed
        copy of the whole key cache every decoder step."""
        q, b = call.args
        view = self._bound_call(b, "relax.reshape")
        swap = self._bound_call(view.args[0], "relax.permute_dims") if view is not None else None
        if swap is None:
            return call
        keys = swap.args[0]
        rank = keys.ty.ndim
        if swap.attrs.axes is None or [int(a) for a in swap.attrs.axes] != [*range(rank - 2), rank - 1, rank - 2]:
            return call
        *lead, r, j = list(b.ty.shape)
        stored = list(keys.ty.shape)
        if not (self.analyzer.can_prove_equal(stored[-1], r) and self.analyzer.can_prove_equal(stored[-2], j)):
            return call
        flat = self.builder_.emit(relax.op.reshape(keys, [*lead, j, r]))
        n = len(lead) + 2
        return relax.op.matmul(q, self.builder_.emit(relax.op.permute_dims(flat, [*range(n - 2), n - 1, n - 2])),
                               out_dtype="int32")

    def _gather(self, call: relax.Call) -> relax.Expr:
        """``take(W, ids, axis=0)`` of an int8 table: read the rows from its packed copy, so that a table
        is stored once, packed (the tied embedding and logits projection; every entry point's copy)."""
        table, ids = call.args
        n, k = (int(d) for d in table.ty.shape)
        dtype = str(ids.ty.dtype)
        shape = list(ids.ty.shape)
        rows = shape_product(shape) if shape else 1
        flat = self.builder_.emit(relax.op.reshape(ids, [rows])) if len(shape) != 1 else ids
        kernel = self._kernel(("rows", n, k, dtype), f"int8_packed_rows_n{n}_k{k}_{dtype}",
                              lambda: packed_rows(n, k, dtype, self.dot))
        out = relax.call_tir(kernel, [flat, self._pack(table)[0]], relax.TensorType([rows, k], "int8"))
        return out if len(shape) == 1 else relax.op.reshape(self.builder_.emit(out), [*shape, k])

    def _pack(self, table: ir.expr.Constant) -> tuple[relax.Expr, relax.Expr]:
        """The packed weight and correction constants of ``table``, made once per table and function."""
        if table not in self.packed:
            packed, correction = pack_weight(table.value.numpy(), self.dot)
            self.packed[table] = (relax.const(packed), relax.const(correction))
        return self.packed[table]

    def _kernel(self, key: tuple, name: str, make) -> ir.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]


@tvm.transform.module_pass(opt_level=0, name="int8mt.PackInt8Matmul")
class PackInt8Matmul:
    """Replace int8 matmuls with constant weights by the packed kernel of ``dot`` (see the module docstring).
    ``tiles_for(n, k, function_name)`` gives each kernel's tile sizes."""

    def __init__(self, tiles_for: TilesFor, dot: Int8Dot = VNNI_DOT, fuse_epilogues: bool = True) -> None:
        self.tiles_for, self.dot, self.fuse_epilogues = tiles_for, dot, fuse_epilogues

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _Packer(mod, self.tiles_for, self.dot)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.run(gv, func)
        mod = relax.transform.DeadCodeElimination()(packer.builder_.get())
        return fuse_dense_epilogues(mod, packer.dense_kernels, self.dot) if self.fuse_epilogues else mod
