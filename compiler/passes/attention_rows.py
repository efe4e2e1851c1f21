"""AttentionRows: each one-query attention of a decoder step, from its scores product through its context's
requantization, -> one call of one function of the graph's own ops, which GPU presets schedule as one kernel (a
thread block per hypothesis and head: :class:`~int8mt.schedules.cuda_attention_rows.CUDAAttentionRows`).

After :class:`.ReadKeysAsStored` and :class:`.ReshapesAfterElementwise` a layer's attention in the decoder step is
``matmul(q, permute_dims(keys))`` (int8, ``q`` ``[pairs, 1, head_dim]``, ``pairs`` = hypotheses x heads), the
scores' dequantization and mask, a softmax along the positions, the probabilities' quantization and ``matmul(p,
values)`` with its requantization: five kernels as TVM fuses them on a GPU, seven for the self-attention, whose keys
and values are each gathered from the cache's rows first (``where(past, take(rows, index), new)``). The chain
becomes one function, matched as:

* the scores product of int8 operands, ``q`` and the keys reshapes of ``[batch, heads, ...]`` tensors;
* then, each value used once, ops along the positions: ``astype``, ``clip``, ``quantize`` with a scalar scale and
  zero point, ``softmax`` along the last axis, elementwise ops with a scalar constant or with a tensor of the
  scores' shape or broadcast over heads (the mask), and reshapes between ``[pairs, 1, positions]`` and ``[batch,
  heads, 1, positions]``;
* the context product of those probabilities and values that reshape a ``[batch, heads, positions, head_dim]``
  tensor, then elementwise ops with scalar constants (its requantization), each value used once.

The function computes in the heads' layout ``[batch, heads, 1, ...]`` (the graph's reshapes between the two layouts
are views, dropped) and takes the keys and values behind their reshapes, and, where a gather and its ``where``
have no other use, the gather's operands: the kernel reads the rows where the cache stores them. It is built from
the ops as the pipeline legalizes them (:func:`~int8mt.compiler.legalize.legalize_map`), fused by TVM into one
PrimFunc: it computes what the graph computes (a softmax's sum in another order: the same within float rounding).
Its result is reshaped back to the graph's layout (a view). GPU presets, quantized models, static ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import ir, relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.cuda_attention_rows import ATTENTION_ROWS
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.quantize_rows import OPAQUE

from ..legalize import legalize_map
from .kernel_calls import (KernelTable, bindings_and_users, bound_op_call, is_int8_matmul, is_one,
                           rewrite_functions, scalar_constant)


UNARY = ("relax.astype", "relax.clip")  # (a clip's other arguments are bounds)
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.right_shift", "relax.left_shift",
          "relax.maximum", "relax.minimum")


@dataclass
class _Attention:
    """One matched attention: its bindings in order (the last one its result), the product sources in the heads'
    layout, and the gathers absorbed with them."""
    batch: tirx.PrimExpr
    heads: tirx.PrimExpr
    chain: list[relax.Var] = field(default_factory=list)
    context: relax.Var | None = None
    absorbed: set[relax.Var] = field(default_factory=set)


@expr_functor.mutator
class _AttentionRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.kernels = KernelTable(self.builder_)
        self.analyzer = Analyzer()
        self.found: dict[relax.Var, _Attention] = {}  # the result's variable -> its attention

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, users = bindings_and_users(func)
        self.users = users
        self.found = {}
        for var, value in self.bindings.items():
            attention = self._match(var, value) if is_int8_matmul(value) else None
            if attention is not None:
                self.found[attention.chain[-1]] = attention

    # matching

    def _heads_first(self, expr: relax.Expr, positions: tirx.PrimExpr | None = None) -> relax.Expr | None:
        """The ``[batch, heads, rows, columns]`` tensor that ``expr`` ``[batch * heads, rows, columns]`` reshapes
        (the heads' layout), if it is such a reshape."""
        reshape = bound_op_call(expr, "relax.reshape", self.bindings)
        if reshape is None or reshape.args[0].ty.ndim != 4 or expr.ty.ndim != 3:
            return None
        source, flat = list(reshape.args[0].ty.shape), list(expr.ty.shape)
        if not (self.analyzer.can_prove_equal(source[0] * source[1], flat[0])
                and all(self.analyzer.can_prove_equal(a, b) for a, b in zip(source[2:], flat[1:]))):
            return None
        return reshape.args[0]

    def _single_use(self, var: relax.Expr) -> bool:
        return isinstance(var, relax.Var) and len(self.users.get(var, [])) == 1 and self.users[var][0] is not None

    def _match(self, scores: relax.Var, call: relax.Call) -> _Attention | None:
        q, transposed = call.args
        keys_t = bound_op_call(transposed, "relax.permute_dims", self.bindings)
        if (keys_t is None or q.ty.ndim != 3 or not is_one(q.ty.shape[1]) or not self._single_use(transposed)
                or [int(a) for a in keys_t.attrs.axes] != [0, 2, 1]):
            return None
        q4, keys4 = self._heads_first(q), self._heads_first(keys_t.args[0])
        if q4 is None or keys4 is None:
            return None
        attention = _Attention(batch=keys4.ty.shape[0], heads=keys4.ty.shape[1], chain=[scores])
        current = scores
        while self._single_use(current):
            following = self.users[current][0]
            value = self.bindings[following]
            if attention.context is None and is_int8_matmul(value) and value.args[0].same_as(current):
                if self._heads_first(value.args[1]) is None:
                    return None
                attention.context = following
            elif not self._along_positions(value, current, attention):
                break
            attention.chain.append(following)
            current = following
        if attention.context is None:
            return None
        for product in (scores, attention.context):
            operand = (keys_t.args[0] if product is scores else self.bindings[product].args[1])
            self._absorb_gather(self._heads_first(operand), attention)
        return attention

    def _along_positions(self, value: relax.Expr, current: relax.Var, attention: _Attention) -> bool:
        """Whether ``value`` (which uses ``current``) is an op of the chain (see the module docstring)."""
        if not isinstance(value, relax.Call) or not isinstance(value.op, ir.Op):
            return False
        name, before_context = value.op.name, attention.context is None
        if name in UNARY:
            return value.args[0].same_as(current)
        if name == "relax.quantize":
            return (value.args[0].same_as(current) and scalar_constant(value.args[1]) is not None
                    and scalar_constant(value.args[2]) is not None)
        if name == "relax.nn.softmax":
            return before_context and int(value.attrs.axis) in (-1, current.ty.ndim - 1)
        if name == "relax.reshape":
            return before_context and self._same_heads_layout(value.ty.shape, current.ty.shape, attention)
        if name in BINARY:
            others = [a for a in value.args if not a.same_as(current)]
            if len(others) != 1 or len(value.args) != 2:
                return False
            if scalar_constant(others[0]) is not None:
                return True
            return before_context and self._row_operand(others[0], attention) is not None
        return False

    def _same_heads_layout(self, a: list, b: list, attention: _Attention) -> bool:
        """Whether shapes ``a`` and ``b`` are both ``[pairs, 1, n]`` or ``[batch, heads, 1, n]`` of one ``n``."""
        lifted = [self._lift(list(s), attention) for s in (a, b)]
        return None not in lifted and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(*lifted))

    def _lift(self, shape: list, attention: _Attention) -> list | None:
        """``shape`` in the heads' layout ``[batch, heads, 1, n]``, from ``[pairs, 1, n]`` or itself."""
        pairs = attention.batch * attention.heads
        if len(shape) == 3 and self.analyzer.can_prove_equal(shape[0], pairs) and is_one(shape[1]):
            return [attention.batch, attention.heads, shape[1], shape[2]]
        if (len(shape) == 4 and self.analyzer.can_prove_equal(shape[0], attention.batch)
                and self.analyzer.can_prove_equal(shape[1], attention.heads) and is_one(shape[2])):
            return shape
        return None

    def _row_operand(self, operand: relax.Expr, attention: _Attention) -> relax.Expr | None:
        """A tensor operand of an op of the chain in the heads' layout: itself if it is ``[batch, heads or 1, 1,
        n]``, the tensor it reshapes if it is ``[pairs, 1, n]``; None for anything else."""
        if not isinstance(operand, relax.Var) or operand.ty.ndim not in (3, 4):
            return None
        if operand.ty.ndim == 3:
            reshape = bound_op_call(operand, "relax.reshape", self.bindings)
            if reshape is None or self._lift(list(operand.ty.shape), attention) is None:
                return None
            operand = reshape.args[0]
        shape = list(operand.ty.shape) if operand.ty.ndim == 4 else None
        if (shape is None or not self.analyzer.can_prove_equal(shape[0], attention.batch) or not is_one(shape[2])
                or not (is_one(shape[1]) or self.analyzer.can_prove_equal(shape[1], attention.heads))):
            return None
        return operand

    def _absorb_gather(self, source: relax.Expr, attention: _Attention) -> None:
        """Marks ``source`` absorbed where it is ``where(c, take(rows, index, axis=0), new)`` (or the ``take``
        alone) used only by the chain's reshape, and its ``take`` used only by it."""
        where = bound_op_call(source, "relax.where", self.bindings)
        gathered = where.args[1] if where is not None else source
        take = bound_op_call(gathered, "relax.take", self.bindings)
        if (take is None or take.args[1].ty.ndim != 3 or int(take.attrs.axis) != 0 or not self._single_use(source)
                or (where is not None and not self._single_use(gathered))):
            return
        attention.absorbed.update({source, gathered} if where is not None else {source})

    # rewriting

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        attention = self.found.get(binding.var)
        if attention is None:
            super().visit_var_binding_(binding)
            return
        kernel, args, out_ty = self._kernel(attention)
        out = self.builder_.emit(relax.call_tir(kernel, [self.visit_expr(a) for a in args], out_ty))
        self.set_var_remap(binding.var, self.builder_.emit(relax.op.reshape(out, binding.var.ty.shape),
                                                           binding.var.name))

    def _kernel(self, attention: _Attention) -> tuple[ir.GlobalVar, list[relax.Expr], relax.TensorType]:
        """The attention's function as a PrimFunc of the module (once per distinct function), the outer
        arguments of its call, and its result's type."""
        builder = _FunctionBuilder(self, attention)
        func, args = builder.build()
        prim, call = _fused(func)
        outer = dict(zip(builder.params, args))
        arguments = [outer.get(a, a) for a in call.args[1].fields]
        kernel = self.kernels.get(("attention_rows", tvm_ffi.structural_hash(prim)), "attention_rows",
                                  lambda: prim.with_attrs({KERNEL_ATTR: ATTENTION_ROWS, "op_pattern": OPAQUE}))
        return kernel, arguments, call.ty_args[0]


class _FunctionBuilder:
    """The Relax function of one matched attention, in the heads' layout."""

    def __init__(self, rewriter: _AttentionRewriter, attention: _Attention) -> None:
        self.rewriter, self.attention = rewriter, attention
        self.bindings = rewriter.bindings
        self.params: list[relax.Var] = []
        self.outer: list[relax.Expr] = []
        self.values: dict[relax.Var, relax.Expr] = {}  # outer variable -> its value in the function

    def build(self) -> tuple[relax.Function, list[relax.Expr]]:
        bb = relax.BlockBuilder()
        self.bb = bb
        chain = self.attention.chain
        with bb.function("attention_rows", attrs={"Primitive": True}, private=True):
            with bb.dataflow():
                for var in chain:
                    self.values[var] = self._emit(var, self.bindings[var])
                out = bb.emit_output(self.values[chain[-1]])
            # sizes that only appear inside others (the cache's rows: ``[rows * heads, head_dim]``) are passed as
            # a shape, so that the PrimFunc takes them
            tensors = [p for p in self.params if isinstance(p.ty, relax.TensorType)]
            defined = {d for p in tensors for d in p.ty.shape if isinstance(d, tirx.Var)}
            inside = {v for p in tensors for d in p.ty.shape for v in tirx.analysis.undefined_vars(d)} - defined
            if inside:
                sizes = sorted(inside, key=lambda v: v.name)
                self.params.append(relax.Var("sizes", relax.ShapeType(sizes)))
                self.outer.append(relax.ShapeExpr(sizes))
            bb.emit_func_output(out, self.params)
        return bb.get()["attention_rows"], self.outer

    def _param(self, expr: relax.Expr) -> relax.Var:
        for param, outer in zip(self.params, self.outer):
            if outer.same_as(expr):
                return param
        param = relax.Var(f"in{len(self.params)}", expr.ty)
        self.params.append(param)
        self.outer.append(expr)
        return param

    def _source(self, operand: relax.Expr) -> relax.Expr:
        """A product's operand in the heads' layout: the gather emitted here where absorbed, else a parameter."""
        source = self.rewriter._heads_first(operand)
        if source in self.attention.absorbed:
            return self._gathered(source)
        return self._param(source)

    def _gathered(self, var: relax.Var) -> relax.Expr:
        value = self.bindings[var]
        args = [self._gathered(a) if a in self.attention.absorbed else self._param(a) for a in value.args]
        return self.bb.emit(relax.Call(value.op, args, value.attrs))

    def _emit(self, var: relax.Var, value: relax.Call) -> relax.Expr:
        name = value.op.name
        if var.same_as(self.attention.chain[0]):
            keys_t = self.bindings[value.args[1]]
            q = self._param(self.rewriter._heads_first(value.args[0]))
            keys = relax.op.permute_dims(self._source(keys_t.args[0]), [0, 1, 3, 2])
            return self.bb.emit(relax.op.matmul(q, keys, out_dtype="int32"))
        if var.same_as(self.attention.context):
            probabilities = self.values[value.args[0]]
            return self.bb.emit(relax.op.matmul(probabilities, self._source(value.args[1]), out_dtype="int32"))
        args = [self._operand(a) for a in value.args]
        if name == "relax.reshape":
            return args[0]
        if name == "relax.nn.softmax":
            return self.bb.emit(relax.op.nn.softmax(args[0], axis=-1))
        if name == "relax.quantize":
            return self.bb.emit(relax.op.quantize(args[0], args[1], args[2], axis=-1,
                                                  out_dtype=str(value.attrs.out_dtype)))
        return self.bb.emit(relax.Call(value.op, args, value.attrs))

    def _operand(self, arg: relax.Expr) -> relax.Expr:
        if isinstance(arg, relax.Var) and arg in self.values:
            return self.values[arg]
        if isinstance(arg, relax.Var):
            return self._param(self.rewriter._row_operand(arg, self.attention))
        return arg


def _fused(func: relax.Function) -> tuple[tirx.PrimFunc, relax.Call]:
    """``func`` (a primitive function of Relax ops) legalized as the pipeline does and fused into one PrimFunc; the
    PrimFunc and the ``call_tir`` of it that calls ``func``'s parameters."""
    params = [relax.Var(p.name, p.ty) for p in func.params]
    bb = relax.BlockBuilder()
    inner = bb.add_func(func, "attention_rows")
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(inner, params))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(legalize_map()), relax.transform.FuseTIR()])(bb.get())
    call = mod["main"].body.blocks[0].bindings[-1].value
    prim = mod[call.args[0]]
    mapping = {p: outer for p, outer in zip(params, func.params)}
    args = [mapping.get(a, a) for a in call.args[1].fields]
    return prim, relax.Call(call.op, [call.args[0], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="int8mt.AttentionRows")
class AttentionRows:
    """Each one-query attention of a decoder step -> one call of one function (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _AttentionRewriter(mod)
        return rewrite_functions(rewriter, mod, before=rewriter.find)
