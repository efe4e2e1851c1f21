"""Row kernels for GPUs: layer norms and quantizations written with the very ops the graph legalizes to (any target
computes the graph's values), each scheduled as one kernel.

* Run-time ranges quantize every linear layer's input per row: a reduction (the row's largest magnitude), the
  scale and the int8 values, three kernels as TVM fuses the graph's ops on a GPU, some 40 launches per decoder
  step of the reference model. :func:`quantize_rows_function` is the three as one function.
* Static ranges quantize one tensor several times (a layer norm's output for the queries, keys and values, each
  with its own range): :func:`static_quantizations_function` computes them all in one loop over the tensor,
  which dlight's default GPU schedule makes one kernel.
* A post-LN Transformer's layer norm feeds both the residual and the next linear layer's quantizations, so TVM
  fuses neither into it (two kernels, the normalized tensor written and read back between them):
  :func:`layer_norm_rows_function` is the layer norm and the quantizations of its result as one function.
* With run-time ranges the cache's appends quantize a step's keys and values per head themselves
  (:func:`~int8mt.schedules.append_rows.append_quantized_rows_kernel`): a row per plane, row and head.

:class:`CUDARows` schedules the row functions (:data:`ROW_KERNELS`): a thread block per row, its threads reducing
across the block (warp shuffles), keeping the row's intermediate values in shared memory (behind barriers) and
writing the outputs.
"""
from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir, te, tirx, topi
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from .append_rows import APPEND_QUANTIZED_ROWS
from .kernel_attrs import KERNEL_ATTR
from .layer_norm_rows import RowQuantize, StaticQuantize
from .quantize_rows import OPAQUE, leading_rows

QUANTIZE_ROWS = "quantize_rows_graph"
LAYER_NORM_ROWS = "layer_norm_rows_graph"
ROW_KERNELS = (QUANTIZE_ROWS, LAYER_NORM_ROWS, APPEND_QUANTIZED_ROWS)
ROW_QUANTIZE_ATTR = "int8mt.row_quantize"  # a row quantization function's qmax and eps
WARP = 32
MAX_THREADS = 256  # threads per row


def _rows(rank: int, columns: int | None) -> te.Tensor:
    """A float32 input of ``rank`` dimensions of any size, the last of ``columns`` elements (None: any number)."""
    lead, _ = leading_rows(rank)
    return te.placeholder((*lead, columns if columns is not None else tirx.Var("columns", "int64")), "float32", "x")


def _row_quantization(x: te.Tensor, quantize: RowQuantize) -> list[te.Tensor]:
    """``[q, s]`` of ``x`` quantized per row as the graph's ops compute it."""
    magnitude = topi.max(topi.abs(x), axis=-1, keepdims=True)
    scale = topi.divide(topi.maximum(magnitude, tirx.const(quantize.eps, "float32")),
                        tirx.const(quantize.qmax, "float32"))
    q = topi.cast(topi.clip(topi.round(topi.divide(x, scale)), -quantize.qmax, quantize.qmax), "int8")
    s = te.compute(scale.shape, lambda *i: scale(*i), name="scale_out")  # the output: the kernel keeps `scale`
    return [q, s]


def _static_quantizations(x: te.Tensor, quantizations: Sequence[StaticQuantize]) -> list[te.Tensor]:
    """Each of ``quantizations`` of ``x`` as TVM legalizes ``clip`` and ``quantize``, in one loop nest."""

    def quantized(*index: tirx.PrimExpr) -> list[tirx.PrimExpr]:
        values = []
        for q in quantizations:
            clipped = te.max(te.min(x(*index), tirx.const(q.hi, "float32")), tirx.const(q.lo, "float32"))
            rounded = te.round(clipped / tirx.const(q.scale, "float32")) + tirx.IntImm("int8", 0)
            values.append(te.max(te.min(rounded, tirx.max_value("int8")), tirx.min_value("int8")).astype("int8"))
        return values

    outputs = te.compute(x.shape, quantized, name="quantized")
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def quantize_rows_function(rank: int, columns: int | None, qmax: float, eps: float) -> tirx.PrimFunc:
    """``(x, q, s)``: ``s[..., 0] = max(max|x[..., :]|, eps) / qmax``, ``q = int8(clip(round(x / s), -qmax,
    qmax))`` for float32 ``x`` of ``rank`` dimensions, the last of ``columns`` elements (None: any number), as the
    graph's ops compute them; unscheduled (its ``qmax`` and ``eps`` in :data:`ROW_QUANTIZE_ATTR`)."""
    x = _rows(rank, columns)
    outputs = _row_quantization(x, RowQuantize(qmax, eps))
    return te.create_prim_func([x, *outputs]).with_attrs({KERNEL_ATTR: QUANTIZE_ROWS, "op_pattern": OPAQUE,
                                                          ROW_QUANTIZE_ATTR: {"qmax": qmax, "eps": eps}})


def static_quantizations_function(rank: int, columns: int | None,
                                  quantizations: Sequence[StaticQuantize]) -> tirx.PrimFunc:
    """``(x, q_0, q_1, ...)``: ``q_i = quantize(clip(x, lo_i, hi_i), scale_i)`` (zero point 0, int8) for float32
    ``x`` of ``rank`` dimensions, the last of ``columns`` elements (None: any number), as TVM legalizes ``clip``
    and ``quantize``; unscheduled, one loop nest."""
    x = _rows(rank, columns)
    return te.create_prim_func([x, *_static_quantizations(x, quantizations)]).with_attr("op_pattern", OPAQUE)


def layer_norm_rows_function(rank: int, columns: int, eps: float,
                             quantize: Sequence[StaticQuantize] | RowQuantize) -> tirx.PrimFunc:
    """The layer norm of float32 ``x`` of ``rank`` dimensions over its last (``columns``), as TVM legalizes it,
    and the quantizations of its result ``y``: ``(x, gamma, beta, y, q_0, q_1, ...)`` for static ones (see
    :func:`static_quantizations_function`), ``(x, gamma, beta, y, q, s)`` for a :class:`RowQuantize` (see
    :func:`quantize_rows_function`); unscheduled."""
    x = _rows(rank, columns)
    gamma, beta = (te.placeholder((columns,), "float32", name) for name in ("gamma", "beta"))
    normalized = topi.nn.layer_norm(x, gamma, beta, axis=[rank - 1], epsilon=eps)
    y = te.compute(x.shape, lambda *i: normalized(*i), name="y")  # the output: the kernel keeps `normalized`
    quantized = (_row_quantization(normalized, quantize) if isinstance(quantize, RowQuantize)
                 else _static_quantizations(normalized, quantize))
    return te.create_prim_func([x, gamma, beta, y, *quantized]).with_attrs(
        {KERNEL_ATTR: LAYER_NORM_ROWS, "op_pattern": OPAQUE})


class CUDARows(GPUScheduleRule):
    """The schedule of the row functions (:data:`ROW_KERNELS`) for CUDA targets: a thread block per row. Every
    intermediate value used once is computed where it is used; the others, the row's reductions (across the
    block's threads) and its other intermediate values (one per row or one per column), live in shared memory, so
    that TVM puts a barrier between their stores and any thread's reads (it writes a value of the row from one
    thread). Each thread computes the row's columns ``t, t + threads, ...`` of every loop along it."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if (not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or func.attrs is None
                or func.attrs.get(KERNEL_ATTR) not in ROW_KERNELS):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_child_blocks(root)
                   if any(sch.get(b).writes[0].source.same_as(p) for p in func.params)}
        for block in sch.get_child_blocks(root):
            name = sch.get(block).name_hint
            if name not in outputs and sch.get(block).init is None and len(sch.get_consumers(block)) == 1:
                sch.compute_inline(block)
        first, *rest = sch.get_child_blocks(root)
        *rows, k = sch.get_loops(first)
        row = sch.fuse(*rows)
        sch.bind(row, "blockIdx.x")
        columns = sch.get(k).extent
        threads = (min(MAX_THREADS, -(-int(columns) // WARP) * WARP) if isinstance(columns, tirx.IntImm)
                   else MAX_THREADS)
        for block in (first, *rest):
            if block is not first:
                sch.reverse_compute_at(block, row)
            along = [loop for loop in sch.get_loops(block)[1:]
                     if not (isinstance(sch.get(loop).extent, tirx.IntImm) and int(sch.get(loop).extent) == 1)]
            if along:
                sch.bind(sch.split(along[-1], [None, threads])[1], "threadIdx.x")
            if sch.get(block).name_hint not in outputs:
                sch.set_scope(block, 0, "shared")
        return sch
