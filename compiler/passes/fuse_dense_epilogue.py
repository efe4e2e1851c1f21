"""FuseDenseEpilogue: the elementwise ops after an int8 dense kernel, computed in its output loop.

Runs after :class:`.PackDense` (and :class:`.FoldDenseBias`) have placed the dense kernels. A linear layer's int32 result is
followed by what Scale Propagation made of its consumer: a requantization to int8 (``astype(int64) *
multiplier + rounding >> shift``, clip, ``astype(int8)``; a ReLU before it in the FFN), or a
dequantization plus the residual (``astype(float32) * scale + x``), often through a reshape and
``permute_dims`` into the attention heads' layout. Unfused, each is a kernel of its own that reads the
whole int32 result back from memory. Here the chain of such ops fed only by the kernel's result becomes
the kernel's epilogue (:class:`~int8mt.schedules.int8_dense.DenseEpilogue`): each int32 sum becomes the
chain's output element while still in registers and is stored at its place in the chain's output layout.

A chain follows the result through values used exactly once: ``reshape`` (dimensions split or merged),
``permute_dims``, ``astype``, ``clip``, ``nn.relu``, and ``add``/``subtract``/``multiply``/``right_shift``/
``left_shift``/``maximum``/``minimum`` with a constant or a tensor computed elsewhere that broadcasts onto
the chain's value. Such a tensor that is itself a product used only there (with run-time ranges, the
dequantization scale: each row's activation scale times each column's weight scale) is computed in the
epilogue from its two factors instead of being written out whole. Each op is written as the TIR expression
its legalization (TOPI) produces, so the fused kernel computes the same values bit for bit. The chain ends before the first other op and after a value
used more than once or outside its dataflow block (so a tapped matmul under ``int8mt verify`` stays
unfused); a chain of views only is left alone.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import ir, relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.int8_dense import DenseEpilogue, dense_attrs, scheduled_int8_dense
from int8mt.schedules.intrin import dense_dot
from int8mt.schedules.kernel_attrs import DENSE_KINDS

from .kernel_calls import bindings_and_users, emit_like, is_one, kernel_kind, scalar_constant, shape_product, use_counts

_BINARY: dict[str, Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]] = {
    "relax.add": operator.add, "relax.subtract": operator.sub, "relax.multiply": operator.mul,
    "relax.right_shift": operator.rshift, "relax.left_shift": operator.lshift,
    "relax.maximum": tirx.max, "relax.minimum": tirx.min,
}
_SUPPORTED = ("relax.reshape", "relax.permute_dims", "relax.astype", "relax.clip", "relax.nn.relu", *_BINARY)
MAX_GROUP = 4  # dimensions merged into, or split from, one another by a reshape


class _Unfusable(Exception):
    """An op the epilogue cannot express; the chain ends before it."""


@dataclass(frozen=True)
class _Step:
    call: relax.Call
    result: relax.Expr  # the value it binds
    chain_arg: int  # which argument of a binary op is the chain's value
    factors: tuple[relax.Expr, ...] = ()  # a binary op's other operand as the product of these, computed here


@dataclass
class _Element:
    """The chain's value for one dense output element: ``value`` at ``coords`` of a tensor of ``shape``."""

    coords: list[tirx.PrimExpr]
    shape: list[tirx.PrimExpr]
    value: tirx.PrimExpr


def _dims(expr: relax.Expr) -> list[tirx.PrimExpr]:
    return list(expr.ty.shape)


def _int(value: int) -> tirx.IntImm:
    return tirx.IntImm("int64", value)


class EpilogueChain:
    """The ops after one dense kernel whose result has shape ``dense_shape`` and dtype ``dense_dtype`` (int32
    sums, or float32 ones for FP32 layers), as a TIR epilogue."""

    def __init__(self, dense_shape: list[tirx.PrimExpr], dense_dtype: str = "int32",
                 products: dict[relax.Var, relax.Call] | None = None) -> None:
        """``products``: values bound to a ``multiply`` of two tensors and used once, which a binary op of the
        chain may compute from their factors."""
        self.dense_shape, self.dense_dtype = dense_shape, dense_dtype
        self.products = products or {}
        self.steps: list[_Step] = []
        self.operands: list[relax.Expr] = []  # the tensors the epilogue reads, in input order
        self.analyzer = Analyzer()

    def try_append(self, call: relax.Call, result: relax.Expr, current: relax.Expr) -> bool:
        """Append ``result = call(current, ...)`` if the epilogue can compute it (checked by a dry run)."""
        if not isinstance(call.op, ir.Op) or call.op.name not in _SUPPORTED:
            return False
        chain_arg, operands, factors = 0, [], ()
        if call.op.name in _BINARY:
            if sum(arg.same_as(current) for arg in call.args) != 1:
                return False
            chain_arg = 0 if call.args[0].same_as(current) else 1
            other = call.args[1 - chain_arg]
            if tvm.ir.is_prim_expr(other):
                return False
            product = self.products.get(other)
            if (product is not None and not any(tvm.ir.is_prim_expr(f) for f in product.args)
                    and not all(isinstance(f, ir.expr.Constant) for f in product.args)):  # (constants fold)
                factors = tuple(product.args)
            operands = [x for x in (factors or (other,)) if scalar_constant(x) is None]
        self.steps.append(_Step(call, result, chain_arg, factors))
        self.operands.extend(operands)
        try:
            self.element(tirx.Var("i", "int64"), tirx.Var("j", "int64"), tirx.Var("c", self.dense_dtype),
                         [tirx.decl_buffer(_dims(x), str(x.ty.dtype)) for x in self.operands])
        except _Unfusable:
            self.steps.pop()
            del self.operands[len(self.operands) - len(operands):]
            return False
        return True

    @property
    def computes(self) -> bool:
        """Whether the chain does more than view the result in another shape."""
        return any(step.call.op.name != "relax.reshape" for step in self.steps)

    def element(self, i: tirx.Var, j: tirx.Var, value: tirx.PrimExpr, inputs: list[tirx.Buffer]) -> _Element:
        """The chain's output element (and where it goes) for the dense result ``value`` at row ``i``,
        column ``j``; ``inputs`` are the buffers of :attr:`operands`."""
        element = _Element([i, j], list(self.dense_shape), value)
        buffers = iter(inputs)
        for step in self.steps:
            call, name = step.call, step.call.op.name
            if name == "relax.reshape":
                element.coords = self._regroup(element.coords, element.shape, _dims(step.result))
                element.shape = _dims(step.result)
            elif name == "relax.permute_dims":
                rank = len(element.shape)
                axes = range(rank)[::-1] if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
                element.coords = [element.coords[a] for a in axes]
                element.shape = [element.shape[a] for a in axes]
            elif name == "relax.astype":
                element.value = tirx.Cast(str(call.attrs.dtype), element.value)
            elif name == "relax.clip":  # topi.clip
                lo, hi = (tirx.Cast(element.value.ty, bound) for bound in call.args[1:])
                element.value = tirx.max(tirx.min(element.value, hi), lo)
            elif name == "relax.nn.relu":  # topi.nn.relu
                element.value = tirx.max(element.value, tirx.const(0, element.value.ty))
            else:
                if step.factors:
                    first, second = (self._operand(x, element, buffers) for x in step.factors)
                    other = first * second
                else:
                    other = self._operand(call.args[1 - step.chain_arg], element, buffers)
                pair = (element.value, other) if step.chain_arg == 0 else (other, element.value)
                element.value = _BINARY[name](*pair)
            result_dims = _dims(step.result)
            if len(result_dims) != len(element.shape) or not all(
                    self.analyzer.can_prove_equal(a, b) for a, b in zip(element.shape, result_dims)):
                raise _Unfusable(f"{name} broadcasts the chain's value")
            if str(step.result.ty.dtype) != str(element.value.ty):
                raise _Unfusable(f"{name} mixes dtypes")
        return element

    def _operand(self, other: relax.Expr, element: _Element, buffers) -> tirx.PrimExpr:
        """A binary op's other operand, for ``element``: a scalar constant, or a load of the tensor broadcast
        onto the chain's value (numpy rules)."""
        scalar = scalar_constant(other)
        if scalar is not None:
            return tirx.const(scalar, str(other.ty.dtype))
        shape = _dims(other)
        lead = len(element.shape) - len(shape)
        if lead < 0:
            raise _Unfusable("the operand has more dimensions than the chain's value")
        index = []
        for d, dim in enumerate(shape):
            if is_one(dim):
                index.append(_int(0))
            elif self.analyzer.can_prove_equal(dim, element.shape[lead + d]):
                index.append(element.coords[lead + d])
            else:
                raise _Unfusable("the operand does not broadcast onto the chain's value")
        return tirx.BufferLoad(next(buffers), index)

    def _regroup(self, coords: list, shape: list, new_shape: list) -> list[tirx.PrimExpr]:
        """Where the element at ``coords`` of ``shape`` is in ``new_shape`` (a row-major reshape): each
        group of dimensions with (provably) equal products is flattened and split again."""
        old = [(c, d) for c, d in zip(coords, shape) if not is_one(d)]
        new = [(k, d) for k, d in enumerate(new_shape) if not is_one(d)]
        out: list[tirx.PrimExpr] = [_int(0)] * len(new_shape)
        a = b = 0
        while a < len(old) or b < len(new):
            p, q = self._group(old[a:], new[b:])
            flat = _int(0)
            for c, d in old[a:a + p]:
                flat = flat * d + c
            stride = _int(1)
            for position, (k, d) in reversed(list(enumerate(new[b:b + q]))):
                index = tirx.floordiv(flat, stride)
                out[k] = self.analyzer.simplify(index if position == 0 else tirx.floormod(index, d))
                stride = stride * d
            a, b = a + p, b + q
        return out

    def _group(self, old: list, new: list) -> tuple[int, int]:
        """The shortest prefixes ``old[:p]``, ``new[:q]`` whose sizes have (provably) equal products."""
        for total in range(2, 2 * MAX_GROUP + 1):
            for p in range(1, min(total, MAX_GROUP + 1)):
                q = total - p
                if p <= len(old) and 0 < q <= min(len(new), MAX_GROUP) and self.analyzer.can_prove_equal(
                        shape_product([d for _, d in old[:p]]), shape_product([d for _, d in new[:q]])):
                    return p, q
        raise _Unfusable("a reshape that is not a split or merge of dimensions")

    @property
    def output(self) -> relax.Expr:
        return self.steps[-1].result

    def epilogue(self) -> DenseEpilogue:
        """The epilogue for :func:`~int8mt.schedules.int8_dense.int8_dense`."""
        shapes = [self.dense_shape, *(_dims(x) for x in self.operands), *(_dims(s.result) for s in self.steps)]
        shape_vars = {v.name: v for shape in shapes for dim in shape for v in tirx.analysis.undefined_vars(dim)}
        for name in _bound_by_buffers([*(_dims(x) for x in self.operands), _dims(self.output)]):
            shape_vars.pop(name, None)  # (the kernel learns it from a buffer: no argument, no VM call to box it)

        def store(value, i, j, inputs):
            element = self.element(i, j, value, inputs)
            return element.coords, element.value

        return DenseEpilogue(out_shape=tuple(_dims(self.output)), out_dtype=str(self.output.ty.dtype),
                             input_specs=tuple((tuple(_dims(x)), str(x.ty.dtype)) for x in self.operands),
                             shape_vars=tuple(shape_vars[name] for name in sorted(shape_vars)), store=store)


def _bound_by_buffers(shapes: list[list[tirx.PrimExpr]]) -> set[str]:
    """The size variables a kernel whose buffers have ``shapes`` (in parameter order) learns from them: those whose
    first mention is a dimension of their own (TVM binds it there; a product mentioning it first could not be
    checked)."""
    mentioned, bound = set(), set()
    for dim in (dim for shape in shapes for dim in shape):
        if isinstance(dim, tirx.Var) and dim.name not in mentioned:
            bound.add(dim.name)
        mentioned.update(v.name for v in tirx.analysis.undefined_vars(dim))
    return bound


class DenseKernels:
    """What :class:`EpilogueFuser` fuses and how: here the dense kernels (``DENSE_KINDS``), rebuilt with the
    chain as their epilogue; another such class names other kernels."""

    def chain_for(self, mod: tvm.IRModule, call: relax.Call, result: relax.Var,
                  products: dict[relax.Var, relax.Call]) -> EpilogueChain | None:
        """An empty chain after ``call`` (bound to ``result``) if it calls a kernel fused here."""
        if kernel_kind(mod, call.args[0]) not in DENSE_KINDS:
            return None
        return EpilogueChain(list(result.ty.shape), str(result.ty.dtype), products)

    def accepts(self, mod: tvm.IRModule, call: relax.Call, chain: EpilogueChain) -> bool:
        """Whether the kernel of ``call`` takes the complete ``chain`` as its epilogue."""
        return chain.computes

    def kernel(self, mod: tvm.IRModule, call: relax.Call,
               chain: EpilogueChain) -> tuple[tvm.tirx.PrimFunc, str, list[relax.Expr], list[tirx.PrimExpr]]:
        """The kernel of ``call`` with ``chain`` as its epilogue, its name, and its tensor and scalar arguments."""
        epilogue = chain.epilogue()
        n, k, tiles, family = dense_attrs(mod[call.args[0]])
        func = scheduled_int8_dense(n, k, tiles, dense_dot(family), epilogue=epilogue)
        return (func, f"{call.args[0].name_hint}_to_{epilogue.out_dtype}", [*call.args[1].fields, *chain.operands],
                list(epilogue.shape_vars))


@expr_functor.mutator
class EpilogueFuser(PyExprMutator):
    """Finds each function's chains after the kernels ``kernels`` fuses (:meth:`run`), then rebinds each chain's
    output to the fused call."""

    def __init__(self, mod: tvm.IRModule, kernels: DenseKernels) -> None:
        super().__init__(mod)
        self.kernels = kernels
        self.fused: list[tuple[tvm.tirx.PrimFunc, ir.GlobalVar]] = []
        self.chains: dict[relax.Var, tuple[relax.Call, EpilogueChain]] = {}  # chain output -> (kernel call, chain)

    def run(self, gv: ir.GlobalVar, func: relax.Function) -> None:
        self.chains = {}
        uses = use_counts(bindings_and_users(func)[1])
        products = {b.var: b.value for block in func.body.blocks for b in block.bindings
                    if isinstance(b.var, relax.DataflowVar) and uses.get(b.var) == 1 and isinstance(b.value, relax.Call)
                    and b.value.op == ir.Op.get("relax.multiply")}
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                continue
            user = {var: b for b in block.bindings for var in relax.analysis.free_vars(b.value)}
            for binding in block.bindings:
                call = binding.value
                if not (isinstance(call, relax.Call) and call.op == ir.Op.get("relax.call_tir")):
                    continue
                chain = self.kernels.chain_for(self.builder_.get(), call, binding.var, products)
                if chain is None:
                    continue
                current = binding.var
                while (isinstance(current, relax.DataflowVar) and uses.get(current) == 1 and current in user
                       and isinstance(user[current].value, relax.Call)
                       and chain.try_append(user[current].value, user[current].var, current)):
                    current = user[current].var
                if self.kernels.accepts(self.builder_.get(), call, chain):
                    self.chains[chain.output] = (call, chain)
        if self.chains:
            self.builder_.update_func(gv, self.visit_expr(func))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.chains:
            super().visit_var_binding_(binding)
            return
        call, chain = self.chains[binding.var]
        func, name, args, scalars = self.kernels.kernel(self.builder_.get(), call, chain)
        fused = relax.call_tir(self._added(func, name), [*(self.visit_expr(x) for x in args), *scalars],
                               binding.var.ty)
        self.set_var_remap(binding.var, emit_like(self.builder_, fused, binding.var))

    def _added(self, func: tvm.tirx.PrimFunc, name: str) -> ir.GlobalVar:
        """``func`` in the module (named ``name`` and a count), or the function equal to it added before."""
        for seen, gv in self.fused:
            if tvm_ffi.structural_equal(seen, func):
                return gv
        gv = self.builder_.add_func(func.without_attr("global_symbol"), f"{name}_{len(self.fused)}")
        self.fused.append((func, gv))
        return gv


@tvm.transform.module_pass(opt_level=0, name="int8mt.FuseDenseEpilogue")
class FuseDenseEpilogue:
    """Every dense kernel call followed by a chain of elementwise ops -> one call of that kernel with the
    chain as its epilogue, in every Relax function (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return fuse_epilogues(mod, DenseKernels())


def fuse_epilogues(mod: tvm.IRModule, kernels: DenseKernels) -> tvm.IRModule:
    """``mod`` with the chains after the kernels ``kernels`` fuses in every Relax function fused into them (the
    unfused kernels and ops left dead are removed)."""
    fuser = EpilogueFuser(mod, kernels)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.run(gv, func)
    return relax.transform.DeadCodeElimination()(fuser.builder_.get())
