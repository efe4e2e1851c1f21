"""ReshapesAfterElementwise: ``op(reshape(x), y)`` -> ``reshape(op(x, y'), ...)`` for elementwise ops.

Reshapes stay views at run time (``R.reshape``, see :func:`int8mt.compiler.legalize.legalize_map`), and TVM's
operator fusion does not fuse across them: a linear layer's int32 result goes through reshapes into the attention
heads' layout before its requantization, so the matmul and the requantization are two kernels, and the int32
result makes a round trip through memory between them. On GPUs each kernel is also a launch the host issues per
decoder step. Moving every reshape after the elementwise ops that follow it leaves those ops next to the kernel
that produced ``x``, where fusion makes them its epilogue (CUDA presets: :class:`~int8mt.schedules.cuda_int8_matmul.
CUDAInt8Matmul` applies it as the tile is written out). CPU presets fuse such chains into their own kernels
(:class:`.FuseDenseEpilogue`) and do not run this pass. Activations move as well: an OPUS-MT FFN's swish
(``x * sigmoid(x)``, the sigmoid on ``x`` viewed as ``[batch, 1, ffn]``) becomes its linear layer's epilogue.

An op moves when its other operand ``y`` (a constant or a tensor) is reshaped to ``x``'s layout as a view: the
dimensions of ``x`` and of the reshaped shape fall into groups of equal size products (dimensions split or merged),
and ``y`` must either span each group whole or be broadcast over all of it. A constant ``y'`` is computed here; a
tensor becomes a reshape of it. A tensor broadcast over part of a group (the attention mask ``[batch, 1, 1, keys]``
added to the scores ``[batch * heads, 1, keys]`` viewed as ``[batch, heads, 1, keys]``) is first broadcast over
that part (``broadcast_to``, once per block for all the ops that add it, fused into its producer's kernel).
Chains of reshapes are looked through to their first input.
"""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import ir, relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from .kernel_calls import (bindings_and_users, emit_like, is_one, rewrite_functions, same_shape, scalar_constant,
                           shape_product, use_counts)

UNARY = ("relax.astype", "relax.clip", "relax.nn.relu", "relax.sigmoid", "relax.nn.silu", "relax.nn.gelu",
         "relax.tanh")  # (a clip's other arguments are bounds)
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.right_shift", "relax.left_shift",
          "relax.maximum", "relax.minimum")


def size_groups(source: list[tirx.PrimExpr], target: list[tirx.PrimExpr],
                analyzer: Analyzer) -> list[tuple[list[int], list[int]]] | None:
    """The dimensions of ``source`` and ``target`` (two shapes of one row-major tensor), other than those of size
    1, in consecutive groups of (provably) equal size products: each group's ``source`` and ``target`` axes. None
    where the sizes do not split that way."""
    old = [a for a, d in enumerate(source) if not is_one(d)]
    new = [a for a, d in enumerate(target) if not is_one(d)]
    groups, a, b = [], 0, 0
    while a < len(old) and b < len(new):
        for p, q in sorted(((p, q) for p in range(1, len(old) - a + 1) for q in range(1, len(new) - b + 1)),
                           key=sum):
            if analyzer.can_prove_equal(shape_product([source[k] for k in old[a:a + p]]),
                                        shape_product([target[k] for k in new[b:b + q]])):
                groups.append((old[a:a + p], new[b:b + q]))
                a, b = a + p, b + q
                break
        else:
            return None
    return groups if a == len(old) and b == len(new) else None


def _aligned_dims(operand: relax.Expr, target: list[tirx.PrimExpr]) -> list[tirx.PrimExpr] | None:
    """The sizes of ``operand`` with sizes of 1 before them up to ``target``'s rank (as it broadcasts onto it), or
    None where it is no tensor of known shape of at most that rank."""
    if not isinstance(operand.ty, relax.TensorType) or operand.ty.shape is None or operand.ty.ndim > len(target):
        return None
    return [tirx.IntImm("int64", 1)] * (len(target) - operand.ty.ndim) + list(operand.ty.shape)


def operand_in_source_layout(operand: relax.Expr, source: list[tirx.PrimExpr], target: list[tirx.PrimExpr],
                             analyzer: Analyzer) -> list[tirx.PrimExpr] | None:
    """The shape ``operand``, which broadcasts onto ``target``, takes to broadcast the same way onto ``source``
    (the same tensor before a reshape to ``target``), or None where no reshape of it does."""
    dims = _aligned_dims(operand, target)
    groups = None if dims is None else size_groups(source, target, analyzer)
    if groups is None:
        return None
    shape: list[tirx.PrimExpr] = [tirx.IntImm("int64", 1)] * len(source)
    for source_axes, target_axes in groups:
        if all(is_one(dims[k]) for k in target_axes):
            continue
        if not all(analyzer.can_prove_equal(dims[k], target[k]) for k in target_axes):
            return None  # broadcast over part of a group only
        for k in source_axes:
            shape[k] = source[k]
    return shape


def spanned_in_part(operand: relax.Expr, source: list[tirx.PrimExpr], target: list[tirx.PrimExpr],
                    analyzer: Analyzer) -> list[tirx.PrimExpr] | None:
    """The shape of ``operand`` (a tensor that broadcasts onto ``target``) broadcast over each group of
    :func:`size_groups` it spans only in part, or None where it spans none in part (or the sizes do not group)."""
    dims = _aligned_dims(operand, target)
    groups = None if dims is None else size_groups(source, target, analyzer)
    if groups is None:
        return None
    partial = [axes for _, axes in groups if len({is_one(dims[k]) for k in axes}) > 1]
    for axes in partial:
        for k in axes:
            dims[k] = target[k]
    return dims if partial else None


@expr_functor.mutator
class _ReshapeSinker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.analyzer = Analyzer()
        self.uses: dict[relax.Var, int] = {}
        self.made: dict[tuple[str, relax.Expr], list[relax.Var]] = {}  # (op, tensor) -> its results in this block

    def count_uses(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.uses = use_counts(bindings_and_users(func)[1])

    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:
        self.made = {}
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        moved = self._moved(binding.value) if self.builder_.current_block_is_dataflow() else None
        if moved is None:
            super().visit_var_binding_(binding)
            return
        moved = self.builder_.normalize(moved)
        if same_shape(list(moved.ty.shape), list(binding.var.ty.shape)):  # (a chain that ends where it began)
            self.set_var_remap(binding.var, emit_like(self.builder_, moved, binding.var))
            return
        value = self.builder_.emit(moved)
        self.set_var_remap(binding.var, emit_like(self.builder_, relax.op.reshape(value, binding.var.ty.shape),
                                                  binding.var))

    def _source(self, expr: relax.Expr) -> relax.Expr | None:
        """The first input of the chain of reshapes bound to ``expr``, None if ``expr`` is no reshape."""
        found = None
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if not (isinstance(bound, relax.Call) and bound.op == ir.Op.get("relax.reshape")):
                break
            found = expr = bound.args[0]
        return found

    def _moved(self, original: relax.Expr) -> relax.Call | None:
        """The call ``original`` (as bound in the function being rewritten) computed on the tensor before the
        reshapes of an operand, or None. Of two reshaped operands, one used only here goes first: it continues a
        chain that may fuse with its producer."""
        if not (isinstance(original, relax.Call) and isinstance(original.op, ir.Op) and _elementwise(original)):
            return None
        call = self.visit_expr(original)
        operands = 2 if call.op.name in BINARY else 1
        for position in sorted(range(operands), key=lambda k: self.uses.get(original.args[k], 0) != 1):
            source = self._source(call.args[position])
            if source is None or not isinstance(source.ty, relax.TensorType) or source.ty.shape is None:
                continue
            source_shape, target_shape = list(source.ty.shape), list(call.args[position].ty.shape)
            if not same_shape(list(call.ty.shape), target_shape):
                continue  # (an operand that grows the result: not elementwise on the chain's value)
            args = list(call.args)
            args[position] = source
            if operands == 2:
                other = args[1 - position]
                if not isinstance(other, ir.expr.Constant):
                    broadcast = spanned_in_part(other, source_shape, target_shape, self.analyzer)
                    other = other if broadcast is None else self._once(relax.op.broadcast_to, other, broadcast)
                shape = operand_in_source_layout(other, source_shape, target_shape, self.analyzer)
                args[1 - position] = None if shape is None else self._reshaped(other, shape)
                if args[1 - position] is None:
                    continue
            return relax.Call(call.op, args, call.attrs, call.ty_args)
        return None

    def _once(self, op: Callable[[relax.Expr, list], relax.Expr], operand: relax.Expr,
              shape: list[tirx.PrimExpr]) -> relax.Var:
        """``op(operand, shape)`` (a broadcast or a reshape), bound once in the current block."""
        made = self.made.setdefault((op.__name__, operand), [])
        found = next((var for var in made if same_shape(list(var.ty.shape), shape)), None)
        if found is None:
            found = self.builder_.emit(op(operand, shape))
            made.append(found)
        return found

    def _reshaped(self, operand: relax.Expr, shape: list[tirx.PrimExpr]) -> relax.Expr | None:
        """``operand`` reshaped to ``shape``: a new constant for a constant (None if ``shape`` is not static), the
        first input of a chain of reshapes reshaped once."""
        if operand.ty.ndim == 0:
            return operand
        source = self._source(operand)
        operand = operand if source is None else source
        if isinstance(operand, ir.expr.Constant):
            if not all(isinstance(d, tirx.IntImm) for d in shape):
                return None
            return relax.const(operand.value.numpy().reshape([int(d) for d in shape]), str(operand.ty.dtype))
        if same_shape(shape, list(operand.ty.shape)):
            return operand
        return self._once(relax.op.reshape, operand, shape)


def _elementwise(call: relax.Call) -> bool:
    """Whether ``call`` computes each element from the same element of its operands (broadcast): the ops of
    :data:`UNARY` and :data:`BINARY`, and ``quantize`` with one scale and zero point (along the last axis, which
    stays the last whatever the rank)."""
    if call.op.name == "relax.quantize":
        return int(call.attrs.axis) == -1 and all(scalar_constant(x) is not None for x in call.args[1:])
    return call.op.name in (*UNARY, *BINARY)


@tvm.transform.module_pass(opt_level=0, name="int8mt.ReshapesAfterElementwise")
class ReshapesAfterElementwise:
    """Elementwise ops moved before the reshapes of their operand (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        sinker = _ReshapeSinker(mod)
        return rewrite_functions(sinker, mod, before=sinker.count_uses)
