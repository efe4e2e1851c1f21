"""Translate a test set with a bundle: sacreBLEU and sentences per second."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import sacrebleu

from int8mt.errors import UserError
from int8mt.runtime.translator import Translator


@dataclass
class EvalResult:
    bundle: str
    sentences: int
    beam_size: int
    batch_size: int
    bleu: float
    bleu_signature: str
    seconds: float
    sentences_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(translator: Translator, sources: list[str], references: list[str]) -> tuple[EvalResult, list[str]]:
    if len(sources) != len(references):
        raise UserError(f"{len(sources)} source lines but {len(references)} reference lines")
    if not sources:
        raise UserError("the source file is empty")
    t0 = time.perf_counter()
    hyps = translator.translate(sources, progress=True)
    seconds = time.perf_counter() - t0
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hyps, [references])
    result = EvalResult(str(translator.bundle.path), len(sources), translator.options.beam_size, translator.batch_size,
                        round(score.score, 2), str(metric.get_signature()), round(seconds, 2),
                        round(len(sources) / seconds, 2))
    return result, hyps
