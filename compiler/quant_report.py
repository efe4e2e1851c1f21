"""What a Relax module computes in integers and in floats: the numbers behind ``int8mt inspect``."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

import tvm
from tvm import ir, relax

from int8mt.schedules.database import TileChooser
from int8mt.schedules.int8_dense import dense_attrs, dense_kind
from int8mt.schedules.intrin import dense_dot

from .passes.kernel_calls import kernel_calls
from .passes.scale_propagation import REWRITES_ATTR

# Why the float ops that remain after scale propagation need floats.
FLOAT_REASONS = {
    "relax.nn.softmax": "exp and normalisation of attention scores",
    "relax.nn.layer_norm": "mean/variance normalisation",
    "relax.exp": "exponential (the log-sum-exp of the logits)",
    "relax.nn.gelu": "FFN activation (erf)",
    "relax.nn.silu": "FFN activation (sigmoid)",
    "relax.add": "residual connections, positions and masks added to float values",
    "relax.multiply": "dequantization and embedding scaling",
    "relax.divide": "run-time scales and quantization of float values",
    "relax.clip": "clipping float values before quantization",
    "relax.round": "rounding float values when quantizing at run time",
    "relax.max": "row maxima: run-time ranges, the log-sum-exp of the logits",
    "relax.abs": "run-time range (largest magnitude) of float values",
    "relax.maximum": "run-time range (largest magnitude) of float values",
    "relax.matmul": "matmuls left in FP32",
    "relax.subtract": "log-sum-exp of the logits (beam search's candidates)",
    "relax.sum": "log-sum-exp of the logits (beam search's candidates)",
    "relax.log": "log-sum-exp of the logits (beam search's candidates)",
}
LAYOUT_OPS = {"relax.reshape", "relax.permute_dims", "relax.concat", "relax.take", "relax.expand_dims",
              "relax.strided_slice", "relax.squeeze", "relax.astype"}


def _dtype(expr: relax.Expr) -> str:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def op_report(mod: tvm.IRModule) -> dict:
    """Counts per entry function and in total: matmuls (integer/float), quantize, dequantize, the float
    compute ops left (by op, with the reason) and the bytes of constants by dtype; after Scale Propagation
    also its requantizations, integer softmaxes and layer norms, as the pass counted them."""
    functions = {}
    constant_bytes: Counter = Counter()
    seen_constants: list[relax.Expr] = []  # a weight used by two functions is counted once
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        counts: Counter = Counter()
        float_ops: Counter = Counter()

        def visit(expr: relax.Expr) -> None:
            if isinstance(expr, ir.expr.Constant) and not any(expr.same_as(c) for c in seen_constants):
                seen_constants.append(expr)
                value = expr.value.numpy() if hasattr(expr.value, "numpy") else np.asarray(expr.value)
                if value.size > 1:
                    constant_bytes[str(value.dtype)] += value.nbytes
            if not isinstance(expr, relax.Call) or not isinstance(expr.op, ir.Op):
                return
            name, out = expr.op.name, _dtype(expr)
            ins = [_dtype(a) for a in expr.args if isinstance(a.ty, relax.TensorType)]
            if name == "relax.matmul":
                counts["matmul_int" if ins and all(_is_int(d) for d in ins) else "matmul_float"] += 1
            if name == "relax.quantize" or (name == "relax.astype" and _is_int(out) and ins and ins[0] == "float32"):
                counts["quantize"] += 1
            elif name == "relax.dequantize" or (name == "relax.astype" and out == "float32" and ins
                                                 and _is_int(ins[0]) and ins[0] != "bool"):
                counts["dequantize"] += 1
            if out.startswith("float") and name not in LAYOUT_OPS and name not in ("relax.quantize", "relax.dequantize"):
                float_ops[name] += 1

        relax.analysis.post_order_visit(func, visit)
        rewrites = func.attrs.get(REWRITES_ATTR) if func.attrs is not None else None
        if rewrites is not None:  # what Scale Propagation counted of its own work
            counts.update({kind: int(n) for kind, n in rewrites.items() if kind != "matmul_int" and int(n)})
        functions[gv.name_hint] = {**counts, "float_ops": dict(float_ops)}
    total: Counter = Counter()
    float_total: Counter = Counter()
    for f in functions.values():
        total.update({k: v for k, v in f.items() if k != "float_ops"})
        float_total.update(f["float_ops"])
    return {
        "functions": functions,
        "total": dict(total),
        "float_ops": {k: {"count": v, "why": FLOAT_REASONS.get(k, "")} for k, v in float_total.most_common()},
        "constant_bytes": dict(constant_bytes),
    }


def _entry_functions(mod: tvm.IRModule) -> list[tuple[ir.GlobalVar, relax.Function]]:
    """The module's entry points (public Relax functions; not the composites a fusion pass adds)."""
    return [(gv, f) for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]


def attention_kernel_calls(mod: tvm.IRModule) -> dict[str, int]:
    """Per entry function, the calls of the batched int8 (attention) kernels."""
    return {gv.name_hint: len(kernel_calls(func, mod, "int8_batch_matmul")) for gv, func in _entry_functions(mod)}


def dense_kernel_report(mod: tvm.IRModule, tiles: TileChooser) -> list[dict]:
    """Per entry function and weight shape, the dense kernel of ``tiles``' kind (int8, or float32 for FP32 layers)
    the module calls: how often, its tiles, dot product, the row bucket they were chosen for and whether a tuning
    run found them."""
    rows = {}
    kind = dense_kind(dense_dot(tiles.family))
    for gv, func in _entry_functions(mod):
        for call in kernel_calls(func, mod, kind):
            n, k, chosen, family = dense_attrs(mod[call.args[0]])
            choice = tiles.choice(n, k, gv.name_hint)
            dot = dense_dot(family)
            row = rows.setdefault((gv.name_hint, n, k), {
                "function": gv.name_hint, "n": n, "k": k, "calls": 0, "rows_tuned_for": choice.task.rows,
                "tiles": chosen.to_dict(), "tuned": choice.tuned and choice.tiles == chosen, "dot": family,
                "block": [dot.lanes, dot.reduce]})
            row["calls"] += 1
    return list(rows.values())


def untuned_kernels_warning(kernels: list[dict], preset: str, bundle: Path, remote: bool = False,
                            kind: str = "int8") -> str | None:
    """What a build says when some of its ``kind`` (int8 or float32) dense kernels got default tiles: which, their
    share of those multiply-adds, and the commands that tune exactly those (``remote``: on a board, through an RPC
    tracker); None when every kernel is tuned."""
    untuned = [k for k in kernels if not k["tuned"]]
    if not untuned:
        return None
    work = sum(k["calls"] * k["n"] * k["k"] for k in kernels)
    share = sum(k["calls"] * k["n"] * k["k"] for k in untuned) / work
    shapes = ", ".join(f"{k['n']}x{k['k']} in {k['function']}" for k in untuned)
    return (f"int8mt: warning: {len(untuned)} of {len(kernels)} {kind} dense kernels have no tuned tiles for {preset} "
            f"and run with default ones, which are usually slower ({shapes}; {share:.0%} of the {kind} "
            f"multiply-adds). Tune exactly these: int8mt tune {bundle} --target {preset} --untuned-only --db DIR"
            f"{' --rpc HOST:PORT:KEY (a board of the target, through a TVM RPC tracker)' if remote else ''}, then "
            "compile again with --db DIR (kernels DIR lacks keep the shipped tiles)")
