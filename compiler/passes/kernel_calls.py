"""What int8mt's kernel passes share: recognising int8 matmuls and weight tables, finding the call bound to a
variable, telling our kernels' calls apart by their ``int8mt.kernel`` attribute, adding each kernel to the
module once, and building kernel variants."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm import ir, relax, s_tir, tirx
from tvm.sym.analyzer import Analyzer

from int8mt.schedules.kernel_attrs import KERNEL_ATTR


def is_int8_matmul(call: relax.Expr) -> bool:
    """``matmul(int8, ..., out_dtype=int32)``: an integer matmul Scale Propagation produced."""
    return (isinstance(call, relax.Call) and call.op == ir.Op.get("relax.matmul")
            and str(call.attrs.out_dtype) == "int32" and str(call.args[0].ty.dtype) == "int8")


def is_float_matmul(call: relax.Expr) -> bool:
    """``matmul(float32, ...)`` with a float32 result: a linear layer (or attention product) of an FP32 layer."""
    return (isinstance(call, relax.Call) and call.op == ir.Op.get("relax.matmul")
            and str(call.args[0].ty.dtype) == "float32" and str(call.ty.dtype) == "float32")


def weight_table(expr: relax.Expr, dtype: str = "int8") -> ir.expr.Constant | None:
    """``expr`` if it is a 2-D constant of ``dtype`` (a weight or an embedding table)."""
    if isinstance(expr, ir.expr.Constant) and str(expr.ty.dtype) == dtype and expr.ty.ndim == 2:
        return expr
    return None


def bindings_and_users(func: relax.Function) -> tuple[dict[relax.Var, relax.Expr], dict[relax.Var, list]]:
    """Each variable of ``func`` bound to a value, that value; and for each variable, the variables bound to the
    values that use it (None for the function's result)."""
    bindings: dict[relax.Var, relax.Expr] = {}
    users: dict[relax.Var, list] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            bindings[binding.var] = binding.value
            for var in relax.analysis.free_vars(binding.value):
                users.setdefault(var, []).append(binding.var)
    for var in relax.analysis.free_vars(func.body.body):
        users.setdefault(var, []).append(None)
    return bindings, users


def use_counts(users: dict[relax.Var, list]) -> dict[relax.Var, int]:
    """How many bindings (and the function's result) use each variable, from :func:`bindings_and_users`."""
    return {var: len(found) for var, found in users.items()}


def bound_op_call(expr: relax.Expr, op: str, bindings: dict[relax.Var, relax.Expr]) -> relax.Call | None:
    """The call of ``op`` that ``bindings`` (from :func:`bindings_and_users`) bind to the variable ``expr``, if any."""
    value = bindings.get(expr) if isinstance(expr, relax.Var) else None
    return value if isinstance(value, relax.Call) and value.op == ir.Op.get(op) else None


def scalar_constant(expr: relax.Expr) -> float | int | None:
    """The value of a one-element constant, None for anything else."""
    if isinstance(expr, ir.expr.Constant) and expr.value.numpy().size == 1:
        return expr.value.numpy().item()
    return None


def is_one(dim: tirx.PrimExpr) -> bool:
    """``dim`` is the static size 1."""
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def same_shape(a: list[tirx.PrimExpr], b: list[tirx.PrimExpr]) -> bool:
    """Whether two shapes are provably equal (symbolic sizes included)."""
    analyzer = Analyzer()
    return len(a) == len(b) and all(analyzer.can_prove_equal(x, y) for x, y in zip(a, b))


def shape_product(dims: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The product of (a non-empty list of) sizes."""
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out


def bound_call(mutator: relax.PyExprMutator, expr: relax.Expr, op: str) -> relax.Call | None:
    """The call of ``op`` bound to the variable ``expr`` in the function ``mutator`` rewrites, if it is one."""
    bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    return bound if isinstance(bound, relax.Call) and bound.op == ir.Op.get(op) else None


def kernel_kind(mod: tvm.IRModule, callee: relax.Expr) -> str | None:
    """Which of our kernels ``callee`` (a ``call_tir``'s first argument) is, if any."""
    func = mod.functions.get(callee) if isinstance(callee, ir.GlobalVar) else None
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
        return None
    return str(func.attrs[KERNEL_ATTR])


def kernel_calls(func: relax.Function, mod: tvm.IRModule, kind: str) -> list[relax.Call]:
    """The calls in ``func`` of our kernels of ``kind``, in visiting order."""
    calls = []

    def visit(expr: relax.Expr) -> None:
        if (isinstance(expr, relax.Call) and expr.op == ir.Op.get("relax.call_tir")
                and kernel_kind(mod, expr.args[0]) == kind):
            calls.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return calls


def kernel_call(mutator: relax.PyExprMutator, expr: relax.Expr, kind: str | tuple[str, ...]) -> relax.Call | None:
    """The ``call_tir`` of our kernel ``kind`` (or of one of the kinds) bound to ``expr``, if it is one."""
    call = bound_call(mutator, expr, "relax.call_tir")
    kinds = (kind,) if isinstance(kind, str) else kind
    if call is None or kernel_kind(mutator.builder_.get(), call.args[0]) not in kinds:
        return None
    return call


class KernelTable:
    """Adds each distinct kernel (by key) to the module being built once, under a readable name. Kernels carry
    no ``global_symbol`` (the build gives them one from their name), so that dead-code elimination removes
    those a later pass stops calling."""

    def __init__(self, builder: relax.BlockBuilder) -> None:
        self.builder = builder
        self.kernels: dict[tuple, ir.GlobalVar] = {}

    def get(self, key: tuple, name: str, make: Callable[[], tirx.PrimFunc]) -> ir.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder.add_func(make().without_attr("global_symbol"), name)
        return self.kernels[key]


def kernel_variant(func: tirx.PrimFunc, params: list, statements: list[tirx.Stmt],
                   bindings: list[tirx.Stmt] | None = None) -> tirx.PrimFunc:
    """``func`` with the parameters ``params``, its body after ``statements`` (declarations) and those after
    ``bindings``, with variables of its own (not the original's). A scheduled kernel's body stays its root block
    (as TVM's analyses of scheduled kernels expect), the statements inside it, the bindings before it (its
    buffers may use them)."""
    body, bindings, inside = func.body, list(bindings or []), False
    if isinstance(body, s_tir.SBlockRealize):
        root = body.block
        sizes = {v for buffer in root.alloc_buffers for dim in buffer.shape
                 for v in tirx.analysis.undefined_vars(dim)}
        inside = not any(b.var in sizes for b in bindings)  # in the block where none of its buffers needs them
        block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint,
                             tirx.SeqStmt([*(bindings if inside else []), *statements, root.body]), root.init,
                             root.alloc_buffers, root.match_buffers, root.annotations, root.span)
        body = s_tir.SBlockRealize(body.iter_values, body.predicate, block, body.span)
    else:
        body = tirx.SeqStmt([*statements, body])
    if bindings and not inside:
        body = tirx.SeqStmt([*bindings, body])
    return s_tir.renew_defs(tirx.PrimFunc(params, body, func.ret_type, func.attrs, func.span))


def with_kernel_variant(call: relax.Call, mod: tvm.IRModule, kernels: KernelTable,
                        argument: Callable[[relax.Expr], tuple[relax.Expr, Any] | None],
                        variant: Callable[[tirx.PrimFunc, dict[int, Any]], tirx.PrimFunc | None],
                        key: Callable[[dict[int, Any]], tuple]) -> relax.Expr:
    """``call``, a ``call_tir`` (or ``call_tir_inplace``) of a kernel of ``mod``, calling a variant of the kernel
    that takes some arguments from elsewhere: ``argument(arg)`` gives an argument's replacement and what the
    variant needs to know of it (or None), ``variant(kernel, {index: that})`` the variant (None where it cannot be
    made), added once per ``key({index: that})``. ``call`` itself where no argument is replaced or no variant
    made."""
    if call.op not in (ir.Op.get("relax.call_tir"), ir.Op.get("relax.call_tir_inplace")) or not isinstance(
            call.args[1], relax.Tuple):
        return call
    func = mod.functions.get(call.args[0])
    if not isinstance(func, tirx.PrimFunc):
        return call
    args, found = list(call.args[1].fields), {}
    for i, arg in enumerate(args):
        replaced = argument(arg)
        if replaced is not None:
            args[i], found[i] = replaced
    made = variant(func, found) if found else None
    if made is None:
        return call
    callee = kernels.get((call.args[0], key(found)), call.args[0].name_hint, lambda: made)
    return relax.Call(call.op, [callee, relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)


def emit_like(builder: relax.BlockBuilder, value: relax.Expr, var: relax.Var) -> relax.Var:
    """``value`` bound under ``var``'s name as ``var`` was bound: inside its dataflow block, as one of the block's
    outputs, or outside a dataflow block."""
    if not isinstance(var, relax.DataflowVar) and builder.current_block_is_dataflow():
        return builder.emit_output(value, var.name)
    return builder.emit(value, var.name)


def rewrite_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule, before=None,
                      drop_dead: bool = True) -> tvm.IRModule:
    """Every Relax function of ``mod`` rewritten by ``mutator`` (``before(gv, func)`` first, if given), then, with
    ``drop_dead``, the bindings and kernels the rewrite left unused removed."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            if before is not None:
                before(gv, func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    mod = mutator.builder_.get()
    return relax.transform.DeadCodeElimination()(mod) if drop_dead else mod
