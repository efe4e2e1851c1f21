"""End-to-end translation benchmark: PyTorch eager FP32 against a compiled bundle, same sentences."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sacrebleu


@dataclass
class BenchRow:
    backend: str
    search: str
    batch_size: int
    sentences: int
    seconds: float
    sentences_per_second: float
    bleu: float


def _row(backend: str, search: str, batch: int, hyps: list[str], refs: list[str], seconds: float) -> BenchRow:
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return BenchRow(backend, search, batch, len(hyps), round(seconds, 2), round(len(hyps) / seconds, 2),
                    round(bleu, 2))


def bench_translation(bundle_dir: Path, model_dir: Path | None, sources: list[str], references: list[str],
                      batch_sizes: tuple[int, ...] = (1, 32), beam_size: int = 4) -> list[BenchRow]:
    """Greedy at each batch size for both backends, plus the bundle's beam search at the largest batch."""
    from int8mt.runtime.search import SearchOptions
    from int8mt.runtime.translator import Translator

    rows = []
    for batch in batch_sizes:
        translator = Translator(bundle_dir, SearchOptions(beam_size=1), batch_size=batch)
        t0 = time.perf_counter()
        hyps = translator.translate(sources, progress=True)
        rows.append(_row("int8mt bundle", "greedy", batch, hyps, references, time.perf_counter() - t0))
    translator = Translator(bundle_dir, SearchOptions(beam_size=beam_size), batch_size=max(batch_sizes))
    t0 = time.perf_counter()
    hyps = translator.translate(sources, progress=True)
    rows.append(_row("int8mt bundle", f"beam {beam_size}", max(batch_sizes), hyps, references,
                     time.perf_counter() - t0))
    if model_dir is not None:
        import torch

        from int8mt.model.checkpoint import load_model_dir
        from int8mt.model.generate import translate_greedy
        from int8mt.tokenizer import Tokenizer

        model, tok = load_model_dir(model_dir), Tokenizer(Path(model_dir) / "spm.model")
        for batch in batch_sizes:
            t0 = time.perf_counter()
            with torch.inference_mode():
                hyps = translate_greedy(model, tok, sources, model.cfg.max_positions, batch)
            rows.append(_row(f"PyTorch {torch.__version__} eager", "greedy", batch, hyps, references,
                             time.perf_counter() - t0))
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
