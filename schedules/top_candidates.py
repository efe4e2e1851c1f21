"""Each row's ``k`` largest entries, where they are, and the row's log-sum-exp, in one kernel: beam search's
candidates from the logits (the entry point ``top_candidates``).

Relax has no legalization for ``topk``; TOPI's calls an external C++ sort (``tvm.contrib.sort``) one row
after another on a CPU and sorts each row whole on a GPU (8000 entries x 128 beam rows per decoder step).
Here no row is sorted, and the log-sum-exp reads the row where the search just did, instead of a reduction
kernel of its own reading the logits again (three more kernels on a GPU: the maximum's slice, the sum of
exponentials, its logarithm):

* CPU (``gpu=False``): rows run in parallel and each keeps its ``k`` best in a small local buffer; the
  row is read 16 entries at a time, and only a block with an entry that beats the current ``k``-th (one vector
  comparison) enters the insertion loop, which for logits is rare after the first blocks. Then the row's
  exponentials, 16 partial sums in a vector register added up at the end (as TVM's CPU schedule of the
  reduction adds them).
* GPU (``gpu=True``): a thread block per row; each thread keeps the ``k`` best of every ``GPU_THREADS``-th
  entry, then the threads' lists are merged pairwise in shared memory; each thread sums the exponentials of its
  entries, and the threads' sums are added pairwise in the same shared memory.

Both give the same candidates: ties keep the lower index first (the first of equal maxima, as
``numpy.argmax``); -inf and NaN are never selected, so a row with fewer than ``k`` other entries leaves its last
slots at -inf with index -1. The log-sum-exp is ``log(sum(exp(x - m))) + m`` with ``m`` the row's largest
entry (its first candidate) and TOPI's ``fast_exp``; a row with no selectable entry has -inf.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .kernel_attrs import KERNEL_ATTR
from .softmax_rows import fast_exp

TOP_CANDIDATES = "top_candidates"  # (KERNEL_ATTR)
CANDIDATES_ATTR = "int8mt.candidates"  # the kernel's k
BLOCK = 16  # entries compared at once, and partial sums (one AVX-512 register of float32)
GPU_THREADS = 128  # threads per row in the GPU kernel (a power of two)
MAX_GPU_K = 32  # its lists of values and int64 indices take GPU_THREADS * k * 12 bytes of 48 KB of shared memory


def top_candidates_kernel(k: int, gpu: bool = False) -> tirx.PrimFunc:
    """``top_candidates(x[rows, n]) -> values[rows, k], indices[rows, k] int64, log_sum_exp[rows]``: the ``k``
    largest entries of each row of float32 ``x`` in descending order and the row's log-sum-exp (both sizes
    dynamic); ``gpu``: a CUDA thread block per row instead of a parallel CPU loop (at most ``MAX_GPU_K``)."""
    if gpu and k > MAX_GPU_K:
        raise ValueError(f"the GPU top-candidates kernel keeps at most {MAX_GPU_K} entries per row (its lists fill "
                         f"shared memory); got k={k}")
    rows, n = tirx.Var("rows", "int64"), tirx.Var("n", "int64")
    K, B, NT = T.int64(k), T.int64(BLOCK), T.int64(GPU_THREADS)
    lowest = tirx.const(float("-inf"), "float32")
    levels = GPU_THREADS.bit_length() - 1  # pairwise merges and sums, stride = 64, 32, ..., 1

    def beats(x, row, start, threshold):
        """Whether an entry of the block at ``start`` beats ``threshold``: one vector comparison and a test of its
        mask (the block's maximum, 16 scalar maxima, made the scan of real logits a third slower)."""
        return T.call_llvm_pure_intrin("bool", f"llvm.vector.reduce.or.v{BLOCK}i1",
                                       x[row, T.ramp(start, T.int64(1), BLOCK)] > T.broadcast(threshold, BLOCK))

    @T.macro
    def insert(value, column, best, where):
        """Put entry ``column`` (``value``) among the ``k`` best if it beats the ``k``-th (bubbled up to its
        place: an equal entry before it stays first)."""
        if value > best[k - 1]:
            best[k - 1] = value
            where[k - 1] = column
            for s in range(K - 1):
                if best[k - 1 - s] > best[k - 2 - s]:
                    v = best[k - 2 - s]
                    best[k - 2 - s] = best[k - 1 - s]
                    best[k - 1 - s] = v
                    w = where[k - 2 - s]
                    where[k - 2 - s] = where[k - 1 - s]
                    where[k - 1 - s] = w

    @T.macro
    def clear(best, where):
        for s in range(K):
            best[s] = lowest
            where[s] = T.int64(-1)

    @T.prim_func(s_tir=True, private=True)
    def top_candidates(x: T.handle, values: T.handle, indices: T.handle, log_sum_exp: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: TOP_CANDIDATES,
                     CANDIDATES_ATTR: k})
        X = T.match_buffer(x, (rows, n), "float32")
        V = T.match_buffer(values, (rows, K), "float32")
        I = T.match_buffer(indices, (rows, K), "int64")
        L = T.match_buffer(log_sum_exp, (rows,), "float32")
        if gpu:  # (a Python bool: one of the two bodies is parsed)
            with T.sblock("root"):
                row = T.launch_thread("blockIdx.x", rows)
                t = T.launch_thread("threadIdx.x", GPU_THREADS)
                lists_v = T.decl_buffer((GPU_THREADS * k,), "float32", scope="shared")
                lists_i = T.decl_buffer((GPU_THREADS * k,), "int64", scope="shared")
                best = T.decl_buffer((k,), "float32", scope="local")
                where = T.decl_buffer((k,), "int64", scope="local")
                taken = T.decl_buffer((2,), "int64", scope="local")
                head_v = T.decl_buffer((2,), "float32", scope="local")
                head_i = T.decl_buffer((2,), "int64", scope="local")
                sums = T.decl_buffer((2,), "float32", scope="local")  # the row's maximum, this thread's sum
                mine = T.Cast("int64", t)
                clear(best, where)  # this thread's k best of entries mine, mine + GPU_THREADS, ..., in index order
                for c in range((n + NT - 1 - mine) // NT):
                    insert(X[row, c * NT + mine], c * NT + mine, best, where)
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
                sums[0] = lists_v[0]  # list 0 holds the row's k best
                if mine < K:
                    V[row, mine] = lists_v[mine]
                    I[row, mine] = lists_i[mine]
                sums[1] = T.float32(0)
                for c in range((n + NT - 1 - mine) // NT):
                    sums[1] = sums[1] + fast_exp(X[row, c * NT + mine] - sums[0])
                T.tvm_storage_sync("shared")  # (the lists read: their first GPU_THREADS values take the sums)
                lists_v[mine] = sums[1]
                for level in T.unroll(levels):
                    T.tvm_storage_sync("shared")
                    stride = T.int64(GPU_THREADS // 2) >> level
                    if mine < stride:
                        lists_v[mine] = lists_v[mine] + lists_v[mine + stride]
                T.tvm_storage_sync("shared")
                if mine == 0:
                    L[row] = T.if_then_else(sums[0] == lowest, lowest, T.log(lists_v[0]) + sums[0])
        else:
            for r in T.parallel(rows):
                with T.sblock("row"):
                    vr = T.axis.spatial(rows, r)
                    T.reads(X[vr, 0:n])
                    T.writes(V[vr, 0:K], I[vr, 0:K], L[vr])
                    best = T.alloc_buffer((k,), "float32", scope="local")
                    where = T.alloc_buffer((k,), "int64", scope="local")
                    partial = T.alloc_buffer((BLOCK,), "float32", scope="local")
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    clear(best, where)
                    for blk in range(n // B):  # whole blocks: only one that beats the k-th is scanned
                        if beats(X, vr, blk * B, best[k - 1]):
                            for lane in range(B):
                                insert(X[vr, blk * B + lane], blk * B + lane, best, where)
                    for tail in range(n - n // B * B):
                        insert(X[vr, n // B * B + tail], n // B * B + tail, best, where)
                    for s in range(K):
                        V[vr, s] = best[s]
                        I[vr, s] = where[s]
                    for lane in T.vectorized(B):  # the exponentials of the row, now in cache
                        partial[lane] = T.float32(0)
                    for blk in range(n // B):
                        for lane in T.vectorized(B):
                            partial[lane] = partial[lane] + fast_exp(X[vr, blk * B + lane] - best[0])
                    total[0] = T.float32(0)
                    for lane in range(B):
                        total[0] = total[0] + partial[lane]
                    for tail in range(n - n // B * B):
                        total[0] = total[0] + fast_exp(X[vr, n // B * B + tail] - best[0])
                    L[vr] = T.if_then_else(best[0] == lowest, lowest, T.log(total[0]) + best[0])

    return top_candidates
