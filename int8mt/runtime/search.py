"""Greedy and beam search in NumPy over a compiled decoder step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .cache import aligned_empty
from .options import SearchOptions


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


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


def _penalized(score: float, length: int, alpha: float) -> float:
    """GNMT length normalisation: score / ((5 + length) / 6) ** alpha."""
    return score / (((5.0 + length) / 6.0) ** alpha)


def beam_search(bundle: Bundle, src: np.ndarray, max_lens: list[int], opts: SearchOptions) -> list[list[int]]:
    """Beam search with ``opts.beam_size`` hypotheses per sentence, row i stopping after ``max_lens[i]``
    tokens and none ending before ``opts.min_length``; returns the best ids without EOS. Each sentence is
    encoded once; its cross-attention keys and values are then repeated on the device for its k hypotheses
    (``reorder_cross``). Each sentence's 2k best continuations are among its rows' 2k best tokens, so for beams
    up to ``bundle.candidates / 2`` the device returns only each row's best candidates and log-sum-exp
    (``decode_step_candidates``) instead of the whole logits, which the host would turn into log-probabilities
    and partition. Reordering hypotheses reorders only the cache's history (on the host). Finished sentences
    leave the batch (their k rows dropped from the history and the cross-attention keys/values) once fewer
    than ``COMPACT_BELOW`` of the sentences in flight are unfinished, as in greedy search; every sentence's
    result is the same as decoded alone. The hypotheses' bookkeeping is vectorized over sentences
    (:func:`_select`); only finished hypotheses are handled one by one."""
    if opts.beam_size == 1:
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
            values, ids, log_sum_exp = bundle.decode_step_candidates(tokens, step, cache, cross, src_t)
            log_probs, token_of = values.astype(np.float64) - log_sum_exp[:, None], ids.reshape(n, -1)
        else:
            logits = bundle.decode_step(tokens, step, cache, cross, src_t)
            log_probs, token_of = _log_softmax(logits.astype(np.float64)), None
        width = log_probs.shape[-1]
        flat = (scores[alive][:, :, None] + log_probs.reshape(n, k, width)).reshape(n, -1)
        top = np.argpartition(-flat, 2 * k, axis=1)[:, : 2 * k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(flat, top, 1), axis=1), 1)  # best first
        beam, column = np.divmod(top, width)
        chosen = _select(np.take_along_axis(flat, top, 1), column if token_of is None else
                         np.take_along_axis(token_of, top, 1), finished_count[alive], k, bundle.eos_id,
                         step < opts.min_length)
        new_scores, origin = chosen.new_scores, np.arange(n * k).reshape(n, k)  # the row each hypothesis continues
        next_tokens = aligned_empty((n, k), np.int64)  # (an input without a copy)
        next_tokens[:] = bundle.pad_id
        sentence, slot = np.nonzero(chosen.new_slot >= 0)
        where = chosen.new_slot[sentence, slot]
        origin[sentence, where] = sentence * k + beam[sentence, slot]
        next_tokens[sentence, where] = chosen.tokens[sentence, slot]
        for i, c in zip(*np.nonzero(chosen.ended)):  # hypotheses ending here, best first
            b = alive[i]
            finished[b].append((_penalized(float(chosen.scores[i, c]), step + 1, opts.length_penalty),
                                tokens_so_far[i * k + beam[i, c]].tolist()))
        active = chosen.active
        scores[alive[active]] = new_scores[active]
        tokens_so_far = np.concatenate([tokens_so_far[origin.reshape(-1)], next_tokens.reshape(-1, 1)], 1)
        for i in np.flatnonzero(active & (step + 1 >= max_len[alive])):  # out of length: live hypotheses end here
            b = alive[i]
            live = np.flatnonzero(new_scores[i] > -np.inf)
            finished[b] += [(_penalized(float(new_scores[i, j]), step + 1, opts.length_penalty),
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


@dataclass(frozen=True)
class _Selection:
    """One step's choice among each sentence's candidates (``[sentences, 2k]``, best first)."""
    scores: np.ndarray      # the candidates' scores
    tokens: np.ndarray      # their tokens
    new_slot: np.ndarray    # the hypothesis slot a candidate continues into, or -1 (not taken, or ended)
    ended: np.ndarray       # the candidate ends its hypothesis (end of sentence) and joins the finished ones
    new_scores: np.ndarray  # [sentences, k]: each slot's score (-inf where no candidate filled it)
    active: np.ndarray      # [sentences]: the sentence was still searching at this step


def _select(scores: np.ndarray, tokens: np.ndarray, finished: np.ndarray, k: int, eos_id: int,
            eos_banned: bool) -> _Selection:
    """Each sentence takes its candidates in order until k continue or k hypotheses have finished (counting the
    ``finished`` before this step), stopping at the first impossible one (-inf); an end of sentence finishes its
    hypothesis, or is passed over while ``eos_banned``. Sentences that had k finished hypotheses take none."""
    possible = np.logical_and.accumulate(scores > -np.inf, axis=1)
    eos = tokens == eos_id
    continues, ends = possible & ~eos, possible & eos & (not eos_banned)
    continued, ended = np.cumsum(continues, 1), finished[:, None] + np.cumsum(ends, 1)
    stop = (continued == k) | (ended >= k)  # after this candidate (if it was taken)
    taken = ((np.cumsum(stop, 1) - stop) == 0) & (finished < k)[:, None]  # nothing stopped the sentence before
    new_slot = np.where(continues & taken, continued - 1, -1)
    new_scores = np.full((len(scores), k), -np.inf)
    sentence, candidate = np.nonzero(new_slot >= 0)
    new_scores[sentence, new_slot[sentence, candidate]] = scores[sentence, candidate]
    return _Selection(scores, tokens, new_slot, ends & taken, new_scores, finished < k)
