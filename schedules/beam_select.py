"""Beam search's choice of each sentence's next hypotheses from its rows' candidates, on the device.

A sentence's ``k`` hypotheses are rows ``i*k .. i*k + k - 1``; each row comes with its ``C`` best tokens, in
descending order, their values and the row's log-sum-exp (``top_candidates``: a candidate's log-probability is
``value - log_sum_exp``). A candidate's score is its hypothesis's score plus its log-probability, in float64 as
``scores[i, b] + (float64(value) - float64(log_sum_exp))``. The kernel walks each sentence's ``2k`` best
candidates best first (a merge of its rows' lists; equal scores in row order, then in their row's order) and, as
the search it replaces did on the host:

* a candidate of -inf (or NaN) stops the sentence: nothing after it is taken;
* an end of sentence finishes its hypothesis (``ended_rows``/``ended_scores``, in order), or is passed over while
  ``eos_banned[0]`` (the step is below the minimum length);
* any other token continues its hypothesis into the next free slot (``tokens``, ``origin``: the row it continues,
  ``new_scores``);
* the sentence stops once ``k`` continue or ``k`` hypotheses have finished (``finished[i]`` before this step
  counted), and takes nothing if ``finished[i] >= k`` already.

Slots left free keep the pad token, their own row as origin and -inf; unused ended entries row -1 and -inf. The
rows' read positions in their lists (``heads``, one per row) are a scratch output, so that any beam fits. Only the
slots, their origins and scores and the ended hypotheses cross to the host per step, instead of every row's
candidates and the host's partition of them. The CPU kernel runs sentences in parallel; the GPU kernel gives each
sentence a thread.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

BEAM_SELECT = "beam_select"  # (KERNEL_ATTR)
GPU_THREADS = 32  # sentences per thread block on a GPU


def beam_select_kernel(gpu: bool = False) -> tirx.PrimFunc:
    """``beam_select(values[R, C], ids[R, C], log_sum_exp[R], scores[n, k], finished[n], eos_banned[1], eos_id,
    pad_id) -> tokens[n, k], origin[n, k], new_scores[n, k], ended_rows[n, k], ended_scores[n, k], heads[n, k]``
    with ``R = n * k`` (all sizes dynamic); ``gpu``: bound to CUDA threads instead of a parallel CPU loop."""
    rows, width, n, k = (tirx.Var(name, "int64") for name in ("rows", "width", "n", "k"))
    lowest = tirx.const(float("-inf"), "float64")

    @T.macro
    def choose(i, V, I, L, S, F, banned, eos_id, pad_id, tokens, origin, new_scores, ended_rows, ended_scores, heads,
               state, best):
        for s in range(k):
            tokens[i, s] = pad_id
            origin[i, s] = i * k + s
            new_scores[i, s] = lowest
            ended_rows[i, s] = T.int64(-1)
            ended_scores[i, s] = lowest
            heads[i, s] = T.int64(0)
        # state: [continued, ended, stopped, best row]
        state[0] = T.int64(0)
        state[1] = F[i]
        state[2] = T.Cast("int64", F[i] >= k)
        for _pick in range(2 * k):
            if state[2] == T.int64(0):
                state[3] = T.int64(-1)
                best[0] = lowest
                for b in range(k):
                    if heads[i, b] < width:
                        if state[3] < 0 or S[i, b] + (T.Cast("float64", V[i * k + b, heads[i, b]])
                                                      - T.Cast("float64", L[i * k + b])) > best[0]:
                            best[0] = S[i, b] + (T.Cast("float64", V[i * k + b, heads[i, b]])
                                                 - T.Cast("float64", L[i * k + b]))
                            state[3] = T.int64(b)
                if state[3] < 0 or not best[0] > lowest:  # (NaN too)
                    state[2] = T.int64(1)
                else:
                    row = i * k + state[3]
                    if I[row, heads[i, state[3]]] == eos_id:
                        if banned[0] == T.int64(0):
                            ended_rows[i, state[1] - F[i]] = row
                            ended_scores[i, state[1] - F[i]] = best[0]
                            state[1] = state[1] + 1
                            state[2] = T.Cast("int64", state[1] >= k)
                    else:
                        tokens[i, state[0]] = I[row, heads[i, state[3]]]
                        origin[i, state[0]] = row
                        new_scores[i, state[0]] = best[0]
                        state[0] = state[0] + 1
                        state[2] = T.Cast("int64", state[0] >= k)
                    heads[i, state[3]] = heads[i, state[3]] + 1

    if gpu:
        @T.prim_func(s_tir=True, private=True)
        def beam_select_gpu(values: T.handle, ids: T.handle, log_sum_exp: T.handle, scores: T.handle,
                            finished: T.handle, eos_banned: T.handle, eos_id: T.int64, pad_id: T.int64,
                            tokens: T.handle, origin: T.handle, new_scores: T.handle, ended_rows: T.handle,
                            ended_scores: T.handle, heads: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "int8mt.kernel": BEAM_SELECT})
            V = T.match_buffer(values, (rows, width), "float32")
            I = T.match_buffer(ids, (rows, width), "int64")
            L = T.match_buffer(log_sum_exp, (rows,), "float32")
            S = T.match_buffer(scores, (n, k), "float64")
            F = T.match_buffer(finished, (n,), "int64")
            banned = T.match_buffer(eos_banned, (T.int64(1),), "int64")
            O_t = T.match_buffer(tokens, (n, k), "int64")
            O_o = T.match_buffer(origin, (n, k), "int64")
            O_s = T.match_buffer(new_scores, (n, k), "float64")
            O_er = T.match_buffer(ended_rows, (n, k), "int64")
            O_es = T.match_buffer(ended_scores, (n, k), "float64")
            H = T.match_buffer(heads, (n, k), "int64")
            with T.sblock("root"):
                block = T.launch_thread("blockIdx.x", (n + GPU_THREADS - 1) // GPU_THREADS)
                thread = T.launch_thread("threadIdx.x", GPU_THREADS)
                state = T.decl_buffer((4,), "int64", scope="local")
                best = T.decl_buffer((1,), "float64", scope="local")
                i = T.Cast("int64", block) * GPU_THREADS + T.Cast("int64", thread)
                if i < n:
                    choose(i, V, I, L, S, F, banned, eos_id, pad_id, O_t, O_o, O_s, O_er, O_es, H, state, best)

        return beam_select_gpu

    @T.prim_func(s_tir=True, private=True)
    def beam_select(values: T.handle, ids: T.handle, log_sum_exp: T.handle, scores: T.handle, finished: T.handle,
                    eos_banned: T.handle, eos_id: T.int64, pad_id: T.int64, tokens: T.handle, origin: T.handle,
                    new_scores: T.handle, ended_rows: T.handle, ended_scores: T.handle, heads: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "int8mt.kernel": BEAM_SELECT})
        V = T.match_buffer(values, (rows, width), "float32")
        I = T.match_buffer(ids, (rows, width), "int64")
        L = T.match_buffer(log_sum_exp, (rows,), "float32")
        S = T.match_buffer(scores, (n, k), "float64")
        F = T.match_buffer(finished, (n,), "int64")
        banned = T.match_buffer(eos_banned, (T.int64(1),), "int64")
        O_t = T.match_buffer(tokens, (n, k), "int64")
        O_o = T.match_buffer(origin, (n, k), "int64")
        O_s = T.match_buffer(new_scores, (n, k), "float64")
        O_er = T.match_buffer(ended_rows, (n, k), "int64")
        O_es = T.match_buffer(ended_scores, (n, k), "float64")
        H = T.match_buffer(heads, (n, k), "int64")
        for i in T.parallel(n):
            with T.sblock("sentence"):
                vi = T.axis.spatial(n, i)
                T.reads(V[vi * k:vi * k + k, 0:width], I[vi * k:vi * k + k, 0:width], L[vi * k:vi * k + k],
                        S[vi, 0:k], F[vi], banned[0])
                T.writes(O_t[vi, 0:k], O_o[vi, 0:k], O_s[vi, 0:k], O_er[vi, 0:k], O_es[vi, 0:k], H[vi, 0:k])
                state = T.alloc_buffer((4,), "int64", scope="local")
                best = T.alloc_buffer((1,), "float64", scope="local")
                choose(vi, V, I, L, S, F, banned, eos_id, pad_id, O_t, O_o, O_s, O_er, O_es, H, state, best)

    return beam_select
