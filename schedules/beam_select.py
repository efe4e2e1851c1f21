"""Beam search's choice of each sentence's next hypotheses from its rows' candidates, on the device.

A sentence's ``k`` hypotheses are rows ``i*k .. i*k + k - 1``; each row comes with its ``C`` best tokens, in
descending order, their values and the row's log-sum-exp (``top_candidates``: a candidate's log-probability is
``value - log_sum_exp``). ``state[i]`` holds the sentence's hypotheses' scores, then how many of its hypotheses
have finished (float64, one array: one copy to a GPU per step). A candidate's score is its hypothesis's score
plus its log-probability, in float64 as ``state[i, b] + (float64(value) - float64(log_sum_exp))``. The kernel
walks each sentence's ``2k`` best candidates best first (a merge of its rows' lists; equal scores in row order,
then in their row's order):

* a candidate of -inf (or NaN) stops the sentence: nothing after it is taken;
* an end of sentence finishes its hypothesis (``ENDED_ROWS``/``ENDED_SCORES``, in order), or is passed over while
  ``eos_banned[0]`` (the step is below the minimum length);
* any other token continues its hypothesis into the next free slot (``TOKENS``, ``ORIGIN``: the row it continues,
  ``NEW_SCORES``);
* the sentence stops once ``k`` continue or ``k`` hypotheses have finished (those before this step counted), and
  takes nothing if ``k`` had finished already.

Slots left free keep the pad token, their own row as origin and -inf; unused ended entries row -1 and -inf. The
five results are planes of one float64 array ``chosen[PLANES, n, k]`` (token ids and rows exact below 2**53), so that
one copy brings them to the host per step, instead of every row's candidates for the host to merge and walk.
The rows' read positions in their lists (``heads``, one per row) are a scratch output, so that any beam fits.
The CPU kernel runs sentences in parallel; the GPU kernel gives each sentence a thread.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from int8mt.runtime.bundle import BeamChoice

from .kernel_attrs import KERNEL_ATTR

BEAM_SELECT = "beam_select"  # (KERNEL_ATTR)
GPU_THREADS = 32  # sentences per thread block on a GPU
TOKENS, ORIGIN, NEW_SCORES, ENDED_ROWS, ENDED_SCORES = (  # the planes of ``chosen``: the runtime's fields
    BeamChoice._fields.index(name) for name in ("tokens", "origin", "new_scores", "ended_rows", "ended_scores"))
PLANES = len(BeamChoice._fields)


def beam_select_kernel(gpu: bool = False) -> tirx.PrimFunc:
    """``beam_select(values[R, C], ids[R, C], log_sum_exp[R], state[n, k + 1], eos_banned[1], eos_id, pad_id) ->
    chosen[PLANES, n, k], heads[n, k]`` with ``R = n * k`` (all sizes dynamic); ``gpu``: bound to CUDA threads
    instead of a parallel CPU loop."""
    rows, width, n, columns = (tirx.Var(name, "int64") for name in ("rows", "width", "n", "columns"))
    k = columns - 1
    lowest = tirx.const(float("-inf"), "float64")

    @T.macro
    def choose(i, V, I, L, S, banned, eos_id, pad_id, out, heads, walk, best):
        for s in range(k):
            out[TOKENS, i, s] = T.Cast("float64", pad_id)
            out[ORIGIN, i, s] = T.Cast("float64", i * k + s)
            out[NEW_SCORES, i, s] = lowest
            out[ENDED_ROWS, i, s] = T.float64(-1)
            out[ENDED_SCORES, i, s] = lowest
            heads[i, s] = T.int64(0)
        # walk: [continued, ended, stopped, best row, finished before this step]
        walk[4] = T.Cast("int64", S[i, k])
        walk[0] = T.int64(0)
        walk[1] = walk[4]
        walk[2] = T.Cast("int64", walk[4] >= k)
        for _pick in range(2 * k):
            if walk[2] == T.int64(0):
                walk[3] = T.int64(-1)
                best[0] = lowest
                for b in range(k):
                    if heads[i, b] < width:  # best[1]: row b's next candidate's score
                        best[1] = S[i, b] + (T.Cast("float64", V[i * k + b, heads[i, b]])
                                             - T.Cast("float64", L[i * k + b]))
                        if walk[3] < 0 or best[1] > best[0]:
                            best[0] = best[1]
                            walk[3] = T.int64(b)
                if walk[3] < 0 or not best[0] > lowest:  # (NaN too)
                    walk[2] = T.int64(1)
                else:
                    row = i * k + walk[3]
                    if I[row, heads[i, walk[3]]] == eos_id:
                        if banned[0] == T.int64(0):
                            out[ENDED_ROWS, i, walk[1] - walk[4]] = T.Cast("float64", row)
                            out[ENDED_SCORES, i, walk[1] - walk[4]] = best[0]
                            walk[1] = walk[1] + 1
                            walk[2] = T.Cast("int64", walk[1] >= k)
                    else:
                        out[TOKENS, i, walk[0]] = T.Cast("float64", I[row, heads[i, walk[3]]])
                        out[ORIGIN, i, walk[0]] = T.Cast("float64", row)
                        out[NEW_SCORES, i, walk[0]] = best[0]
                        walk[0] = walk[0] + 1
                        walk[2] = T.Cast("int64", walk[0] >= k)
                    heads[i, walk[3]] = heads[i, walk[3]] + 1

    @T.prim_func(s_tir=True, private=True)
    def beam_select(values: T.handle, ids: T.handle, log_sum_exp: T.handle, state: T.handle, eos_banned: T.handle,
                    eos_id: T.int64, pad_id: T.int64, chosen: T.handle, heads: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: BEAM_SELECT})
        V = T.match_buffer(values, (rows, width), "float32")
        I = T.match_buffer(ids, (rows, width), "int64")
        L = T.match_buffer(log_sum_exp, (rows,), "float32")
        S = T.match_buffer(state, (n, columns), "float64")
        banned = T.match_buffer(eos_banned, (T.int64(1),), "int64")
        O = T.match_buffer(chosen, (T.int64(PLANES), n, k), "float64")
        H = T.match_buffer(heads, (n, k), "int64")
        if gpu:  # (a Python bool: one of the two bodies is parsed)
            with T.sblock("root"):
                block = T.launch_thread("blockIdx.x", (n + GPU_THREADS - 1) // GPU_THREADS)
                thread = T.launch_thread("threadIdx.x", GPU_THREADS)
                walk = T.decl_buffer((5,), "int64", scope="local")
                best = T.decl_buffer((2,), "float64", scope="local")
                i = T.Cast("int64", block) * GPU_THREADS + T.Cast("int64", thread)
                if i < n:
                    choose(i, V, I, L, S, banned, eos_id, pad_id, O, H, walk, best)
        else:
            for i in T.parallel(n):
                with T.sblock("sentence"):
                    vi = T.axis.spatial(n, i)
                    T.reads(V[vi * k:vi * k + k, 0:width], I[vi * k:vi * k + k, 0:width], L[vi * k:vi * k + k],
                            S[vi, 0:columns], banned[0])
                    T.writes(O[0:PLANES, vi, 0:k], H[vi, 0:k])
                    walk = T.alloc_buffer((5,), "int64", scope="local")
                    best = T.alloc_buffer((2,), "float64", scope="local")
                    choose(vi, V, I, L, S, banned, eos_id, pad_id, O, H, walk, best)

    return beam_select
