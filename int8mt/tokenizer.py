"""Joint SentencePiece vocabulary: training, and the encode/decode used by training and runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from int8mt.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_joint_vocabulary(files: Sequence[Path], model_prefix: Path, vocab_size: int = 8000,
                           seed_sentences: int = 1_000_000) -> Path:
    """Train one unigram SentencePiece model on all ``files`` (source and target sides together)."""
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, input_sentence_size=seed_sentences,
        shuffle_input_sentence=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=2, minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


class Tokenizer:
    """SentencePiece wrapper: text -> ids ending in EOS, ids -> text (stops at EOS, skips specials)."""

    def __init__(self, model_file: Path | str) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(str(path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path} is not a valid SentencePiece model ({err}); re-create the bundle") from None
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Ids of ``text`` plus EOS; truncated to ``max_tokens`` (EOS kept) when given."""
        ids = self._sp.encode(text)
        if max_tokens is not None and len(ids) + 1 > max_tokens:
            ids = ids[: max_tokens - 1]
        return ids + [self.eos_id]

    def encode_batch(self, texts: Iterable[str], max_tokens: int | None = None) -> list[list[int]]:
        return [self.encode(t, max_tokens) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self._sp.decode(out)
