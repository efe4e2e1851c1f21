"""Integer square root of each element, as a kernel with its own loop: the integer layer norm's
``isqrt`` (:mod:`int8mt.quant.int_layer_norm`). Written in TIR rather than as a chain of Relax ops because
each Newton step reads the previous estimate twice, and fused elementwise ops would be inlined into one
expression that doubles with every step."""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def isqrt_kernel(start: int, steps: int) -> tirx.PrimFunc:
    """``out[i] = floor(sqrt(v[i]))`` for positive int64 ``v`` of any length: ``steps`` monotone Newton steps
    from ``start`` (which must be at least the largest root)."""
    m = tirx.Var("m", "int64")

    @T.prim_func(s_tir=True)
    def isqrt(v: T.handle, out: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "int8mt_isqrt", "tirx.is_scheduled": True})
        V = T.match_buffer(v, (m,), "int64")
        O = T.match_buffer(out, (m,), "int64")
        for i in range(m):
            with T.sblock("isqrt"):
                vi = T.axis.spatial(m, i)
                T.reads(V[vi])
                T.writes(O[vi])
                r = T.alloc_buffer((1,), "int64", scope="local")
                r[0] = T.int64(start)
                for _ in range(steps):
                    r[0] = T.min(r[0], (r[0] + V[vi] // r[0]) // T.int64(2))
                O[vi] = r[0]

    return isqrt
