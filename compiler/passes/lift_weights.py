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

The virtual machine checks every parameter's dtype and shape at every call (two builtin calls per parameter: for a
decoder step of the reference model, 82 calls for its 41 weights). Weights are the same at every call, so each
entry point is marked with how many of its parameters are weights (``WEIGHT_PARAMS_ATTR``) and
:func:`drop_weight_checks` removes their checks once the virtual machine's code is lowered; the module gets an
entry point ``check_weights(w_0, w_1, ...)`` taking all of them, which does only those checks and which the
runtime calls once, when it loads the weights.
"""
from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

from int8mt.runtime.bundle import CHECK_WEIGHTS

MIN_WEIGHT_BYTES = 4096  # smaller constants (scales, shapes) stay in the library
WEIGHT_PARAMS_ATTR = "int8mt.weight_params"  # an entry point's number of weight parameters (its last ones)
_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


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
            lifted = relax.Function(list(func.params) + [lifting.params[i] for i in indices], body, func.ret_ty,
                                    func.is_pure, func.attrs, func.span)
            mod[gvar] = lifted.with_attr(WEIGHT_PARAMS_ATTR, len(indices)) if indices else lifted
        if not self.weights:
            return mod
        builder = relax.BlockBuilder(mod)
        with builder.function(CHECK_WEIGHTS, [relax.Var(f"weight{i}", relax.TensorType(w.shape, str(w.dtype)))
                                              for i, w in enumerate(self.weights)]):
            builder.emit_func_output(relax.Tuple([]))
        return builder.get()


@tvm.transform.module_pass(opt_level=0, name="int8mt.DropWeightChecks")
def drop_weight_checks(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """After ``VMShapeLower``: the dtype and shape checks of each entry point's weight parameters (its last
    ``WEIGHT_PARAMS_ATTR`` ones, of static shapes) removed; :data:`CHECK_WEIGHTS` keeps them (see the module doc)."""
    for gvar, func in list(mod.functions.items()):
        count = int((func.attrs or {}).get(WEIGHT_PARAMS_ATTR, 0)) if isinstance(func, relax.Function) else 0
        if not count:
            continue
        weights = {p for p in func.params[len(func.params) - count:]
                   if all(isinstance(d, tvm.tirx.IntImm) for d in p.ty.shape)}
        blocks = [type(block)([b for b in block.bindings if not _checks(b.value, weights)])
                  for block in func.body.blocks]
        mod[gvar] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                   func.attrs, func.span)
    return mod


def _checks(value: relax.Expr, params: set[relax.Var]) -> bool:
    """Whether ``value`` is the virtual machine's dtype or shape check of one of ``params``."""
    return (isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc)
            and str(value.op.global_symbol) in _CHECKS and value.args[0] in params)
