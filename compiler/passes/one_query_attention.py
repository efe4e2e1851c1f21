"""OneQueryAttention: a decoder step's one-query attention products -> our kernels
(:mod:`int8mt.schedules.one_query_attention`), the self-attention's reading the cache's rows where they are stored.

After :class:`.ReadKeysAsStored`, QK^T is ``matmul(q [pairs, 1, head_dim], permute_dims(keys [pairs, positions,
head_dim]))`` and softmax·V ``matmul(p [pairs, 1, positions], values)``, ``pairs`` = hypotheses x heads. The
model's step (:meth:`int8mt.model.transformer.Transformer.decode_step`) builds the self-attention's keys and
values as ``reshape(where(past, take(rows, index, axis=0), new))``: a gather that writes every hypothesis's keys
at every step. A product over such a gather whose gather, ``where`` and views have no other use becomes one call
of the gathered scores or context kernel, which reads the rows through ``index``; any other one-query product
(the cross-attention's) one call of the direct kernel. TVM's own kernels for these products were 3-6x slower.
int8 operands sum in int32 (exact); float32 ones in another order than TVM's kernel (the same within float
rounding).

With run-time ranges each product is also the quantization of its left operand before it and the dequantization
after it (:class:`~int8mt.quant.modules.QMatMul`): the query's ``quantize_dynamic`` and ``astype(scores) *
query_scale * key_scale``, or the probabilities' ``quantize_dynamic`` (the values' scales folded in) and
``astype(context) * row_scale`` (read through the heads' permutation). Where those values have no other use, the
product with both is one call of a quantizing kernel, which takes the float operand and gives the float result
(the same values bit for bit; five kernels per product otherwise). That call also quantizes, where the graph does
so with no other use in between, the self-attention's new key or value (``quantize_dynamic`` per head: each pair
its own row, returned with its scale for the cache) and the context's rows for the output projection (the heads
merged side by side, quantized per row: the kernel then returns those rows and their scales instead of the
context). CPU targets only.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.one_query_attention import (ACCUMULATOR, context_kernel, direct_context_kernel,
                                                  direct_scores_kernel, quantized_context_kernel,
                                                  quantized_scores_kernel, scores_kernel)
from int8mt.schedules.kernel_attrs import ATTENTION_ATTR, KERNEL_ATTR

from .kernel_calls import KernelTable, bindings_and_users, bound_op_call, is_one, rewrite_functions, use_counts
from .quantize_rows import match_row_quantize

HEADS_FIRST = [0, 2, 1, 3]  # [batch, heads, 1, head_dim] <-> [batch, 1, heads, head_dim]


@expr_functor.mutator
class _OneQueryRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, pair: str | None) -> None:
        super().__init__(mod)
        self.lanes, self.pair = lanes, pair
        self.kernels = KernelTable(self.builder_)
        self.analyzer = Analyzer()
        self.bindings: dict = {}
        self.uses: dict = {}

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, self.users = bindings_and_users(func)
        self.uses = use_counts(self.users)
        self.fused = {}  # product's last variable -> (kernel key, name, maker, arguments, [(variable, type)] the
        #                   call gives, whether its first result is permuted heads-first)
        self.absorbed = set()  # bindings a fused call replaces
        for var, value in self.bindings.items():
            if isinstance(value, relax.Call) and isinstance(value.op, ir.Op) and value.op.name == "relax.matmul":
                self._fuse_quantized(var, value)

    def _once(self, var: relax.Expr) -> bool:
        return isinstance(var, relax.DataflowVar) and self.uses.get(var) == 1

    def _gathered(self, view: relax.Expr) -> tuple | None:
        """``(index, past, rows, new)`` if ``view`` is ``reshape(where(past, take(rows, index), new))`` of the
        step's layout, each value used once."""
        reshape = bound_op_call(view, "relax.reshape", self.bindings) if self._once(view) else None
        where = bound_op_call(reshape.args[0], "relax.where", self.bindings) if reshape is not None else None
        if where is None or not self._once(reshape.args[0]):
            return None
        past, gathered, new = where.args
        take = bound_op_call(gathered, "relax.take", self.bindings) if self._once(gathered) else None
        if take is None or take.attrs.axis is None or int(take.attrs.axis) != 0:
            return None
        rows, index = take.args
        if not (index.ty.ndim == 3 and str(index.ty.dtype) == "int64" and rows.ty.ndim == 2
                and str(past.ty.dtype) == "bool" and past.ty.ndim == 4 and new.ty.ndim == 4):
            return None
        batch, heads, positions = index.ty.shape
        head_dim = rows.ty.shape[1]
        expected = {past: [batch, 1, positions, 1], new: [batch, heads, 1, head_dim],
                    view: [batch * heads, positions, head_dim]}
        if not (isinstance(heads, tvm.tirx.IntImm) and isinstance(head_dim, tvm.tirx.IntImm)
                and str(new.ty.dtype) == str(rows.ty.dtype) and str(rows.ty.dtype) in ACCUMULATOR
                and all(self._same(list(x.ty.shape), shape) for x, shape in expected.items())):
            return None
        return index, past, rows, new

    def _same(self, a: list, b: list) -> bool:
        return len(a) == len(b) and all(self.analyzer.can_prove_equal(x, y) for x, y in zip(a, b))

    # -- run-time ranges: the product with its operand's quantization and its result's dequantization -------------
    def _user(self, var: relax.Var, op: str) -> relax.Var | None:
        """The one variable that uses ``var``, if ``var`` has no other use and that variable is bound to ``op``."""
        found = self.users.get(var, [])
        if len(found) != 1 or found[0] is None or not self._once(var):
            return None
        return found[0] if bound_op_call(found[0], op, self.bindings) is not None else None

    def _view_of(self, expr: relax.Expr, source: relax.Var) -> bool:
        """True if ``expr`` is ``source`` through reshapes only."""
        while not expr.same_as(source):
            reshape = bound_op_call(expr, "relax.reshape", self.bindings)
            if reshape is None:
                return False
            expr = reshape.args[0]
        return True

    def _gathered_scales(self, expr: relax.Expr, index: relax.Expr, past: relax.Expr) -> tuple | None:
        """``(scale_rows, new_scale)`` if ``expr`` is, through reshapes, the self-attention's per-position scales
        gathered as its keys or values are (``permute_dims(where(past, take(scale_rows, index), new_scale))``, the
        positions last)."""
        while (reshape := bound_op_call(expr, "relax.reshape", self.bindings)) is not None:
            expr = reshape.args[0]
        permute = bound_op_call(expr, "relax.permute_dims", self.bindings)
        where = bound_op_call(permute.args[0], "relax.where", self.bindings) if permute is not None else None
        if where is None or [int(a) for a in (permute.attrs.axes or [])] != [0, 1, 3, 2]:
            return None
        take = bound_op_call(where.args[1], "relax.take", self.bindings)
        if (take is None or not where.args[0].same_as(past) or not take.args[1].same_as(index)
                or take.attrs.axis is None or int(take.attrs.axis) != 0):
            return None
        scale_rows, new_scale = take.args[0], where.args[2]
        if scale_rows.ty.ndim != 2 or not is_one(scale_rows.ty.shape[1]) or new_scale.ty.ndim != 4:
            return None
        return scale_rows, new_scale

    def _quantized_left(self, left: relax.Expr) -> tuple | None:
        """``(x, scale, qmax, eps)`` if ``left`` is a reshape of ``x``'s run-time row quantization, used once."""
        reshape = bound_op_call(left, "relax.reshape", self.bindings) if self._once(left) else None
        if reshape is None or not self._once(reshape.args[0]):
            return None
        found = match_row_quantize(reshape.args[0], self.bindings, self.uses)
        if not found or found[0].ty.ndim != 4 or not is_one(found[0].ty.shape[2]):
            return None
        return found

    def _dequantization(self, product: relax.Var, scores: bool, scale: relax.Var) -> tuple | None:
        """``(chain, factor)``: the bindings from ``product`` to its float value, each used once by the next, if
        they dequantize it with the left operand's row ``scale`` (views of it); ``factor`` the keys' scales
        (scores: ``astype(reshape(product)) * scale * factor``; context: ``astype(permute_dims(reshape(product)))
        * permute_dims(scale)``, the heads' permutation before the heads merge)."""
        chain = [product]
        steps = ("relax.reshape", "relax.astype", "relax.multiply", "relax.multiply") if scores else (
            "relax.reshape", "relax.permute_dims", "relax.astype", "relax.multiply")
        for op in steps:
            chain.append(self._user(chain[-1], op))
            if chain[-1] is None:
                return None
        calls = [self.bindings[v] for v in chain[1:]]
        if str(calls[1 if scores else 2].attrs.dtype) != "float32":  # the astype
            return None
        if scores:
            _, _, first, second = calls
            if (first.args[0].same_as(chain[2]) and self._view_of(first.args[1], scale)
                    and second.args[0].same_as(chain[3])
                    and self._same(list(second.args[1].ty.shape), list(chain[4].ty.shape))):
                return chain, second.args[1]
            return None
        _, permute, _, last = calls
        factor = bound_op_call(last.args[1], "relax.permute_dims", self.bindings)
        if ([int(a) for a in permute.attrs.axes] == HEADS_FIRST and last.args[0].same_as(chain[3])
                and factor is not None and [int(a) for a in factor.attrs.axes] == HEADS_FIRST
                and self._view_of(factor.args[0], scale)):
            return chain, None
        return None

    def _fuse_quantized(self, var: relax.Var, call: relax.Call) -> None:
        """Record the fused call that replaces the product ``var`` with its quantization and dequantization, if
        the graph has them (see the module docstring)."""
        left, right = call.args
        transposed = bound_op_call(right, "relax.permute_dims", self.bindings)
        scores = transposed is not None and [int(a) for a in (transposed.attrs.axes or [])] == [0, 2, 1]
        operand = transposed.args[0] if scores else right
        found = self._quantized_left(left)
        if (found is None or str(operand.ty.dtype) != "int8" or operand.ty.ndim != 3
                or not isinstance(operand.ty.shape[2], tvm.tirx.IntImm) or (scores and not self._once(right))):
            return
        x, scale, qmax, eps = found
        dequantized = self._dequantization(var, scores, scale)
        if dequantized is None:
            return
        chain, key_scale = dequantized
        head_dim = int(operand.ty.shape[2])
        gathered = self._gathered(operand)
        if gathered is None:  # stored per pair: the [pairs, positions, head_dim] operand is a view of [B, H, ...]
            source = bound_op_call(operand, "relax.reshape", self.bindings)
            if source is None or source.args[0].ty.ndim != 4:
                return
            heads, args = None, (x, source.args[0], *([key_scale] if scores else []))
            new_quantization = None
        else:
            index, past, rows, new = gathered
            if not scores:  # the probabilities before the values' scales are folded in
                folded = bound_op_call(x, "relax.multiply", self.bindings)
                if folded is None:
                    return
                x, key_scale = folded.args
            scales = self._gathered_scales(key_scale, index, past)
            if scales is None:
                return
            heads, args = int(index.ty.shape[1]), (index, past, x, rows, new, *scales)
            new_quantization = self._new_quantization(new, scales[1])
        kind = "scores" if scores else "context"
        new_range = None
        if heads is not None and new_quantization is not None:
            new_x, new_range = new_quantization
            args = (index, past, x, rows, new_x, scales[0])
        shape = list(x.ty.shape)[:3] + [list(chain[-1].ty.shape)[3] if scores else head_dim]
        results = [(chain[-1], relax.TensorType(shape, "float32"))]
        row = None if scores or (heads is not None and new_range is None) else self._row_quantization(chain[-1])
        if row is not None:
            q, row_scale, row_range, bindings = row
            results = [(q, q.ty), (row_scale, row_scale.ty)]
            self.absorbed.update(bindings)
        if new_range is not None:
            results += [(new, new.ty), (scales[1], scales[1].ty)]
        row_range = row[2] if row is not None else None
        key = ("quantized", kind, heads, head_dim, qmax, eps, self.lanes, self.pair, new_range, row_range)
        make = (lambda: quantized_scores_kernel(heads, head_dim, qmax, eps, self.lanes, new_range, self.pair)) if scores else (
            lambda: quantized_context_kernel(heads, head_dim, qmax, eps, new_range, row_range))
        suffix = "_quantizing_rows" if row_range else "_quantizing_new" if new_range else ""
        name = f"quantized_{'gathered' if heads else 'direct'}_{kind}{suffix}"
        self.fused[chain[-1]] = (key, name, make, args, results, not scores and row is None)
        self.absorbed.update(chain[:-1])

    def _row_quantization(self, context: relax.Var) -> tuple | None:
        """``(q, s, (qmax, eps), bindings)`` if the heads-first ``context`` [batch, 1, heads, head_dim] is, merged
        into rows of the heads side by side, quantized per row and used for nothing else (the output projection's
        input with run-time ranges): ``q`` and ``s`` the quantized rows and their scales, ``bindings`` those of
        the merge and the quantization."""
        merged = self._user(context, "relax.reshape")
        batch, _, heads, head_dim = context.ty.shape
        if merged is None or merged.ty.ndim != 3 or not self._same(
                [merged.ty.shape[0], merged.ty.shape[2]], [batch, heads * head_dim]):
            return None
        users = self.users.get(merged, [])
        divided = [u for u in users if u is not None and bound_op_call(u, "relax.divide", self.bindings) is not None]
        if len(users) != 2 or len(divided) != 1:
            return None
        q = divided[0]
        for op in ("relax.round", "relax.clip", "relax.astype"):
            q = self._user(q, op)
            if q is None:
                return None
        found = match_row_quantize(q, self.bindings, self.uses)
        if not found or not found[0].same_as(merged):
            return None
        _, scale, qmax, eps = found
        bindings, pending = [], [q]
        while pending:  # the quantization's bindings, from q back to the merge
            var = pending.pop()
            if var not in bindings and var in self.bindings:
                bindings.append(var)
                if not var.same_as(merged):
                    pending.extend(relax.analysis.free_vars(self.bindings[var]))
        return q, scale, (qmax, eps), bindings

    def _new_quantization(self, new: relax.Expr, new_scale: relax.Expr) -> tuple | None:
        """``(x, (qmax, eps))`` if the self-attention's new keys (or values) ``new`` are ``x``'s run-time row
        quantization with the scale ``new_scale``: the fused kernel then quantizes them, each pair its own row,
        and gives both to the uses after it (the cache's outputs). Uses before it keep the quantization's ops,
        which dead-code elimination removes when the fused call replaced them all (the gathers)."""
        found = match_row_quantize(new, self.bindings, self.uses)
        if not found or not found[1].same_as(new_scale) or not self._same(list(found[0].ty.shape), list(new.ty.shape)):
            return None
        x, _, qmax, eps = found
        return x, (qmax, eps)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        fused = self.fused.get(binding.var)
        if fused is None:
            if binding.var not in self.absorbed:  # (the product and the views and casts after it: the call's)
                super().visit_var_binding_(binding)
            return
        key, name, make, args, results, permuted = fused
        kernel = self.kernels.get(key, name, lambda: make().with_attr(KERNEL_ATTR, name))
        out = relax.call_tir(kernel, [self.visit_expr(a) for a in args], [ty for _, ty in results] if len(results) > 1
                             else results[0][1])
        if len(results) == 1:
            out = relax.op.permute_dims(self.builder_.emit(out), HEADS_FIRST) if permuted else out
            self.set_var_remap(binding.var, self.builder_.emit(out, binding.var.name))
            return
        out = self.builder_.emit(out)
        for i, (var, _) in enumerate(results):
            item = relax.TupleGetItem(out, i)
            if i == 0 and permuted:
                item = relax.op.permute_dims(self.builder_.emit(item), HEADS_FIRST)
            self.set_var_remap(var, self.builder_.emit(item, var.name))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not (isinstance(call.op, ir.Op) and call.op.name == "relax.matmul"):
            return super().visit_call_(call)
        left, right = call.args
        transposed = bound_op_call(right, "relax.permute_dims", self.bindings)
        scores = transposed is not None and [int(a) for a in (transposed.attrs.axes or [])] == [0, 2, 1]
        operand = transposed.args[0] if scores else right
        dtype = str(operand.ty.dtype)
        if not (dtype in ACCUMULATOR and str(left.ty.dtype) == dtype and str(call.ty.dtype) == ACCUMULATOR[dtype]
                and left.ty.ndim == 3 and operand.ty.ndim == 3 and is_one(left.ty.shape[1])
                and isinstance(operand.ty.shape[2], tvm.tirx.IntImm)):
            return super().visit_call_(call)
        head_dim = int(operand.ty.shape[2])
        gathered = self._gathered(operand) if (not scores or self._once(right)) else None
        if gathered is not None:
            index, past, rows, new = gathered
            heads = int(index.ty.shape[1])
            key = ("gathered", scores, heads, head_dim, dtype, self.lanes, self.pair)
            attrs = {"heads": heads}
            make = (lambda: scores_kernel(heads, head_dim, dtype, self.lanes, pair=self.pair)) if scores else (
                lambda: context_kernel(heads, head_dim, dtype))
            args = (index, past, left, rows, new)
        else:
            key = ("direct", scores, head_dim, dtype, self.lanes, self.pair)
            attrs = {}
            make = (lambda: direct_scores_kernel(head_dim, dtype, self.lanes, pair=self.pair)) if scores else (
                lambda: direct_context_kernel(head_dim, dtype))
            args = (left, operand)
        name = f"{key[0]}_{'scores' if scores else 'context'}"
        attrs.update(head_dim=head_dim, dtype=dtype, lanes=self.lanes, pair=self.pair or "")  # what
        # FuseAttentionEpilogue rebuilds it from
        kernel = self.kernels.get(key, name,
                                  lambda: make().with_attr(KERNEL_ATTR, name).with_attr(ATTENTION_ATTR, attrs))
        return relax.call_tir(kernel, [self.visit_expr(x) for x in args], call.ty)


@tvm.transform.module_pass(opt_level=0, name="int8mt.OneQueryAttention")
class OneQueryAttention:
    """The decoder step's one-query attention products -> our kernels, the self-attention's reading the cache's
    rows in place (see the module docstring); ``lanes``: the float32 lanes of the target's vector registers;
    ``pair``: the family of the target's multiply-add of int16 pairs (:func:`int8mt.schedules.intrin.pair_dot`)
    for the int8 scores, None to widen to int32."""

    def __init__(self, lanes: int, pair: str | None = None) -> None:
        self.lanes, self.pair = lanes, pair

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        reader = _OneQueryRewriter(mod, self.lanes, self.pair)
        return rewrite_functions(reader, mod, before=reader.find)
