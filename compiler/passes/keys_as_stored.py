"""ReadKeysAsStored: a decoder step's one-query attention scores (int8, or float32 in FP32 layers) read the key
cache as stored.

The importer gives ``matmul(q [..., 1, R], reshape(permute_dims(K, last two axes swapped)))`` for QK^T.
Legalized as is, the whole key cache is copied transposed at every step. This pass rewrites it to
``matmul(q, permute_dims(reshape(K)))``, which ``FuseTransposeMatmul`` then turns into one kernel that
reads the keys as stored.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from .kernel_calls import bound_call, is_float_matmul, is_int8_matmul, is_one, rewrite_functions


@expr_functor.mutator
class _KeysReader(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.analyzer = Analyzer()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (is_int8_matmul(call) or is_float_matmul(call)):
            return call
        q, b = call.args
        if q.ty.ndim < 2 or not is_one(list(q.ty.shape)[-2]):
            return call
        view = bound_call(self, b, "relax.reshape")
        swap = bound_call(self, view.args[0], "relax.permute_dims") if view is not None else None
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
                               out_dtype=call.attrs.out_dtype)


@tvm.transform.module_pass(opt_level=0, name="int8mt.ReadKeysAsStored")
class ReadKeysAsStored:
    """One-query QK^T over a transposed view of the keys -> a transpose of the keys as stored (see the module
    docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(_KeysReader(mod), mod)
