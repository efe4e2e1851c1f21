"""Hugging Face Marian (OPUS-MT layout) model directories built for tests, as a downloaded one looks:
``config.json``, ``model.safetensors``, ``source.spm``, ``target.spm``, ``vocab.json`` (and
``target_vocab.json`` with separate vocabularies), ``tokenizer_config.json``; saved with
``save_pretrained``. Random weights, SentencePiece models trained on Multi30k."""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
LANGUAGE_CODES = (">>deu<<", ">>fra<<", ">>spa<<")


def _train_spm(text_file: Path, prefix: Path, vocab_size: int) -> Path:
    # Marian's SentencePiece models: <unk> 0, <s> 1, </s> 2, no padding piece
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, num_threads=2, minloglevel=2,
                                   shuffle_input_sentence=False)
    return prefix.with_suffix(".model")


def _pieces(model: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]


def _vocabulary(pieces: list[str], codes: tuple[str, ...]) -> dict[str, int]:
    """OPUS-MT order: </s>, <unk>, language codes, pieces, <pad> last."""
    vocab: dict[str, int] = {}
    for piece in ["</s>", "<unk>", *codes, *pieces]:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


def build_marian_dir(out: Path, kind: str = "shared", seed: int = 0, d_model: int = 64, layers: int = 2,
                     heads: int = 4, ffn_dim: int = 128, pieces: int = 600, init_std: float = 0.4,
                     eos_bias: float = 8.5) -> Path:
    """A MarianMT directory in ``out``. ``kind``: ``shared`` (one vocabulary and embedding, like
    opus-mt-en-de), ``separate`` (separate vocabularies and embeddings, like opus-mt-tc-big) or
    ``multilingual`` (shared, with ``>>xx<<`` target-language tokens, like opus-mt-en-ROMANCE); ``separate``
    also has its own output projection."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    work = out / ".spm"
    work.mkdir(exist_ok=True)
    src_model = _train_spm(DATA_DIR / "train.en", work / "source", pieces)
    separate = kind == "separate"
    tgt_model = _train_spm(DATA_DIR / "train.de", work / "target", pieces)
    codes = LANGUAGE_CODES if kind == "multilingual" else ()
    if separate:
        src_vocab, tgt_vocab = _vocabulary(_pieces(src_model), ()), _vocabulary(_pieces(tgt_model), ())
    else:
        src_vocab = tgt_vocab = _vocabulary(_pieces(src_model) + _pieces(tgt_model), codes)
    (work / "vocab.json").write_text(json.dumps(src_vocab, ensure_ascii=False))
    (work / "target_vocab.json").write_text(json.dumps(tgt_vocab, ensure_ascii=False))
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(src_model), target_spm=str(tgt_model), vocab=str(work / "vocab.json"),
        target_vocab_file=str(work / "target_vocab.json") if separate else None, separate_vocabs=separate,
        source_lang="en", target_lang="de")
    pad = src_vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(src_vocab), decoder_vocab_size=len(tgt_vocab), d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, max_position_embeddings=128, pad_token_id=pad,
        eos_token_id=0, decoder_start_token_id=tgt_vocab["<pad>"], forced_eos_token_id=0,
        share_encoder_decoder_embeddings=not separate, tie_word_embeddings=not separate, init_std=init_std,
        activation_function="swish", scale_embedding=True)
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.5)
        model.final_logits_bias[0, 0] = eos_bias  # sentences of varied lengths: </s> competes with the pieces
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return out
