"""Text in, text out: tokenization, batching by length and search over a loaded bundle."""
from __future__ import annotations

import functools
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from int8mt.data import iterate_batches, pad_batch
from int8mt.errors import UserError
from int8mt.tokenizer import MarianTokenizer, Tokenizer, check_target_lang, starts_with_language_token

from .bundle import Bundle, set_thread_count
from .options import SearchOptions

DEFAULT_BATCH_SIZE = 32  # sentences per call of the compiled entry points
_CALLER = threading.local()  # ``threads``: the thread count a translator gave this (calling) thread's kernels


def check_decoding(options: SearchOptions, batch_size: int, max_rows: int) -> None:
    """Refuse a batch size below 1 or a beam wider than the rows (sentences x beams) a bundle decodes at once."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if options.beam_size > max_rows:
        raise UserError(f"beam size {options.beam_size} exceeds the {max_rows} rows (sentences x beams) the "
                        "bundle's entry points take in one call; use a smaller beam")


def fit_to_positions(ids: list[int], limit: int, eos_id: int) -> list[int]:
    """Source ids cut to the model's ``limit`` positions: the first ``limit - 1`` tokens and the end of sentence."""
    return ids if len(ids) <= limit else ids[:limit - 1] + [eos_id]


def _search(bundle: Bundle, sources: list[list[int]], options: SearchOptions) -> list[list[int]]:
    """``options``' search of ``sources`` (token ids, each at most the model's positions). One sentence's greedy
    search runs the library's greedy loop without NumPy (:mod:`int8mt.runtime.tensors`); the others import it."""
    max_lens = [options.max_length(len(ids), bundle.max_positions) for ids in sources]
    if len(sources) == 1 and options.beam_size == 1 and bundle.decodes_greedily:
        return [bundle.greedy_decode(sources[0], max_lens[0], options.min_length)]
    from .search import beam_search

    return beam_search(bundle, pad_batch(sources, bundle.pad_id), max_lens, options)


class Translator:
    """Translates text with a bundle. ``replicas`` virtual machines over the one loaded library (weights in memory
    once) translate batches in parallel, each on ``threads`` threads (default: ``TVM_NUM_THREADS`` or the CPUs,
    shared out among the replicas), like CTranslate2's ``inter_threads`` x ``intra_threads``. The first replica
    translates in the calling thread (whose kernels then run on ``threads`` threads), the others on threads of
    their own. One ``Translator`` may be shared by threads: each replica runs one batch at a time."""

    def __init__(self, bundle_dir: Path | str, options: SearchOptions = SearchOptions(),
                 batch_size: int = DEFAULT_BATCH_SIZE, target_lang: str | None = None, replicas: int = 1,
                 threads: int | None = None) -> None:
        if replicas < 1:
            raise UserError(f"replicas must be at least 1, got {replicas}")
        if threads is not None and threads < 1:
            raise UserError(f"threads per replica must be at least 1, got {threads}")
        self.bundle = Bundle(bundle_dir)
        check_decoding(options, batch_size, self.bundle.max_rows)
        if target_lang is not None:
            check_target_lang(self.tokenizer, target_lang)
        self.target_lang = target_lang
        self.options = options
        self.batch_size = batch_size
        self.replicas, self.threads = replicas, threads or max(1, int(os.environ["TVM_NUM_THREADS"]) // replicas)
        self._free: queue.SimpleQueue[Bundle] = queue.SimpleQueue()
        for replica in range(replicas):
            self._free.put(self.bundle if replica == 0 else self.bundle.replica())
        self._pool = ThreadPoolExecutor(replicas - 1, "int8mt-replica", set_thread_count, (self.threads,)) \
            if replicas > 1 else None  # (the calling thread is the first replica's)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | MarianTokenizer:
        """The bundle's tokenizer, loaded when first needed (translating token ids needs none: 2.4 MiB less)."""
        return self.bundle.tokenizer()

    def sentences_per_call(self, options: SearchOptions | None = None) -> int:
        """Sentences in one search: ``batch_size``, fewer where sentences x beams would exceed the bundle's
        row bound."""
        beam = (options or self.options).beam_size
        return max(1, min(self.batch_size, self.bundle.max_rows // beam))

    def source_ids(self, sentence: str, target_lang: str | None = None) -> list[int]:
        """The token ids :meth:`translate` feeds the model for ``sentence`` (stripped; the target-language
        token first where the model has them and the sentence names none; ``</s>`` last), before any cut to
        the model's positions. ``target_lang`` was checked by the caller (None: the translator's)."""
        text = sentence.strip()
        target_lang = target_lang or self.target_lang
        if target_lang is None:  # a model with language tokens needs one from the sentence itself
            check_target_lang(self.tokenizer, None, text)
        own = not text or starts_with_language_token(text)  # a sentence's own >>xx<< token wins
        return self.tokenizer.encode(text, target_lang=None if own else target_lang)

    def translate(self, sentences: list[str], progress: bool = False, options: SearchOptions | None = None,
                  target_lang: str | None = None) -> list[str]:
        """Translate ``sentences`` with the translator's search options and target language, or ``options`` and
        ``target_lang`` for this call (models whose vocabulary has ``>>xx<<`` tokens need one; a sentence that
        starts with such a token keeps it instead); empty input lines give empty output lines. An input longer
        than the model's positions is cut to fit, with a warning on stderr naming it. ``progress`` shows a bar
        on stderr."""
        target_lang = target_lang or self.target_lang
        check_target_lang(self.tokenizer, target_lang)
        limit = self.bundle.max_positions
        ids = []
        for number, sentence in enumerate(sentences, 1):
            full = self.source_ids(sentence, target_lang)
            if len(full) > limit:
                print(f"int8mt: warning: input {number} has {len(full)} tokens; the model reads at most {limit}, "
                      f"so only its first {limit - 1} are translated", file=sys.stderr)
            ids.append(fit_to_positions(full, limit, self.tokenizer.eos_id))
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        out = [""] * len(sentences)
        for i, hyp in zip(todo, self.translate_ids([ids[i] for i in todo], options, progress)):
            out[i] = self.tokenizer.decode(hyp)
        return out

    def translate_ids(self, sources: list[list[int]], options: SearchOptions | None = None,
                      progress: bool = False) -> list[list[int]]:
        """Search on token ids: each source as :meth:`source_ids` gives it (at most the model's positions), each
        result without end of sentence. Batches of similar length go to the replicas as they come free."""
        options = options or self.options
        check_decoding(options, self.batch_size, self.bundle.max_rows)
        limit = self.bundle.max_positions
        too_long = [n for n, ids in enumerate(sources, 1) if not 0 < len(ids) <= limit]
        if too_long:
            raise UserError(f"source {too_long[0]} has {len(sources[too_long[0] - 1])} tokens; the model reads 1 "
                            f"to {limit}")
        vocab = self.bundle.source_vocab_size  # (the embedding kernel reads the row of any id it is given)
        for n, ids in enumerate(sources, 1):
            if min(ids) < 0 or max(ids) >= vocab:
                bad = next(i for i in ids if not 0 <= i < vocab)
                raise UserError(f"source {n} has token id {bad}; the model's source vocabulary has ids 0 to "
                                f"{vocab - 1}")

        out: list[list[int]] = [[] for _ in sources]
        batches = list(iterate_batches(sources, self.sentences_per_call(options)))
        bar = None
        if progress:
            from tqdm import tqdm  # (here: a process translating without a progress bar holds 0.9 MiB less)

            bar = tqdm(total=len(batches), desc="translating", unit="batch", file=sys.stderr, leave=False)

        def search(rows: list[int]) -> None:
            bundle = self._free.get()
            try:
                hyps = _search(bundle, [sources[i] for i in rows], options)
            finally:
                self._free.put(bundle)
            for i, hyp in zip(rows, hyps):
                out[i] = hyp
            if bar is not None:
                bar.update()

        try:
            self._search_all(search, batches)
        finally:
            if bar is not None:
                bar.close()
        return out

    def _search_all(self, search: Callable[[list[int]], None], batches: list[list[int]]) -> None:
        """``search`` every batch, each replica taking the next batch as it comes free: the first in the calling
        thread, the others on threads of their own (handing every batch to another thread cost 6 % at batch 1 with
        one replica, two thread switches per sentence; waking the calling thread at each finished batch 6-9 %
        with two). An error stops the batches not started."""
        if getattr(_CALLER, "threads", None) != self.threads:  # (TVM keeps a thread pool per calling thread)
            set_thread_count(self.threads)
            _CALLER.threads = self.threads
        pending, lock, stop = iter(batches), threading.Lock(), threading.Event()

        def work() -> None:
            while not stop.is_set():
                with lock:
                    rows = next(pending, None)
                if rows is None:
                    return
                search(rows)

        jobs = [self._pool.submit(work) for _ in range(self.replicas - 1)] if self._pool is not None else []
        try:
            work()
            for job in jobs:
                job.result()
        finally:
            stop.set()
