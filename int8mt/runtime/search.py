"""Greedy and beam search in NumPy over a compiled decoder step."""
from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .cache import aligned_empty
from .options import SearchOptions


COMPACT_BELOW = 0.75  # drop finished rows once fewer than this share of the batch in flight is unfinished


def greedy_search(bundle: Bundle, src: np.ndarray, max_lens: list[int], min_length: int = 0) -> list[list[int]]:
    """Arg-max decoding of each row of ``src`` [B, S], row i stopping after ``max_lens[i]`` tokens and not
    ending before ``min_length``; returns ids without EOS. Finished rows leave the batch (their cache history
    and cross-attention rows are dropped) once fewer than ``COMPACT_BELOW`` of the rows in flight are
    unfinished, so a batch does not keep paying for its longest sentence; every row's result is the same as
    decoded alone. One sentence decodes in one call of the library where it has the loop
    (:meth:`Bundle.greedy_decode`: the same tokens without the host's work between steps)."""
    batch = src.shape[0]
    if batch == 1 and bundle.decodes_greedily:
        return [bundle.greedy_decode(src[0].tolist(), max_lens[0], min_length)]
    src_t = bundle.tensor(src)
    cross = bundle.encode(src)
    cache = bundle.empty_cache(batch, max(max_lens))
    token_memory = aligned_empty((batch, 1), np.int64)  # each step's tokens: an input without a copy
    tokens = token_memory
    tokens[:] = bundle.start_id
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    rows = list(range(batch))  # the sentence of each row in flight
    unfinished = batch
    for step in range(max(max_lens)):
        logits = bundle.decode_step(tokens, step, cache, cross, src_t)
        if step < min_length:
            logits[:, bundle.eos_id] = -np.inf
        nxt = logits.argmax(-1)
        for i, token in zip(rows, nxt.tolist()):  # Python ints: NumPy's per-element calls cost µs per step
            if done[i]:
                continue
            if token == bundle.eos_id:
                done[i] = True
            else:
                out[i].append(token)
                done[i] = len(out[i]) >= max_lens[i]
            unfinished -= done[i]
        if not unfinished:
            break
        if unfinished < COMPACT_BELOW * len(rows):
            keep = np.array([r for r, i in enumerate(rows) if not done[i]])
            cache.select(keep)
            cross = bundle.reorder_cross(cross, keep)
            rows, nxt = [rows[r] for r in keep], nxt[keep]
            src_t = bundle.tensor(src[rows])
        tokens = token_memory[:len(nxt)]  # (the step has read the last ones)
        tokens[:, 0] = nxt
    return out


def length_normalized(score: float, length: int, alpha: float) -> float:
    """GNMT length normalisation: score / ((5 + length) / 6) ** alpha."""
    return score / (((5.0 + length) / 6.0) ** alpha)


def beam_search(bundle: Bundle, src: np.ndarray, max_lens: list[int], opts: SearchOptions) -> list[list[int]]:
    """Beam search with ``opts.beam_size`` hypotheses per sentence, row i stopping after ``max_lens[i]``
    tokens and none ending before ``opts.min_length``; returns the best ids without EOS. Each sentence is
    encoded once; its cross-attention keys and values are then repeated on the device for its k hypotheses
    (``reorder_cross``). Each sentence's 2k best continuations are among its rows' 2k best tokens, so for beams
    up to ``bundle.candidates / 2`` the device keeps only each row's best candidates and log-sum-exp and chooses
    each sentence's next hypotheses from them (``beam_step``): only the chosen tokens, the rows they continue,
    their scores and the hypotheses that ended come to the host. Wider beams read the whole logits and hand each
    row's 2k best to the same choice. Reordering hypotheses reorders only the cache's history (on the host).
    Finished sentences leave the batch (their k rows dropped from the history and the cross-attention
    keys/values) once fewer than ``COMPACT_BELOW`` of the sentences in flight are unfinished, as in greedy search;
    every sentence's result is the same as decoded alone. One hypothesis per sentence is greedy search: on the
    CPU :func:`greedy_search` (each row's arg-max of its logits, read in place); on a GPU this search with k = 1
    makes the same choice on the device, so that no logits are copied to the host (a step's logits: rows x
    vocabulary float32)."""
    if opts.beam_size == 1 and not bundle.on_gpu:
        return greedy_search(bundle, src, max_lens, opts.min_length)
    batch, k = src.shape[0], opts.beam_size
    alive = np.arange(batch)  # the sentences in flight, in row order: sentence alive[i] has rows i*k .. i*k+k-1
    sentence_of_row = np.repeat(alive, k)
    src_t = bundle.tensor(src[sentence_of_row])
    cross = bundle.reorder_cross(bundle.encode(src), sentence_of_row)
    cache = bundle.empty_cache(batch * k, max(max_lens))
    scores = np.full((batch, k), -np.inf)
    scores[:, 0] = 0.0
    tokens_so_far = np.zeros((batch * k, 0), np.int64)  # each row's hypothesis (all have the step's length)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    finished_count = np.zeros(batch, np.int64)
    max_len = np.asarray(max_lens)
    tokens = np.full((batch * k, 1), bundle.start_id, np.int64)
    on_device = 2 * k <= bundle.candidates  # enough per-row candidates for the 2k best of each sentence
    for step in range(max(max_lens)):
        n = len(alive)
        if on_device:
            chosen = bundle.beam_step(tokens, step, cache, cross, src_t, scores[alive], finished_count[alive],
                                      step < opts.min_length)
        else:
            logits = bundle.decode_step(tokens, step, cache, cross, src_t)
            candidates = tuple(bundle.tensor(part) for part in _row_candidates(logits, 2 * k))
            chosen = bundle.select_beams(candidates, scores[alive], finished_count[alive], step < opts.min_length)
        for i, e in zip(*np.nonzero(chosen.ended_rows >= 0)):  # hypotheses ending here, best first
            score = length_normalized(float(chosen.ended_scores[i, e]), step + 1, opts.length_penalty)
            finished[alive[i]].append((score, tokens_so_far[chosen.ended_rows[i, e]].tolist()))
        active = finished_count[alive] < k
        scores[alive[active]] = chosen.new_scores[active]
        origin, next_tokens = chosen.origin, chosen.tokens
        tokens_so_far = np.concatenate([tokens_so_far[origin.reshape(-1)], next_tokens.reshape(-1, 1)], 1)
        for i in np.flatnonzero(active & (step + 1 >= max_len[alive])):  # out of length: live hypotheses end here
            b = alive[i]
            live = np.flatnonzero(chosen.new_scores[i] > -np.inf)
            finished[b] += [(length_normalized(float(chosen.new_scores[i, j]), step + 1, opts.length_penalty),
                             tokens_so_far[i * k + j].tolist()) for j in live]
            finished[b] += [(-np.inf, [])] * (k - len(finished[b]))
        finished_count[alive] = [len(finished[b]) for b in alive]
        unfinished = np.flatnonzero(finished_count[alive] < k)
        if len(unfinished) == 0:
            break
        if len(unfinished) < COMPACT_BELOW * n:  # the finished sentences' rows leave
            kept_rows = (unfinished[:, None] * k + np.arange(k)).reshape(-1)
            cross = bundle.reorder_cross(cross, kept_rows)
            tokens_so_far = tokens_so_far[kept_rows]
            alive, origin, next_tokens = alive[unfinished], origin[unfinished], next_tokens[unfinished]
            src_t = bundle.tensor(src[np.repeat(alive, k)])
        rows = origin.reshape(-1)
        if not np.array_equal(rows, np.arange(n * k)):
            cache.select(rows)
        tokens = next_tokens.reshape(-1, 1)
    return [max(pool, key=lambda item: item[0])[1] for pool in finished]


def _row_candidates(logits: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``top_candidates`` returns, from the whole logits [B, V] on the host: each row's ``count`` largest
    logits and their ids (descending, equal ones in id order; where several equal the ``count``-th, any of them
    may be the one kept) and the row's log-sum-exp, in float32 as the device's. (A stable sort of each whole row
    took 6x as long.)"""
    width = logits.shape[1]
    count = min(count, width)
    part = np.argpartition(logits, width - count, axis=1)[:, width - count:]
    values = np.take_along_axis(logits, part, 1)
    order = np.lexsort((part, -values), axis=1)
    peak = logits.max(-1, keepdims=True)
    log_sum_exp = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
    return np.take_along_axis(values, order, 1), np.take_along_axis(part, order, 1), log_sum_exp
