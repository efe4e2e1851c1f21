"""GreedyLoop: an entry point that decodes one sentence greedily to its end in one call of the library.

Greedy search at batch 1 on the host pays, at every step, the Python and FFI work between two calls of the
decoder step (the history, the inputs, the arg-max, the stop test): microseconds each, because the step's weights
have just gone through the caches the interpreter's code and objects were in (30 of a reference-model step's
270 µs on a Xeon with AMX). Here the loop runs in the virtual machine instead:

* ``greedy_decode(cache_0, .., cross_0, .., src[1, S], ids[M] int64, limits[2] int64, weights..)`` starts at the
  decoder's start token with an empty history and returns ``count[1]``: the steps it ran, whose tokens it wrote to
  ``ids[0 .. count - 1]`` (the last the end of sentence, unless the maximum length stopped it first);
* ``greedy_step`` runs one step and, unless it stops, itself for the next (``R.If``; the virtual machine's frames,
  not a host loop): the step's logits, their arg-max (:func:`~int8mt.schedules.greedy_loop.next_token_kernel`: the
  end of sentence passed over while ``step < limits[1]``, the minimum length), the token written at ``ids[step]``,
  then the stop test (end of sentence, or ``step + 1 >= limits[0]``, the maximum length).

Its state (token, position, stop flag, history) lives in tensors made once per sentence and rewritten in place
(:mod:`int8mt.schedules.greedy_loop`); the history the step reads is a view ``[1, T + 1]`` of one buffer, its width
``T + 1`` a shape parameter of ``greedy_step``, so a frame holds no tensor of its own (each would hold a page of
the pooled allocator: 256 steps held 6 MB; the frames' registers alone hold 2 MB there, ~0.1 MB at 15 steps). The self-attention cache is a fresh one (``1 + M`` rows,
:mod:`int8mt.runtime.cache`): the step at position ``T`` writes row ``T + 1`` and reads rows ``1 .. T`` through the
history ``[1 .. T, 0]``. The tokens are those of the host's greedy search
(:func:`int8mt.runtime.search.greedy_search`) bit for bit: the same step, and NumPy's arg-max. Run it after
:class:`LiftWeights` (the loop passes the decoder step's weights through).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

from int8mt.runtime.bundle import GREEDY_ENTRY_POINT
from int8mt.schedules.greedy_loop import (advance_kernel, next_token_kernel, record_token_kernel, start_kernel,
                                          stop_kernel)

from .lift_weights import WEIGHT_PARAMS_ATTR, LiftWeights

STEP = "decode_step"
LOOP = "greedy_step"


def _fresh(params: list[relax.Var], batch: tirx.Var | None = None) -> list[relax.Var]:
    """Variables of the parameters' types with symbolic dimensions of their own (a function may not share them
    with another); ``batch``'s dimension (the step's rows) set to 1."""
    dims: dict[tirx.Var, tirx.PrimExpr] = {} if batch is None else {batch: tirx.IntImm("int64", 1)}

    def dim(d: tirx.PrimExpr) -> tirx.PrimExpr:
        if isinstance(d, tirx.Var):
            return dims.setdefault(d, tirx.Var(d.name, "int64"))  # (shape dimensions)
        return d

    return [relax.Var(p.name, relax.TensorType([dim(d) for d in p.ty.shape], p.ty.dtype)) for p in params]


@tvm.transform.module_pass(opt_level=0, name="GreedyLoop")
class GreedyLoop:
    """See the module doc. ``start_id`` and ``eos_id``: the decoder's start token and the end of sentence;
    ``weights``: the :class:`LiftWeights` that ran before, whose ``uses`` get the new entry point's weights."""

    def __init__(self, start_id: int, eos_id: int, weights: LiftWeights) -> None:
        self.start_id, self.eos_id, self.weights = start_id, eos_id, weights

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        step_var = mod.get_global_var(STEP)
        step = mod[step_var]
        if not isinstance(step_var.ty, relax.FuncType):  # (replaced by LiftWeights, its global has no type to call by)
            relax.expr._update_type(step_var, step.ty)
        weight_count = int((step.attrs or {}).get(WEIGHT_PARAMS_ATTR, 0))
        names = [p.name for p in step.params]
        caches = [step.params[i] for i, n in enumerate(names) if n.startswith("cache_")]
        crosses = [step.params[i] for i, n in enumerate(names) if n.startswith("cross_")]
        src, weights = step.params[names.index("src")], step.params[len(names) - weight_count:]
        batch = step.params[names.index("tokens")].ty.shape[0]
        vocab = int(step.ret_ty.fields[0].shape[1])

        bb = relax.BlockBuilder(mod)
        kernel = {name: bb.add_func(make, name) for name, make in (
            ("next_token", next_token_kernel(vocab, self.eos_id)), ("record_token", record_token_kernel()),
            ("stop_here", stop_kernel(self.eos_id)), ("advance", advance_kernel()),
            ("start", start_kernel(self.start_id)))}
        attrs = {"relax.force_pure": True, WEIGHT_PARAMS_ATTR: weight_count}

        def signature() -> tuple[list[relax.Var], dict[str, list[relax.Var]]]:
            """The loop's parameters (with symbolic dimensions of their own), and by role: its state (token,
            position, stop flag, history buffer), the step's caches, cross-attention caches, source and weights, the
            ids and limits, and the history's width."""
            own = _fresh([*caches, *crosses, src, *weights], batch)
            room, width = tirx.Var("room", "int64"), tirx.Var("width", "int64")
            state = [("token", [1, 1], "int64"), ("step", [1], "int64"), ("stop", [], "bool"),
                     ("history", [1, room + 1], "int64")]
            parts = {"state": [relax.Var(n, relax.TensorType(shape, dtype)) for n, shape, dtype in state],
                     "caches": own[:len(caches)], "crosses": own[len(caches):len(caches) + len(crosses)],
                     "src": [own[len(caches) + len(crosses)]], "weights": own[len(caches) + len(crosses) + 1:],
                     "io": [relax.Var("ids", relax.TensorType([room], "int64")),
                            relax.Var("limits", relax.TensorType([2], "int64"))],
                     "width": [relax.Var("width", relax.ShapeType([width]))]}
            order = ("state", "caches", "crosses", "src", "io", "width", "weights")
            return [v for part in order for v in parts[part]], parts

        params, parts = signature()
        token, position, stop, history = parts["state"]
        ids, limits = parts["io"]
        width = parts["width"][0].ty.values[0]
        loop_var = bb.add_func(relax.Function(params, relax.SeqExpr([], position), position.ty, True), LOOP)  # (named)
        with bb.function(f"{LOOP}_body", params, attrs, private=True):
            view = bb.emit(relax.op.memory.view(history, relax.ShapeExpr([1, width])))
            out = bb.emit(relax.Call(step_var, [token, position, *parts["caches"], view, *parts["crosses"],
                                                *parts["src"], relax.ShapeExpr([width]), *parts["weights"]]))
            logits = bb.emit(relax.TupleGetItem(out, 0))
            written = [bb.emit(relax.TupleGetItem(out, 1 + i)) for i in range(len(caches))]

            def in_place(name: str, args: list[relax.Expr], index: int) -> relax.Var:
                return bb.emit(relax.op.call_tir_inplace(kernel[name], relax.Tuple(args), index, args[index].ty))

            token = in_place("next_token", [logits, position, limits, token], 3)
            ids = in_place("record_token", [ids, token, position], 0)
            stop = in_place("stop_here", [token, position, limits, stop], 3)
            advanced = bb.emit(relax.op.call_tir_inplace(kernel["advance"], relax.Tuple(
                [position, history, relax.prim_value(width)]), [0, 1], [position.ty, history.ty]))
            position, history = (bb.emit(relax.TupleGetItem(advanced, i)) for i in range(2))
            rest = relax.Var("rest", position.ty)
            more = relax.Call(loop_var, [token, position, stop, history, *written, *parts["crosses"], *parts["src"],
                                         ids, limits, relax.ShapeExpr([width + 1]), *parts["weights"]])
            result = bb.emit(relax.If(stop, relax.SeqExpr([], position),
                                      relax.SeqExpr([relax.BindingBlock([relax.VarBinding(rest, more)])], rest)))
            body = bb.emit_func_output(result)
        bb.update_func(loop_var, bb.get()[body])

        params, parts = signature()
        ids, limits = parts["io"]
        entry = [*parts["caches"], *parts["crosses"], *parts["src"], ids, limits, *parts["weights"]]
        with bb.function(GREEDY_ENTRY_POINT, entry, {**attrs, "global_symbol": GREEDY_ENTRY_POINT}):
            start = bb.emit(relax.call_tir(kernel["start"], [ids], [v.ty for v in parts["state"]]))
            result = bb.emit(relax.Call(loop_var, [*(bb.emit(relax.TupleGetItem(start, i)) for i in range(4)),
                                                   *parts["caches"], *parts["crosses"], *parts["src"], ids, limits,
                                                   relax.ShapeExpr([1]), *parts["weights"]]))
            bb.emit_func_output(result)
        self.weights.uses[GREEDY_ENTRY_POINT] = list(self.weights.uses.get(STEP, []))
        mod = bb.get()
        return tvm.IRModule({gv: f for gv, f in mod.functions_items() if not gv.same_as(body)}, attrs=mod.attrs)
