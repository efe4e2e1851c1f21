"""AppendQuantizedRows: a decoder step's run-time quantizations of its new keys and values -> done by the kernels
that append them to the cache (GPU presets).

With run-time ranges each layer's new key and value are quantized per head (one call of the row-quantizing
function each, :class:`.QuantizeRows`), their parts returned by the step's dataflow block and written into the
cache by ``append_rows`` (one call per cache tensor: the int8 rows, their scales;
:func:`~int8mt.compiler.frontend.appending_step`). Here each such call becomes one of
:func:`~int8mt.schedules.append_rows.append_quantized_rows_kernel` on the float rows, which quantizes them itself
(the same values), where every new row it appends is the same part of such a quantization and nothing else reads
it. The quantizations then feed only the attentions, which compute them too (:class:`.AttentionRows`): a kernel
per layer's key and value fewer per step.
"""
from __future__ import annotations

import tvm
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.schedules.append_rows import APPEND_ROWS, append_quantized_rows_kernel
from int8mt.schedules.layer_norm_rows import RowQuantize

from .kernel_calls import KernelTable, bindings_and_users, emit_like, kernel_kind, rewrite_functions
from .quantize_rows import called_row_quantization


@expr_functor.mutator
class _Appender(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.kernels = KernelTable(self.builder_)
        self.appends: dict[relax.Var, tuple[RowQuantize, int]] = {}  # each rewritten append -> its quantization
        self.floats: dict[tuple[relax.Var, int], relax.Expr] = {}  # (tuple, field) -> the float rows in its place

    def find(self, _gv: ir.GlobalVar, func: relax.Function) -> None:
        self.bindings, self.users = bindings_and_users(func)
        self.appends, self.floats = {}, {}
        for var, value in self.bindings.items():
            if (isinstance(value, relax.Call) and value.op == ir.Op.get("relax.call_tir_inplace")
                    and kernel_kind(self.mod, value.args[0]) == APPEND_ROWS):
                self._match(var, value)

    def _match(self, var: relax.Var, call: relax.Call) -> None:
        """Notes the append ``var`` (``call``) where each new row is a part of a row quantization, the same part
        of each, returned by the dataflow block and read by this append alone."""
        _cache, *news, _used = call.args[1].fields
        found = []
        for new in news:
            got = self.bindings.get(new)
            tup = self.bindings.get(got.tuple_value) if isinstance(got, relax.TupleGetItem) else None
            field = tup.fields[got.index] if isinstance(tup, relax.Tuple) else None
            part = self.bindings.get(field)
            quantize = self.bindings.get(part.tuple_value) if isinstance(part, relax.TupleGetItem) else None
            settings = called_row_quantization(self.mod, quantize)  # of new rows ``[count, heads, 1, width]``
            if not (self.users.get(new) == [var] and settings is not None and quantize.args[1].fields[0].ty.ndim == 4
                    and all(self._other_field(user, got) for user in self.users[got.tuple_value])):
                return
            found.append(((got.tuple_value, got.index), quantize.args[1].fields[0], (settings, part.index)))
        parts = {part for _, _, part in found}
        if len(parts) != 1:
            return
        (self.appends[var],) = parts
        self.floats.update({field: x for field, x, _ in found})

    def _other_field(self, user: relax.Var | None, got: relax.TupleGetItem) -> bool:
        """Whether ``user`` of the returned tuple takes a field of it other than ``got``'s, or is ``got``'s."""
        value = self.bindings.get(user)
        return isinstance(value, relax.TupleGetItem) and (value.index != got.index or value.same_as(got))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.Tuple) and any((binding.var, i) in self.floats for i in range(len(value.fields))):
            fields = [self.floats.get((binding.var, i), field) for i, field in enumerate(value.fields)]
            self.set_var_remap(binding.var, emit_like(self.builder_, relax.Tuple([self.visit_expr(f) for f in fields]),
                                                      binding.var))
        elif binding.var in self.appends:
            quantize, part = self.appends[binding.var]
            cache, *news, used = (self.visit_expr(a) for a in value.args[1].fields)
            planes, (heads, width) = len(news), (int(news[0].ty.shape[i]) for i in (1, 3))
            kernel = self.kernels.get(("append_quantized_rows", planes, heads, width, quantize, part),
                                      "append_quantized_rows",
                                      lambda: append_quantized_rows_kernel(planes, heads, width, quantize, part))
            call = relax.op.call_tir_inplace(kernel, relax.Tuple([cache, *news, used]), 0, binding.var.ty)
            self.set_var_remap(binding.var, emit_like(self.builder_, call, binding.var))
        else:
            super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="int8mt.AppendQuantizedRows")
class AppendQuantizedRows:
    """A decoder step's new keys and values quantized by the kernels that append them (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        appender = _Appender(mod)
        return rewrite_functions(appender, mod, before=appender.find)
