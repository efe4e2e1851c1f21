"""Tokenizers used by training and by the runtime: our joint SentencePiece vocabulary (``spm.model``), and
the Hugging Face Marian / OPUS-MT layout (``source.spm``, ``target.spm``, ``vocab.json``), read without
``transformers`` and encoding and decoding as its ``MarianTokenizer`` does."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import sentencepiece as spm

from int8mt.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
JOINT_SPM = "spm.model"
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")  # plus target_vocab.json with separate vocabularies
MARIAN_OPTIONAL = ("target_vocab.json", "tokenizer_config.json")


def train_joint_vocabulary(files: Sequence[Path], model_prefix: Path, vocab_size: int = 8000,
                           seed_sentences: int = 1_000_000) -> Path:
    """Train one unigram SentencePiece model on all ``files`` (source and target sides together)."""
    import sentencepiece as spm

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, input_sentence_size=seed_sentences,
        shuffle_input_sentence=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=2, minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def _load_spm(path: Path) -> spm.SentencePieceProcessor:
    import sentencepiece as spm  # (here: a process translating token ids holds 1.3 MiB less)

    if not path.is_file():
        raise UserError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as err:
        raise UserError(f"{path} is not a valid SentencePiece model ({err}); restore the file from the model "
                        "directory, or compile the bundle again") from None
    return sp


class Tokenizer:
    """Our joint SentencePiece vocabulary (``spm.model``): text -> ids ending in EOS, ids -> text (stops at
    EOS, skips specials). Source and target sides share it."""

    kind = "sentencepiece"
    target_languages: tuple[str, ...] = ()

    def __init__(self, model_file: Path | str) -> None:
        self._sp = _load_spm(Path(model_file))
        self.files = (Path(model_file),)
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, max_tokens: int | None = None, target_lang: str | None = None) -> list[int]:
        """Ids of ``text`` plus EOS; truncated to ``max_tokens`` (EOS kept) when given."""
        check_target_lang(self, target_lang)
        return _with_eos(self._sp.encode(text), self.eos_id, max_tokens)

    def encode_target(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Ids of a target-side ``text`` plus EOS (for teacher forcing)."""
        return self.encode(text, max_tokens)

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


def _with_eos(ids: list[int], eos_id: int, max_tokens: int | None) -> list[int]:
    if max_tokens is not None and len(ids) + 1 > max_tokens:
        ids = ids[: max_tokens - 1]
    return ids + [eos_id]


_LANGUAGE_CODE = re.compile(r"^>>.+<<$")


def starts_with_language_token(text: str) -> bool:
    """True if ``text`` begins with a ``>>xx<<`` target-language token (read as one token, as transformers does)."""
    return text.startswith(">>") and text.find("<<") != -1


def check_target_lang(tokenizer: "Tokenizer | MarianTokenizer", target_lang: str | None, text: str = "") -> None:
    """Refuse a target language the vocabulary has no token for, and a missing one where the model needs one
    (its vocabulary has ``>>xx<<`` tokens and ``text`` does not start with one)."""
    valid = tokenizer.target_languages
    names = ", ".join(token[2:-2] for token in valid)
    if target_lang is None:
        if valid and text and not starts_with_language_token(text):
            raise UserError(f"this model translates into several languages and needs a target language: "
                            f"pass --target-lang with one of {names}")
        return
    if not valid:
        raise UserError(f"--target-lang {target_lang}: this model has no target-language tokens; leave it out")
    if language_token(target_lang) not in valid:
        raise UserError(f"--target-lang {target_lang} is not a language of this model; use one of {names}")


def language_token(target_lang: str) -> str:
    """``fra`` or ``>>fra<<`` -> ``>>fra<<``."""
    return target_lang if _LANGUAGE_CODE.match(target_lang) else f">>{target_lang}<<"


class MarianTokenizer:
    """The tokenizer of a Hugging Face Marian / OPUS-MT directory, as ``transformers.MarianTokenizer``
    encodes and decodes (``skip_special_tokens=True``):

    - source text is split at the special tokens' spellings (``</s>``, ``<unk>``, ``<pad>``); a ``>>xx<<``
      code at the start of each part is one token; the rest goes through ``source.spm``; pieces map to ids
      through ``vocab.json`` (pieces it lacks to ``<unk>``); ``</s>`` is appended;
    - target text (teacher forcing) likewise with ``target.spm`` (and ``target_vocab.json`` if separate);
    - output ids go back to pieces through the target vocabulary, specials dropped, and are joined by the
      *source* SentencePiece model when the vocabulary is shared (as ``transformers`` does), the target one
      otherwise.
    """

    kind = "marian"

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        missing = [f for f in MARIAN_FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{folder} lacks the Marian tokenizer files {missing}")
        settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        self.separate = bool(settings.get("separate_vocabs", False))
        self.files = tuple(folder / f for f in (*MARIAN_FILES, *MARIAN_OPTIONAL) if (folder / f).is_file())
        if self.separate and not (folder / "target_vocab.json").is_file():
            raise UserError(f"{folder / 'tokenizer_config.json'} says separate_vocabs, but target_vocab.json is "
                            "missing")
        self._source, self._target = _load_spm(folder / "source.spm"), _load_spm(folder / "target.spm")
        self._vocab = _read_vocab(folder / "vocab.json")
        self._target_vocab = _read_vocab(folder / "target_vocab.json") if self.separate else self._vocab
        self._pieces = {i: piece for piece, i in self._target_vocab.items()}
        names = {key: _token_name(settings.get(f"{key}_token"), default)
                 for key, default in (("unk", "<unk>"), ("eos", "</s>"), ("pad", "<pad>"))}
        for key, name in names.items():
            if name not in self._vocab:
                raise UserError(f"{folder / 'vocab.json'} has no {name!r} ({key}) token")
        self.unk_id, self.eos_id, self.pad_id = (self._vocab[names[k]] for k in ("unk", "eos", "pad"))
        self._target_unk = self._target_vocab.get(names["unk"], self.unk_id)
        self._target_eos = self._target_vocab.get(names["eos"], self.eos_id)
        self._special_names = tuple(names.values())
        self._special_split = re.compile("(" + "|".join(re.escape(n) for n in sorted(names.values(), key=len,
                                                                                       reverse=True)) + ")")
        self._special_ids = {self._target_vocab[n] for n in names.values() if n in self._target_vocab}
        self.target_languages = tuple(p for p in self._vocab if p.startswith(">>") and p.endswith("<<"))

    def encode(self, text: str, max_tokens: int | None = None, target_lang: str | None = None) -> list[int]:
        """Ids of source ``text`` (preceded by the ``target_lang`` token if given) plus ``</s>``."""
        check_target_lang(self, target_lang)
        prefix = [self._vocab[language_token(target_lang)]] if target_lang is not None else []
        return _with_eos(prefix + self._ids(text, self._source, self._vocab, self.unk_id), self.eos_id, max_tokens)

    def encode_target(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Ids of target ``text`` plus ``</s>`` (for teacher forcing)."""
        return _with_eos(self._ids(text, self._target, self._target_vocab, self._target_unk), self._target_eos,
                         max_tokens)

    def encode_batch(self, texts: Iterable[str], max_tokens: int | None = None) -> list[list[int]]:
        return [self.encode(t, max_tokens) for t in texts]

    def _ids(self, text: str, sp: spm.SentencePieceProcessor, vocab: dict[str, int], unk: int) -> list[int]:
        ids: list[int] = []
        for part in self._special_split.split(text):
            if not part:
                continue
            if part in self._special_names:
                ids.append(vocab[part] if part in vocab else unk)
                continue
            if part.startswith(">>") and (end := part.find("<<")) != -1:
                code, part = part[:end + 2], part[end + 2:]
                ids.append(vocab.get(code, unk))
            ids.extend(vocab.get(piece, unk) for piece in sp.encode(part, out_type=str))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of target ``ids``, the special tokens dropped."""
        sp = self._target if self.separate else self._source
        pieces = []
        for i in ids:
            i = int(i)
            if i not in self._special_ids:
                piece = self._pieces.get(i) or (sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else "")
                pieces.append(piece or self._special_names[0])  # the <unk> spelling, as transformers does
        return sp.decode_pieces(pieces).replace("\u2581", " ").strip()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise UserError(f"{path} must map pieces to integer ids")
    return vocab


def _token_name(value: object, default: str) -> str:
    """A special token's spelling in ``tokenizer_config.json``: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


TOKENIZER_KINDS = (Tokenizer.kind, MarianTokenizer.kind)  # the manifest's "tokenizer" values


def load_tokenizer(folder: Path | str, kind: str | None = None) -> Tokenizer | MarianTokenizer:
    """The tokenizer of a model directory or bundle: ``kind`` ``sentencepiece`` (our ``spm.model``) or
    ``marian`` (the OPUS-MT files); None = whichever the folder has."""
    folder = Path(folder)
    if kind == Tokenizer.kind or kind is None and (folder / JOINT_SPM).is_file():
        return Tokenizer(folder / JOINT_SPM)
    if kind == MarianTokenizer.kind or kind is None and (folder / MARIAN_FILES[0]).is_file():
        return MarianTokenizer(folder)
    raise UserError(f"{folder} has no tokenizer: it needs {JOINT_SPM}, or the Marian files {', '.join(MARIAN_FILES)}")
