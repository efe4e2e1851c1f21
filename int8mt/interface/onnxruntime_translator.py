"""Translation with the graphs of :mod:`.onnxruntime_model` in ONNX Runtime: greedy and beam search in NumPy around
its sessions, as int8mt's runtime searches (the same length limits, GNMT length penalty and choice of each
sentence's next hypotheses among its rows' 2 x beam best tokens), so that the two engines differ in how they run
the model, not in what they search. Batches hold sentences of similar length (sorted, as CTranslate2 batches);
a finished sentence leaves its batch at once (its rows of the caches dropped)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from int8mt.errors import UserError
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.search import length_normalized

from .onnxruntime_model import CONFIG_FILE, DECODER_FILE, ENCODER_FILE, import_onnxruntime


class OnnxRuntimeTranslator:
    """One encoder and decoder session pair per replica, ``threads`` intra-op threads each; replicas translate
    different batches at the same time (Python threads: ONNX Runtime releases the GIL while it runs)."""

    def __init__(self, model_dir: Path, replicas: int = 1, threads: int = 1) -> None:
        ort = import_onnxruntime()
        model_dir = Path(model_dir)
        try:
            self.settings = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{model_dir} is not an exported ONNX Runtime model ({CONFIG_FILE}: {err})") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.replicas = [tuple(ort.InferenceSession(str(model_dir / name), options,
                                                    providers=["CPUExecutionProvider"])
                               for name in (ENCODER_FILE, DECODER_FILE)) for _ in range(replicas)]
        s = self.settings
        self.start_id, self.eos_id, self.pad_id = s["start_id"], s["eos_id"], s["pad_id"]
        self.layers, self.heads, self.head_dim = s["decoder_layers"], s["heads"], s["head_dim"]

    def translate(self, sources: list[list[int]], batch: int, options: SearchOptions) -> list[list[int]]:
        """Each source's best output ids (end of sentence excluded) under ``options`` (beam size, length penalty,
        output limits: at most the model's positions); sources are token ids with their end of sentence."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        batches = [order[i:i + batch] for i in range(0, len(order), batch)]
        limit = self.settings["max_positions"]
        results: list[list[int]] = [[] for _ in sources]

        def run(replica: int) -> None:
            sessions = self.replicas[replica]
            for indices in batches[replica::len(self.replicas)]:
                rows = [sources[i] for i in indices]
                src = np.full((len(rows), max(map(len, rows))), self.pad_id, np.int64)
                for r, ids in enumerate(rows):
                    src[r, :len(ids)] = ids
                max_lens = [options.max_length(len(ids), limit) for ids in rows]
                found = (self._greedy(sessions, src, max_lens, options.min_length) if options.beam_size == 1 else
                         self._beam(sessions, src, max_lens, options.beam_size, options.length_penalty,
                                    options.min_length))
                for i, out in zip(indices, found):
                    results[i] = out

        if len(self.replicas) == 1:
            run(0)
        else:
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                list(pool.map(run, range(len(self.replicas))))
        return results

    def _step(self, decoder, tokens: np.ndarray, step: int, src: np.ndarray, candidates: int, past: list[np.ndarray],
              cross: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        """One decoder step: each row's ``candidates`` best logits and their ids, its log-sum-exp, the grown caches."""
        feeds = {"tokens": tokens, "step": np.array([step], np.int64), "src": src,
                 "candidates": np.array([candidates], np.int64)}
        for i in range(self.layers):
            feeds.update({f"past_k_{i}": past[2 * i], f"past_v_{i}": past[2 * i + 1],
                          f"cross_k_{i}": cross[2 * i], f"cross_v_{i}": cross[2 * i + 1]})
        values, ids, log_sum_exp, *past = decoder.run(None, feeds)
        return values, ids, log_sum_exp, past

    def _empty_cache(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def _greedy(self, sessions, src: np.ndarray, max_lens: list[int], min_length: int) -> list[list[int]]:
        """Each row's arg-max token until its end of sentence or its length limit (a finished row leaves)."""
        encoder, decoder = sessions
        cross = encoder.run(None, {"src": src})
        past = self._empty_cache(len(src))
        out: list[list[int]] = [[] for _ in src]
        rows = np.arange(len(src))  # the sentence of each row in flight
        limits = np.asarray(max_lens)
        tokens = np.full((len(src), 1), self.start_id, np.int64)
        for step in range(max(max_lens)):
            banned = step < min_length
            _, ids, _, past = self._step(decoder, tokens, step, src, 1 + banned, past, cross)
            best = np.where(ids[:, 0] == self.eos_id, ids[:, -1], ids[:, 0]) if banned else ids[:, 0]
            ended = best == self.eos_id
            for i, token in zip(rows[~ended].tolist(), best[~ended].tolist()):
                out[i].append(token)
            keep = ~ended & (step + 1 < limits[rows])
            if not keep.any():
                break
            if not keep.all():
                past, cross = [p[keep] for p in past], [c[keep] for c in cross]
                src, rows = src[keep], rows[keep]
            tokens = best[keep, None]
        return out

    def _beam(self, sessions, src: np.ndarray, max_lens: list[int], k: int, alpha: float,
              min_length: int) -> list[list[int]]:
        """Beam search with ``k`` hypotheses per sentence."""
        encoder, decoder = sessions
        n = len(src)
        cross = encoder.run(None, {"src": src})
        alive = np.arange(n)  # the sentences in flight: sentence alive[i] has rows i*k .. i*k+k-1
        rows = np.repeat(alive, k)
        cross = [c[rows] for c in cross]
        src_rows = src[rows]
        past = self._empty_cache(n * k)
        scores = np.full((n, k), -np.inf)
        scores[:, 0] = 0.0
        hyps = np.zeros((n * k, 0), np.int64)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
        tokens = np.full((n * k, 1), self.start_id, np.int64)
        for step in range(max(max_lens)):
            banned = step < min_length
            values, ids, log_sum_exp, past = self._step(decoder, tokens, step, src_rows, 2 * k + banned, past, cross)
            log_probs = values.astype(np.float64) - log_sum_exp[:, None]  # (as int8mt's beam_select subtracts)
            if banned:
                log_probs[ids == self.eos_id] = -np.inf
            m = len(alive)
            total = (scores[alive].reshape(-1, 1) + log_probs).reshape(m, -1)  # sentence i: its rows' candidates
            row_ids = (np.arange(m * k)[:, None] + np.zeros_like(ids)).reshape(m, -1)
            candidate_ids = ids.reshape(m, -1)
            order = np.argsort(-total, axis=1, kind="stable")  # (row-major ties: the lower row first)
            origin, next_tokens = np.zeros((m, k), np.int64), np.full((m, k), self.pad_id, np.int64)
            new_scores = np.full((m, k), -np.inf)
            keep = np.zeros(m, bool)
            for i in range(m):
                b, continued = alive[i], 0
                origin[i] = i * k + np.arange(k)
                for j in order[i]:
                    score = float(total[i, j])
                    if not score > -np.inf or continued == k or len(finished[b]) >= k:
                        break
                    row, token = int(row_ids[i, j]), int(candidate_ids[i, j])
                    if token == self.eos_id:
                        finished[b].append((length_normalized(score, step + 1, alpha), hyps[row].tolist()))
                    else:
                        origin[i, continued], next_tokens[i, continued] = row, token
                        new_scores[i, continued] = score
                        continued += 1
                if len(finished[b]) < k and step + 1 >= max_lens[b]:  # out of length: live hypotheses end here
                    finished[b] += [(length_normalized(float(new_scores[i, j]), step + 1, alpha),
                                     [*hyps[origin[i, j]].tolist(), int(next_tokens[i, j])])
                                    for j in range(continued)]
                    finished[b] += [(-np.inf, [])] * (k - len(finished[b]))
                keep[i] = len(finished[b]) < k
            if not keep.any():
                break
            scores[alive] = new_scores
            chosen = origin[keep].reshape(-1)
            hyps = np.concatenate([hyps[chosen], next_tokens[keep].reshape(-1, 1)], 1)
            past = [p[chosen] for p in past]
            if not keep.all():
                kept_rows = (np.flatnonzero(keep)[:, None] * k + np.arange(k)).reshape(-1)
                cross, src_rows = [c[kept_rows] for c in cross], src_rows[kept_rows]
                alive = alive[keep]
            tokens = next_tokens[keep].reshape(-1, 1)
        return [max(pool, key=lambda item: item[0])[1] for pool in finished]
