"""Run-time quantization of each row in one kernel: the row's largest magnitude, its scale and its int8 values.

With run-time ranges every linear layer's input is quantized per row (:func:`int8mt.quant.ops.quantize_dynamic`).
As Relax ops that is a reduction (``max(abs(x))``), the scale (``maximum(.., eps) / qmax``) and the quantization
(``astype(clip(round(x / scale)))``): three kernels after fusion, the row read twice from memory and the scale
written and read back. Here, for each row in parallel, one loop finds the magnitude (``VECTOR_LANES`` partial
maxima, combined at the end) and a second, while the row is still in cache, writes the int8 values. The
arithmetic is the ops' own (TOPI's ``clip`` is ``max(min(x, hi), lo)``, ``round`` is ``nearbyint``, half to
even), so the values are the same bit for bit.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx

VECTOR_LANES = 16  # float32 lanes of the partial maxima and of the quantizing loop (one AVX-512 register)


def quantize_rows_kernel(rank: int, columns: int, qmax: float, eps: float) -> tirx.PrimFunc:
    """``q[..., :] = int8(clip(round(x[..., :] / s[...]), -qmax, qmax))`` with ``s[...] = max(max|x[..., :]|,
    eps) / qmax`` for float32 ``x`` of ``rank`` dimensions, the last of ``columns`` elements and the others of
    any size; the kernel ``(x, q, s)``, ``s`` of ``x``'s shape with a last dimension of 1."""
    lead = [tirx.Var(f"d{i}", "int64") for i in range(rank - 1)]
    shape = [*lead, tirx.IntImm("int64", columns)]
    x = te.placeholder(shape, "float32", "x")
    k = te.reduce_axis((0, columns), "k")
    one = tirx.IntImm("int64", 1)
    amax = te.compute([*lead, one], lambda *i: te.max(te.abs(x[(*i[:-1], k)]), axis=k), "amax")
    scale = te.compute([*lead, one], lambda *i: te.max(amax[i], tirx.const(eps, "float32"))
                       / tirx.const(qmax, "float32"), "scale")
    q = te.compute(shape, lambda *i: tirx.Cast("int8", te.max(te.min(
        te.nearbyint(x[i] / scale[(*i[:-1], 0)]), tirx.const(qmax, "float32")), tirx.const(-qmax, "float32"))), "q")
    sch = s_tir.Schedule(te.create_prim_func([x, q, scale]))
    vector = columns % VECTOR_LANES == 0
    if vector:  # VECTOR_LANES partial maxima, then their maximum
        partial = sch.rfactor(sch.split(sch.get_loops(sch.get_sblock("amax"))[-1], [None, VECTOR_LANES])[1], 0)
    *rows, _ = sch.get_loops(sch.get_sblock("scale"))
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.parallel(row)
    sch.compute_at(sch.get_sblock("amax"), row)
    sch.reverse_compute_at(sch.get_sblock("q"), row)
    if vector:
        sch.compute_at(partial, row)
        lane, chunk = sch.get_loops(partial)[-2:]
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(partial, chunk))[-1])
        sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("q"))[-1], [None, VECTOR_LANES])[1])
    return sch.mod["main"].with_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
