"""The ``k`` largest entries of each row, and where they are: a search's candidates from the logits.

Relax has no legalization for ``topk``, and TOPI's calls an external C++ sort (``tvm.contrib.sort``) one
row after another (8000 entries x 128 beam rows per decoder step). Here rows run in parallel and each
keeps its ``k`` best in a small local buffer: the row is
read 16 entries at a time, and only a block whose largest entry beats the current ``k``-th enters the
insertion loop, which for logits is rare after the first blocks. Ties keep the lower index first (the
first of equal maxima, as ``numpy.argmax``); -inf and NaN are never selected, so a row with fewer than
``k`` other entries leaves its last slots at -inf with index -1.
"""
from __future__ import annotations

from functools import reduce

from tvm import tirx
from tvm.script import tirx as T

BLOCK = 16  # entries compared at once (one AVX-512 register of float32)


def top_k_kernel(k: int, dtype: str = "float32", index_dtype: str = "int64") -> tirx.PrimFunc:
    """``(values[r, :k], indices[r, :k])``: the ``k`` largest entries of each row of ``x[rows, n]`` in
    descending order (both sizes dynamic)."""
    rows, n = tirx.Var("rows", "int64"), tirx.Var("n", "int64")
    K, B = T.int64(k), T.int64(BLOCK)
    lowest = tirx.const(float("-inf"), dtype)

    def block_max(x, row, start):
        return reduce(tirx.max, (x[row, start + T.int64(lane)] for lane in range(BLOCK)))

    @T.macro
    def consider(x, row, column, best, where, swap, swap_index):
        """Insert entry ``column`` of the row among the best ``k`` if it beats the ``k``-th."""
        if x[row, column] > best[k - 1]:
            best[k - 1] = x[row, column]
            where[k - 1] = T.Cast(index_dtype, column)
            for s in range(K - 1):  # bubble the new entry up to its place
                if best[k - 1 - s] > best[k - 2 - s]:
                    swap[0] = best[k - 2 - s]
                    best[k - 2 - s] = best[k - 1 - s]
                    best[k - 1 - s] = swap[0]
                    swap_index[0] = where[k - 2 - s]
                    where[k - 2 - s] = where[k - 1 - s]
                    where[k - 1 - s] = swap_index[0]

    @T.prim_func(s_tir=True)
    def top_k(x: T.handle, values: T.handle, indices: T.handle):
        T.func_attr({"tirx.noalias": True, "global_symbol": "int8mt_top_k", "tirx.is_scheduled": True})
        X = T.match_buffer(x, (rows, n), dtype)
        V = T.match_buffer(values, (rows, K), dtype)
        I = T.match_buffer(indices, (rows, K), index_dtype)
        for r in T.parallel(rows):
            with T.sblock("top_k"):
                vr = T.axis.spatial(rows, r)
                T.reads(X[vr, 0:n])
                T.writes(V[vr, 0:K], I[vr, 0:K])
                best = T.alloc_buffer((k,), dtype, scope="local")
                where = T.alloc_buffer((k,), index_dtype, scope="local")
                swap = T.alloc_buffer((1,), dtype, scope="local")
                swap_index = T.alloc_buffer((1,), index_dtype, scope="local")
                for s in range(K):
                    best[s] = lowest
                    where[s] = T.Cast(index_dtype, -1)
                for blk in range(n // B):  # whole blocks: only one that beats the k-th is scanned
                    if block_max(X, vr, blk * B) > best[k - 1]:
                        for lane in range(B):
                            consider(X, vr, blk * B + lane, best, where, swap, swap_index)
                for tail in range(n - n // B * B):
                    consider(X, vr, n // B * B + tail, best, where, swap, swap_index)
                for s in range(K):
                    V[vr, s] = best[s]
                    I[vr, s] = where[s]

    return top_k
