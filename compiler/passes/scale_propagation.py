"""Scale Propagation: turn a Relax graph with quantize/dequantize ops into one where integers flow from op
to op (Lin et al., 2020), carrying each tensor's scale instead of dequantizing.

The pass walks every dataflow binding and keeps, for each float variable that is *a dequantized integer
tensor*, the pair (integer tensor, scale). A scale is a NumPy array broadcastable to the tensor (a compile-
time constant: per tensor, or per channel for weights) or a Relax expression (run-time ranges). Rules:

* ``dequantize(q, s)`` and ``astype(q:int, float32) * s``  -> (q, s)
* ``matmul((a, sa), (b, sb))`` -> ``matmul(a, b, out_dtype=int32)`` with scale ``sa * sb`` when neither
  scale varies along the reduction axis (int8 x int8 -> int32); a scale of 1 (softmax·V's values with
  run-time ranges, their scales folded into the probabilities) leaves the other, and two run-time scales are
  multiplied into the float value one after the other (one fused kernel instead of their product's and its own)
* ``add((acc, s), bias)`` -> bias folded into int32 (``round(bias / s)``); ``add((a, sa), (b, sb))`` with
  constant per-tensor scales -> integer addition after aligning both to the finer scale
* ``quantize(clip((x, s)), s')`` -> requantization by an integer multiplier and shift (no float math);
  equal scales cancel the pair, and the clip too where the integers are known to be in range (made by a
  clip, or int8 entry-point parameters: the caches, which int8mt's entry points fill with requantized values
  within +-127); a chain of two requantizations folds into one from the first integer tensor (rounding
  once, so it can differ by one step from rounding twice, towards the exact value)
* reshape, permute_dims, take, strided_slice, concat (equal scales), relu, max (reduction), maximum and
  where (masking; operands with one scale, or constants on its grid such as 0) and multiplication by a
  positive constant keep integers and transform the scale; a broadcast_to its own shape is dropped
* with ``integer_softmax``: ``softmax((q, S) [+ mask])`` with a constant ``S`` -> integer probabilities
  (:mod:`int8mt.quant.int_softmax`; the float mask joins the scores' integer grid)
* with ``integer_layer_norm``: a residual ``add`` with an integer addend -> int64 on a fixed grid, and
  ``layer_norm`` of it -> integers (:mod:`int8mt.quant.int_layer_norm`)
* anything else (softmax, layer norm, masking with -inf, ...) receives the dequantized float value.

Every rewritten binding keeps a float twin (``astype(q) * s``) for consumers that need floats; dead-code
elimination afterwards removes the twins nobody uses, so dequantization remains only where needed.

Contract. The pass handles symmetric int8 quantization as int8mt's importer emits it: ``quantize`` to
``int8`` and ``dequantize`` of ``int8``, each with a constant zero point of 0 and a constant scale (per
tensor, or per channel along the op's axis). A ``quantize``/``dequantize`` outside that (a non-zero or
run-time zero point, ``uint8``, ``int4``, ``int16``, ...) is *declined*: left as it is, so the graph stays
correct and that value stays in float. With ``strict=True`` (the compile pipeline) such an op raises
:class:`UnsupportedQuantization` instead, since a declined op silently costs integer matmuls. Which op
each rule handles is the table :data:`RULES`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
import tvm_ffi
from tvm import ir, relax
from tvm.relax import PyExprMutator, expr_functor

from int8mt.errors import UserError
from int8mt.quant import int_layer_norm as iln
from int8mt.quant.fixed_point import fixed_point
from int8mt.quant.int_softmax import BIAS_FLOOR, NORM_BITS, PROB_BITS, IntSoftmax
from int8mt.schedules.int_sqrt import isqrt_kernel

from .kernel_calls import same_shape

Scale = np.ndarray | relax.Expr  # a constant scale, or a run-time one

QUANT_DTYPE = "int8"  # the only quantized dtype the rules handle (see the contract above)
INT8_MAX, INT8_MIN = 127, -128
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
BIAS_LIMIT = 2 ** 30  # a folded int32 bias larger than this could overflow the accumulator: kept in float
INT64_GRID_LIMIT = 2 ** 62  # the clip of terms requantized onto the int64 layer-norm grid


@tvm_ffi.register_error
class UnsupportedQuantization(UserError):
    """A quantize/dequantize outside the pass's contract (strict mode); registered with TVM's FFI so that it
    reaches the caller of the pass as itself."""


@dataclass(frozen=True)
class QTensor:
    """A float value known to equal ``astype(data, float32) * scale``."""

    data: relax.Expr
    scale: Scale
    clip: float | None = None  # a symmetric float clip applied to the value, pending a quantize
    requantized: "_Requantized | None" = None  # ``data`` is a requantization of this integer tensor
    factors: tuple[relax.Expr, relax.Expr] | None = None  # a run-time ``scale`` as two factors (see ``_float``)


@dataclass(frozen=True)
class _Requantized:
    """An int8 tensor made by requantizing ``source`` to the range +-``qmax``."""

    source: QTensor
    qmax: int


@dataclass(frozen=True)
class _Biased:
    """``float(scores) + bias``: integer scores plus a float additive bias (a mask), pending a softmax."""

    scores: QTensor
    bias: relax.Expr


@dataclass(frozen=True)
class _Cast:
    """``astype(data, float32)`` of an integer tensor: half of an expanded dequantize."""

    data: relax.Expr


def _ty(expr: relax.Expr):
    return expr.ty


def _dtype(expr: relax.Expr) -> str:
    return str(_ty(expr).dtype)


def _is_int(expr: relax.Expr) -> bool:
    return _dtype(expr).startswith("int")


def _static_shape(expr: relax.Expr) -> list[int | None]:
    shape = _ty(expr).shape
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in shape]


def _const(expr: relax.Expr) -> np.ndarray | None:
    if not isinstance(expr, ir.expr.Constant):
        return None
    return expr.value.numpy() if hasattr(expr.value, "numpy") else np.asarray(expr.value)


def _expand(scale: np.ndarray, rank: int) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    return scale.reshape((1,) * (rank - scale.ndim) + scale.shape) if scale.ndim < rank else scale


def _is_scalar(scale: Scale) -> bool:
    return isinstance(scale, np.ndarray) and scale.size == 1


@expr_functor.mutator
class _Propagator(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, integer_softmax: bool, integer_layer_norm: bool, strict: bool) -> None:
        super().__init__(mod)
        self.integer_softmax, self.integer_layer_norm, self.strict = integer_softmax, integer_layer_norm, strict
        self.isqrt: ir.GlobalVar | None = None
        self.info: dict[relax.Var, QTensor | _Cast | _Biased | _Requantized] = {}
        self.params: set[relax.Var] = set()  # the parameters of the function being rewritten
        self.made: dict[str, list[relax.Var]] = {kind: [] for kind in REWRITES}  # what the rules emitted

    # -- plumbing ------------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        call = binding.value
        if isinstance(call, relax.Call) and isinstance(call.op, ir.Op):
            rule = RULES.get(call.op.name)
            if rule is not None:
                args = [self.visit_expr(a) for a in call.args]
                result = getattr(self, rule)(call, args, binding.var)
                if result is not None:
                    expr, info = result
                    if not isinstance(binding.var, relax.DataflowVar):  # the block's output stays one
                        new_var = self.builder_.emit_output(expr, binding.var.name)
                    elif isinstance(expr, relax.Var) and expr not in self.info:
                        new_var = expr  # an existing integer tensor (a requantization that is the identity)
                    else:
                        new_var = self.builder_.emit(expr, binding.var.name)
                    self.set_var_remap(binding.var, new_var)
                    if info is not None:
                        self.info[new_var] = info
                    return
        super().visit_var_binding_(binding)

    def _get(self, expr: relax.Expr) -> QTensor | _Cast | _Biased | _Requantized | None:
        return self.info.get(expr) if isinstance(expr, relax.Var) else None

    def _qt(self, expr: relax.Expr) -> QTensor | None:
        info = self._get(expr)
        return info if isinstance(info, QTensor) else None

    def _emit(self, expr: relax.Expr) -> relax.Expr:
        return self.builder_.emit(expr)

    def _int_bound(self, expr: relax.Expr) -> int | None:
        """A bound on the magnitude of the integer tensor ``expr``, if one is known: int8 entry-point
        parameters (caches, see the module docstring) are within 127, a clip within its limits, a quantize of a
        symmetric clip within the clip over the scale, and
        take/concat/where/reshape/permute_dims/strided_slice/broadcast_to/astype/max keep a bound."""
        if isinstance(expr, relax.Var):
            if expr in self.params:
                return INT8_MAX if _dtype(expr) == QUANT_DTYPE else None
            expr = self.lookup_binding(expr)
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, ir.Op):
            return None
        name = expr.op.name
        if name == "relax.clip":
            return max(abs(int(v.value)) for v in expr.args[1:3])
        if name == "relax.quantize":  # of a symmetric float clip: at most round(clip / scale)
            clipped = self.lookup_binding(expr.args[0]) if isinstance(expr.args[0], relax.Var) else None
            scale = _const(expr.args[1])
            if (isinstance(clipped, relax.Call) and clipped.op == ir.Op.get("relax.clip") and scale is not None
                    and scale.size == 1 and self._in_contract(expr, QUANT_DTYPE)):
                limit = max(abs(float(v.value)) for v in clipped.args[1:3])
                return int(np.floor(limit / float(scale.reshape(())) + 0.5))
            return None
        if name == "relax.concat" and isinstance(expr.args[0], relax.Tuple):
            bounds = [self._int_bound(f) for f in expr.args[0].fields]
            return None if None in bounds else max(bounds)
        if name == "relax.where":  # the decoder step's keys and values: past ones from the cache, the new one
            bounds = [self._int_bound(a) for a in expr.args[1:]]
            return None if None in bounds else max(bounds)
        if name in ("relax.take", "relax.reshape", "relax.permute_dims", "relax.strided_slice",
                    "relax.broadcast_to", "relax.astype", "relax.max"):
            return self._int_bound(expr.args[0])
        return None

    def _scale_expr(self, scale: Scale) -> relax.Expr:
        if isinstance(scale, np.ndarray):
            value = scale.astype(np.float32)
            return relax.const(float(value.reshape(())) if value.size == 1 else value, "float32")
        return scale

    def _float(self, qt: QTensor) -> relax.Expr:
        """The float value of ``qt`` (its dequantization); dead unless a float consumer uses it."""
        value = relax.op.astype(qt.data, "float32")
        if qt.factors is not None:  # both full-size multiplies: they fuse with the cast into one kernel
            value = relax.op.multiply(self._emit(relax.op.multiply(value, qt.factors[0])), qt.factors[1])
        else:
            value = relax.op.multiply(value, self._scale_expr(qt.scale))
        if qt.clip is not None:
            value = relax.op.clip(self._emit(value), -qt.clip, qt.clip)
        return value

    def _propagated(self, qt: QTensor):
        return self._float(qt), qt

    # -- integer arithmetic --------------------------------------------------------------------
    def _rescale(self, data: relax.Expr, ratio: np.ndarray, lo: int, hi: int, dtype: str) -> relax.Expr:
        """``clip(round_half_up(data * ratio), lo, hi)`` as ``dtype`` with an integer multiplier and shift."""
        ratio = np.asarray(ratio, dtype=np.float64)
        if np.all(ratio == 1.0):
            bound = self._int_bound(data)
            out = data if _dtype(data) == dtype else self._emit(relax.op.astype(data, dtype))
            return out if bound is not None and bound <= min(-lo, hi) else relax.op.clip(out, lo, hi)
        mult, shift = fixed_point(ratio)
        if np.all(shift == shift.flat[0]):
            shift = shift.reshape(-1)[:1].reshape(())
        if np.all(mult == mult.flat[0]):
            mult = mult.reshape(-1)[:1].reshape(())
        x = relax.op.multiply(relax.op.astype(data, "int64"), relax.const(mult, "int64"))
        x = relax.op.add(x, relax.const(np.left_shift(np.int64(1), shift - 1), "int64"))
        x = self._emit(relax.op.right_shift(self._emit(x), relax.const(shift, "int64")))
        self.made["requantize"].append(x)
        return relax.op.astype(relax.op.clip(x, lo, hi), dtype)

    # -- rules (name = relax op name) ----------------------------------------------------------
    def _in_contract(self, call: relax.Call, dtype: str) -> bool:
        """Whether a quantize/dequantize is symmetric (constant zero point 0) over ``int8`` (``dtype`` is its
        integer side); outside the contract it is declined, or raises in strict mode."""
        zero = _const(call.args[2])
        problems = []
        if dtype != QUANT_DTYPE:
            problems.append(f"integer type {dtype} (only {QUANT_DTYPE} is handled)")
        if zero is None or zero.any():
            problems.append("a zero point that is not a constant 0 (only symmetric quantization is handled)")
        if problems and self.strict:
            raise UnsupportedQuantization(f"Scale Propagation cannot turn {call.op.name} with "
                                          f"{' and '.join(problems)} into integer arithmetic; quantize "
                                          "symmetrically to int8, or leave this matmul in FP32 (--keep-fp32)")
        return not problems

    def _dequantize(self, call, args, var):
        scale = _const(args[1])
        if not self._in_contract(call, _dtype(args[0])) or scale is None:
            return None
        rank, axis = _ty(args[0]).ndim, int(call.attrs.axis)
        shape = [1] * rank
        if scale.size > 1:
            shape[axis % rank] = scale.size
        origin = self._get(args[0])
        requantized = origin if isinstance(origin, _Requantized) else None
        return (relax.Call(call.op, args, call.attrs),
                QTensor(args[0], scale.astype(np.float64).reshape(shape), requantized=requantized))

    def _astype(self, call, args, var):
        if _is_int(args[0]) and _dtype(var) == "float32":
            return relax.op.astype(args[0], "float32"), _Cast(args[0])
        return None

    def _multiply(self, call, args, var):
        for a, b in (args, args[::-1]):
            info, const = self._get(a), _const(b)
            if isinstance(info, _Cast) and not _is_int(b):
                scale = const.astype(np.float64) if const is not None else b
                return relax.op.multiply(a, b), QTensor(info.data, scale)
            if isinstance(info, QTensor) and const is not None and const.size == 1 and float(const) > 0:
                c = float(const.reshape(()))
                scale = (info.scale * c if isinstance(info.scale, np.ndarray)
                         else self._emit(relax.op.multiply(info.scale, relax.const(c, "float32"))))
                return self._propagated(replace(info, scale=scale, clip=None, factors=None))
        return None

    def _clip(self, call, args, var):
        qt = self._qt(args[0])
        lo, hi = (float(v.value) for v in args[1:3])
        if qt is None or qt.clip is not None or lo != -hi:
            return None
        return self._propagated(replace(qt, clip=hi))

    def _quantize(self, call, args, var):
        if not self._in_contract(call, str(call.attrs.out_dtype)):
            return None
        qt, target = self._qt(args[0]), _const(args[1])
        if qt is None or target is None or target.size != 1 or not isinstance(qt.scale, np.ndarray):
            return None
        target = float(target.reshape(()))
        qmax = int(round(qt.clip / target)) if qt.clip is not None else INT8_MAX
        lo = -qmax if qt.clip is not None else INT8_MIN
        first = qt.requantized
        if first is not None and float(np.ptp(qt.scale)) == 0.0:
            # a chain int -> int8 (scale s) -> int8 (target): one requantization from the first integer
            # tensor, rounding once, within both ranges
            bound = min(qmax, int(np.floor(first.qmax * float(qt.scale.reshape(-1)[0]) / target + 1e-9)))
            lo, qmax, qt = max(lo, -bound), bound, first.source
        ratio = _expand(qt.scale, _ty(qt.data).ndim) / target
        return self._rescale(qt.data, ratio, lo, qmax, QUANT_DTYPE), _Requantized(qt, qmax)

    def _matmul(self, call, args, var):
        a, b = self._qt(args[0]), self._qt(args[1])
        if a is None or b is None or _dtype(a.data) != QUANT_DTYPE or _dtype(b.data) != QUANT_DTYPE:
            return None
        ra, rb = _ty(a.data).ndim, _ty(b.data).ndim
        if rb < 2 or not (self._flat_along(a.scale, ra, -1) and self._flat_along(b.scale, rb, -2)):
            return None
        acc = self._emit(relax.op.matmul(a.data, b.data, out_dtype="int32"))
        self.made["matmul_int"].append(acc)
        rank = _ty(var).ndim
        if isinstance(a.scale, np.ndarray) and isinstance(b.scale, np.ndarray):
            return self._propagated(QTensor(acc, _expand(a.scale, rank) * _expand(b.scale, rank)))
        if isinstance(b.scale, np.ndarray) and np.all(b.scale == 1.0):  # softmax·V's values, scales folded into a
            return self._propagated(QTensor(acc, a.scale))
        factors = (a.scale, b.scale) if not isinstance(a.scale, np.ndarray) and not isinstance(
            b.scale, np.ndarray) else None  # two run-time scales (QK^T): multiplied into the float value one by one
        scale = self._emit(relax.op.multiply(self._scale_expr(a.scale), self._scale_expr(b.scale)))
        return self._propagated(QTensor(acc, scale, factors=factors))

    @staticmethod
    def _flat_along(scale: Scale, rank: int, axis: int) -> bool:
        """True if ``scale`` does not vary along ``axis`` of a rank-``rank`` tensor."""
        if isinstance(scale, np.ndarray):
            return _expand(scale, rank).shape[axis] == 1
        shape = _static_shape(scale)
        return len(shape) < -axis or shape[axis] == 1

    def _add(self, call, args, var):
        qa, qb = self._qt(args[0]), self._qt(args[1])
        if self.integer_layer_norm:
            residual = self._residual_on_grid(args, qa, qb, var)
            if residual is not None:
                return residual
        if qa is not None and qb is not None:
            return self._add_aligned(qa, qb)
        for qt, other in ((qa, args[1]), (qb, args[0])):
            const = _const(other)
            if qt is not None and const is not None and isinstance(qt.scale, np.ndarray) and qt.clip is None:
                rank = _ty(var).ndim
                if const.ndim > rank or _static_shape(var) != _static_shape(qt.data):
                    return None
                bias = np.round(_expand(const, rank) / _expand(qt.scale, rank))
                if np.abs(bias).max(initial=0) >= BIAS_LIMIT:
                    return None
                data = qt.data if _dtype(qt.data) == "int32" else self._emit(relax.op.astype(qt.data, "int32"))
                out = self._emit(relax.op.add(data, relax.const(bias.astype(np.int32), "int32")))
                return self._propagated(QTensor(out, qt.scale))
            if qt is not None and const is None and _is_scalar(qt.scale) and qt.clip is None:
                return relax.Call(call.op, args, call.attrs), _Biased(qt, other)
        return None

    def _add_aligned(self, qa: QTensor, qb: QTensor):
        if not (_is_scalar(qa.scale) and _is_scalar(qb.scale)) or qa.clip is not None or qb.clip is not None:
            return None
        target = min(float(qa.scale.reshape(-1)[0]), float(qb.scale.reshape(-1)[0]))
        terms = [self._emit(self._rescale(q.data, q.scale.reshape(()) / target, INT32_MIN, INT32_MAX, "int32"))
                 for q in (qa, qb)]
        out = self._emit(relax.op.add(*terms))
        return self._propagated(QTensor(out, np.array(target)))

    def _nn_softmax(self, call, args, var):
        """With ``integer_softmax``: softmax over the last axis of integer scores (plus a float mask) with a
        constant scale -> probabilities in integers (:mod:`int8mt.quant.int_softmax`)."""
        info = self._get(args[0])
        scores = info.scores if isinstance(info, _Biased) else info
        rank = _ty(args[0]).ndim
        if (not self.integer_softmax or not isinstance(scores, QTensor) or scores.clip is not None
                or not _is_scalar(scores.scale) or int(call.attrs.axis) not in (-1, rank - 1)):
            return None
        sm = IntSoftmax.for_scale(float(scores.scale.reshape(-1)[0]))

        def i64(value: int) -> relax.Expr:
            return relax.const(value, "int64")

        q = scores.data if _dtype(scores.data) == "int32" else self._emit(relax.op.astype(scores.data, "int32"))
        if isinstance(info, _Biased):
            grid = relax.op.round(relax.op.multiply(info.bias, relax.const(sm.inv_scale, "float32")))
            grid = self._emit(relax.op.astype(relax.op.clip(self._emit(grid), BIAS_FLOOR, -BIAS_FLOOR), "int32"))
            q = self._emit(relax.op.add(q, grid))
        d = self._emit(relax.op.astype(relax.op.subtract(q, relax.op.max(q, axis=[-1], keepdims=True)), "int64"))
        if sm.upshift:
            d = self._emit(relax.op.left_shift(d, i64(sm.upshift)))
        z = self._emit(relax.op.floor_divide(relax.op.negative(d), i64(sm.ln2)))
        t = self._emit(relax.op.add(relax.op.add(d, relax.op.multiply(z, i64(sm.ln2))), i64(sm.b)))
        poly = self._emit(relax.op.add(relax.op.multiply(t, t), i64(sm.c)))
        e = self._emit(relax.op.right_shift(poly, relax.op.minimum(relax.op.add(z, i64(sm.shift)), i64(62))))
        recip = self._emit(relax.op.floor_divide(i64(1 << NORM_BITS), relax.op.sum(e, axis=[-1], keepdims=True)))
        self.made["softmax_int"].append(recip)
        half = i64(1 << (NORM_BITS - PROB_BITS - 1))
        prob = relax.op.floor_divide(relax.op.add(relax.op.multiply(e, recip), half), i64(1 << (NORM_BITS - PROB_BITS)))
        prob = self._emit(relax.op.astype(self._emit(prob), "int32"))
        return self._propagated(QTensor(prob, np.array(2.0 ** -PROB_BITS)))

    def _residual_on_grid(self, args, qa: QTensor | None, qb: QTensor | None, var):
        """A residual sum of same-shaped addends, at least one integer with a constant scale, as int64 on the
        layer-norm input grid (:mod:`int8mt.quant.int_layer_norm`); a float addend is scaled by a power of
        two and rounded (exact scaling), integer ones are requantized onto the grid."""
        if qa is None and qb is None:
            return None
        terms = []
        for arg, qt in zip(args, (qa, qb)):
            if not same_shape(list(_ty(arg).shape), list(_ty(var).shape)) or _const(arg) is not None:
                return None
            if qt is None:
                if self._get(arg) is not None or _dtype(arg) != "float32":
                    return None
                scaled = relax.op.round(relax.op.multiply(arg, relax.const(1.0 / iln.INPUT_SCALE, "float32")))
                terms.append(self._emit(relax.op.astype(self._emit(scaled), "int64")))
            elif isinstance(qt.scale, np.ndarray) and qt.clip is None:
                ratio = _expand(qt.scale, _ty(qt.data).ndim) / iln.INPUT_SCALE
                terms.append(self._emit(self._rescale(qt.data, ratio, -INT64_GRID_LIMIT, INT64_GRID_LIMIT, "int64")))
            else:
                return None
        return self._propagated(QTensor(self._emit(relax.op.add(*terms)), np.array(iln.INPUT_SCALE)))

    def _nn_layer_norm(self, call, args, var):
        """With ``integer_layer_norm``: layer norm of a residual sum on the integer grid, in integers."""
        qt = self._qt(args[0])
        gamma, beta = _const(args[1]), _const(args[2])
        if (not self.integer_layer_norm or qt is None or gamma is None or beta is None or qt.clip is not None
                or not _is_scalar(qt.scale) or float(qt.scale.reshape(-1)[0]) != iln.INPUT_SCALE
                or [int(a) for a in call.attrs.axes] not in ([-1], [_ty(qt.data).ndim - 1])):
            return None
        ln = iln.IntLayerNorm.for_params(gamma, beta, float(call.attrs.epsilon))

        def i64(value) -> relax.Expr:
            return relax.const(value, "int64")

        n = i64(int(_ty(qt.data).shape[-1]))
        x = qt.data
        mean = relax.op.floor_divide(relax.op.sum(x, axis=[-1], keepdims=True), n)
        centred = self._emit(relax.op.subtract(x, mean))
        square = relax.op.sum(relax.op.multiply(centred, centred), axis=[-1], keepdims=True)
        var_ = self._emit(relax.op.add(relax.op.floor_divide(self._emit(square), n), i64(ln.eps)))
        y = self._emit(relax.op.floor_divide(relax.op.left_shift(centred, i64(iln.NORM_BITS)), self._isqrt(var_)))
        out = relax.op.add(relax.op.multiply(y, relax.const(ln.gamma, "int64")), relax.const(ln.beta, "int64"))
        return self._propagated(QTensor(self._emit(out), np.array(iln.OUTPUT_SCALE)))

    def _isqrt(self, value: relax.Expr) -> relax.Expr:
        """floor(sqrt(value)) of an int64 [..., 1] tensor by the isqrt kernel (on the rows, flattened)."""
        if self.isqrt is None:
            self.isqrt = self.builder_.add_func(isqrt_kernel(iln.SQRT_START, iln.SQRT_STEPS), "int8mt_isqrt")
        shape = list(_ty(value).shape)
        rows = shape[0]
        for d in shape[1:]:
            rows = rows * d
        flat = self._emit(relax.op.reshape(value, [rows]))
        root = self._emit(relax.call_tir(self.isqrt, [flat], relax.TensorType([rows], "int64")))
        self.made["layer_norm_int"].append(root)
        return self._emit(relax.op.reshape(root, shape))

    def _nn_relu(self, call, args, var):
        qt = self._qt(args[0])
        if qt is None or qt.clip is not None:
            return None
        return self._propagated(QTensor(self._emit(relax.op.nn.relu(qt.data)), qt.scale))

    def _on_integers(self, call, args, var):
        """Ops that pick or reduce elements (``take``, ``strided_slice``, a ``max`` reduction) of an integer
        tensor with one scale: the same op on its integers, the same scale."""
        qt = self._qt(args[0])
        if qt is None or qt.clip is not None or not _is_scalar(qt.scale):
            return None
        data = self._emit(relax.Call(call.op, [qt.data, *args[1:]], call.attrs))
        return self._propagated(QTensor(data, qt.scale.reshape(())))

    def _same_grid(self, args) -> tuple[list[relax.Expr], np.ndarray] | None:
        """Operands as integers on one grid: integer tensors with one and the same scale, and float constants
        that are whole multiples of it (0 as the value of masked positions)."""
        parts = [self._qt(a) for a in args]
        tensors = [p for p in parts if p is not None]
        if not tensors or any(p.clip is not None or not _is_scalar(p.scale) for p in tensors):
            return None
        scale = float(tensors[0].scale.reshape(()))
        if any(float(p.scale.reshape(())) != scale for p in tensors) or len({_dtype(p.data) for p in tensors}) != 1:
            return None
        dtype, out = _dtype(tensors[0].data), []
        for arg, part in zip(args, parts):
            if part is not None:
                out.append(part.data)
                continue
            const = _const(arg)
            if const is None or const.size != 1 or float(const) / scale != round(float(const) / scale):
                return None
            out.append(relax.const(int(round(float(const) / scale)), dtype))
        return out, np.array(scale)

    def _maximum(self, call, args, var):
        grid = self._same_grid(args)
        if grid is None:
            return None
        (a, b), scale = grid
        return self._propagated(QTensor(self._emit(relax.op.maximum(a, b)), scale))

    def _where(self, call, args, var):
        """Masking: ``where(cond, x, y)`` of integer tensors on one grid (or a constant such as 0)."""
        grid = self._same_grid(args[1:])
        if grid is None:
            return None
        (a, b), scale = grid
        return self._propagated(QTensor(self._emit(relax.op.where(args[0], a, b)), scale))

    def _permute_dims(self, call, args, var):
        qt = self._qt(args[0])
        if qt is None or qt.clip is not None:
            return None
        rank = _ty(qt.data).ndim
        axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else list(range(rank))[::-1]
        if isinstance(qt.scale, np.ndarray):
            scale = np.transpose(_expand(qt.scale, rank), axes)
        elif _ty(qt.scale).ndim == rank:
            scale = self._emit(relax.op.permute_dims(qt.scale, axes))
        else:
            return None
        return self._propagated(QTensor(self._emit(relax.op.permute_dims(qt.data, axes)), scale))

    def _broadcast_to(self, call, args, var):
        qt = self._qt(args[0])
        same = same_shape(list(_ty(var).shape), list(_ty(args[0]).shape))
        if qt is None or qt.clip is not None or not (same or _is_scalar(qt.scale)):
            return None
        data = qt.data if same else self._emit(relax.op.broadcast_to(qt.data, args[1]))
        return self._propagated(QTensor(data, qt.scale))

    def _reshape(self, call, args, var):
        qt = self._qt(args[0])
        if qt is None or qt.clip is not None:
            return None
        new_shape = _static_shape(var)
        if not isinstance(qt.scale, np.ndarray):
            return self._reshape_rows(qt, args[1], var)
        scale = _expand(qt.scale, _ty(qt.data).ndim)
        if scale.size == 1:
            new_scale = scale.reshape(())
        else:
            varying = [i for i, n in enumerate(scale.shape) if n != 1]
            if varying != [scale.ndim - 1]:
                return None
            n = scale.shape[-1]
            new_scale = None
            for k in range(len(new_shape)):
                tail = new_shape[k:]
                if None not in tail and int(np.prod(tail)) == n:
                    new_scale = scale.reshape([1] * k + tail)
                    break
            if new_scale is None:
                return None
        return self._propagated(QTensor(self._emit(relax.op.reshape(qt.data, args[1])), new_scale))

    def _reshape_rows(self, qt: QTensor, shape: relax.Expr, var: relax.Var):
        """Reshape with a run-time scale (same rank as the data) that only merges or splits leading
        dimensions: the scale's trailing dimensions stay, its leading ones follow the data's (and so do its
        factors')."""
        if not isinstance(shape, relax.ShapeExpr):
            return None
        old, new = list(_ty(qt.data).shape), list(_ty(var).shape)
        scales = [self._reshaped_scale(scale, old, new, shape) for scale in (qt.scale, *(qt.factors or ()))]
        if any(scale is None for scale in scales):
            return None
        return self._propagated(QTensor(self._emit(relax.op.reshape(qt.data, shape)), scales[0],
                                        factors=tuple(scales[1:]) or None))

    def _reshaped_scale(self, scale: relax.Expr, old: list, new: list, shape: relax.ShapeExpr) -> relax.Expr | None:
        scale_shape = list(_ty(scale).shape)
        if len(scale_shape) != len(old):
            return None
        for k in (2, 1):
            if len(old) <= k or len(new) <= k or not same_shape(old[-k:], new[-k:]):
                continue
            lead_equal = same_shape(scale_shape[:-k], old[:-k])
            lead_ones = all(isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in scale_shape[:-k])
            if not (lead_equal or lead_ones):
                continue
            lead = list(shape.values)[:-k] if lead_equal else [1] * (len(new) - k)
            return self._emit(relax.op.reshape(scale, relax.ShapeExpr([*lead, *scale_shape[-k:]])))
        return None

    def _concat(self, call, args, var):
        fields = args[0].fields if isinstance(args[0], relax.Tuple) else None
        if fields is None:
            return None
        parts = [self._qt(f) for f in fields]
        if any(p is None or p.clip is not None or not _is_scalar(p.scale) for p in parts):
            return None
        scales = {float(p.scale.reshape(())) for p in parts}
        if len(scales) != 1 or len({_dtype(p.data) for p in parts}) != 1:
            return None
        data = self._emit(relax.op.concat([p.data for p in parts], axis=int(call.attrs.axis)))
        return self._propagated(QTensor(data, np.array(scales.pop())))


# What the pass counts of its own work, per function, in the ``int8mt.rewrites`` attribute: integer matmuls,
# requantizations (integer multiply, round, shift), integer softmaxes and integer layer norms.
REWRITES = ("matmul_int", "requantize", "softmax_int", "layer_norm_int")
REWRITES_ATTR = "int8mt.rewrites"

# op -> the rule (a method of _Propagator) that rewrites it; ops not listed receive dequantized floats
RULES: dict[str, str] = {
    "relax.dequantize": "_dequantize",
    "relax.quantize": "_quantize",
    "relax.astype": "_astype",
    "relax.multiply": "_multiply",
    "relax.clip": "_clip",
    "relax.matmul": "_matmul",
    "relax.add": "_add",
    "relax.nn.softmax": "_nn_softmax",
    "relax.nn.layer_norm": "_nn_layer_norm",
    "relax.nn.relu": "_nn_relu",
    "relax.maximum": "_maximum",
    "relax.where": "_where",
    "relax.permute_dims": "_permute_dims",
    "relax.broadcast_to": "_broadcast_to",
    "relax.reshape": "_reshape",
    "relax.concat": "_concat",
    "relax.take": "_on_integers",
    "relax.strided_slice": "_on_integers",
    "relax.max": "_on_integers",
}


@tvm.transform.module_pass(opt_level=0, name="int8mt.ScalePropagation")
class ScalePropagation:
    """Rewrite quantize/dequantize round trips into integer ops (see the module docstring), share equal ops
    (one quantize of a layer-norm output for Q, K and V when their scales are equal, as with calibrated or
    run-time ranges), then drop the float values no one uses. With ``integer_softmax``, softmaxes of integer
    scores with constant scales run in integers too (polynomial exp, integer normalisation); with
    ``integer_layer_norm``, residual sums and the layer norms after them (integer square root). Ops outside
    the contract (module docstring) are declined, or raise :class:`UnsupportedQuantization` with ``strict``."""

    def __init__(self, integer_softmax: bool = False, integer_layer_norm: bool = False, strict: bool = False) -> None:
        self.integer_softmax, self.integer_layer_norm, self.strict = integer_softmax, integer_layer_norm, strict

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        propagator = _Propagator(mod, self.integer_softmax, self.integer_layer_norm, self.strict)
        made = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                propagator.params = set(func.params)
                propagator.made = {kind: [] for kind in REWRITES}
                propagator.builder_.update_func(gv, propagator.visit_expr(func))
                made[gv] = propagator.made
        shared = relax.transform.EliminateCommonSubexpr()(propagator.builder_.get())
        out = relax.transform.DeadCodeElimination()(shared)
        for gv, kinds in made.items():
            kept = _computed_vars(out[gv])  # what common-subexpression and dead-code elimination left
            out[gv] = out[gv].with_attr(REWRITES_ATTR, {k: sum(v in kept for v in vs) for k, vs in kinds.items()})
        return out


def _computed_vars(func: relax.Function) -> set[relax.Var]:
    """The variables ``func`` binds to a computation (not to another variable)."""
    return {b.var for block in func.body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding) and not isinstance(b.value, relax.Var)}
