"""Greedy and beam search in NumPy over a compiled decoder step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from int8mt.errors import UserError
from .bundle import Bundle
from .cache import aligned_empty


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 4
    length_penalty: float = 0.6
    max_length_a: float = 1.5
    max_length_b: int = 10
    min_length: int = 0  # tokens before end of sentence may be chosen (capped by the maximum length)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise UserError(f"beam size must be at least 1, got {self.beam_size}")
        for name in ("length_penalty", "max_length_a"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("max_length_b", "min_length"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")

    def max_lengths(self, src: np.ndarray, pad_id: int, limit: int) -> list[int]:
        """Per-sentence output limits from the unpadded source lengths (so batching never changes a result)."""
        lengths = (src != pad_id).sum(1)
        return [max(1, min(int(self.max_length_a * n) + self.max_length_b, limit)) for n in lengths]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


COMPACT_BELOW = 0.75  # drop finished rows once fewer than this share of the batch in flight is unfinished


def greedy_search(bundle: Bundle, src: np.ndarray, max_lens: list[int], min_length: int = 0) -> list[list[int]]:
    """Arg-max decoding of each row of ``src`` [B, S], row i stopping after ``max_lens[i]`` tokens and not
    ending before ``min_length``; returns ids without EOS. Finished rows leave the batch (their cache history
    and cross-attention rows are dropped) once fewer than ``COMPACT_BELOW`` of the rows in flight are
    unfinished, so a batch does not keep paying for its longest sentence; every row's result is the same as
    decoded alone."""
    batch = src.shape[0]
    src_t = bundle.tensor(src)
    cross = bundle.encode(src)
    cache = bundle.empty_cache(batch, max(max_lens))
    tokens = np.full((batch, 1), bundle.start_id, np.int64)
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    rows = np.arange(batch)  # the sentence of each row in flight
    for step in range(max(max_lens)):
        logits = bundle.decode_step(tokens, step, cache, cross, src_t)
        if step < min_length:
            logits[:, bundle.eos_id] = -np.inf
        nxt = logits.argmax(-1)
        for r in np.flatnonzero(~done[rows]):
            i = rows[r]
            if nxt[r] == bundle.eos_id:
                done[i] = True
            else:
                out[i].append(int(nxt[r]))
                done[i] = len(out[i]) >= max_lens[i]
        if done.all():
            break
        tokens = aligned_empty((len(nxt), 1), np.int64)  # an input without a copy
        tokens[:, 0] = nxt
        keep = np.flatnonzero(~done[rows])
        if len(keep) < COMPACT_BELOW * len(rows):
            cache.select(keep)
            cross = bundle.reorder_cross(cross, keep)
            rows, tokens = rows[keep], tokens[keep]
            src_t = bundle.tensor(src[rows])
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
    result is the same as decoded alone."""
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
    hyps: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
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
        origin = np.arange(n * k).reshape(n, k).copy()  # the row each new hypothesis continues
        next_tokens = aligned_empty((n, k), np.int64)  # (an input without a copy)
        next_tokens[:] = bundle.pad_id
        for i, b in enumerate(alive):
            if len(finished[b]) >= k:
                continue
            new_hyps, new_scores = [], []
            for idx in top[i][np.argsort(-flat[i, top[i]])]:
                beam, column = divmod(int(idx), width)
                tok = column if token_of is None else int(token_of[i, idx])
                score = float(flat[i, idx])
                if score == -np.inf:
                    break
                if tok == bundle.eos_id and step < opts.min_length:
                    continue
                if tok == bundle.eos_id:
                    prefix = hyps[b][beam]
                    finished[b].append((_penalized(score, len(prefix) + 1, opts.length_penalty), prefix))
                else:
                    new_hyps.append(hyps[b][beam] + [tok])
                    new_scores.append(score)
                    origin[i, len(new_hyps) - 1] = i * k + beam
                    next_tokens[i, len(new_hyps) - 1] = tok
                if len(new_hyps) == k or len(finished[b]) >= k:
                    break
            hyps[b] = new_hyps + [[] for _ in range(k - len(new_hyps))]
            scores[b] = new_scores + [-np.inf] * (k - len(new_scores))
            if step + 1 >= max_lens[b]:  # out of length: the live hypotheses end here
                finished[b] += [(_penalized(sc, len(h), opts.length_penalty), h)
                                for sc, h in zip(new_scores, new_hyps)]
                finished[b] += [(-np.inf, [])] * (k - len(finished[b]))
        unfinished = np.flatnonzero([len(finished[b]) < k for b in alive])
        if len(unfinished) == 0:
            break
        if len(unfinished) < COMPACT_BELOW * n:  # the finished sentences' rows leave
            kept_rows = (unfinished[:, None] * k + np.arange(k)).reshape(-1)
            cross = bundle.reorder_cross(cross, kept_rows)
            alive, origin, next_tokens = alive[unfinished], origin[unfinished], next_tokens[unfinished]
            src_t = bundle.tensor(src[np.repeat(alive, k)])
        rows = origin.reshape(-1)
        if not np.array_equal(rows, np.arange(n * k)):
            cache.select(rows)
        tokens = next_tokens.reshape(-1, 1)
    return [max(pool, key=lambda item: item[0])[1] for pool in finished]
