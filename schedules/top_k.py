"""The ``k`` largest entries of each row, and where they are: a search's candidates from the logits.

Relax has no legalization for ``topk``; TOPI's calls an external C++ sort (``tvm.contrib.sort``) one row
after another on a CPU and sorts each row whole on a GPU (8000 entries x 128 beam rows per decoder step).
Here no row is sorted:

* CPU (:func:`top_k_kernel`): rows run in parallel and each keeps its ``k`` best in a small local buffer; the
  row is read 16 entries at a time, and only a block whose largest entry beats the current ``k``-th enters
  the insertion loop, which for logits is rare after the first blocks.
* GPU (:func:`top_k_gpu_kernel`): a thread block per row; each thread keeps the ``k`` best of every
  ``GPU_THREADS``-th entry, then the threads' lists are merged pairwise in shared memory.

Both give the same results: ties keep the lower index first (the first of equal maxima, as ``numpy.argmax``);
-inf and NaN are never selected, so a row with fewer than ``k`` other entries leaves its last slots at -inf
with index -1.
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


GPU_THREADS = 128  # threads per row in the GPU kernel (a power of two)
MAX_GPU_K = 32  # its lists of values and int64 indices take GPU_THREADS * k * 12 bytes of 48 KB of shared memory


def top_k_gpu_kernel(k: int, dtype: str = "float32", index_dtype: str = "int64") -> tirx.PrimFunc:
    """:func:`top_k_kernel`'s results on a GPU: a thread block per row; thread ``t`` keeps the ``k`` best of the
    entries ``t, t + GPU_THREADS, ...`` (in index order, as the CPU kernel), then pairs of lists are merged in
    shared memory (``log2(GPU_THREADS)`` levels), ordered by value, then lower index. Written as the threads'
    code (buffers declared where they live), not as a schedule. TVM's CUDA ``topk`` sorted each row whole: 287 µs
    at 128 rows of 8000 on an H200, in some ten kernel launches."""
    if k > MAX_GPU_K:
        raise ValueError(f"the GPU top-k kernel keeps at most {MAX_GPU_K} entries per row (its lists fill shared "
                         f"memory); got k={k}")
    rows, n = tirx.Var("rows", "int64"), tirx.Var("n", "int64")
    K, NT = T.int64(k), T.int64(GPU_THREADS)
    lowest = tirx.const(float("-inf"), dtype)
    levels = GPU_THREADS.bit_length() - 1  # merges of list t and list t + stride, stride = 64, 32, ..., 1

    @T.prim_func(s_tir=True)
    def top_k_gpu(x: T.handle, values: T.handle, indices: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        X = T.match_buffer(x, (rows, n), dtype)
        V = T.match_buffer(values, (rows, K), dtype)
        I = T.match_buffer(indices, (rows, K), index_dtype)
        with T.sblock("root"):
            row = T.launch_thread("blockIdx.x", rows)
            t = T.launch_thread("threadIdx.x", GPU_THREADS)
            lists_v = T.decl_buffer((GPU_THREADS * k,), dtype, scope="shared")
            lists_i = T.decl_buffer((GPU_THREADS * k,), index_dtype, scope="shared")
            best = T.decl_buffer((k,), dtype, scope="local")
            where = T.decl_buffer((k,), index_dtype, scope="local")
            taken = T.decl_buffer((2,), "int64", scope="local")
            head_v = T.decl_buffer((2,), dtype, scope="local")
            head_i = T.decl_buffer((2,), index_dtype, scope="local")
            mine = T.Cast("int64", t)
            for s in range(K):  # this thread's k best of entries mine, mine + GPU_THREADS, ..., in index order
                best[s] = lowest
                where[s] = T.Cast(index_dtype, -1)
            for c in range((n + NT - 1 - mine) // NT):
                j = c * NT + mine
                if X[row, j] > best[k - 1]:
                    best[k - 1] = X[row, j]
                    where[k - 1] = T.Cast(index_dtype, j)
                    for s in range(K - 1):
                        if best[k - 1 - s] > best[k - 2 - s]:
                            v = best[k - 2 - s]
                            best[k - 2 - s] = best[k - 1 - s]
                            best[k - 1 - s] = v
                            w = where[k - 2 - s]
                            where[k - 2 - s] = where[k - 1 - s]
                            where[k - 1 - s] = w
            for s in range(K):
                lists_v[mine * K + s] = best[s]
                lists_i[mine * K + s] = where[s]
            for level in T.unroll(levels):  # list mine takes the k best of itself and list mine + stride
                T.tvm_storage_sync("shared")
                stride = T.int64(GPU_THREADS // 2) >> level
                if mine < stride:
                    taken[0] = T.int64(0)
                    taken[1] = T.int64(0)
                    for s in range(K):
                        head_v[0] = lists_v[mine * K + T.min(taken[0], K - 1)]
                        head_i[0] = lists_i[mine * K + T.min(taken[0], K - 1)]
                        head_v[1] = lists_v[(mine + stride) * K + T.min(taken[1], K - 1)]
                        head_i[1] = lists_i[(mine + stride) * K + T.min(taken[1], K - 1)]
                        if taken[1] >= K or (taken[0] < K and (head_v[0] > head_v[1] or (
                                head_v[0] == head_v[1] and head_i[0] < head_i[1]))):
                            best[s] = head_v[0]
                            where[s] = head_i[0]
                            taken[0] = taken[0] + 1
                        else:
                            best[s] = head_v[1]
                            where[s] = head_i[1]
                            taken[1] = taken[1] + 1
                T.tvm_storage_sync("shared")
                if mine < stride:
                    for s in range(K):
                        lists_v[mine * K + s] = best[s]
                        lists_i[mine * K + s] = where[s]
            T.tvm_storage_sync("shared")
            if mine < K:  # list 0 holds the row's k best
                V[row, mine] = lists_v[mine]
                I[row, mine] = lists_i[mine]
    return top_k_gpu
