"""Translation quality: corpus BLEU with sacreBLEU's defaults (cased, 13a tokenization)."""
from __future__ import annotations

import sacrebleu


def corpus_bleu(hyps: list[str], refs: list[str]) -> float:
    return sacrebleu.corpus_bleu(hyps, [refs]).score
