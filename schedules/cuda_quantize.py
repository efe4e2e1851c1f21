"""Quantization kernels for GPUs, written with the very ops the graph legalizes to (any target computes the graph's
values), so that phase 4 schedules each as one kernel.

* Run-time ranges quantize every linear layer's input per row: a reduction (the row's largest magnitude), the
  scale and the int8 values, three kernels as TVM fuses the graph's ops on a GPU, some 40 launches per decoder
  step of the reference model. :func:`quantize_rows_function` is the three as one function; :class:`CUDAQuantizeRows`
  schedules it: a thread block per row, its threads reducing the magnitudes across the block, then each thread
  quantizing its columns with the scale the block shares.
* Static ranges quantize one tensor several times (a layer norm's output for the queries, keys and values, each
  with its own range): :func:`static_quantizations_function` computes them all in one loop over the tensor,
  which dlight's default GPU schedule makes one kernel.
"""
from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir, te, tirx, topi
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from .kernel_attrs import KERNEL_ATTR
from .layer_norm_rows import StaticQuantize
from .quantize_rows import OPAQUE, leading_rows

KERNEL = "quantize_rows_graph"
WARP = 32
MAX_THREADS = 256  # threads per row


def _rows(rank: int, columns: int | None) -> te.Tensor:
    """A float32 input of ``rank`` dimensions of any size, the last of ``columns`` elements (None: any number)."""
    lead, _ = leading_rows(rank)
    return te.placeholder((*lead, columns if columns is not None else tirx.Var("columns", "int64")), "float32", "x")


def quantize_rows_function(rank: int, columns: int | None, qmax: float, eps: float) -> tirx.PrimFunc:
    """``(x, q, s)``: ``s[..., 0] = max(max|x[..., :]|, eps) / qmax``, ``q = int8(clip(round(x / s), -qmax,
    qmax))`` for float32 ``x`` of ``rank`` dimensions, the last of ``columns`` elements (None: any number), as the
    graph's ops compute them; unscheduled."""
    x = _rows(rank, columns)
    magnitude = topi.max(topi.abs(x), axis=-1, keepdims=True)
    scale = topi.divide(topi.maximum(magnitude, tirx.const(eps, "float32")), tirx.const(qmax, "float32"))
    q = topi.cast(topi.clip(topi.round(topi.divide(x, scale)), -qmax, qmax), "int8")
    s = te.compute(scale.shape, lambda *i: scale(*i), name="scale_out")  # the output: the kernel keeps `scale`
    return te.create_prim_func([x, q, s]).with_attrs({KERNEL_ATTR: KERNEL, "op_pattern": OPAQUE})


def static_quantizations_function(rank: int, columns: int | None,
                                  quantizations: Sequence[StaticQuantize]) -> tirx.PrimFunc:
    """``(x, q_0, q_1, ...)``: ``q_i = quantize(clip(x, lo_i, hi_i), scale_i)`` (zero point 0, int8) for float32
    ``x`` of ``rank`` dimensions, the last of ``columns`` elements (None: any number), as TVM legalizes ``clip``
    and ``quantize``; unscheduled, one loop nest."""
    x = _rows(rank, columns)

    def quantized(*index: tirx.PrimExpr) -> list[tirx.PrimExpr]:
        values = []
        for q in quantizations:
            clipped = te.max(te.min(x(*index), tirx.const(q.hi, "float32")), tirx.const(q.lo, "float32"))
            rounded = te.round(clipped / tirx.const(q.scale, "float32")) + tirx.IntImm("int8", 0)
            values.append(te.max(te.min(rounded, tirx.max_value("int8")), tirx.min_value("int8")).astype("int8"))
        return values

    outputs = te.compute(x.shape, quantized, name="quantized")
    return te.create_prim_func([x, *outputs]).with_attr("op_pattern", OPAQUE)


class CUDAQuantizeRows(GPUScheduleRule):
    """The schedule of :func:`quantize_rows_function` for CUDA targets (see the module docstring). The scale is
    computed into shared memory behind a barrier before any thread divides by it (TVM writes a block's single value
    from one thread)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if (not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or func.attrs is None
                or func.attrs.get(KERNEL_ATTR) != KERNEL):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        q_buffer, s_buffer = func.params[1:]
        reduction = next(b for b in blocks if sch.get(b).init is not None)
        q = next(b for b in blocks if sch.get(b).writes[0].source.same_as(q_buffer))
        out = next(b for b in blocks if sch.get(b).writes[0].source.same_as(s_buffer))
        scale = sch.get_producers(out)[0]
        kept = {sch.get(b).name_hint for b in (reduction, scale, out, q)}
        for block in blocks:
            if sch.get(block).name_hint not in kept:
                sch.compute_inline(block)
        *rows, _, k = sch.get_loops(reduction)
        row = sch.fuse(*rows)
        sch.bind(row, "blockIdx.x")
        columns = sch.get(k).extent
        threads = (min(MAX_THREADS, -(-int(columns) // WARP) * WARP) if isinstance(columns, tirx.IntImm)
                   else MAX_THREADS)
        sch.bind(sch.split(k, [None, threads])[1], "threadIdx.x")
        sch.set_scope(reduction, 0, "shared")
        sch.reverse_compute_at(scale, row)
        sch.set_scope(scale, 0, "shared")
        sch.reverse_compute_at(q, row)
        sch.bind(sch.split(sch.get_loops(q)[-1], [None, threads])[1], "threadIdx.x")
        sch.reverse_compute_at(out, row)
        return sch
