"""Text in, text out: tokenization, batching by length and search over a loaded bundle."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from int8mt.data import iterate_batches, pad_batch
from int8mt.tokenizer import Tokenizer

from .bundle import Bundle
from .search import SearchOptions, beam_search

DEFAULT_BATCH_SIZE = 32  # sentences per call of the compiled entry points


class Translator:
    def __init__(self, bundle_dir: Path | str, options: SearchOptions = SearchOptions(),
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.bundle = Bundle(bundle_dir)
        self.tokenizer = Tokenizer(self.bundle.tokenizer_file)
        self.options = options
        self.batch_size = batch_size

    def translate(self, sentences: list[str], progress: bool = False) -> list[str]:
        """Translate ``sentences``; empty input lines give empty output lines. Long inputs are truncated to
        the model's maximum number of positions. ``progress`` shows a bar on stderr."""
        limit = self.bundle.max_positions
        ids = [self.tokenizer.encode(s.strip(), max_tokens=limit) for s in sentences]
        out = [""] * len(sentences)
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        batches = list(iterate_batches([ids[i] for i in todo], self.batch_size))
        for batch in tqdm(batches, desc="translating", unit="batch", file=sys.stderr, disable=not progress,
                          leave=False):
            rows = [todo[j] for j in batch]
            src = pad_batch([ids[i] for i in rows], self.bundle.pad_id)
            max_lens = self.options.max_lengths(src, self.bundle.pad_id, limit)
            for i, hyp in zip(rows, beam_search(self.bundle, src, max_lens, self.options)):
                out[i] = self.tokenizer.decode(hyp)
        return out
