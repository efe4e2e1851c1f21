"""End-to-end translation benchmark: PyTorch eager FP32 against a compiled bundle, same sentences."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from int8mt.metrics import corpus_bleu


@dataclass
class BenchRow:
    backend: str
    search: str
    batch_size: int
    sentences: int
    seconds: float
    sentences_per_second: float
    bleu: float


def _timed(backend: str, search: str, batch: int, translate: Callable[[], list[str]], refs: list[str]) -> BenchRow:
    t0 = time.perf_counter()
    hyps = translate()
    seconds = time.perf_counter() - t0
    return BenchRow(backend, search, batch, len(hyps), round(seconds, 2), round(len(hyps) / seconds, 2),
                    round(corpus_bleu(hyps, refs), 2))


def bench_translation(bundle_dir: Path, model_dir: Path | None, sources: list[str], references: list[str],
                      batch_sizes: tuple[int, ...] = (1, 32), beam_size: int = 4) -> list[BenchRow]:
    """Greedy at each batch size for both backends, plus the bundle's beam search at the largest batch."""
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    runs = [(1, batch) for batch in batch_sizes] + [(beam_size, max(batch_sizes))]
    rows = []
    for beam, batch in runs:
        translator = Translator(bundle_dir, SearchOptions(beam_size=beam), batch_size=batch)
        search = "greedy" if beam == 1 else f"beam {beam}"
        rows.append(_timed("int8mt bundle", search, batch, lambda: translator.translate(sources, progress=True),
                           references))
    if model_dir is not None:
        import torch

        from int8mt.model.checkpoint import load_model_dir
        from int8mt.model.generate import translate_greedy
        from int8mt.tokenizer import load_tokenizer

        model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
        for batch in batch_sizes:
            with torch.inference_mode():
                rows.append(_timed(f"PyTorch {torch.__version__} eager", "greedy", batch,
                                   lambda: translate_greedy(model, tok, sources, model.cfg.max_positions, batch),
                                   references))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    header = f"| {'backend':<24} | {'search':<7} | batch | sentences | seconds | sentences/s | BLEU  |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r.backend:<24} | {r.search:<7} | {r.batch_size:>5} | {r.sentences:>9} | {r.seconds:>7} "
                     f"| {r.sentences_per_second:>11} | {r.bleu:>5} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
