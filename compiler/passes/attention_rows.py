"""AttentionRows: each one-query attention of a decoder step, from its scores product through its context's
requantization (or dequantization), -> one call of one function of the graph's own ops, which GPU presets schedule
as one kernel (a thread block per hypothesis and head: :class:`~int8mt.schedules.cuda_attention_rows.
CUDAAttentionRows`).

After :class:`.ReadKeysAsStored` and :class:`.ReshapesAfterElementwise` a layer's attention in the decoder step is
``matmul(q, permute_dims(keys))`` (int8, ``q`` ``[pairs, 1, head_dim]``, ``pairs`` = hypotheses x heads), the
scores' dequantization and mask, a softmax along the positions, the probabilities' quantization and ``matmul(p,
values)`` with its requantization: five kernels as TVM fuses them on a GPU, seven for the self-attention, whose keys
and values are each gathered from the cache's rows first (``where(past, take(rows, index), new)``); with run-time
ranges also the keys' and values' scales, each gathered, and the probabilities' row quantization. The attention
becomes one function: from the scores product of int8 operands (``q`` and the keys reshaping ``[batch, heads, ...]``
tensors), every later op that uses its values and is one of

* ``astype``, ``clip``, ``quantize`` with a scalar scale and zero point, ``softmax`` along the last axis;
* elementwise ops whose other operand is a scalar constant, a value of the attention or a tensor of the heads'
  layout (``[batch, heads or 1, ...]``, or ``[pairs, ...]`` reshaping one: the mask, the query's scales, the
  keys' and values' scales);
* a reshape within the heads' layout (between ``[pairs, x, y]`` and ``[batch, heads, x, y]``, or moving an axis of
  size 1: ``[..., 1, positions]`` and ``[..., positions, 1]``);
* our row quantization (:data:`~int8mt.schedules.cuda_rows.QUANTIZE_ROWS`) of a value in the heads' layout, and
  the parts of its result;
* the context product, of a value of the attention and values reshaping a ``[batch, heads, positions, head_dim]``
  tensor, once;

as long as exactly one of these values, after the context product, is used by anything else: the attention's
result. A row quantization of a tensor of the heads' layout whose parts only the attention reads (directly or
through reshapes and gathers: with run-time ranges, the query's, per head, and the step's key's and value's, which
:class:`.AppendQuantizedRows` leaves to the attention) goes into the function too, which then takes the float
tensor. The function computes in the heads' layout ``[batch, heads, x, y]``: the graph's reshapes between the two
layouts are views, dropped; moves of an axis of size 1 become ``permute_dims``. It takes tensors behind their
reshapes and, where a gather and its ``where`` (or a ``broadcast_to``) have no other use, the gather's operands
(the broadcast's input): the kernel reads the rows where the cache stores them. Inputs that are elementwise
arithmetic on the entry point's parameters and ``arange`` (the past positions and the cache-row index from the
step's history, the mask from the source's tokens) it computes itself. It is built from the ops as the pipeline
legalizes them (:func:`~int8mt.compiler.legalize.legalize_map`), fused by TVM into one PrimFunc: it computes what
the graph computes (a softmax's sum in another order: the same within float rounding). It writes its result in the
shape the graph's reshapes of it give it where that merges axes of the heads' layout (``[batch, 1, heads *
head_dim]``: the same bytes), else in that layout, reshaped back (a view). GPU presets, quantized models.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import ir, relax, s_tir, tirx, topi
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.cuda_attention_rows import ATTENTION_ROWS
from int8mt.schedules.kernel_attrs import KERNEL_ATTR
from int8mt.schedules.quantize_rows import OPAQUE

from ..legalize import legalize_map
from .kernel_calls import (KernelTable, bindings_and_users, bound_op_call, emit_like, is_int8_matmul, is_one,
                           rewrite_functions, same_shape, scalar_constant)
from .quantize_rows import called_row_quantization, row_quantization
from .reshapes_after_elementwise import BINARY

UNARY = ("relax.astype", "relax.clip")  # (a clip's other arguments are bounds)
SWAP_LAST = [0, 1, 3, 2]
ARITHMETIC = ("relax.expand_dims", "relax.astype", "relax.add", "relax.multiply", "relax.equal", "relax.greater",
              "relax.arange")  # (what a step's past positions, its cache-row index and the source's mask are made of)


@dataclass
class _Attention:
    """One matched attention: its bindings in order (the last one its result) and its context product."""
    batch: tirx.PrimExpr
    heads: tirx.PrimExpr
    members: list[relax.Var] = field(default_factory=list)
    context: relax.Var | None = None


@expr_functor.mutator
class _AttentionRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.kernels = KernelTable(self.builder_)
        self.analyzer = Analyzer()
        self.found: dict[relax.Var, _Attention] = {}  # the result's variable -> its attention
        self.results: dict[relax.Var, relax.Var] = {}  # the result's variable -> the call's result

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, self.users = bindings_and_users(func)
        self.order = {var: i for i, var in enumerate(self.bindings)}
        self.found = {}
        for var, value in self.bindings.items():
            attention = self._match(var, value) if is_int8_matmul(value) else None
            if attention is not None:
                self.found[attention.members[-1]] = attention

    # shapes in the heads' layout

    def lift(self, shape: list, attention: _Attention) -> list | None:
        """``shape`` in the heads' layout: ``[batch, heads, x, y]`` for ``[pairs, x, y]``; itself for ``[batch,
        heads or 1, x, y]``; None for anything else."""
        equal = self.analyzer.can_prove_equal
        if len(shape) == 3 and equal(shape[0], attention.batch * attention.heads):
            return [attention.batch, attention.heads, *shape[1:]]
        if len(shape) == 4 and equal(shape[0], attention.batch) and (is_one(shape[1])
                                                                     or equal(shape[1], attention.heads)):
            return list(shape)
        return None

    def arrangement(self, source: list, target: list) -> str | None:
        """How a tensor of lifted shape ``source`` is one of lifted shape ``target`` (its last two axes): "same",
        "swapped" (an axis of size 1 moved), or None."""
        equal = self.analyzer.can_prove_equal
        if all(equal(a, b) for a, b in zip(source, target)):
            return "same"
        if (all(equal(a, b) for a, b in zip(source[:2], target[:2])) and equal(source[2], target[3])
                and equal(source[3], target[2]) and (is_one(source[2]) or is_one(source[3]))):
            return "swapped"
        return None

    def heads_source(self, expr: relax.Expr, attention: _Attention, same: bool = False) -> relax.Expr | None:
        """The tensor of the heads' layout ``expr`` is: itself if it is one, else the one it reshapes (as it is,
        or with an axis of size 1 moved; with ``same`` only as it is)."""
        if not isinstance(expr, relax.Var) or expr.ty.ndim not in (3, 4):
            return None
        wanted = self.lift(list(expr.ty.shape), attention)
        if wanted is None:
            return None
        if expr.ty.ndim == 4:
            return expr
        reshape = bound_op_call(expr, "relax.reshape", self.bindings)
        source = reshape.args[0] if reshape is not None else None
        if source is None or source.ty.ndim != 4 or self.lift(list(source.ty.shape), attention) is None:
            return None
        arranged = self.arrangement(list(source.ty.shape), wanted)
        return source if arranged == "same" or (arranged == "swapped" and not same) else None

    def _operand(self, expr: relax.Expr, target: list, attention: _Attention, members: set) -> bool:
        """Whether ``expr`` can be an elementwise op's operand in the function, against a value of lifted shape
        ``target``: a scalar constant, a value of the attention, or a tensor of the heads' layout that broadcasts
        onto it (possibly with its last two axes swapped)."""
        if scalar_constant(expr) is not None or expr in members:
            return True
        wanted = self.lift(list(expr.ty.shape), attention) if self.heads_source(expr, attention) is not None else None
        return wanted is not None and all(is_one(s) or self.analyzer.can_prove_equal(s, t)
                                          for s, t in zip(wanted, target))

    # matching

    def single_user(self, var: relax.Expr) -> relax.Var | None:
        """The one binding that uses ``var``, if it has exactly one use."""
        used = self.users.get(var, []) if isinstance(var, relax.Var) else []
        return used[0] if len(used) == 1 else None

    def _match(self, scores: relax.Var, call: relax.Call) -> _Attention | None:
        q, transposed = call.args
        keys_t = bound_op_call(transposed, "relax.permute_dims", self.bindings)
        if (keys_t is None or self.single_user(transposed) is None or q.ty.ndim != 3 or not is_one(q.ty.shape[1])
                or [int(a) for a in keys_t.attrs.axes] != [0, 2, 1]):
            return None
        keys = keys_t.args[0]
        reshape = bound_op_call(keys, "relax.reshape", self.bindings)
        if reshape is None or reshape.args[0].ty.ndim != 4:
            return None
        attention = _Attention(batch=reshape.args[0].ty.shape[0], heads=reshape.args[0].ty.shape[1],
                               members=[scores])
        if any(self.heads_source(x, attention, same=True) is None for x in (q, keys)):
            return None
        members = {scores}
        for var in list(self.bindings)[self.order[scores] + 1:]:
            value = self.bindings[var]
            if not any(v in members for v in relax.analysis.free_vars(value)):
                continue
            if self._joins(var, value, attention, members):
                members.add(var)
                attention.members.append(var)
        used_outside = [v for v in attention.members if any(u not in members for u in self.users.get(v, []))]
        if (attention.context is None or used_outside != [attention.members[-1]]
                or self.order[used_outside[0]] <= self.order[attention.context]):
            return None
        return attention

    def computes_quantization(self, part: relax.TupleGetItem, attention: _Attention) -> bool:
        """Whether ``part`` is a part of a row quantization (a call of a row-quantizing function) of a tensor of
        the heads' layout whose parts only the attention reads (directly, or through reshapes and gathers): the
        attention's function computes it."""
        call = self.bindings.get(part.tuple_value)
        if called_row_quantization(self.mod, call) is None:
            return False
        (x,) = call.args[1].fields
        return (x.ty.ndim == 4 and self.lift(list(x.ty.shape), attention) is not None
                and self._feeds(part.tuple_value, set(attention.members)))

    def _feeds(self, var: relax.Var | None, members: set) -> bool:
        """Whether ``var`` is one of ``members`` or used, and only on the way to them."""
        if var in members:
            return True
        users = self.users.get(var, []) if var is not None else []
        return bool(users) and all(self._feeds(user, members) for user in users)

    def _joins(self, var: relax.Var, value: relax.Expr, attention: _Attention, members: set) -> bool:
        """Whether ``var``'s binding joins the attention (see the module docstring); notes its context product."""
        if isinstance(value, relax.TupleGetItem):
            return value.tuple_value in members
        if not isinstance(value, relax.Call):
            return False
        if value.op == ir.Op.get("relax.call_tir"):
            return (called_row_quantization(self.mod, value) is not None
                    and all(a in members and a.ty.ndim == 4 for a in value.args[1].fields))
        if not isinstance(value.op, ir.Op):
            return False
        name, x = value.op.name, value.args[0]
        target = self.lift(list(var.ty.shape), attention) if var.ty.ndim in (3, 4) else None
        if target is None:
            return False
        if is_int8_matmul(value):
            if attention.context is not None or x not in members:
                return False
            values = self.heads_source(value.args[1], attention, same=True)
            if values is None or value.args[1].ty.ndim != 3:
                return False
            attention.context = var
            return True
        if x not in members and name not in BINARY:
            return False
        if name in UNARY:
            return True
        if name == "relax.quantize":
            return scalar_constant(value.args[1]) is not None and scalar_constant(value.args[2]) is not None
        if name == "relax.nn.softmax":
            return int(value.attrs.axis) in (-1, var.ty.ndim - 1) and not is_one(target[3])
        if name == "relax.reshape":
            source = self.lift(list(x.ty.shape), attention)
            return source is not None and self.arrangement(source, target) is not None
        if name in BINARY and len(value.args) == 2:
            return all(self._operand(a, target, attention, members) for a in value.args)
        return False

    # rewriting

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        attention = self.found.get(binding.var)
        reshape = bound_op_call(binding.var, "relax.reshape", self.bindings)
        if reshape is not None and reshape.args[0] in self.results:  # a reshape of a result: of the call's result
            self.results[binding.var] = self.results[reshape.args[0]]
            self.set_var_remap(binding.var, self._bind(self._reshaped(self.results[binding.var], binding.var),
                                                       binding.var))
            return
        if attention is None:
            super().visit_var_binding_(binding)
            return
        kernel, args, out_ty = self._kernel(attention, self._written_layouts(binding.var))
        out = self.builder_.emit(relax.call_tir(kernel, [self.visit_expr(a) for a in args], out_ty))
        self.results[binding.var] = out
        self.set_var_remap(binding.var, self._bind(self._reshaped(out, binding.var), binding.var))

    def _written_layouts(self, result: relax.Var) -> list[list]:
        """The shapes the kernel may write the attention's result in, the best first: those of the reshapes that
        follow it (each the only use of the one before), the last first, then its own."""
        chain = [result]
        while (user := self.single_user(chain[-1])) is not None:
            reshape = bound_op_call(user, "relax.reshape", self.bindings)
            if reshape is None or not reshape.args[0].same_as(chain[-1]):
                break
            chain.append(user)
        return [list(var.ty.shape) for var in reversed(chain)]

    @staticmethod
    def _reshaped(out: relax.Var, var: relax.Var) -> relax.Expr:
        """The call's result ``out`` as ``var``'s shape: itself where it has it."""
        return out if same_shape(list(out.ty.shape), list(var.ty.shape)) else relax.op.reshape(out, var.ty.shape)

    def _bind(self, value: relax.Expr, var: relax.Var) -> relax.Var:
        """``value`` bound in place of ``var`` (itself where it is a variable and ``var`` is not an output of the
        dataflow block)."""
        if isinstance(var, relax.DataflowVar) and isinstance(value, relax.Var):
            return value
        return emit_like(self.builder_, value, var)

    def _kernel(self, attention: _Attention, layouts: list[list]) -> tuple[ir.GlobalVar, list[relax.Expr],
                                                                        relax.TensorType]:
        """The attention's function as a PrimFunc of the module (once per distinct function) that writes its
        result in the first of the shapes ``layouts`` that is a view of the heads' layout (else in that layout),
        the outer arguments of its call, and its result's type."""
        builder = _FunctionBuilder(self, attention)
        module, outer = builder.build()
        prim, call = _fused(module)
        out_ty = call.ty_args[0]
        for shape in layouts:
            groups = _merged_axes(list(out_ty.shape), shape, self.analyzer)
            if groups is not None:
                prim, out_ty = _written_merged(prim, groups), relax.TensorType(shape, out_ty.dtype)
                break
        by_param = dict(zip(builder.params, outer))
        kernel = self.kernels.get(("attention_rows", tvm_ffi.structural_hash(prim)), "attention_rows",
                                  lambda: prim.with_attrs({KERNEL_ATTR: ATTENTION_ROWS, "op_pattern": OPAQUE}))
        return kernel, [by_param.get(a, a) for a in call.args[1].fields], out_ty


class _FunctionBuilder:
    """The Relax function of one matched attention, in the heads' layout."""

    def __init__(self, rewriter: _AttentionRewriter, attention: _Attention) -> None:
        self.rewriter, self.attention = rewriter, attention
        self.bindings = rewriter.bindings
        self.params: list[relax.Var] = []
        self.outer: list[relax.Expr] = []
        self.values: dict[relax.Var, relax.Expr] = {}  # the graph's variable -> its value in the function
        self.computed: dict[relax.Var, relax.Expr] = {}  # the graph's inputs computed in the function (_input)

    def build(self) -> tuple[tvm.IRModule, list[relax.Expr]]:
        """A module of the primitive function ``attention_rows``, and the graph's values its parameters take."""
        bb = self.bb = relax.BlockBuilder()
        with bb.function("attention_rows", attrs={"Primitive": True}, private=True):
            with bb.dataflow():
                for var in self.attention.members:
                    self.values[var] = self._emit(var, self.bindings[var])
                out = bb.emit_output(self.values[self.attention.members[-1]])
            self._sizes()
            bb.emit_func_output(out, self.params)
        return bb.get(), self.outer

    def _sizes(self) -> None:
        """Sizes that appear only inside others (the cache's rows: ``[rows * heads, head_dim]``) as a shape
        parameter, so that the PrimFunc takes them."""
        tensors = [p for p in self.params if isinstance(p.ty, relax.TensorType)]
        defined = {d for p in tensors for d in p.ty.shape if isinstance(d, tirx.Var)}
        inside = {v for p in tensors for d in p.ty.shape for v in tirx.analysis.undefined_vars(d)} - defined
        if inside:
            sizes = sorted(inside, key=lambda v: v.name)
            self.params.append(relax.Var("sizes", relax.ShapeType(sizes)))
            self.outer.append(relax.ShapeExpr(sizes))

    def _param(self, expr: relax.Expr) -> relax.Var:
        for param, outer in zip(self.params, self.outer):
            if outer.same_as(expr):
                return param
        param = relax.Var(f"in{len(self.params)}", expr.ty)
        self.params.append(param)
        self.outer.append(expr)
        return param

    def _tensor(self, source: relax.Expr) -> relax.Expr:
        """A tensor of the heads' layout the function reads: emitted here where it is a gather (``where(c,
        take(rows, index, axis=0), new)`` or the ``take``) used only there, its input where it is a ``broadcast_to``
        used only there (the op broadcasts it), else a parameter."""
        value = self.bindings.get(source) if isinstance(source, relax.Var) else None
        if value is None or self.rewriter.single_user(source) is None:
            return self._input(source)
        where = bound_op_call(source, "relax.where", self.bindings)
        gathered = where.args[1] if where is not None else source
        take = bound_op_call(gathered, "relax.take", self.bindings)
        if take is not None and take.args[1].ty.ndim == 3 and int(take.attrs.axis) == 0 and (
                where is None or self.rewriter.single_user(gathered) is not None):
            rows, index = self._param(take.args[0]), self._input(take.args[1])
            taken = self.bb.emit(relax.op.take(rows, index, axis=0, mode=str(take.attrs.mode)))
            if where is None:
                return taken
            return self.bb.emit(relax.op.where(self._input(where.args[0]), taken, self._input(where.args[2])))
        broadcast = bound_op_call(source, "relax.broadcast_to", self.bindings)
        if broadcast is not None and broadcast.args[0].ty.ndim == source.ty.ndim:
            return self._input(broadcast.args[0])
        return self._input(source)

    def _input(self, expr: relax.Expr) -> relax.Expr:
        """``expr`` computed here where it is a part of a row quantization the attention computes (the query's, and
        the step's key's and value's once the cache's appends quantize them themselves: from its input) or
        elementwise arithmetic on the entry point's own parameters, scalar constants and ``arange`` (a step's past
        positions and cache-row index, the source's mask: a kernel of their own per step otherwise, read by every
        layer), else a parameter."""
        if expr in self.computed:
            return self.computed[expr]
        value = self.bindings.get(expr) if isinstance(expr, relax.Var) else None
        if isinstance(value, relax.TupleGetItem) and self.rewriter.computes_quantization(value, self.attention):
            if value.tuple_value not in self.computed:
                call = self.bindings[value.tuple_value]
                self.computed[value.tuple_value] = self._row_quantization(call, self._param(call.args[1].fields[0]))
            self.computed[expr] = self.bb.emit(relax.TupleGetItem(self.computed[value.tuple_value], value.index))
        elif not self._is_arithmetic(expr, depth=8):
            return self._param(expr)
        elif value.op.name == "relax.arange":
            # as its own computation: legalized, it would be a constant, which FuseTIR refuses in the function
            self.computed[expr] = self.bb.emit_te(topi.arange, *(a.value for a in value.args), str(value.attrs.dtype))
        else:
            args = [a if isinstance(a, ir.expr.Constant) or not isinstance(a.ty, relax.TensorType)
                    else self._input(a) for a in value.args]
            self.computed[expr] = self.bb.emit(relax.Call(value.op, args, value.attrs))
        return self.computed[expr]

    def _is_arithmetic(self, expr: relax.Expr, depth: int) -> bool:
        """Whether ``expr`` is bound to :data:`ARITHMETIC` ops whose tensor operands are scalar constants, the entry
        point's parameters or such ops again (at most ``depth`` deep)."""
        value = self.bindings.get(expr) if isinstance(expr, relax.Var) else None
        if depth == 0 or not (isinstance(value, relax.Call) and isinstance(value.op, ir.Op)
                              and value.op.name in ARITHMETIC):
            return False
        return all(not isinstance(a.ty, relax.TensorType) or (isinstance(a, ir.expr.Constant) and a.ty.ndim == 0)
                   or (isinstance(a, relax.Var) and a not in self.bindings) or self._is_arithmetic(a, depth - 1)
                   for a in value.args)

    def _operand(self, arg: relax.Expr, target: list) -> relax.Expr:
        """``arg`` as an elementwise op's operand in the function (see ``_AttentionRewriter._operand``)."""
        if arg in self.values:
            return self.values[arg]
        if scalar_constant(arg) is not None:
            return arg
        rewriter, attention = self.rewriter, self.attention
        source = rewriter.heads_source(arg, attention)
        tensor = self._tensor(source)
        wanted = rewriter.lift(list(arg.ty.shape), attention)
        if rewriter.arrangement(list(source.ty.shape), wanted) == "swapped":
            return self.bb.emit(relax.op.permute_dims(tensor, SWAP_LAST))
        return tensor

    def _row_quantization(self, call: relax.Call, x: relax.Expr) -> relax.Var:
        """The graph's ops that ``call`` of a row-quantizing function stands for, on ``x``: ``(q, s)``."""
        quantize = called_row_quantization(self.rewriter.mod, call)
        return self.bb.emit(row_quantization(self.bb, x, int(quantize.qmax), quantize.eps))

    def _emit(self, var: relax.Var, value: relax.Expr) -> relax.Expr:
        bb, rewriter, attention = self.bb, self.rewriter, self.attention
        if isinstance(value, relax.TupleGetItem):
            return bb.emit(relax.TupleGetItem(self.values[value.tuple_value], value.index))
        if value.op == ir.Op.get("relax.call_tir"):
            return self._row_quantization(value, self.values[value.args[1].fields[0]])
        if var.same_as(attention.members[0]):
            q, keys_t = value.args[0], self.bindings[value.args[1]]
            keys = keys_t.args[0]
            q4 = self._tensor(rewriter.heads_source(q, attention))
            keys4 = self._tensor(rewriter.heads_source(keys, attention))
            return bb.emit(relax.op.matmul(q4, relax.op.permute_dims(keys4, SWAP_LAST), out_dtype="int32"))
        if var.same_as(attention.context):
            values = value.args[1]
            values4 = self._tensor(rewriter.heads_source(values, attention))
            return bb.emit(relax.op.matmul(self.values[value.args[0]], values4, out_dtype="int32"))
        name, target = value.op.name, rewriter.lift(list(var.ty.shape), attention)
        if name == "relax.reshape":
            x = self.values[value.args[0]]
            source = rewriter.lift(list(value.args[0].ty.shape), attention)
            swapped = rewriter.arrangement(source, target) == "swapped"
            return bb.emit(relax.op.permute_dims(x, SWAP_LAST)) if swapped else x
        args = [self._operand(a, target) if isinstance(a.ty, relax.TensorType) else a  # (not a clip's bounds)
                for a in value.args]
        if name == "relax.nn.softmax":
            return bb.emit(relax.op.nn.softmax(args[0], axis=-1))
        if name == "relax.quantize":
            return bb.emit(relax.op.quantize(args[0], args[1], args[2], axis=-1, out_dtype=str(value.attrs.out_dtype)))
        return bb.emit(relax.Call(value.op, args, value.attrs))


def _fused(module: tvm.IRModule) -> tuple[tirx.PrimFunc, relax.Call]:
    """``module``'s primitive function ``attention_rows`` (Relax ops) legalized as the pipeline does and fused into
    one PrimFunc; the PrimFunc and the ``call_tir`` of it on the function's parameters."""
    inner = module.get_global_var("attention_rows")
    func = module[inner]
    params = [relax.Var(p.name, p.ty) for p in func.params]
    bb = relax.BlockBuilder(module)
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(inner, params))
        bb.emit_func_output(out)
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(legalize_map()), relax.transform.FuseTIR()])(
        bb.get())
    call = fused["main"].body.blocks[0].bindings[-1].value
    by_param = dict(zip(params, func.params))
    args = [by_param.get(a, a) for a in call.args[1].fields]
    return fused[call.args[0]], relax.Call(call.op, [call.args[0], relax.Tuple(args), *call.args[2:]], call.attrs,
                                           call.ty_args)


def _merged_axes(source: list, target: list, analyzer: Analyzer) -> list[list[int]] | None:
    """For each axis of ``target``, the axes of ``source`` it merges, where ``target`` is ``source`` with runs of
    adjacent axes merged (axes of size 1 dropped or added anywhere; each merged axis but a run's first of a static
    size); else None."""
    axes = [i for i, size in enumerate(source) if not is_one(size)]
    groups, k = [], 0
    for size in target:
        group, product = [], tirx.const(1, "int64")
        while not is_one(size) and k < len(axes) and not analyzer.can_prove_equal(product, size):
            if group and not isinstance(source[axes[k]], tirx.IntImm):
                return None
            group.append(axes[k])
            product, k = product * source[axes[k]], k + 1
        if not is_one(size) and not (group and analyzer.can_prove_equal(product, size)):
            return None
        groups.append(group)
    return groups if k == len(axes) else None


def _written_merged(prim: tirx.PrimFunc, groups: list[list[int]]) -> tirx.PrimFunc:
    """``prim`` writing its result (its last parameter) with the axes merged as ``groups`` say: the same bytes, the
    buffer of the shape the graph reshapes the result to."""
    out = prim.params[-1]
    shape = out.ty.shape

    def merged(*index: tirx.PrimExpr) -> list[tirx.PrimExpr]:
        positions = []
        for first, *rest in (group or [None] for group in groups):
            position = tirx.const(0, "int64") if first is None else index[first]
            for axis in rest:
                position = position * shape[axis] + index[axis]
            positions.append(position)
        return positions

    sch = s_tir.Schedule(prim)
    (block,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).writes[0].source.same_as(out)]
    sch.transform_layout(block, ("write", 0), tirx.IndexMap.from_func(merged, ndim=len(shape)))
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="int8mt.AttentionRows")
class AttentionRows:
    """Each one-query attention of a decoder step -> one call of one function (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _AttentionRewriter(mod)
        return rewrite_functions(rewriter, mod, before=rewriter.find)
