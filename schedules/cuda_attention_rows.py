"""The decoder step's one-query attention as one GPU kernel: a thread block per hypothesis and head.

:class:`~int8mt.compiler.passes.AttentionRows` turns each layer's attention of the step (its scores product with
their scale and mask, the softmax, the probabilities' quantization, the context product and its requantization; the
self-attention's keys and values gathered from the cache's rows) into one function of the graph's own ops, marked
:data:`ATTENTION_ROWS`, in the heads' layout ``[batch, heads, 1, ...]``. :class:`CUDAAttentionRows` schedules it:

* each of the function's reductions is kept (int32 scores, the softmax's maximum and sum, the int32 context; with
  run-time ranges the query's, the step's key's and value's and the probabilities' largest magnitudes); a
  product's first operand computed from a reduction's result (the query quantized in the function) is computed
  once into shared memory, a column per thread; every other value is computed where it is used (the gathers, and
  the step's own key and value quantized, inside the products' reads; the scores' scale and mask in each read of a
  score);
* a thread block per ``(batch, head)`` (``blockIdx.y``, ``blockIdx.x``) of :func:`threads` threads: the scores one
  position per thread (the head's dot product in the thread), the maximum and the sum across the block (warp
  shuffles), the context one column of the head per thread;
* the context's positions in chunks of as many positions as threads: the chunk's quantized probabilities are
  computed once, a position per thread, into shared memory, then summed by every column's thread; the chunks are
  padded to whole ones with zero probabilities (so the buffer has a fixed size);
* the scores (one row of positions, 4 bytes each: 12288 positions fill the 48 KB a block gets, a model's
  positions are far fewer) in dynamic shared memory, the reductions' single values in shared memory: TVM puts a
  barrier between their stores and any other thread's reads.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from .kernel_attrs import KERNEL_ATTR

ATTENTION_ROWS = "attention_rows_graph"
WARP = 32
LEAD_AXES = ("blockIdx.y", "blockIdx.x")  # batch, head


def threads(head_dim: int) -> int:
    """Threads per block: the head's columns rounded up to whole warps, at least two warps."""
    return max(2 * WARP, -(-head_dim // WARP) * WARP)


def _is_one(extent: tirx.PrimExpr) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1


def _loops_along(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lead: int) -> tuple[list, list]:
    """The block's loops after the ``lead`` ones that are not of extent 1, as (spatial, reduction) loops; each
    loop is that of the block variable at its place (the loops are as TVM made them, one per variable)."""
    variables = [iv for iv in sch.get(block).iter_vars[lead:] if not _is_one(iv.dom.extent)]
    loops = [loop for loop in sch.get_loops(block)[lead:] if not _is_one(sch.get(loop).extent)]
    if len(loops) != len(variables):
        raise ValueError(f"block {sch.get(block).name_hint}: {len(loops)} loops for {len(variables)} variables")
    spatial = [loop for loop, iv in zip(loops, variables) if iv.iter_type == tirx.IterVar.DataPar]
    reduction = [loop for loop, iv in zip(loops, variables) if iv.iter_type == tirx.IterVar.CommReduce]
    return spatial, reduction


class CUDAAttentionRows(GPUScheduleRule):
    """The schedule of :data:`ATTENTION_ROWS` functions for CUDA targets (see the module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if (not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or func.attrs is None
                or func.attrs.get(KERNEL_ATTR) != ATTENTION_ROWS):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        outputs = {sch.get(b).name_hint for b in blocks
                   if any(sch.get(b).writes[0].source.same_as(p) for p in func.params)}
        *products, context = [b for b in blocks if sch.get(b).init is not None
                              and sch.get(b).writes[0].source.dtype == "int32"]
        shape = sch.get(context).writes[0].source.shape
        lead, count = len(shape) - 2, threads(int(shape[-1]))
        sch.pad_einsum(context, [count if iv.iter_type == tirx.IterVar.CommReduce else 1
                                 for iv in sch.get(context).iter_vars])
        staged = _first_operand_after_reduction(sch, [context])
        operands = _first_operand_after_reduction(sch, products)
        for block in sch.get_child_blocks(root):
            name = sch.get(block).name_hint
            if name not in outputs | staged | operands and sch.get(block).init is None:
                sch.compute_inline(block)
        *rest, last = sch.get_child_blocks(root)
        lead_loops = sch.get_loops(last)[:lead]
        for loop, axis in zip(lead_loops, LEAD_AXES[-lead:]):
            sch.bind(loop, axis)
        context_name = sch.get(context).name_hint
        for block in reversed(rest):  # consumers first: each block computed for the block's (batch, head)
            if sch.get(block).name_hint in staged:
                continue
            sch.compute_at(block, lead_loops[-1])
            if sch.get(block).name_hint == context_name:
                self._context_in_chunks(sch, block, lead, count, staged)
        for block in (*rest, last):
            name = sch.get(block).name_hint
            if name in staged:
                continue
            if name == context_name:
                thread, reduces = sch.get_loops(block)[-2], True
            else:
                spatial, reduction = _loops_along(sch, block, lead)
                thread, reduces = sch.split((spatial or reduction)[-1], [None, count])[1], bool(spatial and reduction)
            sch.bind(thread, "threadIdx.x")
            if reduces:  # a product's sum in a register, then stored
                stored = sch.cache_write(block, 0, "local")
                if name == context_name:
                    column = [loop for loop in sch.get_loops(stored)[lead:] if not _is_one(sch.get(loop).extent)][-1]
                    sch.bind(sch.split(column, [None, count])[1], "threadIdx.x")
                else:
                    sch.reverse_compute_at(stored, thread)
                block = stored
            if name not in outputs:
                buffer_shape = sch.get(block).writes[0].source.shape[lead:]
                fixed = all(isinstance(d, tirx.IntImm) for d in buffer_shape)
                sch.set_scope(block, 0, "shared" if fixed else "shared.dyn")
        return sch

    @staticmethod
    def _context_in_chunks(sch: s_tir.Schedule, context: s_tir.schedule.SBlockRV, lead: int, count: int,
                           staged: set[str]) -> None:
        """The context's (padded) positions in chunks of ``count``, each chunk's staged operand (the quantized
        probabilities) computed into shared memory before the chunk, a position per thread."""
        spatial, reduction = _loops_along(sch, context, lead)
        chunk, _ = sch.split(reduction[-1], [None, count])
        thread = sch.split(spatial[-1], [None, count])[1]
        sch.reorder(chunk, thread)
        for name in sorted(staged):
            block = sch.get_sblock(name)
            sch.compute_at(block, chunk)
            sch.bind(sch.get_loops(block)[-1], "threadIdx.x")
            sch.set_scope(block, 0, "shared")


def _first_operand_after_reduction(sch: s_tir.Schedule, products: list) -> set[str]:
    """The blocks computing the first operand of ``products`` (the scores' query, the context's probabilities)
    where they compute from a reduction's result; not the second (the keys and values, the step's own quantized in
    the function: each value read once)."""
    found = set()
    for product in products:
        operand = sch.get(product).reads[0].source
        found |= {sch.get(p).name_hint for p in sch.get_producers(product)
                  if sch.get(p).writes[0].source.same_as(operand) and _after_reduction(sch, p, {})}
    return found


def _after_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, seen: dict[str, bool]) -> bool:
    """Whether ``block`` computes from a reduction's result (the probabilities do)."""
    name = sch.get(block).name_hint
    if name not in seen:
        seen[name] = any(sch.get(p).init is not None or _after_reduction(sch, p, seen)
                         for p in sch.get_producers(block))
    return seen[name]
