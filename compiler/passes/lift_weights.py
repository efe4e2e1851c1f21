"""LiftWeights: the weights (large constants) of each entry point become trailing parameters, so that a bundle
keeps them in a file of their own, mapped at load, instead of inside its library.

A constant inside the library is read at load into TVM's executable, which copies it more than once on the way:
peak memory at load was about three times the weights (an opus-mt-en-de-shaped INT8 model: 255 MB for 52 MB of
weights). As parameters, the weights are the runtime's arrays, mapped from ``weights.bin`` (copy-on-write pages,
shared by every replica and every process of the machine that maps the file).

Each entry point ``f(x...)`` becomes ``f(x..., w_i, w_j, ...)``: the constants of at least ``min_bytes`` it uses,
in the order of :attr:`LiftWeights.weights` (one entry per distinct value, shared by every entry point that
uses it: a shared vocabulary's embedding, packed alike for the encoder and the decoder, is kept once); :attr:`LiftWeights.uses` maps each entry point to its weights' indices. Run it once the graph is final
(after fusion and scheduling), so that no pass still needs the constants' values.
"""
from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

MIN_WEIGHT_BYTES = 4096  # smaller constants (scales, shapes) stay in the library


@mutator
class _ConstantsToParams(PyExprMutator):
    """Replaces the large constants of one function by variables, registering their values in ``lifted``."""

    def __init__(self, mod: tvm.IRModule, lifted: "LiftWeights") -> None:
        super().__init__(mod)
        self.lifted = lifted
        self.params: dict[int, relax.Var] = {}  # weight index -> this function's parameter

    def visit_generic_const_(self, const: GenericConst) -> relax.Expr:
        data = const.value
        if not isinstance(data, tvm.runtime.Tensor) or not data.shape:
            return const
        if int(np.prod(data.shape)) * np.dtype(str(data.dtype)).itemsize < self.lifted.min_bytes:
            return const
        index = self.lifted.index_of(data)
        if index not in self.params:
            self.params[index] = relax.Var(f"weight{index}", const.ty)
        return self.params[index]


@tvm.transform.module_pass(opt_level=0, name="LiftWeights")
class LiftWeights:
    """See the module doc. After the pass ran, ``weights`` holds the lifted values and ``uses`` each entry
    point's weight indices (its trailing parameters, in order)."""

    def __init__(self, min_bytes: int = MIN_WEIGHT_BYTES) -> None:
        self.min_bytes = min_bytes
        self.weights: list[np.ndarray] = []
        self.uses: dict[str, list[int]] = {}
        self._index: dict[tuple, int] = {}  # a value's dtype, shape and digest -> its index in ``weights``

    def index_of(self, data: tvm.runtime.Tensor) -> int:
        array = data.numpy()
        key = (str(array.dtype), array.shape, hashlib.blake2b(array.tobytes()).digest())
        if key not in self._index:
            self._index[key] = len(self.weights)
            self.weights.append(array)
        return self._index[key]

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or "global_symbol" not in (func.attrs or {}):
                continue
            lifting = _ConstantsToParams(mod, self)
            body = lifting.visit_expr(func.body)
            indices = sorted(lifting.params)
            self.uses[gvar.name_hint] = indices
            mod[gvar] = relax.Function(list(func.params) + [lifting.params[i] for i in indices], body, func.ret_ty,
                                       func.is_pure, func.attrs, func.span)
        return mod
